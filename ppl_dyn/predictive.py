"""Posterior predictive checks and forecasts with bands, for every inference path.

One function per question, the same for an EM point estimate (``EMResult``), numpyro
``MCMC`` draws (latent-state or marginalised) and a BlackJAX run:

* :func:`posterior_predictive`: replicated data ``y_rep ~ p(y_rep | y)``: per parameter
  draw a path of states from ``p(x_{1:T} | y, theta)`` (the latent-state draw itself,
  or a joint draw from the smoother) and observations from the emission;
* :func:`forecast`: ``y_{T+1:T+k} ~ p(. | y_{1:T})``: per draw the filtered state at
  ``T`` (or the sampled ``x_T``), then the dynamics and emission with their noise.

Bands are pointwise quantiles of the simulated observations over parameter draws and
paths, so they include parameter uncertainty for MCMC and only the noise for EM.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ppl_dyn._validation import check_rng_key
from ppl_dyn.draws import _e_step_of, _per_draw, _spec_of, draws_of, sampled_states
from ppl_dyn.infer import _linalg as la
from ppl_dyn.infer.stats import sample_smoothed_paths
from ppl_dyn.state_space import bind

__all__ = ["PredictiveBands", "posterior_predictive", "forecast", "plot_bands"]


class PredictiveBands(NamedTuple):
    """Simulated observations and their pointwise summary.

    Attributes:
        time: time indices (0-based) of the rows: ``0..T-1`` for the posterior
            predictive, ``T..T+k-1`` for a forecast.
        mean: pointwise mean, ``([S,] n, obs_dim)``.
        lower, upper: pointwise ``(1 - level)/2`` and ``(1 + level)/2`` quantiles.
        level: the central probability of the band.
        samples: the simulated observations ``(chain, draw * num_paths, [S,] n, obs_dim)``.
    """

    time: np.ndarray
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    level: float
    samples: np.ndarray


def _prepare(source, model, e_step, model_kwargs):

    draws = draws_of(source, model, model_kwargs)
    if draws.model_kwargs.get("y") is None:
        raise ValueError("pass the observations y (the data the draws condition on)")
    spec = _spec_of(draws)
    return draws, _e_step_of(draws.model, e_step, spec), spec


def _num_paths(num_paths, lead):
    if num_paths is None:
        return max(1, 500 // int(np.prod(lead)))
    if not isinstance(num_paths, (int, np.integer)) or num_paths < 1:
        raise ValueError(f"num_paths must be a positive int; got {num_paths!r}")
    return int(num_paths)


def _bands(sims, time, level, batched):
    """sims: ``(chain, draw, paths, S, n, dy)`` -> PredictiveBands."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1); got {level!r}")
    sims = np.asarray(sims)
    c, d, p = sims.shape[:3]
    sims = sims.reshape((c, d * p) + sims.shape[3:])
    if not batched:
        sims = sims[:, :, 0]
    flat = sims.reshape((-1,) + sims.shape[2:])
    lo, hi = np.quantile(flat, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return PredictiveBands(np.asarray(time), flat.mean(0), lo, hi, float(level), sims)


def posterior_predictive(
    rng_key,
    source,
    *,
    model=None,
    e_step=None,
    num_paths: Optional[int] = None,
    level: float = 0.9,
    **model_kwargs,
) -> PredictiveBands:
    """Replicated observations ``y_rep`` for every draw of ``source``.

    Args:
        rng_key: PRNG key (required).
        source: numpyro ``MCMC``, :class:`~ppl_dyn.mcmc.BlackJAXRun`, ``EMResult`` or a
            dict of draws with leading ``(chain, draw)`` axes.
        model, **model_kwargs: the model and its arguments (needed for ``EMResult`` and
            dicts; MCMC objects record them).
        e_step: smoother used to draw state paths when the source has no state draws
            (default: the marginalising E-step or ``KalmanSmoother``).
        num_paths: simulated paths per draw (default: enough for ~500 in total).
        level: central probability of the bands.
    """

    check_rng_key(rng_key)
    draws, e, spec0 = _prepare(source, model, e_step, model_kwargs)
    lead = next(iter(draws.samples.values())).shape[:2]
    paths = _num_paths(num_paths, lead)
    keys = jax.random.split(rng_key, int(np.prod(lead)))
    kw = draws.model_kwargs

    def fn(params, key):
        ss, spec = bind(draws.model, params, **kw)
        k_x, k_y = jax.random.split(key)
        xs = sampled_states(params, spec)
        if xs is None:
            post = e.posterior(k_x, ss, spec.y, spec.u)
            xs = state_paths(k_x, post, paths)  # (paths, S, T, dx)
        else:
            xs = jnp.broadcast_to(xs, (paths,) + xs.shape)
        return ss.emission(xs, spec.u).sample(k_y)  # (paths, S, T, dy)

    sims = _per_draw(fn, draws, jnp.reshape(keys, lead + keys.shape[1:]))
    return _bands(sims, np.arange(spec0.num_steps), level, spec0.batched)


def forecast(
    rng_key,
    source,
    num_steps: int,
    *,
    model=None,
    e_step=None,
    u_future=None,
    num_paths: Optional[int] = None,
    level: float = 0.9,
    **model_kwargs,
) -> PredictiveBands:
    """Forecast ``y_{T+1}, ..., y_{T+num_steps}`` given ``y_{1:T}`` for every draw.

    The state at ``T`` is the draw's own ``x_T`` (latent-state MCMC) or a draw from the
    filter's ``p(x_T | y_{1:T}, theta)``; it is then propagated through the model's
    transition and emission with their noise. ``u_future`` ``(num_steps, input_dim)``
    (or with a sequence axis) is needed when the model has inputs. Other arguments as
    in :func:`posterior_predictive`.
    """

    check_rng_key(rng_key)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
    draws, e, spec0 = _prepare(source, model, e_step, model_kwargs)
    kw = draws.model_kwargs
    S, du = spec0.num_sequences, spec0.u.shape[-1]
    uf = _future_inputs(u_future, num_steps, S, du, spec0.u.dtype)
    lead = next(iter(draws.samples.values())).shape[:2]
    paths = _num_paths(num_paths, lead)
    keys = jax.random.split(rng_key, int(np.prod(lead)))

    def fn(params, key):
        ss, spec = bind(draws.model, params, **kw)
        k_x, k_run = jax.random.split(key)
        xs = sampled_states(params, spec)
        if xs is None:
            post = e.posterior(k_x, ss, spec.y, spec.u)
            xT = final_states(k_x, post, paths)  # (paths, S, dx)
        else:
            xT = jnp.broadcast_to(xs[:, -1], (paths,) + xs[:, -1].shape)

        def step(x, inp_t):
            u_t, k_t = inp_t
            k1, k2 = jax.random.split(k_t)
            x = ss.transition(x, u_t).sample(k1)
            return x, ss.emission(x, u_t).sample(k2)

        u_tm = jnp.swapaxes(uf, 0, 1)  # (k, S, du)
        _, ys = jax.lax.scan(step, xT, (u_tm, jax.random.split(k_run, num_steps)))
        return jnp.moveaxis(ys, 0, 2)  # (paths, S, k, dy)

    sims = _per_draw(fn, draws, jnp.reshape(keys, lead + keys.shape[1:]))
    T = spec0.num_steps
    return _bands(sims, np.arange(T, T + num_steps), level, spec0.batched)


def state_paths(rng_key, post, num_paths: int) -> jax.Array:
    """``num_paths`` draws of ``x_{1:T}`` per sequence from an E-step's posterior,
    ``(num_paths, S, T, dx)``: joint draws from a Gaussian smoothed posterior (the
    Gauss-Markov chain of its means and cross-covariances), or backward-simulated
    particle trajectories (drawn with replacement from the ``M`` the E-step made)."""
    traj = getattr(post, "trajectories", None)
    if traj is not None:  # (S, M, T, dx)
        S, M = traj.shape[:2]
        idx = jax.random.randint(rng_key, (num_paths, S), 0, M)
        return traj[jnp.arange(S)[None, :], idx]
    if all(hasattr(post, f) for f in ("means", "covs", "cross_covs")):
        return sample_smoothed_paths(rng_key, post, num_paths)
    raise ValueError(
        f"a {type(post).__name__} carries no paths of the states; use a Gaussian smoother "
        "or ParticleSmoother(mode='ffbsi', num_trajectories=M) as e_step"
    )


def final_states(rng_key, post, num_paths: int) -> jax.Array:
    """``num_paths`` draws of ``x_T`` from the filter's ``p(x_T | y_{1:T})`` per
    sequence, ``(num_paths, S, dx)``: Gaussian filtered moments, or the weighted
    particles of the last step."""
    if hasattr(post, "filtered_means"):
        m, P = post.filtered_means[:, -1], post.filtered_covs[:, -1]  # (S, dx), (S, dx, dx)
        L = la.cholesky(la.sym(P))
        z = jax.random.normal(rng_key, (num_paths,) + m.shape, m.dtype)
        return m + la.mv(L, z)
    if hasattr(post, "filter_log_weights"):
        lw = post.filter_log_weights[:, -1]  # (S, N)
        idx = jax.random.categorical(rng_key, lw, shape=(num_paths, lw.shape[0]))
        x = post.particles[:, -1]  # (S, N, dx)
        return x[jnp.arange(lw.shape[0])[None, :], idx]
    raise ValueError(
        f"a {type(post).__name__} carries no filtering distribution of the last state; use "
        "a Gaussian smoother or a ParticleSmoother as e_step"
    )


def _future_inputs(u_future, k, S, du, dtype):
    if du == 0:
        if u_future is not None and np.shape(u_future)[-1] != 0:
            raise ValueError("the model has no inputs; do not pass u_future")
        return jnp.zeros((S, k, 0), dtype)
    if u_future is None:
        raise ValueError(f"the model has inputs: pass u_future of shape ({k}, {du})")
    uf = jnp.asarray(u_future, dtype)
    if uf.ndim == 2:
        uf = jnp.broadcast_to(uf[None], (S,) + uf.shape)
    if uf.shape != (S, k, du):
        raise ValueError(
            f"u_future must have shape ({k}, {du}) or ({S}, {k}, {du}); got {np.shape(u_future)}"
        )
    return uf


def plot_bands(
    ax,
    bands: PredictiveBands,
    y=None,
    *,
    dim: int = 0,
    sequence: int = 0,
    label: str = "predictive",
    color: Optional[str] = None,
):
    """Draw the mean and band of ``bands`` for one observation dimension on ``ax``.

    ``y`` (the observed data, ``([S,] T, obs_dim)``) is drawn as points when given.
    """
    mean, lo, hi = bands.mean, bands.lower, bands.upper
    if mean.ndim == 3:
        mean, lo, hi = mean[sequence], lo[sequence], hi[sequence]
    (ln,) = ax.plot(bands.time, mean[:, dim], lw=1.2, color=color, label=f"{label} mean")
    ax.fill_between(
        bands.time,
        lo[:, dim],
        hi[:, dim],
        color=ln.get_color(),
        alpha=0.25,
        label=f"{label} {100 * bands.level:.0f}% band",
    )
    if y is not None:
        yy = np.asarray(y)
        if yy.ndim == 3:
            yy = yy[sequence]
        ax.plot(np.arange(yy.shape[0]), yy[:, dim], ".", ms=2.5, color="0.3", label="observed")
    ax.set_xlabel("time")
    ax.legend(loc="best", fontsize=8)
    return ax
