"""Particle filtering and smoothing in the log domain (the E-step for nonlinear models).

* Forward: bootstrap particle filter with ESS-triggered resampling (BlackJAX's
  systematic / stratified / multinomial draws; the first two from closed-form offspring counts,
  :mod:`ppl_dyn.infer.resampling`), normalised log-weights, and the
  unbiased estimate of ``p(y_{1:T})`` (its log is returned).
* Backward, mode ``"ffbsm"``: forward-filtering backward-smoothing (seed 000, eqs 17-20,
  with the eq 23 index typos corrected, ``docs/math.md``) entirely in the log domain; the
  ``N x N`` transition matrix is evaluated in row chunks and never stored, and the one
  pair statistic EM needs, ``sum_ij W_t^{ij} x_{t+1}^j phi(x_t^i)^T``, is accumulated on the
  fly.
* Backward, mode ``"ffbsi"``: backward simulation of ``M`` trajectories (O(N M) per step).

Any model written by the documented convention works: Gaussian transitions use one
Cholesky factor of the noise covariance per step; other transitions use their own
``log_prob``. NaN observations contribute a weight increment of 0.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from ppl_dyn._validation import check_rng_key
from ppl_dyn.infer import _linalg as la
from ppl_dyn.infer._compile import cached_program, jit_model
from ppl_dyn.infer._mesh import MeshAxes, mesh_axes
from ppl_dyn.infer._run import prepare_eager, ragged_data, split_static, static_items
from ppl_dyn.infer.backward import (
    DEFAULT_MAX_TRIALS,
    BackwardKernel,
    ffbsi_hybrid,
    ffbsi_mcmc,
    path_statistics,
)
from ppl_dyn.infer.resampling import RESAMPLERS
from ppl_dyn.infer.stats import InitStats, LinearStats, RegressionStats, keep, sum_stats
from ppl_dyn.requirements import additive_gaussian
from ppl_dyn.state_space import (
    StateSpace,
    bind,
    emission_log_lik,
    mask_covariance,
)


class FilterOutput(NamedTuple):
    particles: jax.Array  # (T, N, dx)
    log_weights: jax.Array  # (T, N) normalised filter log-weights
    ancestors: jax.Array  # (T, N) indices into the particles at t-1 (t=0: identity)
    log_marginal: jax.Array  # () log of the unbiased estimate of p(y_{1:T})
    ess: jax.Array  # (T,) effective sample size before resampling decisions
    resampled: jax.Array  # (T,) whether step t resampled
    # (T,) log p_hat(y_t | y_{1:t-1}): the factors of the estimate (they sum to
    # log_marginal; each is a ratio estimate, only their product is unbiased)
    predicted_log_probs: Optional[jax.Array] = None


class ParticlePosterior(NamedTuple):
    """Particle approximation of the smoothing distribution (leading ``S`` axis when
    batched).

    Attributes:
        particles: filter particles ``(T, N, dx)``.
        filter_log_weights: normalised filter log-weights ``(T, N)``.
        smoothed_log_weights: FFBSm marginal log-weights ``log v_t^i`` ``(T, N)``.
        pair_moments: ``sum_ij W_t^{ij} x_{t+1}^j phi(x_t^i)^T`` ``(T-1, dx, k)`` for the
            dynamics features ``phi`` (what the closed-form M-step needs).
        trajectories: backward-simulated paths ``(M, T, dx)`` (mode ``"ffbsi"``), else None.
        log_marginal: log of the unbiased likelihood estimate.
        ess: filter effective sample sizes ``(T,)``.
        predicted_log_probs: ``log p_hat(y_t | y_{1:t-1})`` ``(T,)``, the filter's
            per-step factors (they sum to ``log_marginal``).
        backward_fallback_rate: mode ``"ffbsi-hybrid"``: the share of the backward
            draws that the rejection rounds did not settle and the exact ``O(N)`` draw
            made (a high rate means a loose bound and quadratic cost: use
            ``"ffbsi-mcmc"``); None for the other modes.
        path_indices: the linear-cost modes (``"ffbsi-mcmc"``, ``"ffbsi-hybrid"``): the
            filter particle each drawn path passes through, ``(T, M)``; the M-step
            statistics are then averages over the ``M`` paths, computed from them
            directly in ``O(M T)`` memory. None for the other modes.
    """

    particles: jax.Array
    filter_log_weights: jax.Array
    smoothed_log_weights: jax.Array
    pair_moments: Optional[jax.Array]
    trajectories: Optional[jax.Array]
    log_marginal: jax.Array
    ess: jax.Array
    predicted_log_probs: Optional[jax.Array] = None
    backward_fallback_rate: Optional[jax.Array] = None
    path_indices: Optional[jax.Array] = None

    def linear_statistics(self, ss, y, u, time_mask=None):
        """Expected sufficient statistics of the closed-form M-step from the smoothing
        weights and pair moments, or from the paths in the path modes
        (:func:`particle_linear_statistics`)."""
        return particle_linear_statistics(self, ss, y, u, time_mask)

    @property
    def means(self):
        """Smoothed means ``E[x_t | y]`` ``(T, dx)``."""
        w = jnp.exp(self.smoothed_log_weights)
        return jnp.einsum("...tn,...tnd->...td", w, self.particles)

    @property
    def covs(self):
        """Smoothed covariances ``(T, dx, dx)``."""
        w = jnp.exp(self.smoothed_log_weights)
        m = self.means
        d = self.particles - m[..., None, :]
        return jnp.einsum("...tn,...tni,...tnj->...tij", w, d, d)


# --------------------------------------------------------------------------------------
# log-densities through the bridge
# --------------------------------------------------------------------------------------


def pairwise_transition_log_prob(ss: StateSpace, x_next, x_prev, u_next):
    """``log p(x_next^j | x_prev^i)`` as a ``(len(x_next), len(x_prev))`` matrix.

    Gaussian transitions with a state-independent ``Q`` (proved from the traced model):
    whiten once with the Cholesky factor of ``Q`` and take pairwise squared distances.
    Other models: their own ``log_prob``, broadcast.
    """
    if additive_gaussian(ss, "transition"):
        mu = ss.transition_mean(x_prev, u_next)
        Q = ss.transition_cov(u_next)
        L = la.cholesky(Q)
        a = la.solve_lower(L, x_next.T).T  # (B, dx) whitened
        b = la.solve_lower(L, mu.T).T  # (N, dx)
        sq = jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2.0 * a @ b.T
        sq = jnp.maximum(sq, 0.0)
        dx = x_next.shape[-1]
        const = jnp.sum(jnp.log(jnp.diagonal(L))) + 0.5 * dx * jnp.log(2 * jnp.pi)
        return -0.5 * sq - const
    d = ss.transition(x_prev[None, :, :], u_next)
    return d.log_prob(x_next[:, None, :])


# --------------------------------------------------------------------------------------
# forward pass
# --------------------------------------------------------------------------------------


def shard_particles(x, mesh, axis: int = 0):
    """``x`` with its particle axis ``axis`` split over the devices of ``mesh`` (a
    ``Mesh``: all its axes; a :class:`MeshAxes`: the axes named there).

    A sharding constraint for XLA's SPMD partitioner (which then inserts the
    collectives); ``x`` unchanged when ``mesh`` is None. Under ``vmap`` the batch axis
    stays unsharded."""
    if mesh is None:
        return x
    from jax.sharding import NamedSharding, PartitionSpec

    if not isinstance(mesh, MeshAxes):
        mesh = mesh_axes(mesh)
    spec = [None] * x.ndim
    spec[axis] = mesh.axes
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh.mesh, PartitionSpec(*spec)))


def check_particle_mesh(mesh, num_particles: int, axes=None) -> None:
    """Raise ValueError unless ``mesh`` is None or a ``jax.sharding.Mesh`` whose device
    count along ``axes`` (all its axes by default) divides ``num_particles``."""
    if mesh is None:
        return
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"particle_mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    size = mesh_axes(mesh, axes).size
    if int(num_particles) % size:
        raise ValueError(
            f"num_particles ({num_particles}) must be a multiple of the particle_mesh's "
            f"device count along the particle axes ({size})"
        )


def _normalise(logw):
    """Normalised log-weights; all ``-inf`` stays ``-inf`` (never NaN)."""
    lse = logsumexp(logw)
    return jnp.where(jnp.isfinite(lse), logw - lse, -jnp.inf), lse


#: The filter draws the Gaussian noise of a block of steps at once: about this many
#: normals per block (at most 64 steps).
NOISE_BLOCK_NUMBERS = 2**16


def check_int(name, value, minimum):
    """ValueError unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def check_filter_args(num_particles, resampling, ess_threshold) -> None:
    """ValueError naming the bad bootstrap-filter argument (every particle E-step's)."""
    check_int("num_particles", num_particles, 1)
    if resampling not in RESAMPLERS:
        raise ValueError(f"resampling must be one of {sorted(RESAMPLERS)}; got {resampling!r}")
    if not (0.0 <= float(ess_threshold) <= 1.0):
        raise ValueError(f"ess_threshold must be in [0, 1]; got {ess_threshold!r}")


