"""ArviZ export: one :func:`to_inference_data` for numpyro MCMC, BlackJAX runs, PGAS
and EM.

Groups written:

* ``posterior``: every parameter site, the states ``x`` (``x_1`` and ``x`` joined into
  one variable with dims ``(chain, draw, [sequence,] time, state)``) and the
  non-centred innovations when sampled; named dims and coordinates (``time``,
  ``state``, ``obs_dim``, ``input_dim``, ``sequence``);
* ``sample_stats``: ``diverging``, ``lp`` (= minus the potential energy), ``energy``,
  ``step_size``, ``n_steps``, ``tree_depth``, ``acceptance_rate`` for samplers; for EM
  the log-marginal trace ``log_marginal`` over ``em_iteration``;
* ``observed_data``: ``y`` (NaN = missing);
* ``log_likelihood``: ``y`` per time step. For draws of the parameters only
  (marginalised NUTS, EM, BlackJAX on a marginalised model) the one-step-ahead
  predictive log-densities ``log p(y_t | y_{1:t-1}, theta)``, which sum to the marginal
  log-likelihood of each draw (from the E-step: exact for the Kalman smoother, the
  particle filter's factors otherwise); for latent-state draws ``log p(y_t | x_t,
  theta)`` at the sampled states, from the model's own emission (any family). Use
  leave-future-out rather than LOO for time series: the pointwise terms are not
  conditionally independent given ``theta``;
* on request, ``posterior_predictive`` (replicated ``y``) and ``predictions``
  (forecasts over ``forecast_time``), see :mod:`ppl_dyn.predictive`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ppl_dyn._version import __version__
from ppl_dyn.draws import (
    _e_step_of,
    _per_draw,
    _sites,
    _spec_of,
    _tree_depth_from_steps,
    draws_of,
    emission_log_probs,
    one_step_log_probs,
)
from ppl_dyn.predictive import forecast as _fc
from ppl_dyn.predictive import posterior_predictive as _pp
from ppl_dyn.state_space import innovations_name, one_step_log_prob_name

__all__ = ["to_inference_data"]


def to_inference_data(
    source,
    *,
    model=None,
    e_step=None,
    log_likelihood: Optional[bool] = None,
    posterior_predictive: bool = False,
    forecast_steps: int = 0,
    u_future=None,
    rng_key=None,
    coords: Optional[dict] = None,
    dims: Optional[dict] = None,
    **model_kwargs,
):
    """Convert a numpyro ``MCMC``, a :class:`~ppl_dyn.mcmc.BlackJAXRun`, a
    :class:`~ppl_dyn.infer.PGASResult` or an :class:`~ppl_dyn.infer.EMResult` to
    ``arviz.InferenceData``.

    Args:
        source: the fitted object.
        model, **model_kwargs: the model and its keyword arguments; needed for an
            ``EMResult`` (which does not record them), taken from the object otherwise.
        e_step: E-step for the one-step-ahead log-densities (default: the marginalising
            E-step, the Kalman smoother, or the extended Kalman smoother for nonlinear
            built-in models).
        log_likelihood: write the ``log_likelihood`` group. Default (None): yes for
            posterior draws; for a one-draw point estimate (EM, SGD, online EM) the
            per-step log-densities go to ``sample_stats`` (``y_one_step_log_prob``)
            instead, so that ``az.loo``/``az.compare``, which need posterior draws,
            refuse it ("log likelihood not found") rather than fail inside PSIS; pass
            True to write the group anyway.
        posterior_predictive: write the ``posterior_predictive`` group (one simulated
            path per posterior draw; 200 paths for a point estimate).
        forecast_steps: when > 0, write forecasts of that many steps to ``predictions``
            and, as ``y_forecast``, to ``posterior_predictive``, where
            ``az.plot_ts(idata, y="y", y_hat="y", y_forecasts="y_forecast",
            plot_dim="time", holdout_dim="forecast_time")`` finds them (``u_future``
            for models with inputs).
        rng_key: PRNG key for the posterior predictive and forecasts.
        coords, dims: ArviZ coordinates and dimension names, merged over the defaults
            (e.g. ``coords={"time": dates}``; the defaults are ``time``, ``state``,
            ``obs_dim``, ``input_dim``, ``sequence``, ``forecast_time`` and ``*_col`` for
            the columns of square matrices, the same in every group).

    Example:
        >>> idata = ppl_dyn.to_inference_data(mcmc)        # doctest: +SKIP
        >>> az.summary(idata, var_names=["A", "Q"])          # doctest: +SKIP
    """
    import arviz as az
    import jax

    from ppl_dyn.infer.pgas import PGASResult

    coords_arg, dims_arg = coords, dims

    states = None
    pgas = isinstance(source, PGASResult)
    if pgas:  # the parameter draws as a dict of draws; the state paths join below
        model = source.model if model is None else model
        model_kwargs = {**source.model_kwargs, **model_kwargs}
        states, source = source.states, source.samples
    draws = draws_of(source, model, model_kwargs)
    if pgas:
        draws = draws._replace(kind="pgas")
    spec = _spec_of(draws)
    samples = {k: np.asarray(v) for k, v in draws.samples.items()}
    S, T, dx, dy = spec.num_sequences, spec.num_steps, spec.state_dim, spec.obs_dim
    du = int(spec.u.shape[-1])
    seq = ("sequence",) if spec.batched else ()
    lp_name = one_step_log_prob_name(spec)

    # ---- posterior -------------------------------------------------------------------
    step_lp = samples.pop(lp_name, None)
    post = _join_states(samples, spec)
    if states is not None:
        post[spec.state_name] = np.asarray(states)
    dims = {k: _dims(k, v.shape[2:], spec) for k, v in post.items()}
    dims = {k: v for k, v in dims.items() if v is not None}

    # ---- sample_stats ----------------------------------------------------------------
    stats = _sample_stats(draws, _tree_depth_from_steps)
    stat_dims = {}
    if draws.kind == "em":
        stats = {
            "log_marginal": np.asarray(source.log_marginals)[None, None],
            "converged": np.full((1, 1), bool(source.converged)),
        }
        stat_dims["log_marginal"] = ["em_iteration"]

    # ---- data and log-likelihood ---------------------------------------------------
    observed = None
    y = None if spec.y is None else np.asarray(spec.y if spec.batched else spec.y[0])
    if y is not None:
        observed = {spec.obs_name: y}
        dims[spec.obs_name] = list(seq) + ["time", "obs_dim"]
    loglik = None
    point = draws.kind == "em"  # one draw: a point estimate
    if log_likelihood is None:
        log_likelihood = True
        if point and y is not None:
            log_likelihood, loglik_to_stats = False, True
        else:
            loglik_to_stats = False
    else:
        loglik_to_stats = False
    if (log_likelihood or loglik_to_stats) and y is not None:
        if step_lp is None and f"{spec.state_name}_1" in draws.samples and e_step is None:
            # latent-state draws: log p(y_t | x_t, theta) at the sampled states (any
            # emission; what NumPyro's log_likelihood gives for the observation sites)

            step_lp = np.asarray(emission_log_probs(draws_as_dict(draws), **_mk(draws)))
        if step_lp is None:
            step_lp = np.asarray(one_step_log_probs(draws_as_dict(draws), e_step, **_mk(draws)))
        loglik_dims = list(seq) + ["time"]
        if loglik_to_stats:
            stats[lp_name] = step_lp
            stat_dims[lp_name] = loglik_dims
        else:
            loglik = {spec.obs_name: step_lp}
    pp = preds = None
    if posterior_predictive or forecast_steps:
        from ppl_dyn._validation import check_rng_key

        check_rng_key(rng_key)
        k_pp, k_fc = jax.random.split(rng_key)
        e = _e_step_of(draws.model, e_step, spec)
        # one path per posterior draw; a point estimate gets 200 paths (its predictive
        # groups then have 200 draws, what az.plot_ppc / az.plot_ts sample from)
        paths = 200 if point else 1
        if posterior_predictive:
            bands = _pp(k_pp, draws_as_dict(draws), e_step=e, num_paths=paths, **_mk(draws))
            pp = {spec.obs_name: bands.samples}
        if forecast_steps:
            bands = _fc(
                k_fc,
                draws_as_dict(draws),
                forecast_steps,
                e_step=e,
                u_future=u_future,
                num_paths=paths,
                **_mk(draws),
            )
            preds = {spec.obs_name: bands.samples}
            pp = {**(pp or {}), f"{spec.obs_name}_forecast": bands.samples}
            dims[f"{spec.obs_name}_forecast"] = list(seq) + ["forecast_time", "obs_dim"]

    default_coords = {
        "time": np.arange(T),
        "state": np.arange(dx),
        "state_col": np.arange(dx),
        "obs_dim": np.arange(dy),
        "obs_dim_col": np.arange(dy),
    }
    coords = default_coords
    if du:
        coords["input_dim"] = np.arange(du)
    if spec.batched:
        coords["sequence"] = np.arange(S)
    if forecast_steps:
        # (arviz 0.23 builds the predictions group with `coords`, not `pred_coords`)
        coords["forecast_time"] = np.arange(T, T + forecast_steps)
    coords = {**coords, **(coords_arg or {})}
    dims = {**dims, **(dims_arg or {})}
    constant = None
    if du:  # the inputs the draws condition on
        u = np.asarray(spec.u if spec.batched else spec.u[0])
        constant = {"u": u}
        dims.setdefault("u", list(seq) + ["time", "input_dim"])
    if loglik is not None:
        # log_likelihood vars share the observed variable's name; its dims differ
        loglik_group = az.from_dict(
            log_likelihood=loglik, coords=coords, dims={spec.obs_name: loglik_dims}
        )
    idata = az.from_dict(
        posterior=post,
        sample_stats=stats or None,
        observed_data=observed,
        constant_data=constant,
        posterior_predictive=pp,
        predictions=preds,
        coords=coords,
        dims={**dims, **stat_dims},
        pred_dims={spec.obs_name: list(seq) + ["forecast_time", "obs_dim"]},
        pred_coords=coords,
        attrs=_attrs(draws, point),
    )
    if loglik is not None:
        idata.extend(loglik_group)
    return idata


def _attrs(draws, point: bool) -> dict:

    attrs = {
        "inference_library": draws.kind,
        "ppl_dyn_model": _model_name(draws.model),
        "ppl_dyn_version": __version__,
    }
    if point:
        attrs["ppl_dyn_note"] = (
            "one draw (a point estimate): LOO and WAIC need posterior draws; the "
            "one-step-ahead log-densities are in sample_stats"
        )
    return attrs


def draws_as_dict(draws):
    """The draws' samples (for the helpers that accept a dict of draws)."""
    return draws.samples


