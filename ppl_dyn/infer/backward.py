r"""Linear-cost backward kernels for particle smoothing (FFBSi with MCMC or hybrid
rejection draws; ``docs/particle.md``, ``algorithms.md`` section 4.4).

Given a stored particle filter (particles ``x_t^i`` with normalised log-weights
``log w_t^i``), the backward kernel of the smoother is

.. math::

    B_t(m, i) = \frac{w_t^i\, p(x_{t+1}^m \mid x_t^i)}{\sum_k w_t^k\, p(x_{t+1}^m \mid x_t^k)},

the law of the index at ``t`` given a point ``x_{t+1}^m`` at ``t + 1``. Drawing from it
exactly costs ``O(N)`` per draw (``O(N M)`` per time step for ``M`` trajectories).
This module draws from it at ``O(N + M)`` cost per time step:

* :func:`backward_indices_mcmc`: ``num_steps`` independent Metropolis-Hastings moves
  with proposal ``Cat(w_t)`` and acceptance ``min(1, p(x^m | x_t^{i'}) / p(x^m | x_t^i))``
  (Bunch & Godsill 2013; the default of Dau & Chopin 2023). Deterministic cost; started
  at the genealogical ancestor the draws are not exact given the particles, but the
  smoother stays consistent (the chain's starting point is itself distributed, over the
  filter's randomness, like a draw from the backward kernel).
* :func:`backward_indices_hybrid`: rejection sampling (Douc et al. 2011) with proposal
  ``Cat(w_t)`` and acceptance ``p(x^m | x_t^i) / eps_bar``, ``eps_bar >= sup p``, for at
  most ``max_trials`` vectorised rounds; the rows still unaccepted then take the exact
  ``O(N)`` draw. Exact given the particles, with bounded run time (pure rejection has a
  random run time whose expectation may be infinite: Dau & Chopin 2023).

Everything is a pure JAX function of one sequence (``lax.scan`` / ``lax.while_loop``,
jit-friendly); batch sequences with ``vmap``. Categorical proposals are drawn by inverse
CDF (``searchsorted`` on the cumulative weights): ``O(N)`` to build, ``O(log N)`` per
draw, never an ``M x N`` matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ppl_dyn.infer import _linalg as la
from ppl_dyn.requirements import additive_gaussian

if TYPE_CHECKING:  # no import cycle: particle.py imports this module
    from ppl_dyn.infer.particle import FilterOutput
    from ppl_dyn.state_space import StateSpace

__all__ = [
    "BackwardInfo",
    "BackwardSample",
    "backward_indices_hybrid",
    "backward_indices_mcmc",
    "categorical_inverse_cdf",
    "ffbsi_hybrid",
    "ffbsi_mcmc",
    "path_statistics",
    "transition_log_prob_rows",
]

DEFAULT_MAX_TRIALS = 10


#: The backward kernels: ``"mcmc"`` (independent Metropolis-Hastings moves started at
#: the genealogical ancestor) and ``"hybrid"`` (rejection rounds, then the exact draw).
KERNELS = ("hybrid", "mcmc")


class BackwardKernel(NamedTuple):
    """How backward indices are drawn, one value for every smoother that draws them:
    ``ParticleSmoother(mode="ffbsi", kernel=...)`` (``M`` paths), ``PARISSmoother(kernel=
    ...)`` and ``OnlineEM`` (``num_backward`` draws per particle). Hashable, static.

    Attributes:
        name: ``"mcmc"`` or ``"hybrid"``.
        num_backward: draws per particle and step (PaRIS's ``K``; FFBSi draws
            ``num_trajectories`` paths instead and ignores it).
        num_mcmc_steps: Metropolis-Hastings moves per draw (``"mcmc"``).
        max_trials: rejection rounds before the exact fallback (``"hybrid"``).
    """

    name: str = "mcmc"
    num_backward: int = 2
    num_mcmc_steps: int = 1
    max_trials: int = DEFAULT_MAX_TRIALS

    def check(self) -> "BackwardKernel":
        if self.name not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)}; got {self.name!r}")
        for name, low in (("num_backward", 1), ("num_mcmc_steps", 1), ("max_trials", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
        return self


_FALLBACK_BLOCK = 1 << 22  # entries of one (rows x N) block of the exact fallback


class BackwardInfo(NamedTuple):
    """Diagnostics of a backward pass, per backward step ``t = 1..T-1`` (leading axis
    ``T - 1``; index ``t`` is the draw of the indices at ``t`` given ``t + 1``).

    Attributes:
        acceptance_rate: MCMC: accepted moves / proposed moves; hybrid: accepted
            rejection proposals / proposals made.
        num_proposals: proposals evaluated (MCMC: ``M * num_mcmc_steps``; hybrid: the
            proposals of the rounds actually run, counting still-unaccepted rows only).
        num_fallback: rows drawn by the exact ``O(N)`` fallback (hybrid; 0 for MCMC).
    """

    acceptance_rate: jax.Array
    num_proposals: jax.Array
    num_fallback: jax.Array


class BackwardSample(NamedTuple):
    """``M`` backward-simulated trajectories of one sequence.

    Attributes:
        trajectories: ``(M, T, dx)`` paths (each point is a filter particle).
        indices: ``(T, M)`` particle index of each path at each time.
        info: :class:`BackwardInfo`.
    """

    trajectories: jax.Array
    indices: jax.Array
    info: BackwardInfo


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------


def categorical_inverse_cdf(rng_key, log_weights, shape=()) -> jax.Array:
    """Draws from ``Cat(softmax(log_weights))`` by inverse CDF (``searchsorted``).

    ``O(N)`` to build the cumulative weights, ``O(log N)`` per draw. Zero-weight
    entries are never returned (unless every weight is zero, when the result is an
    arbitrary index). Returns int32 indices of the given ``shape``.
    """
    lw = jnp.asarray(log_weights)
    n = lw.shape[-1]
    mx = jnp.max(lw)
    p = jnp.exp(lw - jnp.where(jnp.isfinite(mx), mx, 0.0))
    cdf = jnp.cumsum(p)
    u = jax.random.uniform(rng_key, shape, dtype=cdf.dtype) * cdf[-1]
    idx = jnp.searchsorted(cdf, u, side="right")  # first k with cdf[k] > u: p[k] > 0
    # u == cdf[-1] can happen by rounding: return the last positive-weight index
    last = n - 1 - jnp.argmax((p > 0)[::-1])
    return jnp.minimum(idx, last).astype(jnp.int32)


def _transition_factor(ss: StateSpace, u_next):
    """Cholesky factor of the (state-independent) transition covariance, or None."""
    if not additive_gaussian(ss, "transition"):
        return None
    return la.cholesky(ss.transition_cov(u_next))


def transition_log_prob_rows(ss: StateSpace, x_next, x_prev, u_next, L=None) -> jax.Array:
    """``log p(x_next^m | x_prev^m)`` row by row, ``(M,)`` for ``(M, dx)`` inputs.

    Gaussian transitions with a state-independent ``Q`` use one Cholesky factor ``L`` of
    ``Q`` (computed here when not given); other models their transition ``log_prob``.
    """
    if not additive_gaussian(ss, "transition"):
        return ss.transition(x_prev, u_next).log_prob(x_next)
    if L is None:
        L = _transition_factor(ss, u_next)
    z = la.solve_lower(L, (x_next - ss.transition_mean(x_prev, u_next)).T).T
    return -0.5 * jnp.sum(z * z, -1) + _log_sup_gaussian(L)


def _log_sup_gaussian(L):
    """``log sup_x N(x; m, Q) = -0.5 log|2 pi Q|`` from the Cholesky factor of ``Q``."""
    dx = L.shape[-1]
    return -jnp.sum(jnp.log(jnp.diagonal(L))) - 0.5 * dx * jnp.log(2 * jnp.pi).astype(L.dtype)


def _check_num(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------
# backward-index primitives (one time step)
# --------------------------------------------------------------------------------------


def backward_indices_mcmc(
    rng_key,
    ss: StateSpace,
    particles,
    log_weights,
    x_next,
    u_next,
    init_indices,
    num_steps: int = 1,
) -> tuple[jax.Array, jax.Array]:
    r"""Backward indices by independent Metropolis-Hastings, ``O(N + M num_steps)``.

    Targets, for each row ``m``, the backward kernel
    ``B(m, i) \propto w_t^i p(x_next^m | x_t^i)`` with the proposal ``i' ~ Cat(w_t)``
    and acceptance probability ``min(1, p(x_next^m | x_t^{i'}) / p(x_next^m | x_t^i))``
    (the weights cancel). Each move leaves ``B(m, .)`` invariant; the chains of the
    ``M`` rows are independent given the particles.

    Args:
        rng_key: a JAX PRNG key.
        ss: the state space (its transition density and, when it declares a
            Gaussian transition with a state-independent covariance, its factor).
        particles: filter particles at ``t`` ``(N, dx)``.
        log_weights: their (normalised or not) filter log-weights ``(N,)``.
        x_next: the ``M`` points at ``t + 1`` ``(M, dx)``.
        u_next: the input entering the transition into ``t + 1`` ``(du,)``.
        init_indices: starting indices ``(M,)`` int, typically the genealogical
            ancestors ``a_{t+1}`` of the points (for FFBSi) or exact draws.
        num_steps: Metropolis-Hastings moves per row (static, >= 0).

    Returns:
        ``(indices, num_accepted)``: int32 ``(M,)`` indices into ``particles`` and the
        number of accepted moves per row ``(M,)``.
    """
    num_steps = _check_num("num_steps", num_steps, 0)
    x_t = jnp.asarray(particles)
    x_next = jnp.asarray(x_next)
    M = x_next.shape[0]
    idx0 = jnp.asarray(init_indices, jnp.int32)
    if idx0.shape != (M,):
        raise ValueError(
            f"init_indices must have shape (M,) = ({M},) matching x_next; got {idx0.shape}"
        )
    if num_steps == 0:
        return idx0, jnp.zeros((M,), jnp.int32)
    L = _transition_factor(ss, u_next)
    k_prop, k_acc = jax.random.split(rng_key)
    props = categorical_inverse_cdf(k_prop, log_weights, (num_steps, M))
    log_u = jnp.log(jax.random.uniform(k_acc, (num_steps, M), dtype=x_t.dtype))
    lp0 = transition_log_prob_rows(ss, x_next, x_t[idx0], u_next, L)

    def move(carry, inp):
        idx, lp, nacc = carry
        prop, lu = inp
        lp_prop = transition_log_prob_rows(ss, x_next, x_t[prop], u_next, L)
        # accept with prob min(1, exp(lp_prop - lp)); -inf - (-inf) never reaches NaN
        diff = jnp.where(lp_prop >= lp, 0.0, lp_prop - lp)
        acc = lu < diff
        return (
            jnp.where(acc, prop, idx),
            jnp.where(acc, lp_prop, lp),
            nacc + acc.astype(jnp.int32),
        ), None

    (idx, _, nacc), _ = jax.lax.scan(move, (idx0, lp0, jnp.zeros((M,), jnp.int32)), (props, log_u))
    return idx, nacc


def backward_indices_hybrid(
    rng_key,
    ss: StateSpace,
    particles,
    log_weights,
    x_next,
    u_next,
    max_trials: int = DEFAULT_MAX_TRIALS,
    log_bound: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Exact backward indices by hybrid rejection sampling, bounded run time.

    Each round proposes ``i ~ Cat(w_t)`` for every unaccepted row and accepts it with
    probability ``p(x_next^m | x_t^i) / eps_bar``; a row accepted at any round is an
    exact draw from ``B(m, .)``. After ``max_trials`` rounds (a ``lax.while_loop`` that
    stops early once every row is accepted) the rows still unaccepted take the exact
    ``O(N)`` draw, so the draws are exact and the cost is at most
    ``O(N + M max_trials + N num_fallback)``.

    ``eps_bar``: for Gaussian transitions with a state-independent covariance (a
    state-independent ``Q``) ``log eps_bar = -0.5 log|2 pi Q|`` (the density at its
    mode); otherwise pass ``log_bound`` (a valid bound on ``log p(x' | x)`` over ``x``
    for the given points, scalar or ``(M,)``), or use :func:`backward_indices_mcmc`.

    Why ``max_trials = 10`` by default: the rejection rounds cost ``O(M)`` each and the
    fallback ``O(N)`` per row, so a row with acceptance probability ``rho`` costs about
    ``min(max_trials, 1/rho) + N (1 - rho)^max_trials``; 10 rounds leave fewer than 3%
    of the rows with ``rho >= 0.3`` to the fallback while a hard case (tiny ``rho``,
    e.g. a small ``Q`` against a wide filter cloud) wastes only 10 cheap rounds before
    paying the exact ``O(N)`` draw it would have needed anyway. Raise it when the
    acceptance rates logged in :class:`BackwardInfo` are moderate (0.05-0.3) and
    ``N`` is large.

    Args:
        rng_key: a JAX PRNG key.
        ss: the state space.
        particles: filter particles at ``t`` ``(N, dx)``.
        log_weights: their filter log-weights ``(N,)``.
        x_next: the ``M`` points at ``t + 1`` ``(M, dx)``.
        u_next: the input entering the transition into ``t + 1`` ``(du,)``.
        max_trials: rejection rounds before the exact fallback (static, >= 0; 0 means
            exact draws for every row).
        log_bound: ``log eps_bar`` for other transitions.

    Returns:
        ``(indices, num_trials, accepted)``: int32 indices ``(M,)``, the number of
        rejection proposals made per row ``(M,)`` int32, and whether each row was
        accepted by rejection (``False``: drawn by the exact fallback) ``(M,)``.
    """
    max_trials = _check_num("max_trials", max_trials, 0)
    x_t = jnp.asarray(particles)
    lw = jnp.asarray(log_weights)
    x_next = jnp.asarray(x_next)
    M = x_next.shape[0]
    gaussian = additive_gaussian(ss, "transition")
    if not gaussian and log_bound is None:
        raise ValueError(
            "backward_indices_hybrid needs an upper bound on the transition density: the "
            "model's transition is not Gaussian with a state-independent covariance, so "
            "pass log_bound, or use backward_indices_mcmc (mode='ffbsi-mcmc')"
        )
    k_rounds, k_fall = jax.random.split(rng_key)
    if gaussian:
        L = _transition_factor(ss, u_next)
        # whitened transition means of all N particles: O(N dx^2), shared by the rounds
        # and the fallback; log p - log eps_bar = -0.5 |a_m - b_i|^2
        b = la.solve_lower(L, ss.transition_mean(x_t, u_next).T).T  # (N, dx)
        a = la.solve_lower(L, x_next.T).T  # (M, dx)

        def log_ratio(prop):  # (M,) log p(x^m | x^{prop_m}) - log eps_bar
            d = a - b[prop]
            return -0.5 * jnp.sum(d * d, -1)

        col = lw - 0.5 * jnp.sum(b * b, -1)  # (N,)

        def rows_logits(rows):  # (F, N) log w_i + log p(x^m | x^i) + const(m)
            return col[None, :] + a[rows] @ b.T
    else:
        bound = jnp.broadcast_to(jnp.asarray(log_bound, x_t.dtype), (M,))

        def log_ratio(prop):
            return transition_log_prob_rows(ss, x_next, x_t[prop], u_next) - bound

        def rows_logits(rows):
            return lw[None, :] + ss.transition(x_t[None], u_next).log_prob(x_next[rows][:, None])

    def cond(c):
        k, _, _, accepted, _ = c
        return (k < max_trials) & ~jnp.all(accepted)

    def body(c):
        k, idx, ntr, accepted, _ = c
        kk = jax.random.fold_in(k_rounds, k)
        k_p, k_u = jax.random.split(kk)
        prop = categorical_inverse_cdf(k_p, lw, (M,))
        lu = jnp.log(jax.random.uniform(k_u, (M,), dtype=x_t.dtype))
        new = ~accepted & (lu < log_ratio(prop))
        ntr = ntr + (~accepted).astype(jnp.int32)
        return k + 1, jnp.where(new, prop, idx), ntr, accepted | new, None

    init = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((M,), jnp.int32),
        jnp.zeros((M,), jnp.int32),
        jnp.zeros((M,), bool),
        None,
    )
    _, idx, ntr, accepted, _ = jax.lax.while_loop(cond, body, init)

    # exact O(N) fallback for the unaccepted rows (sorted first in `order`), F rows at a
    # time as one (F, N) block: vectorised, memory bounded by ~2^22 entries
    N = x_t.shape[0]
    F = max(1, min(M, _FALLBACK_BLOCK // max(N, 1)))
    order = jnp.argsort(accepted, stable=True)
    num_fail = M - jnp.sum(accepted.astype(jnp.int32))

    def fallback(c, idx):
        pos = c * F + jnp.arange(F)
        valid = pos < num_fail
        rows = order[jnp.minimum(pos, M - 1)]
        logits = rows_logits(rows)
        mx = jnp.max(logits, axis=-1, keepdims=True)
        cdf = jnp.cumsum(jnp.exp(logits - jnp.where(jnp.isfinite(mx), mx, 0.0)), axis=-1)
        uu = jax.random.uniform(jax.random.fold_in(k_fall, c), (F, 1), dtype=cdf.dtype)
        draw = jnp.minimum(jnp.sum(cdf <= uu * cdf[:, -1:], axis=-1), N - 1).astype(jnp.int32)
        return idx.at[jnp.where(valid, rows, M)].set(draw, mode="drop")

    idx = jax.lax.fori_loop(0, (num_fail + F - 1) // F, fallback, idx)
    return idx, ntr, accepted


# --------------------------------------------------------------------------------------
# FFBSi with the linear-cost kernels
# --------------------------------------------------------------------------------------


def ffbsi_mcmc(
    rng_key,
    ss: StateSpace,
    filt: FilterOutput,
    u,
    num_trajectories: int,
    num_mcmc_steps: int = 1,
) -> BackwardSample:
    """FFBSi with MCMC backward draws: ``O(N + M num_mcmc_steps)`` per time step.

    ``J_T ~ Cat(w_T)`` exactly; then for ``t = T-1, ..., 1`` each path's index starts at
    the genealogical ancestor ``a_{t+1}^{J_{t+1}}`` (``filt.ancestors``) and makes
    ``num_mcmc_steps`` independent Metropolis-Hastings moves targeting ``B_t(J_{t+1}, .)``
    (:func:`backward_indices_mcmc`).

    Args:
        rng_key: a JAX PRNG key.
        ss: the state space.
        filt: the particle filter output of one sequence
            (:func:`ppl_dyn.infer.particle.particle_filter`).
        u: inputs ``(T, du)``.
        num_trajectories: ``M`` paths.
        num_mcmc_steps: MH moves per backward step (>= 1).

    Returns:
        :class:`BackwardSample` with trajectories ``(M, T, dx)``, indices ``(T, M)`` and
        per-step acceptance rates.
    """
    steps = _check_num("num_mcmc_steps", num_mcmc_steps, 1)

    def draw(key, x_t, lw_t, x_next, init, u_next):
        J, nacc = backward_indices_mcmc(key, ss, x_t, lw_t, x_next, u_next, init, steps)
        M = x_next.shape[0]
        zero = jnp.zeros((), jnp.int32)
        return J, jnp.sum(nacc), jnp.asarray(M * steps, jnp.int32), zero

    return _ffbsi_with_inputs(rng_key, filt, u, num_trajectories, draw)


def ffbsi_hybrid(
    rng_key,
    ss: StateSpace,
    filt: FilterOutput,
    u,
    num_trajectories: int,
    max_trials: int = DEFAULT_MAX_TRIALS,
    log_bound: Optional[jax.Array] = None,
) -> BackwardSample:
    """FFBSi with hybrid rejection backward draws (exact given the particles).

    ``J_T ~ Cat(w_T)``; then for ``t = T-1, ..., 1`` each index is drawn from
    ``B_t(J_{t+1}, .)`` by :func:`backward_indices_hybrid`: at most ``max_trials``
    rejection rounds, then the exact ``O(N)`` draw for the remaining rows. The paths
    have exactly the law of exact FFBSi (:func:`ppl_dyn.infer.particle.ffbsi`).

    Args:
        rng_key: a JAX PRNG key.
        ss: the state space (Gaussian transitions with a state-independent covariance; else
            pass ``log_bound``).
        filt: the particle filter output of one sequence.
        u: inputs ``(T, du)``.
        num_trajectories: ``M`` paths.
        max_trials: rejection rounds per backward step before the exact fallback.
        log_bound: ``log sup p(x' | x)`` for other transitions.

    Returns:
        :class:`BackwardSample`; ``info.acceptance_rate`` is the rejection acceptance
        rate and ``info.num_fallback`` the rows that needed the exact draw.
    """
    trials = _check_num("max_trials", max_trials, 0)
    if not additive_gaussian(ss, "transition") and log_bound is None:
        raise ValueError(
            "ffbsi_hybrid needs an upper bound on the transition density: the model's "
            "transition is not Gaussian with a state-independent covariance, so pass "
            "log_bound, or use ffbsi_mcmc (mode='ffbsi-mcmc')"
        )

    def draw(key, x_t, lw_t, x_next, init, u_next):
        del init
        J, ntr, acc = backward_indices_hybrid(key, ss, x_t, lw_t, x_next, u_next, trials, log_bound)
        n_acc = jnp.sum(acc.astype(jnp.int32))
        return J, n_acc, jnp.sum(ntr), x_next.shape[0] - n_acc

    return _ffbsi_with_inputs(rng_key, filt, u, num_trajectories, draw)


def _ffbsi_with_inputs(rng_key, filt, u, num_trajectories, draw) -> BackwardSample:
    X, LW, anc = filt.particles, filt.log_weights, filt.ancestors
    T = X.shape[0]
    M = _check_num("num_trajectories", num_trajectories, 1)
    u = jnp.asarray(u)
    if u.shape[0] != T:
        raise ValueError(f"u must have T = {T} rows like the filter output; got {u.shape}")
    k_last, k_back = jax.random.split(rng_key)
    J_T = categorical_inverse_cdf(k_last, LW[-1], (M,))
    keys = jax.random.split(k_back, max(T - 1, 0))

    def back(J_next, inp):
        # the rows t and t + 1 are read in place (scanning over the slices X[:-1] and
        # X[1:] would copy the whole (T, N, dx) history twice)
        key, t, u_next = inp
        x_t, lw_t = X[t], LW[t]
        x_next, anc_next = X[t + 1][J_next], anc[t + 1][J_next]
        out = draw(key, x_t, lw_t, x_next, anc_next, u_next)
        return out[0], out

    xs = (keys, jnp.arange(max(T - 1, 0)), u[1:])
    _, (J, n_acc, n_prop, n_fall) = jax.lax.scan(back, J_T, xs, reverse=True)
    idx = jnp.concatenate([J, J_T[None]], 0)  # (T, M)
    traj = jnp.swapaxes(jnp.take_along_axis(X, idx[..., None], axis=1), 0, 1)  # (M, T, dx)
    rate = n_acc.astype(X.dtype) / jnp.maximum(n_prop, 1).astype(X.dtype)
    return BackwardSample(traj, idx, BackwardInfo(rate, n_prop, n_fall))


# --------------------------------------------------------------------------------------
# EM statistics along drawn paths
# --------------------------------------------------------------------------------------


def path_statistics(particles, indices, feature: Callable) -> tuple[jax.Array, jax.Array]:
    r"""FFBSm-shaped inputs of the M-step statistics from ``M`` equally weighted paths.

    Returns ``(log_v, pair)``:

    * ``log_v`` ``(T, N)``: ``log(c_t^i / M)`` with ``c_t^i`` the number of paths through
      particle ``i`` at ``t`` (``-inf`` where none), so that
      ``sum_i v_t^i f(x_t^i) = (1/M) sum_m f(x_t^{J_t^m})`` for every ``f``;
    * ``pair`` ``(T-1, dx, k)``: ``(1/M) sum_m x_{t+1}^{J_{t+1}^m} phi(x_t^{J_t^m})^T``.

    Fed to :func:`ppl_dyn.infer.particle.particle_linear_statistics` in place of the
    FFBSm weights, they give exactly the average over the paths of the complete-data
    sufficient statistics.
    """
    X = jnp.asarray(particles)
    idx = jnp.asarray(indices)
    T, N, _ = X.shape
    M = idx.shape[1]
    counts = jax.vmap(lambda j: jnp.zeros((N,), X.dtype).at[j].add(1.0))(idx)
    log_v = jnp.log(counts) - jnp.log(jnp.asarray(M, X.dtype))
    pts = jnp.take_along_axis(X, idx[..., None], axis=1)  # (T, M, dx)
    F = jax.vmap(feature)(pts[:-1])  # (T-1, M, k)
    pair = jnp.einsum("tmd,tmk->tdk", pts[1:], F) / M
    return log_v, pair