def filter_init(key, ss, y1, u1, m1, num_particles):
    """Initial particles, normalised log-weights, ``log p_hat(y_1)`` and ESS."""
    N = num_particles
    x1 = ss.init.sample(key, (N,)).astype(y1.dtype)
    lw1 = emission_log_lik(ss, x1, u1, y1, m1).astype(y1.dtype)
    lw1 = jnp.where(jnp.isnan(lw1), -jnp.inf, lw1)
    lw1n, lse1 = _normalise(lw1)
    ess1 = 1.0 / jnp.sum(jnp.exp(2 * lw1n))
    return x1, lw1n, lse1 - jnp.log(N).astype(y1.dtype), ess1


def filter_step(
    ss,
    resampling,
    ess_threshold,
    k_res,
    k_mov,
    x_prev,
    lw_prev,
    degenerate,
    u_t,
    y_t,
    m_t,
    noise=None,
):
    """One bootstrap step: ``(x_t, lw_t, ancestors, log p_hat(y_t | y_{1:t-1}), ess,
    resampled)``; ``degenerate`` (all previous weights zero) suppresses resampling.
    ``noise``: standard normal draws ``(N, dx)`` for a Gaussian transition with a
    state-independent covariance (then ``x_t = mean + L noise``, ``L L^T = Q``, and
    ``k_mov`` is unused); None draws from the model's transition with ``k_mov``."""
    N = x_prev.shape[0]
    resample = RESAMPLERS[resampling]
    w = jnp.exp(lw_prev)
    ess = 1.0 / jnp.sum(w**2)
    do_res = (ess < ess_threshold * N) & ~degenerate
    idx = jax.lax.cond(
        do_res,
        lambda: resample(k_res, jnp.where(degenerate, 1.0 / N, w), N).astype(jnp.int32),
        lambda: jnp.arange(N, dtype=jnp.int32),
    )
    lw_base = jnp.where(do_res, jnp.full((N,), -jnp.log(N), lw_prev.dtype), lw_prev)
    if noise is None:
        x = ss.transition(x_prev[idx], u_t).sample(k_mov).astype(y_t.dtype)
    else:
        L = la.cholesky(ss.transition_cov(u_t))
        x = (ss.transition_mean(x_prev[idx], u_t) + la.mm(noise, L.T)).astype(y_t.dtype)
    inc = emission_log_lik(ss, x, u_t, y_t, m_t).astype(y_t.dtype)
    inc = jnp.where(jnp.isnan(inc), -jnp.inf, inc)
    lw_new, step_lz = _normalise(lw_base + inc)
    return x, lw_new, idx, step_lz, ess, do_res