def _mk(draws) -> dict:
    return {"model": draws.model, **draws.model_kwargs}


def _model_name(model) -> str:
    fn = model
    while hasattr(fn, "fn") and not hasattr(fn, "__name__"):
        fn = fn.fn
    return getattr(fn, "__name__", type(fn).__name__)


def _join_states(samples: dict, spec) -> dict:
    """Join ``x_1`` ``(c, d, S, dx)`` and ``x`` ``(c, d, T-1, S, dx)`` into ``x``
    ``(c, d, [S,] T, dx)``."""
    name1, name = f"{spec.state_name}_1", spec.state_name
    out = dict(samples)
    if name1 not in out:
        return out
    x1 = out.pop(name1)[:, :, None]
    parts = [x1] if spec.num_steps == 1 else [x1, out.pop(name)]
    xs = np.concatenate(parts, axis=2)  # (c, d, T, S, dx)
    xs = np.moveaxis(xs, 3, 2)  # (c, d, S, T, dx)
    out[name] = xs if spec.batched else xs[:, :, 0]
    return out


def _role_dims(spec) -> dict:
    st = spec.structure
    if st is None:
        return {}
    dx, dy = spec.state_dim, spec.obs_dim
    roles: dict = {}
    for reg, row, row_col in (
        (st.dynamics, "state", "state_col"),
        (st.emission, "obs_dim", "obs_dim_col"),
    ):
        feature = "state" if reg.feature_map.elementwise else f"{reg.weight}_feature"
        if reg is st.dynamics and feature == "state":
            feature = "state_col"
        roles[reg.weight] = [row, feature]
        if reg.input_weight:
            roles[reg.input_weight] = [row, "input_dim"]
        if reg.bias:
            roles[reg.bias] = [row]
        roles[reg.noise] = [row] if reg.diagonal_noise else [row, row_col]
    roles[st.init_mean] = ["state"]
    roles[st.init_cov] = ["state"] if st.diagonal_init else ["state", "state_col"]
    del dx, dy
    return roles


