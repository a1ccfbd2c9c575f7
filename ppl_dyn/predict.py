"""k-step-ahead prediction from a filter's state estimate.

For every time ``t`` a filter gives ``p(x_t | y_{1:t})``: the Kalman filter, exact, for
linear-Gaussian models (proved from the model, :mod:`ppl_dyn.requirements`), a bootstrap
particle filter otherwise, or the filter of an E-step you pass (``e_step=``, e.g. the
extended Kalman smoother's). The forecast of ``y_{t+k}`` is then made either

* ``method="rollout"`` (the seed's predictor): start at the filtered mean and iterate the
  noise-free dynamics ``x <- E[x_{t+1} | x]``, read out ``E[y | x]`` (for a linear model
  this is the exact predictive mean); or
* ``method="particles"``: propagate draws of the filtered state (the weighted particles,
  or draws from the Gaussian filter) ``k`` steps with process noise and average the
  emission means; bands are quantiles of simulated observations.

A particle filter whose effective sample size collapses gives forecasts that look
confident and are wrong; :func:`predict` warns when it happens and says what to do.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.smc import resampling as bj_resampling

from ppl_dyn._validation import check_rng_key
from ppl_dyn.infer import _linalg as la
from ppl_dyn.infer._compile import cached_program, jit_model
from ppl_dyn.infer._run import split_static, static_items, validate_data
from ppl_dyn.infer.particle import particle_filter
from ppl_dyn.requirements import UnsupportedModelError, linear_gaussian_form
from ppl_dyn.state_space import bind


class Prediction(NamedTuple):
    """Forecasts keyed by horizon ``k``: ``mean[k][t]`` predicts ``y_{t+k}`` from
    ``y_{1:t}`` (0-based ``t``; rows with ``t + k >= T`` forecast beyond the data).

    ``lower``/``upper`` are the 2.5% / 97.5% quantiles of simulated observations
    (``method="particles"`` only, else None). Arrays have a leading sequence axis when
    ``y`` had one.
    """

    horizons: tuple
    mean: dict
    lower: Optional[dict]
    upper: Optional[dict]
    filtered_means: jax.Array
    log_marginal: jax.Array
    filter: str = "particle"  # "kalman", "particle" or the E-step's class name
    min_ess: Optional[jax.Array] = None  # the particle filter's smallest ESS per sequence


def predict(
    params: dict,
    model,
    *,
    y,
    rng_key,
    horizons: Sequence[int] = (1, 5, 10),
    method: str = "rollout",
    num_particles: int = 1000,
    e_step=None,
    **model_kwargs,
) -> Prediction:
    """Filter ``y`` with the model at ``params`` and forecast ``horizons`` steps ahead.

    Args:
        params: values of the model's parameter sites.
        model: the model function.
        y, **model_kwargs: the data and the model's other arguments.
        rng_key: PRNG key (required).
        horizons: the steps ahead ``k``.
        method: ``"rollout"`` (noise-free dynamics from the filtered mean) or
            ``"particles"`` (simulated paths with their noise: means and 95% bands).
        num_particles: particles of the particle filter, and paths of
            ``method="particles"``.
        e_step: the filter to use: None picks the Kalman filter (exact) for
            linear-Gaussian models and a bootstrap particle filter otherwise; a Gaussian
            E-step (``KalmanSmoother()``, ``ExtendedKalmanSmoother()``) uses its filtered
            moments.

    Example:
        >>> pred = ppl_dyn.predict(params, tanh_rnn, y=y_test, horizons=(1, 5, 10),
        ...                        state_dim=5, rng_key=jax.random.key(0))  # doctest: +SKIP
        >>> prediction_rmse(pred, y_test)                                   # doctest: +SKIP
    """
    from ppl_dyn.infer._run import prepare_eager
    from ppl_dyn.infer.kalman import KalmanSmoother

    check_rng_key(rng_key)
    if method not in ("rollout", "particles"):
        raise ValueError(f"method must be 'rollout' or 'particles'; got {method!r}")
    horizons = tuple(int(k) for k in horizons)
    if not horizons or min(horizons) < 1:
        raise ValueError(f"horizons must be positive ints; got {horizons}")
    ss, spec = prepare_eager(model, params, (), dict(model_kwargs, y=y))
    K = max(horizons)
    if e_step is None:
        try:
            linear_gaussian_form(ss, dtype=spec.y.dtype)
            e_step = KalmanSmoother()  # exact filtering for a linear-Gaussian model
        except UnsupportedModelError:
            e_step = None  # the bootstrap particle filter below
    if e_step is not None and not callable(getattr(e_step, "posterior", None)):
        raise ValueError(f"e_step must be an E-step; got {e_step!r}")
    gaussian = e_step is not None
    if gaussian and getattr(e_step, "deterministic", True) is False:
        gaussian = False  # a particle E-step: use the bootstrap filter here
    name = "particle" if not gaussian else (
        "kalman" if type(e_step).__name__ == "KalmanSmoother" else type(e_step).__name__
    )  # fmt: skip

    dynamic, static = split_static(validate_data(dict(model_kwargs, y=y)))
    config = (method, K, int(num_particles), gaussian)
    args = (model, e_step if gaussian else None, static_items(static), config)
    fn = cached_program(("predictor",) + args, lambda: _make_predictor(*args))
    m, means, lo, hi, lm, min_ess = fn(rng_key, dict(params), dynamic)
    if not gaussian:
        _warn_if_degenerate(np.asarray(min_ess), num_particles)

    def pick(a):
        if a is None:
            return None
        out = {k: a[:, k - 1] for k in horizons}  # a: (S, K, T, dy)
        return out if spec.batched else {k: v[0] for k, v in out.items()}

    if not spec.batched:
        m, lm, min_ess = m[0], lm[0], min_ess[0]
    return Prediction(
        horizons, pick(means), pick(lo), pick(hi), m, lm, name, None if gaussian else min_ess
    )


def _make_predictor(model, e_step, static_items, config):
    """The compiled prediction program ``(key, params, dynamic) -> filtered means,
    forecasts (S, K, T, dy), bands or None, log-marginals, smallest ESS``: one per model,
    filter, static arguments and sizes (JAX's cache keys the shapes)."""
    method, K, num_particles, gaussian = config
    static = dict(static_items)

    def run(key, params, dynamic):
        ss, spec = bind(model, params, **static, **dynamic)
        y_all, u_all = spec.y, spec.u
        k_f, k_p = jax.random.split(key)
        if gaussian:
            post = e_step.posterior(k_f, ss, y_all, u_all)
        else:
            post = None

        def one(key_s, y_s, u_s, s):
            k_pf, k_s = jax.random.split(key_s)
            T = y_s.shape[0]
            if post is None:
                filt = particle_filter(k_pf, ss, y_s, u_s, num_particles)
                w = jnp.exp(filt.log_weights)  # (T, N)
                m = jnp.einsum("tn,tnd->td", w, filt.particles)
                lm, min_ess = filt.log_marginal, jnp.min(filt.ess)
            else:
                m = post.filtered_means[s]
                lm, min_ess = post.log_marginal[s], jnp.asarray(jnp.inf, m.dtype)
            t_idx = jnp.arange(T)

            def u_at(k):
                return u_s[jnp.minimum(t_idx + k, T - 1)]  # (T, du)

            if method == "rollout":
                x, outs = m, []
                for k in range(1, K + 1):
                    x = ss.transition_mean(x, u_at(k))
                    outs.append(ss.emission_mean(x, u_at(k)))
                return m, jnp.stack(outs), None, None, lm, min_ess
            if post is None:
                # systematic resampling of the filter particles at every t (a
                # categorical draw of N indices would cost N x N Gumbel variates a step)
                idx = jax.vmap(lambda kk, ww: bj_resampling.systematic(kk, ww, num_particles))(
                    jax.random.split(k_s, T), w
                )
                x = jnp.take_along_axis(filt.particles, idx[..., None], axis=1)  # (T, N, dx)
            else:  # draws from the Gaussian filter
                L = la.cholesky(la.sym(post.filtered_covs[s]))  # (T, dx, dx)
                z = jax.random.normal(k_s, (T, num_particles, m.shape[-1]), m.dtype)
                x = m[:, None, :] + jnp.einsum("tij,tnj->tni", L, z)
            keys = jax.random.split(k_p, 2 * K)
            means, lo, hi = [], [], []
            for k in range(1, K + 1):
                uk = u_at(k)[:, None, :]
                x = ss.transition(x, uk).sample(keys[2 * k - 2])
                em = ss.emission(x, uk)
                means.append(jnp.mean(em.mean, axis=1))
                ysim = em.sample(keys[2 * k - 1])
                lo.append(jnp.quantile(ysim, 0.025, axis=1))
                hi.append(jnp.quantile(ysim, 0.975, axis=1))
            return m, jnp.stack(means), jnp.stack(lo), jnp.stack(hi), lm, min_ess

        S = y_all.shape[0]
        keys = jax.random.split(k_p, S)
        return jax.vmap(one)(keys, y_all, u_all, jnp.arange(S))

    return jit_model(run, e_step)


def _warn_if_degenerate(min_ess: np.ndarray, num_particles: int) -> None:
    """Warn when the particle filter's effective sample size fell to a handful of
    particles: its filtered states, and so the forecasts, rest on one or two paths."""
    worst = float(np.min(min_ess))
    if worst < max(2.0, 0.01 * num_particles):
        warnings.warn(
            f"the particle filter degenerated: its effective sample size fell to "
            f"{worst:.1f} of {num_particles} particles, so the forecasts rest on one or two "
            "paths. Increase num_particles, pass a Gaussian filter (e_step=KalmanSmoother() "
            "for a linear-Gaussian model, ExtendedKalmanSmoother() for Gaussian noise), or "
            "check the fit (a tiny observation noise makes every particle but one "
            "impossible)",
            UserWarning,
            stacklevel=3,
        )


def prediction_rmse(pred: Prediction, y) -> dict:
    """Root-mean-square error of each horizon over all valid (observed) targets."""
    y = np.asarray(y, dtype=float)
    out = {}
    for k in pred.horizons:
        f = np.asarray(pred.mean[k])
        T = y.shape[-2]
        err = f[..., : T - k, :] - y[..., k:, :]
        out[k] = float(np.sqrt(np.nanmean(err**2)))
    return out