def dynamics_features(ss: StateSpace):
    """The dynamics features ``phi`` of the model's :class:`~ppl_dyn.LinearStructure`
    (for the pair moments of the smoothers), or the identity for a model without one."""
    if ss.structure is None:
        return lambda x: x
    return ss.structure.dynamics.features


def scan_with_noise(step, carry, xs, k_rest, ss: StateSpace, N: int, dtype, mesh=None):
    """``lax.scan(step, carry, (*xs, eps))`` over the ``T - 1`` filter steps, with
    ``eps`` the step's standard normal transition noise ``(N, dx)`` drawn a block of
    steps at once (about 2^16 numbers, at most 64 steps) where the transitions are
    Gaussian with a state-independent covariance (proved from the traced model), else
    None (the step draws from the model's own law). Per step, a small draw (2,000
    numbers at N = 1,000) cost three times as much per number as a block of about 64k.
    The block keys come from ``fold_in(k_rest, 1)``: the bootstrap filter and PaRIS's
    one-pass filter (same ``k_rest``) draw the same noise. Returns ``(carry, ys)``
    with ``ys`` over the steps."""
    gaussian = additive_gaussian(ss, "transition")
    dx = ss.state_dim
    n_steps = xs[0].shape[0]
    block = max(1, min(NOISE_BLOCK_NUMBERS // (N * dx), 64)) if gaussian else max(n_steps, 1)

    def steps(carry, inp):
        """A block of steps: its noise drawn at once, then the steps in a scan."""
        k_noise, rest = inp
        B = rest[0].shape[0]
        eps = None
        if gaussian:
            eps = jax.random.normal(k_noise, (B, N, dx), dtype)
            eps = shard_particles(eps, mesh, axis=1)
        return jax.lax.scan(step, carry, (*rest, eps))

    n_blocks, tail = divmod(n_steps, block)
    noise_keys = jax.random.split(jax.random.fold_in(k_rest, 1), n_blocks + 1)
    parts = []
    if n_blocks:
        main = tuple(a[: n_blocks * block].reshape((n_blocks, block) + a.shape[1:]) for a in xs)
        carry, ys = jax.lax.scan(steps, carry, (noise_keys[:-1], main))
        parts.append(jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), ys))
    if tail or not n_blocks:
        carry, ys = steps(carry, (noise_keys[-1], tuple(a[n_blocks * block :] for a in xs)))
        parts.append(ys)
    if len(parts) == 1:
        return carry, parts[0]
    return carry, jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), *parts)