def _dims(name: str, shape: tuple, spec) -> Optional[list]:
    seq = ["sequence"] if spec.batched else []
    if name in (spec.state_name, innovations_name(spec)):
        return seq + ["time", "state"]
    sizes = {
        "state": spec.state_dim,
        "obs_dim": spec.obs_dim,
        "input_dim": int(spec.u.shape[-1]),
    }
    role = _role_dims(spec).get(name)
    if role is not None and len(role) == len(shape):
        if all(sizes.get(d.replace("_col", ""), n) == n for d, n in zip(role, shape, strict=True)):
            return role
    # other sites: name an axis only when its size matches exactly one known size
    dims = []
    for i, n in enumerate(shape):
        hits = [d for d, size in sizes.items() if size == n]
        if len(hits) == 1 and hits[0] not in dims:
            dims.append(hits[0])
        elif len(hits) == 1 and f"{hits[0]}_col" not in dims:
            dims.append(f"{hits[0]}_col")
        else:
            dims.append(f"{name}_dim_{i}")
    return dims if shape else None


def _sample_stats(draws, tree_depth_fn) -> dict:
    """Sampler statistics named as ArviZ expects (``lp = -potential_energy``)."""
    st = {k: np.asarray(v) for k, v in draws.stats.items()}
    if draws.kind == "blackjax":
        return st
    if draws.kind != "numpyro":
        return {}
    out = {}
    rename = {
        "diverging": "diverging",
        "energy": "energy",
        "accept_prob": "acceptance_rate",
        "adapt_state.step_size": "step_size",
        "num_steps": "n_steps",
    }
    for k, v in st.items():
        if k == "potential_energy":
            out["lp"] = -v
        elif k in rename:
            out[rename[k]] = v
    if "n_steps" in out:
        out["tree_depth"] = tree_depth_fn(out["n_steps"])
    if "lp" not in out:
        out["lp"] = _recompute_lp(draws)
    return out


def _recompute_lp(draws) -> np.ndarray:
    """``-potential_energy`` at the constrained draws (when MCMC did not record it)."""
    import jax
    from numpyro.infer.util import potential_energy, unconstrain_fn

    model, kw = draws.model, draws.model_kwargs

    def fn(params):
        z = unconstrain_fn(model, (), kw, params)
        return -potential_energy(model, (), kw, z)

    latent = _latent_names(draws)
    sub = draws._replace(samples={k: draws.samples[k] for k in latent})
    return np.asarray(_per_draw(jax.tree_util.Partial(fn), sub))


def _latent_names(draws) -> list:

    first = {k: v[0, 0] for k, v in draws.samples.items()}
    sites = _sites(draws.model, first, draws.model_kwargs)
    return [k for k, st in sites.items() if not st.observed and k in draws.samples]
