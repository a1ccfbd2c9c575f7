r"""Conventional baselines: deterministic RNN and LSTM trained by back-propagation through
time on the squared one-step prediction error (seed 000, eq 8).

Both networks are one-step-ahead predictors driven by the previous observation (and
optional exogenous inputs ``u_t``): with input ``v_t = [y_{t-1}; u_t]`` (``y_0 := 0``)

* ``cell="tanh"`` (the seed-000 RNN without noise, net-input form):
  ``x_t = A tanh(x_{t-1}) + B v_t + b``, ``ŷ_t = C tanh(x_t) + d``;
* ``cell="lstm"``: ``(c_t, h_t) = LSTM(c_{t-1}, h_{t-1}, v_t)``, ``ŷ_t = C h_t + d``,

from a zero initial state. Training minimises the seed's eq 8, normalised per observed
entry, ``L = (1 / 2N) sum_t ||y_t - ŷ_t||^2`` (NaN targets are skipped and a missing
input is replaced by the network's own prediction), by Adam with optional gradient
clipping (optax), the gradient by BPTT (``jax.grad`` through ``lax.scan``).

Forecasts (:func:`predict`) follow :func:`ppl_dyn.predict`: the network reads
``y_{1:t}`` (the warm-up), then runs closed loop, feeding its own predictions back, to give
``mean[k][t]`` = forecast of ``y_{t+k}``; :func:`ppl_dyn.prediction_rmse` scores it.

Example:
    >>> import jax, numpy as np
    >>> from ppl_dyn import baselines, prediction_rmse
    >>> y = np.sin(0.3 * np.arange(200.0))[:, None]
    >>> net = baselines.Baseline("lstm", hidden_dim=4)
    >>> fit = baselines.fit_bptt(jax.random.key(0), net, y=y[:150], num_steps=300,
    ...                          progress_bar=False)
    >>> pred = baselines.predict(fit.params, net, y=y[150:], horizons=(1, 5))
    >>> sorted(prediction_rmse(pred, y[150:]))
    [1, 5]
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ppl_dyn._validation import check_rng_key
from ppl_dyn.models.lstm import lstm_cell
from ppl_dyn.predict import Prediction

__all__ = [
    "Baseline",
    "BPTTResult",
    "init_params",
    "one_step_predictions",
    "loss",
    "fit_bptt",
    "predict",
]

_CELLS = ("tanh", "lstm")


class Baseline(NamedTuple):
    """A deterministic recurrent one-step predictor.

    Args:
        cell: ``"tanh"`` (Elman RNN in the seed-000 form) or ``"lstm"``.
        hidden_dim: number of hidden units ``H``.
    """

    cell: str
    hidden_dim: int

    def check(self) -> None:
        if self.cell not in _CELLS:
            raise ValueError(f"cell must be one of {_CELLS}; got {self.cell!r}")
        H = self.hidden_dim
        if not isinstance(H, (int, np.integer)) or isinstance(H, bool) or H < 1:
            raise ValueError(f"hidden_dim must be a positive int; got {H!r}")


class BPTTResult(NamedTuple):
    """Outcome of :func:`fit_bptt`.

    Attributes:
        params: trained weights (``A, B, b, C, d`` for ``"tanh"``; ``W, U, b, C, d`` for
            ``"lstm"``).
        losses: training loss (eq 8, normalised) before each Adam step, ``(num_steps,)``.
        baseline: the :class:`Baseline` trained.
        final_loss: loss at the returned ``params``.
    """

    params: dict
    losses: np.ndarray
    baseline: Baseline
    final_loss: float


# -- data --------------------------------------------------------------------------------
def _as_batch(y, u, name_y="y", name_u="u"):
    """``y`` ``(T, dy)`` or ``(S, T, dy)``, ``u`` likewise; returns 3-D arrays."""
    if y is None:
        raise ValueError(f"{name_y} is required")
    y = jnp.asarray(np.asarray(y, dtype=float) if not isinstance(y, jax.Array) else y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    if y.ndim not in (2, 3):
        raise ValueError(
            f"{name_y} must have shape (num_steps, obs_dim) or (num_sequences, num_steps, "
            f"obs_dim); got shape {tuple(y.shape)}"
        )
    batched = y.ndim == 3
    yb = y if batched else y[None]
    S, T, _ = yb.shape
    if T < 1 or S < 1:
        raise ValueError(f"{name_y} is empty: shape {tuple(y.shape)}")
    if bool(jnp.any(jnp.isinf(yb))):
        raise ValueError(f"{name_y} contains inf; use NaN for missing values")
    if u is None:
        ub = jnp.zeros((S, T, 0), yb.dtype)
    else:
        u = jnp.asarray(u, dtype=yb.dtype)
        if u.ndim == 2 and u.shape[0] == T:
            ub = jnp.broadcast_to(u[None], (S,) + u.shape)
        elif u.ndim == 3 and u.shape[:2] == (S, T):
            ub = u
        else:
            raise ValueError(
                f"{name_u} must have shape ({T}, input_dim) or ({S}, {T}, input_dim) to "
                f"match {name_y}; got shape {tuple(u.shape)}"
            )
        if not bool(jnp.all(jnp.isfinite(ub))):
            raise ValueError(f"{name_u} must be finite")
    return yb, ub, batched


# -- the networks ------------------------------------------------------------------------
def init_params(rng_key, baseline: Baseline, obs_dim: int, input_dim: int = 0, dtype=None) -> dict:
    """Random initial weights (recurrent weights ``N(0, 0.9^2 / H)``, input weights
    ``N(0, 1 / dv)``, read-out ``N(0, 1 / H)``, LSTM forget-gate bias 1, other biases 0)."""
    check_rng_key(rng_key)
    baseline.check()
    dtype = jnp.result_type(float) if dtype is None else dtype
    H, dy = int(baseline.hidden_dim), int(obs_dim)
    dv = dy + int(input_dim)
    k1, k2, k3 = jax.random.split(rng_key, 3)
    G = 4 * H if baseline.cell == "lstm" else H
    rec = 0.9 / np.sqrt(H) * jax.random.normal(k1, (G, H), dtype)
    inp = 1.0 / np.sqrt(dv) * jax.random.normal(k2, (G, dv), dtype)
    out = 1.0 / np.sqrt(H) * jax.random.normal(k3, (dy, H), dtype)
    if baseline.cell == "tanh":
        return {"A": rec, "B": inp, "b": jnp.zeros(H, dtype), "C": out, "d": jnp.zeros(dy, dtype)}
    b = jnp.zeros(4 * H, dtype).at[H : 2 * H].set(1.0)
    return {"W": inp, "U": rec, "b": b, "C": out, "d": jnp.zeros(dy, dtype)}


def _check_params(params: dict, baseline: Baseline, dy: int, du: int) -> None:
    H, dv = int(baseline.hidden_dim), dy + du
    if baseline.cell == "tanh":
        shapes = {"A": (H, H), "B": (H, dv), "b": (H,), "C": (dy, H), "d": (dy,)}
    else:
        shapes = {"W": (4 * H, dv), "U": (4 * H, H), "b": (4 * H,), "C": (dy, H), "d": (dy,)}
    for k, shp in shapes.items():
        if k not in params:
            raise ValueError(
                f"params lacks {k!r} (a {baseline.cell} baseline needs {sorted(shapes)})"
            )
        if tuple(jnp.shape(params[k])) != shp:
            raise ValueError(
                f"params[{k!r}] must have shape {shp} for hidden_dim={H}, obs_dim={dy}, "
                f"input_dim={du}; got {tuple(jnp.shape(params[k]))}"
            )


def _zero_state(baseline: Baseline, batch: tuple, dtype):
    H = baseline.hidden_dim
    z = jnp.zeros(batch + (H,), dtype)
    return (z, z) if baseline.cell == "lstm" else z


def _step(params, baseline: Baseline, state, v):
    """One network step on input ``v`` ``(..., dv)``; returns ``(state, ŷ, features)``."""
    if baseline.cell == "tanh":
        x = jnp.tanh(state) @ params["A"].T + v @ params["B"].T + params["b"]
        feat = jnp.tanh(x)
        return x, feat @ params["C"].T + params["d"], x
    c, h = lstm_cell(params["W"], params["U"], params["b"], state[0], state[1], v)
    return (c, h), h @ params["C"].T + params["d"], h


def _teacher_forced(params, baseline, y, u):
    """One sequence ``y`` ``(T, dy)``: states after reading ``y_{1:t}`` and one-step
    predictions ``ŷ_t`` (from ``y_{1:t-1}``)."""
    dy = y.shape[-1]
    state0 = _zero_state(baseline, (), y.dtype)

    def body(carry, yu):
        state, y_prev, yhat_prev = carry
        y_t, u_t = yu
        y_in = jnp.where(jnp.isnan(y_prev), yhat_prev, y_prev)  # missing: own prediction
        state, yhat, feat = _step(params, baseline, state, jnp.concatenate([y_in, u_t], -1))
        return (state, y_t, yhat), (state, yhat, feat)

    zero = jnp.zeros(dy, y.dtype)
    _, (states, yhat, feats) = jax.lax.scan(body, (state0, zero, zero), (y, u))
    return states, yhat, feats


def one_step_predictions(params: dict, baseline: Baseline, y, u=None) -> jax.Array:
    """``ŷ_t`` (the prediction of ``y_t`` from ``y_{1:t-1}`` and ``u_{1:t}``), same shape as
    ``y``."""
    baseline.check()
    yb, ub, batched = _as_batch(y, u)
    _check_params(params, baseline, yb.shape[-1], ub.shape[-1])
    out = _one_step_jit(params, baseline, yb, ub)
    return out if batched else out[0]


@jax.jit(static_argnums=1)
def _one_step_jit(params, baseline, y, u):
    return jax.vmap(lambda a, b: _teacher_forced(params, baseline, a, b)[1])(y, u)


def _loss(params, baseline, y, u, washout):
    _, yhat, _ = jax.vmap(lambda a, b: _teacher_forced(params, baseline, a, b))(y, u)
    mask = ~jnp.isnan(y)
    if washout:
        mask = mask & (jnp.arange(y.shape[1]) >= washout)[None, :, None]
    r = jnp.where(mask, y - yhat, 0.0)
    return 0.5 * jnp.sum(r**2) / jnp.maximum(jnp.sum(mask), 1)


def loss(params: dict, baseline: Baseline, y, u=None, washout: int = 0) -> jax.Array:
    """Seed-000 eq 8 normalised per observed entry:
    ``(1 / 2N) sum_{t > washout} ||y_t - ŷ_t||^2``."""
    baseline.check()
    yb, ub, _ = _as_batch(y, u)
    _check_params(params, baseline, yb.shape[-1], ub.shape[-1])
    return _loss_jit(params, baseline, yb, ub, int(washout))


_loss_jit = jax.jit(_loss, static_argnums=(1, 4))


# -- training ----------------------------------------------------------------------------
def fit_bptt(
    rng_key,
    baseline: Baseline,
    *,
    y,
    u=None,
    num_steps: int = 2000,
    learning_rate: float = 1e-2,
    clip_norm: Optional[float] = 1.0,
    washout: int = 0,
    init_params: Optional[dict] = None,
    progress_bar: bool = True,
    chunk_size: int = 100,
) -> BPTTResult:
    """Train ``baseline`` by BPTT + Adam on the one-step squared error (seed-000 eq 8).

    Args:
        rng_key: PRNG key for the initial weights (required).
        baseline: the network (:class:`Baseline`).
        y: training series ``(T, obs_dim)`` or ``(S, T, obs_dim)`` (NaN = missing).
        u: optional exogenous inputs ``(T, input_dim)`` or ``(S, T, input_dim)``.
        num_steps: Adam steps (full-batch gradient over all sequences).
        learning_rate: Adam step size.
        clip_norm: clip the gradient's global norm to this (None: no clipping).
        washout: initial steps excluded from the loss (the zero initial state).
        init_params: starting weights (else :func:`init_params` from ``rng_key``).
        progress_bar: show a tqdm bar (updated every ``chunk_size`` steps).
        chunk_size: Adam steps per jitted ``lax.scan`` call.

    Returns:
        :class:`BPTTResult` (``losses`` holds the loss before each step).
    """
    import optax

    check_rng_key(rng_key)
    baseline.check()
    yb, ub, _ = _as_batch(y, u)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive; got {learning_rate!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive or None; got {clip_norm!r}")
    washout = int(washout)
    if not 0 <= washout < yb.shape[1]:
        raise ValueError(f"washout must be in [0, num_steps of y = {yb.shape[1]}); got {washout}")
    dy, du = yb.shape[-1], ub.shape[-1]
    if init_params is None:
        params = _default_init(rng_key, baseline, dy, du, yb.dtype)
    else:
        _check_params(init_params, baseline, dy, du)
        params = {k: jnp.asarray(v, yb.dtype) for k, v in init_params.items()}
    parts = [optax.clip_by_global_norm(float(clip_norm))] if clip_norm is not None else []
    opt = optax.chain(*parts, optax.adam(float(learning_rate)))
    value_and_grad = jax.value_and_grad(lambda p: _loss(p, baseline, yb, ub, washout))

    @jax.jit
    def run_chunk(params, opt_state, n_valid):
        def body(carry, i):
            p, st = carry
            val, g = value_and_grad(p)
            upd, st_new = opt.update(g, st, p)
            p_new = optax.apply_updates(p, upd)
            keep = i < n_valid  # the last chunk may be partial
            p = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), p_new, p)
            st = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), st_new, st)
            return (p, st), val

        (params, opt_state), vals = jax.lax.scan(body, (params, opt_state), jnp.arange(chunk_size))
        return params, opt_state, vals

    chunk_size = int(max(1, min(chunk_size, num_steps)))
    opt_state = opt.init(params)
    losses = []
    bar = tqdm(total=num_steps, disable=not progress_bar, desc=f"BPTT {baseline.cell}", leave=False)
    done = 0
    while done < num_steps:
        n = min(chunk_size, num_steps - done)
        params, opt_state, vals = run_chunk(params, opt_state, n)
        vals = np.asarray(vals[:n])
        if not np.all(np.isfinite(vals)):
            bad = done + int(np.argmin(np.isfinite(vals)))
            raise FloatingPointError(f"BPTT step {bad}: non-finite loss (lower learning_rate)")
        losses.append(vals)
        done += n
        bar.update(n)
        bar.set_postfix(loss=f"{vals[-1]:.3g}", refresh=False)
    bar.close()
    final = float(_loss_jit(params, baseline, yb, ub, washout))
    return BPTTResult(
        params=params, losses=np.concatenate(losses), baseline=baseline, final_loss=final
    )


_default_init = init_params  # fit_bptt's argument `init_params` shadows the function


# -- forecasting -------------------------------------------------------------------------
def predict(
    params: dict,
    baseline: Baseline,
    *,
    y,
    u=None,
    horizons: Sequence[int] = (1, 5, 10),
    rng_key=None,
) -> Prediction:
    """k-step forecasts, shaped like :func:`ppl_dyn.predict`'s.

    The network reads ``y_{1:t}`` (teacher forcing from a zero state: the warm-up is the
    given prefix), then feeds its own predictions back for ``k - 1`` more steps. Inputs
    ``u`` beyond the data repeat the last one, as in :func:`ppl_dyn.predict`.

    Args:
        params: trained weights (``BPTTResult.params``).
        baseline: the network.
        y: series ``(T, obs_dim)`` or ``(S, T, obs_dim)`` to forecast along.
        u: exogenous inputs, if the network was trained with them.
        horizons: positive forecast horizons.
        rng_key: unused (the networks are deterministic); accepted so that calls look
            like :func:`ppl_dyn.predict`'s.

    Returns:
        :class:`ppl_dyn.Prediction` with ``mean[k][t]`` the forecast of ``y_{t+k}``
        (0-based ``t``), ``lower``/``upper`` None, ``filtered_means`` the hidden features
        at ``t`` (having read ``y_{1:t-1}``; ``x_t`` for ``"tanh"``, ``h_t`` for
        ``"lstm"``) and ``log_marginal`` NaN.
    """
    del rng_key
    baseline.check()
    horizons = tuple(int(k) for k in horizons)
    if not horizons or min(horizons) < 1:
        raise ValueError(f"horizons must be positive ints; got {horizons}")
    yb, ub, batched = _as_batch(y, u)
    dy, du = yb.shape[-1], ub.shape[-1]
    _check_params(params, baseline, dy, du)
    K = max(horizons)
    params = {k: jnp.asarray(v, yb.dtype) for k, v in params.items()}

    @jax.jit
    def one(y_s, u_s):
        states, yhat, feats = _teacher_forced(params, baseline, y_s, u_s)
        T = y_s.shape[0]
        t_idx = jnp.arange(T)
        y_prev = jnp.where(jnp.isnan(y_s), yhat, y_s)  # last value read at each t
        state, outs = states, []
        for k in range(1, K + 1):
            u_k = u_s[jnp.minimum(t_idx + k, T - 1)]
            state, y_prev, _ = _step(params, baseline, state, jnp.concatenate([y_prev, u_k], -1))
            outs.append(y_prev)
        return jnp.stack(outs), feats

    means, feats = jax.vmap(one)(yb, ub)  # (S, K, T, dy), (S, T, H)
    mean = {k: means[:, k - 1] for k in horizons}
    if not batched:
        mean = {k: v[0] for k, v in mean.items()}
        feats = feats[0]
    log_marginal = jnp.full((yb.shape[0],) if batched else (), jnp.nan, yb.dtype)
    return Prediction(horizons, mean, None, None, feats, log_marginal)