def particle_filter(
    rng_key,
    ss: StateSpace,
    y,
    u,
    num_particles: int,
    resampling: str = "systematic",
    ess_threshold: float = 0.5,
    mesh=None,
) -> FilterOutput:
    """Bootstrap particle filter for one sequence (``y`` ``(T, dy)``, NaN = missing).

    If every weight is zero (log-weights all ``-inf``) the log-marginal is ``-inf``
    and the weights stay ``-inf``; no NaN is produced and no index is silently chosen.
    ``mesh``: a ``jax.sharding.Mesh`` to split the particle axis over (see
    :class:`ParticleSmoother`), or None.
    """
    N = num_particles
    T = y.shape[0]
    mask = ~jnp.isnan(y)
    k_init, k_rest = jax.random.split(rng_key)
    step_keys = jax.random.split(k_rest, (max(T - 1, 0), 2))
    # the (T, N, ...) history lives in buffers carried through the scan and written in
    # place row by row (stacking the first row onto a (T - 1)-row scan output copied all
    # of it again)
    x1, lw1n, logZ1, ess1 = filter_init(k_init, ss, y[0], u[0], mask[0], N)
    x1, lw1n = shard_particles(x1, mesh), shard_particles(lw1n, mesh)

    def buffer(first):
        first = jnp.asarray(first)
        return jnp.zeros((T,) + first.shape, first.dtype).at[0].set(first)

    hist = (
        buffer(x1),
        buffer(lw1n),
        buffer(jnp.arange(N, dtype=jnp.int32)),
        buffer(ess1),
        buffer(False),
        buffer(logZ1),
    )

    def step(carry, inp):
        x_prev, lw_prev, logZ, hist = carry  # lw_prev normalised
        k_res, k_mov, t, u_t, y_t, m_t, eps = inp
        degenerate = ~jnp.isfinite(logZ)
        x, lw_new, idx, step_lz, ess, do_res = filter_step(
            ss,
            resampling,
            ess_threshold,
            k_res,
            k_mov,
            x_prev,
            lw_prev,
            degenerate,
            u_t,
            y_t,
            m_t,
            noise=eps,
        )
        x, lw_new, idx = (shard_particles(a, mesh) for a in (x, lw_new, idx))
        rows = (x, lw_new, idx, ess, do_res, step_lz)
        hist = tuple(
            jax.lax.dynamic_update_index_in_dim(h, r.astype(h.dtype), t, 0)
            for h, r in zip(hist, rows, strict=True)
        )
        return (x, lw_new, logZ + step_lz, hist), None

    xs = (step_keys[:, 0], step_keys[:, 1], jnp.arange(1, T), u[1:], y[1:], mask[1:])
    carry, _ = scan_with_noise(step, (x1, lw1n, logZ1, hist), xs, k_rest, ss, N, y.dtype, mesh)
    _, _, logZ, (X, LW, anc, ess, res, lz) = carry
    return FilterOutput(
        particles=X,
        log_weights=LW,
        ancestors=anc,
        log_marginal=logZ,
        ess=ess,
        resampled=res,
        predicted_log_probs=lz,
    )


# --------------------------------------------------------------------------------------
# backward passes
# --------------------------------------------------------------------------------------


