"""k-step-ahead prediction from a particle-filter state estimate.

For every time ``t`` the bootstrap particle filter gives ``p(x_t | y_{1:t})``; the
forecast of ``y_{t+k}`` is then made either

* ``method="rollout"`` (the seed's predictor): start at the filtered mean and iterate the
  noise-free dynamics ``x <- E[x_{t+1} | x]``, read out ``E[y | x]``; or
* ``method="particles"``: propagate every (resampled) particle ``k`` steps with process
  noise and average the emission means; bands are quantiles of simulated observations.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.smc import resampling as bj_resampling

from ppl_dyn._validation import check_rng_key
from ppl_dyn.infer.particle import particle_filter


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


def predict(
    params: dict,
    model,
    *,
    y,
    rng_key,
    horizons: Sequence[int] = (1, 5, 10),
    method: str = "rollout",
    num_particles: int = 1000,
    **model_kwargs,
) -> Prediction:
    """Filter ``y`` with the model at ``params`` and forecast ``horizons`` steps ahead.

    Example:
        >>> pred = ppl_dyn.predict(params, tanh_rnn, y=y_test, horizons=(1, 5, 10),
        ...                        state_dim=5, rng_key=jax.random.key(0))  # doctest: +SKIP
        >>> prediction_rmse(pred, y_test)                                   # doctest: +SKIP
    """
    from ppl_dyn.infer._run import prepare_eager

    check_rng_key(rng_key)
    if method not in ("rollout", "particles"):
        raise ValueError(f"method must be 'rollout' or 'particles'; got {method!r}")
    horizons = tuple(int(k) for k in horizons)
    if not horizons or min(horizons) < 1:
        raise ValueError(f"horizons must be positive ints; got {horizons}")
    ss, spec = prepare_eager(model, params, (), dict(model_kwargs, y=y))
    K = max(horizons)

    def one(key, y_s, u_s):
        k_f, k_p = jax.random.split(key)
        filt = particle_filter(k_f, ss, y_s, u_s, num_particles)
        w = jnp.exp(filt.log_weights)  # (T, N)
        m = jnp.einsum("tn,tnd->td", w, filt.particles)
        T = y_s.shape[0]
        t_idx = jnp.arange(T)

        def u_at(k):
            return u_s[jnp.minimum(t_idx + k, T - 1)]  # (T, du)

        if method == "rollout":
            x, outs = m, []
            for k in range(1, K + 1):
                x = ss.transition_mean(x, u_at(k))
                outs.append(ss.emission_mean(x, u_at(k)))
            return m, jnp.stack(outs), None, None, filt.log_marginal
        # systematic resampling of the filter particles at every t (a categorical draw
        # of N indices would cost N x N Gumbel variates per step)
        idx = jax.vmap(lambda kk, w: bj_resampling.systematic(kk, w, num_particles))(
            jax.random.split(k_p, T), w
        )
        x = jnp.take_along_axis(filt.particles, idx[..., None], axis=1)  # (T, N, dx)
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
        return m, jnp.stack(means), jnp.stack(lo), jnp.stack(hi), filt.log_marginal

    keys = jax.random.split(rng_key, spec.y.shape[0])
    m, means, lo, hi = None, None, None, None
    m, means, lo, hi, lm = jax.jit(jax.vmap(one))(keys, spec.y, spec.u)

    def pick(a):
        if a is None:
            return None
        out = {k: a[:, k - 1] for k in horizons}  # a: (S, K, T, dy)
        return out if spec.batched else {k: v[0] for k, v in out.items()}

    if not spec.batched:
        m, lm = m[0], lm[0]
    return Prediction(horizons, pick(means), pick(lo), pick(hi), m, lm)


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