def _chunks(n: int, chunk_size: Optional[int]):
    size = n if chunk_size is None else max(1, min(int(chunk_size), n))
    num = -(-n // size)
    return size, num


def ffbsm(
    ss: StateSpace,
    filt: FilterOutput,
    u,
    feature,
    chunk_size: Optional[int] = None,
    time_mask=None,
    mesh=None,
):
    """Marginal smoothing log-weights and the pair moments, in one reverse scan.

    ``feature`` maps states ``(N, dx)`` to dynamics features ``(N, k)``. ``time_mask``
    ``(T,)``: False past the sequence's end (ragged lengths); the backward pass restarts
    at the last step inside (smoothed = filter weights there, pair moments 0 past it).
    ``mesh``: split the particles at ``t`` (the columns ``i`` of each chunk) over its
    devices; the rows ``j`` (particles at ``t + 1``) are replicated.
    """
    X, LW = filt.particles, filt.log_weights
    T, N, dx = X.shape
    size, num = _chunks(N, chunk_size)
    pad = size * num - N

    gaussian = additive_gaussian(ss, "transition")  # state-independent Q (proved)
    fused_logits = la._small(dx)  # the size rule of _linalg's fused products

    def back(log_v_next, inp):
        x_t, lw_t, x_next, u_next, valid_next = inp
        x_t, lw_t = shard_particles(x_t, mesh), shard_particles(lw_t, mesh)
        phi_t = shard_particles(feature(x_t), mesh)  # (N, k)
        xn = jnp.concatenate([x_next, jnp.zeros((pad, dx), x_next.dtype)], 0)
        lvn = jnp.concatenate([log_v_next, jnp.full((pad,), -jnp.inf, log_v_next.dtype)])
        if gaussian:
            # log p(x^j | x^i) = -|a_j|^2/2 + a_j.b_i - |b_i|^2/2 + const in whitened
            # coordinates; terms that depend on the row j only cancel when the row is
            # normalised, so the logits are col_i + a_j.b_i (one product per pair)
            L = la.cholesky(ss.transition_cov(u_next))
            b = la.solve_lower(L, ss.transition_mean(x_t, u_next).T).T  # (N, dx)
            b = shard_particles(b, mesh)
            col = lw_t - 0.5 * jnp.sum(b * b, -1)
            xn = la.solve_lower(L, xn.T).T  # whitened x_{t+1} (the pair moment un-whitens)
        xn = xn.reshape(num, size, dx)
        lvn = lvn.reshape(num, size)

        def chunk(acc, c):
            colsum, pair = acc
            xj, lvj = c
            if gaussian and fused_logits:
                # element-wise for a small dx: XLA fuses the logits into the max and the
                # exp passes instead of writing and re-reading a (B, N) block
                a = col[None, :]
                for d in range(dx):
                    a = a + xj[:, d : d + 1] * b[None, :, d]
            elif gaussian:
                a = col[None, :] + xj @ b.T  # (B, N) row-shifted logits
            else:
                a = lw_t[None, :] + pairwise_transition_log_prob(ss, xj, x_t, u_next)
            a = shard_particles(a, mesh, axis=1)
            # one exponential per pair: E = exp(a - rowmax); row sums normalise
            amax = jnp.max(a, axis=1)
            E = jnp.exp(a - jnp.where(jnp.isfinite(amax), amax, 0.0)[:, None])
            rowsum = jnp.sum(E, axis=1)
            ok = jnp.isfinite(lvj) & (rowsum > 0)
            scale = jnp.where(ok, jnp.exp(lvj - jnp.log(jnp.where(ok, rowsum, 1.0))), 0.0)
            # W[j, i] = scale_j E[j, i] is never formed. Column sums and pair moments
            # come from one product with E (one pass over the block):
            # [scale; (scale * x_j)^T] E = [colsum; sum_j scale_j x_j E[j, :]]
            lhs = jnp.concatenate([scale[:, None], xj * scale[:, None]], 1)  # (B, 1 + dx)
            M = shard_particles(lhs.T @ E, mesh, axis=1)  # (1 + dx, N)
            colsum = shard_particles(colsum + M[0], mesh)
            pair = pair + M[1:] @ phi_t
            return (colsum, pair), None

        init = (
            shard_particles(jnp.zeros((N,), X.dtype), mesh),
            jnp.zeros((dx, phi_t.shape[-1]), X.dtype),
        )
        (colsum, pair), _ = jax.lax.scan(chunk, init, (xn, lvn))
        if gaussian:
            pair = la.mm(L, pair)  # back from whitened x_{t+1}
        log_v = jnp.log(colsum)
        # x_{t+1} past the sequence's end (ragged lengths): restart from the filter
        log_v = jnp.where(valid_next, log_v, lw_t)
        pair = jnp.where(valid_next, pair, 0.0)
        return log_v, (log_v, pair)

    valid = jnp.ones((T,), bool) if time_mask is None else time_mask
    _, (log_v, pair) = jax.lax.scan(
        back, LW[-1], (X[:-1], LW[:-1], X[1:], u[1:], valid[1:]), reverse=True
    )
    log_v = jnp.concatenate([log_v, LW[-1:]], 0)
    return log_v, pair


def _sample_rows(key, logits):
    """One categorical draw per row by inverse CDF (one uniform per row)."""
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    cdf = jnp.cumsum(p, axis=-1)
    u = jax.random.uniform(key, logits.shape[:-1] + (1,), dtype=cdf.dtype) * cdf[..., -1:]
    idx = jnp.sum(cdf < u, axis=-1)
    return jnp.minimum(idx, logits.shape[-1] - 1).astype(jnp.int32)


def ffbsi(rng_key, ss: StateSpace, filt: FilterOutput, u, num_trajectories: int, time_mask=None):
    """Backward simulation: ``M`` exact draws of whole trajectories, O(N M) per step.

    ``time_mask`` ``(T,)``: False past the sequence's end (ragged lengths); at the last
    step inside, the draw is from the filter weights alone."""
    X, LW = filt.particles, filt.log_weights
    T = X.shape[0]
    keys = jax.random.split(rng_key, T)
    J_T = _sample_rows(keys[-1], jnp.broadcast_to(LW[-1], (num_trajectories, LW.shape[-1])))
    valid = jnp.ones((T,), bool) if time_mask is None else time_mask

    def back(J_next, inp):
        key, x_t, lw_t, x_next, u_next, valid_next = inp
        lam = pairwise_transition_log_prob(ss, x_next[J_next], x_t, u_next)  # (M, N)
        J = _sample_rows(key, lw_t[None, :] + jnp.where(valid_next, lam, 0.0))
        return J, J

    inputs = (keys[:-1], X[:-1], LW[:-1], X[1:], u[1:], valid[1:])
    _, J = jax.lax.scan(back, J_T, inputs, reverse=True)
    idx = jnp.concatenate([J, J_T[None]], 0)  # (T, M)
    traj = jnp.take_along_axis(X, idx[..., None], axis=1)  # (T, M, dx)
    return jnp.swapaxes(traj, 0, 1)


# --------------------------------------------------------------------------------------
# expected statistics for the linear-in-parameters M-step
# --------------------------------------------------------------------------------------


def _imputed_y_moments(ss: StateSpace, x, u_t, y_t, mask_t):
    """Per particle ``E[y_t | x, y_obs]`` ``(N, dy)`` and the shared conditional
    covariance of the missing entries ``(dy, dy)``."""
    mu = ss.emission_mean(x, u_t)  # (N, dy)
    R = ss.emission_cov(u_t)
    o = mask_t.astype(R.dtype)
    miss = 1.0 - o
    K = la.cho_solve(la.cholesky(mask_covariance(R, mask_t)), (R * o[None, :]).T).T
    K = K * o[None, :]
    yf = jnp.where(mask_t, y_t, 0.0)
    resid = (yf - mu) * o
    Ey = o * yf + miss * (mu + resid @ K.T)
    Rc = miss[:, None] * (R - K @ R) * miss[None, :]
    return Ey, 0.5 * (Rc + Rc.T)


def particle_linear_statistics(
    post: ParticlePosterior, ss: StateSpace, y, u, time_mask=None
) -> LinearStats:
    """Statistics of the dynamics and emission regressions from FFBSm weights.

    ``time_mask`` ``(S, T)`` (ragged lengths): steps where it is False lie past the
    sequence's end and contribute nothing (a length-0 sequence not even its initial
    state)."""
    st = ss.structure
    if st is None:
        raise ValueError("the model declares no LinearStructure; use GradientMStep for its M-step")
    phi = st.dynamics.features
    psi = st.emission.features

    def one(X, log_v, pair, y_s, u_s, valid):
        # past the end: zero weights and particles (selects: they may be inf or NaN)
        X = keep(valid, X)
        v = keep(valid, jnp.exp(log_v))  # (T, N)
        pair = keep(valid[1:], pair)
        ones = valid.astype(X.dtype)[:, None]  # (T, 1): 1 inside the sequence, 0 past it
        # dynamics: z = x_t, r = [phi(x_{t-1}); u_t; 1]
        F = jax.vmap(phi)(X)  # (T, N, k)
        Ef = jnp.einsum("tn,tnk->tk", v, F)
        Eff = jnp.einsum("tn,tnk,tnl->tkl", v, F, F)
        Ex = jnp.einsum("tn,tnd->td", v, X)
        Exx = jnp.einsum("tn,tnd,tne->tde", v, X, X)
        r_bar = jnp.concatenate([Ef[:-1], u_s[1:], ones[1:]], -1)  # (T-1, p)
        k = F.shape[-1]
        r_bar = r_bar * ones[1:]
        S_rr = r_bar.T @ r_bar
        S_rr = S_rr.at[:k, :k].set(jnp.sum(keep(valid[1:], Eff[:-1]), 0))
        z_bar = Ex[1:]
        S_zr = z_bar.T @ r_bar
        S_zr = S_zr.at[:, :k].set(jnp.sum(pair, 0))
        S_zz = jnp.sum(Exx[1:], 0)
        dyn = RegressionStats(S_zr, S_rr, S_zz, jnp.sum(ones[1:]))
        # emission: z = y_t (missing entries imputed per particle), r = [psi(x_t); u_t; 1]
        mask = ~jnp.isnan(y_s)
        Ey, Rc = jax.vmap(lambda x, ut, yt, mt: _imputed_y_moments(ss, x, ut, yt, mt))(
            X, u_s, y_s, mask
        )  # (T, N, dy), (T, dy, dy)
        G = jax.vmap(psi)(X)  # (T, N, q)
        q = G.shape[-1]
        Eg = jnp.einsum("tn,tnq->tq", v, G)
        Egg = jnp.einsum("tn,tnq,tnr->tqr", v, G, G)
        Ez = jnp.einsum("tn,tnd->td", v, Ey)
        Ezg = jnp.einsum("tn,tnd,tnq->tdq", v, Ey, G)
        Ezz = jnp.einsum("tn,tnd,tne->tde", v, Ey, Ey) + keep(valid, Rc)
        psi_bar = jnp.concatenate([Eg, u_s, ones], -1) * ones
        E_rr = psi_bar.T @ psi_bar
        E_rr = E_rr.at[:q, :q].set(jnp.sum(Egg, 0))
        E_zr = Ez.T @ psi_bar
        E_zr = E_zr.at[:, :q].set(jnp.sum(Ezg, 0))
        emi = RegressionStats(E_zr, E_rr, jnp.sum(Ezz, 0), jnp.sum(ones))
        init = InitStats(Ex[0], Exx[0], ones[0, 0])
        return LinearStats(dyn, emi, init)

    mask = jnp.ones(y.shape[:2], bool) if time_mask is None else time_mask
    X, log_v = post.particles, post.smoothed_log_weights
    if post.path_indices is not None:
        # equally weighted paths: the statistics from the M path states directly, never
        # from (T, N, ...) arrays (same values: log_v counts the paths through each
        # particle, so sum_i v_t^i f(x_t^i) = (1/M) sum_m f(x_t^{J_t^m}))
        X = jnp.take_along_axis(X, post.path_indices[..., None], axis=-2)  # (S, T, M, dx)
        M = post.path_indices.shape[-1]
        log_v = jnp.full(X.shape[:-1], -jnp.log(M), X.dtype)
    per_seq = jax.vmap(one)(X, log_v, post.pair_moments, y, u, mask)
    return sum_stats(per_seq)


_MODES = ("ffbsm", "ffbsi", "ffbsi-mcmc", "ffbsi-hybrid")


class ParticleSmoother(NamedTuple):
    """Particle E-step: bootstrap filter + FFBSm (default) or backward simulation.

    Modes (``docs/particle.md``):

    * ``"ffbsm"``: marginal and pair weights, O(N^2) per step (chunked); no paths.
    * ``"ffbsi"``: FFBSm weights as above, plus ``num_trajectories`` exact
      backward-simulated paths (O(N M) per step).
    * ``"ffbsi-mcmc"``: ``M = num_trajectories`` paths drawn with ``num_mcmc_steps``
      independent Metropolis-Hastings moves per backward step, started at the
      genealogical ancestor (:func:`ppl_dyn.infer.backward.ffbsi_mcmc`);
      O(N + M num_mcmc_steps) per step, deterministic.
    * ``"ffbsi-hybrid"``: ``M`` exact paths by rejection sampling with at most
      ``max_trials`` rounds per step, then the exact O(N) draw for the remaining rows
      (:func:`ppl_dyn.infer.backward.ffbsi_hybrid`); needs Gaussian transitions (a
      ``LinearStructure``).

    In the two linear-cost modes no FFBSm is run: ``smoothed_log_weights`` hold
    ``log(c_t^i / M)`` with ``c_t^i`` the number of paths through particle ``i`` at ``t``
    (``-inf`` where none), ``pair_moments`` hold ``(1/M) sum_m x_{t+1}^m phi(x_t^m)^T``
    along the paths, and ``trajectories`` the paths; so ``means``, ``covs`` and the
    M-step statistics are exactly the averages over the ``M`` paths.

    Args:
        num_particles: ``N``.
        resampling: ``"systematic"``, ``"stratified"`` or ``"multinomial"``.
        ess_threshold: resample when ``ESS < ess_threshold * N`` (1.0: always).
        mode: ``"ffbsm"``, ``"ffbsi"``, ``"ffbsi-mcmc"`` or ``"ffbsi-hybrid"``.
        num_trajectories: ``M`` for the three backward-simulation modes.
        chunk_size: rows of the ``N x N`` transition matrix evaluated at once
            (None: all); bounds memory at ``chunk_size * N`` per step.
        num_mcmc_steps: Metropolis-Hastings moves per backward step (``"ffbsi-mcmc"``).
        max_trials: rejection rounds per backward step before the exact fallback
            (``"ffbsi-hybrid"``).
        kernel: a :class:`~ppl_dyn.infer.backward.BackwardKernel` value (the one
            ``PARISSmoother`` and ``OnlineEM`` take) instead of the two settings above:
            ``mode="ffbsi", kernel=BackwardKernel("mcmc", num_mcmc_steps=3)`` is
            ``mode="ffbsi-mcmc", num_mcmc_steps=3``; ``BackwardKernel("hybrid",
            max_trials=5)`` is ``mode="ffbsi-hybrid", max_trials=5``.
        particle_mesh: a ``jax.sharding.Mesh`` to split the particle axis over (one long
            sequence, many particles; ``docs/scale.md``), or None. ``num_particles``
            must be a multiple of its device count. The particles, log-weights and
            ancestors, and the ``N`` columns of each FFBSm chunk, carry sharding
            constraints over all the mesh's axes (or ``particle_axes``); XLA inserts the
            collectives (resampling, normalising sums, the FFBSm row sums). The random
            numbers do not depend on the sharding: the result equals the unsharded one
            to floating-point rounding.
        particle_axes: the names of the ``particle_mesh`` axes the particles are split
            over (None: all). With a two-axis mesh ``("seq", "particles")`` and
            ``EM.run(..., mesh=mesh, sequence_axes="seq")``, the sequences are split over
            one axis and the particles of each sequence over the other.

    Example:
        >>> import jax, numpy as np
        >>> from jax.sharding import Mesh
        >>> from ppl_dyn.infer import ParticleSmoother
        >>> mesh = Mesh(np.array(jax.devices()), ("particles",))
        >>> e_step = ParticleSmoother(num_particles=1024 * mesh.devices.size,
        ...                           particle_mesh=mesh)
    """

    # a random likelihood estimate: handlers.marginalize (NUTS) refuses this E-step
    deterministic = False

    num_particles: int = 100
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    mode: str = "ffbsm"
    num_trajectories: int = 100
    chunk_size: Optional[int] = 256
    num_mcmc_steps: int = 1
    max_trials: int = DEFAULT_MAX_TRIALS
    particle_mesh: Optional[jax.sharding.Mesh] = None
    particle_axes: Optional[tuple] = None
    kernel: Optional[BackwardKernel] = None

    def backward_settings(self) -> tuple[str, int, int]:
        """``(mode, num_mcmc_steps, max_trials)`` with a ``kernel`` value folded in."""
        if self.kernel is None:
            return self.mode, self.num_mcmc_steps, self.max_trials
        if not isinstance(self.kernel, BackwardKernel):
            raise ValueError(
                f"kernel must be a BackwardKernel value (or None); got {self.kernel!r}"
            )
        k = self.kernel.check()
        mode = f"ffbsi-{k.name}"
        if self.mode not in ("ffbsi", mode):
            raise ValueError(
                f"kernel={k!r} draws backward paths: use mode='ffbsi' with it; got "
                f"mode={self.mode!r}"
            )
        return mode, k.num_mcmc_steps, k.max_trials

    def _check(self):
        check_filter_args(self.num_particles, self.resampling, self.ess_threshold)
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}; got {self.mode!r}")
        for name, low in (("num_trajectories", 1), ("num_mcmc_steps", 1), ("max_trials", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or int(value) < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        check_particle_mesh(self.particle_mesh, self.num_particles, self.particle_axes)

    def posterior(self, rng_key, ss: StateSpace, y, u, time_mask=None) -> ParticlePosterior:
        """Pure E-step on normalised data ``y`` ``(S, T, dy)``, ``u`` ``(S, T, du)``.

        ``time_mask`` ``(S, T)``: False past each sequence's end (ragged lengths; ``y``
        NaN there). FFBSm and FFBSi then start their backward pass at the last step
        inside, so the smoother of the observed span is the one of the cut sequence; the
        two linear-cost modes run through the padded steps (valid draws, a little more
        Monte Carlo noise)."""
        self._check()
        mode, num_mcmc_steps, max_trials = self.backward_settings()
        feature = dynamics_features(ss)
        S = y.shape[0]
        keys = jax.random.split(rng_key, S)

        mesh = mesh_axes(self.particle_mesh, self.particle_axes)

        def one(key, y_s, u_s, mask_s=None):
            k_f, k_b = jax.random.split(key)
            filt = particle_filter(
                k_f, ss, y_s, u_s, self.num_particles, self.resampling, self.ess_threshold, mesh
            )
            # the stored (T, N, ...) filter outputs keep their particle axis split, so the
            # backward passes start from sharded arrays
            filt = filt._replace(
                particles=shard_particles(filt.particles, mesh, axis=1),
                log_weights=shard_particles(filt.log_weights, mesh, axis=1),
                ancestors=shard_particles(filt.ancestors, mesh, axis=1),
            )
            traj = fallback = paths = None
            if mode in ("ffbsm", "ffbsi"):
                log_v, pair = ffbsm(ss, filt, u_s, feature, self.chunk_size, mask_s, mesh)
            if mode == "ffbsi":
                traj = ffbsi(k_b, ss, filt, u_s, self.num_trajectories, mask_s)
            elif mode == "ffbsi-mcmc":
                back = ffbsi_mcmc(k_b, ss, filt, u_s, self.num_trajectories, num_mcmc_steps)
            elif mode == "ffbsi-hybrid":
                back = ffbsi_hybrid(k_b, ss, filt, u_s, self.num_trajectories, max_trials)
                draws = max(back.indices.shape[0] - 1, 1) * self.num_trajectories
                fallback = jnp.sum(back.info.num_fallback) / draws
            if mode in ("ffbsi-mcmc", "ffbsi-hybrid"):
                traj, paths = back.trajectories, back.indices
                log_v, pair = path_statistics(filt.particles, back.indices, feature)
            return ParticlePosterior(
                filt.particles,
                filt.log_weights,
                log_v,
                pair,
                traj,
                filt.log_marginal,
                filt.ess,
                filt.predicted_log_probs,
                fallback,
                paths,
            )

        if time_mask is None:
            return jax.vmap(one)(keys, y, u)
        return jax.vmap(one)(keys, y, u, time_mask)

    def smooth(
        self, params: dict, model, *args, rng_key=None, lengths=None, **kwargs
    ) -> ParticlePosterior:
        """Particle posterior of ``model`` at ``params`` (``rng_key`` required).

        Ragged sequences: lists of arrays or ``lengths=``, as in
        :meth:`KalmanSmoother.smooth` (the posterior is padded to the longest)."""

        check_rng_key(rng_key)
        self._check()
        kwargs, time_mask = ragged_data(kwargs, lengths)
        _, spec = prepare_eager(model, params, args, kwargs)
        has_u = kwargs.get("u") is not None
        rest = {k: v for k, v in kwargs.items() if k not in ("y", "u")}
        dynamic, static = split_static(rest)
        args = (self, model, static_items(static), has_u)
        kernel = cached_program(("particle_smoother",) + args, lambda: _smooth_kernel(*args))
        post = kernel(rng_key, params, spec.y, spec.u, dynamic, time_mask)
        if post.backward_fallback_rate is not None:
            warn_backward_fallback(np.asarray(post.backward_fallback_rate), stacklevel=3)
        if not spec.batched:
            post = jax.tree_util.tree_map(lambda a: a[0], post)
        return post


#: The share of exact fallback draws above which ffbsi-hybrid warns.
FALLBACK_WARN_RATE = 0.2


def warn_backward_fallback(rate, stacklevel: int = 2) -> None:
    """Warn when ffbsi-hybrid's rejection rounds left more than
    :data:`FALLBACK_WARN_RATE` of the backward draws to the exact ``O(N)`` draw."""
    worst = float(np.max(rate))
    if worst > FALLBACK_WARN_RATE:
        warnings.warn(
            f"ffbsi-hybrid drew {100 * worst:.0f}% of its backward indices by the exact "
            "O(N) fallback (its rejection bound is loose for this model and these "
            "particles), so the pass costs about as much as exact FFBSi: "
            "mode='ffbsi-mcmc' keeps a linear cost, or raise max_trials",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )


def _smooth_kernel(e_step: ParticleSmoother, model, static_items, has_u: bool):

    def kernel(rng_key, params, y, u, dynamic, time_mask=None):
        data = {"y": y, "u": u} if has_u else {"y": y}
        ss, spec = bind(model, params, **data, **dict(static_items), **dynamic)
        return e_step.posterior(rng_key, ss, spec.y, spec.u, time_mask=time_mask)

    return jit_model(kernel)
