"""Conditional particle filter with ancestor sampling (CPF-AS), for PSAEM and PGAS.

Given a reference path ``x'_{1:T}`` kept in the last slot ``N - 1``
(``docs/psaem.md``; Lindsten, Jordan & Schön 2014):

* the other ``N - 1`` particles follow the bootstrap filter of
  :mod:`ppl_dyn.infer.particle` with multinomial resampling at every step (blackjax's
  scheme; conditional SMC needs i.i.d. ancestor draws, so systematic or ESS-triggered
  resampling would break invariance);
* the reference slot keeps ``x_t^{N-1} = x'_t`` and draws its ancestor from
  ``Cat(w_{t-1}^j p(x'_t | x_{t-1}^j))`` (one factorisation of the transition
  covariance per step, :func:`~ppl_dyn.infer.particle.pairwise_transition_log_prob`);
* NaN observations contribute a weight increment of 0, as in the bootstrap filter
  (:func:`~ppl_dyn.infer.particle.emission_log_lik`);
* the new reference is the ancestral path of ``k ~ Cat(w_T)``.

The kernel leaves the smoothing distribution ``p(x_{1:T} | y_{1:T}, theta)`` invariant for
any ``N >= 2``. Cost ``O(N T)`` time and memory for one sequence; several sequences are a
``vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.smc import resampling as bj_resampling
from jax.scipy.special import logsumexp

from ppl_dyn.infer.particle import (
    dynamics_features,
    emission_log_lik,
    pairwise_transition_log_prob,
)
from ppl_dyn.state_space import StateSpace

__all__ = [
    "CPFAS",
    "CPFState",
    "CPFOutput",
    "conditional_particle_filter",
    "ancestral_paths",
    "path_posterior",
]


class CPFOutput(NamedTuple):
    """What one CPF-AS sweep returns (one sequence; a leading axis when vmapped).

    Attributes:
        particles: ``(T, N, dx)``; slot ``N - 1`` holds the reference path when the
            filter was conditional.
        ancestors: ``(T, N)`` indices into the particles at ``t - 1`` (row 0: identity).
        log_weights: normalised filter log-weights ``(T, N)``; the last row is ``log w_T``.
        log_marginal: ``sum_t log(mean_i g(y_t | x_t^i))``. With ``conditional=False``
            this is the bootstrap filter's estimate of ``log p(y_{1:T})`` (its exponential
            is unbiased); conditional on a reference path it is not an unbiased estimate
            (the reference is a draw from the smoothing distribution, which pulls it up),
            and serves as a rough progress trace only.
        reference: the new reference path ``(T, dx)``: the ancestral path of
            ``k ~ Cat(w_T)``.
        reference_index: ``k``.
    """

    particles: jax.Array
    ancestors: jax.Array
    log_weights: jax.Array
    log_marginal: jax.Array
    reference: jax.Array
    reference_index: jax.Array


def _log_normalise(logw):
    lse = logsumexp(logw)
    return jnp.where(jnp.isfinite(lse), logw - lse, -jnp.inf), lse


def conditional_particle_filter(
    rng_key,
    ss: StateSpace,
    y,
    u,
    reference,
    num_particles: int,
    *,
    conditional=True,
    ancestor_sampling=True,
    time_mask=None,
) -> CPFOutput:
    """One CPF-AS sweep over one sequence.

    Args:
        rng_key: PRNG key.
        ss: the bound state space (:func:`ppl_dyn.bind`).
        y: observations ``(T, dy)``, NaN = missing.
        u: inputs ``(T, du)`` (``du`` may be 0).
        reference: reference path ``(T, dx)``; ignored when ``conditional`` is False.
        num_particles: ``N >= 2`` (``N - 1`` free particles plus the reference).
        conditional: keep the reference in slot ``N - 1`` (may be a traced bool: False
            gives a plain bootstrap filter with multinomial resampling, e.g. to draw the
            first reference, without a second compilation).
        ancestor_sampling: draw the reference's ancestors (CPF-AS); False keeps the
            reference's own history (plain CPF, which mixes poorly: for comparison).
            May be a traced bool.
        time_mask: ``(T,)``, False past the sequence's end (ragged lengths; None: all
            True). The sequence has ended there: each step repeats the last step inside
            (same particles and weights, identity ancestors, log-marginal unchanged),
            so the paths past the end repeat their last state and ``Cat(w_T)`` is the
            last step's draw. The keys of step ``t`` do not depend on ``T``, so the
            sweep equals the one on the sequence cut at its length (to rounding).

    Returns:
        A :class:`CPFOutput`.
    """
    N = int(num_particles)
    if N < 2:
        raise ValueError(f"num_particles must be >= 2 for a conditional filter; got {N}")
    T = y.shape[0]
    dtype = y.dtype
    mask = ~jnp.isnan(y)
    reference = jnp.asarray(reference, dtype)
    conditional = jnp.asarray(conditional, bool)
    ancestor_sampling = jnp.asarray(ancestor_sampling, bool)
    last = N - 1
    k_init, k_final, k_rest = jax.random.split(rng_key, 3)
    step_keys = jax.random.split(k_rest, (max(T - 1, 0), 3))
    valid = jnp.ones((T,), bool) if time_mask is None else jnp.asarray(time_mask, bool)

    x1 = ss.init.sample(k_init, (N,)).astype(dtype)
    x1 = x1.at[last].set(jnp.where(conditional, reference[0], x1[last]))
    inc1 = emission_log_lik(ss, x1, u[0], y[0], mask[0]).astype(dtype)
    inc1 = jnp.where(jnp.isnan(inc1), -jnp.inf, inc1)
    lw1, lse1 = _log_normalise(inc1)
    log_n = jnp.log(jnp.asarray(N, dtype))

    def step(carry, inp):
        x_prev, lw_prev, log_z = carry
        k_res, k_anc, k_mov, u_t, y_t, m_t, x_ref, valid_t = inp
        w = jnp.exp(lw_prev)
        # N - 1 i.i.d. multinomial ancestors (blackjax returns them sorted: drawing N
        # and overwriting the last would keep the N - 1 smallest, a biased set)
        idx = bj_resampling.multinomial(k_res, w, N - 1).astype(jnp.int32)
        trans = pairwise_transition_log_prob(ss, x_ref[None, :], x_prev, u_t)[0]
        use_as = conditional & ancestor_sampling
        anc_logits = jnp.where(use_as, lw_prev + trans, lw_prev)
        a_last = jax.random.categorical(k_anc, anc_logits).astype(jnp.int32)
        a_last = jnp.where(conditional & ~ancestor_sampling, jnp.int32(last), a_last)
        idx = jnp.concatenate([idx, a_last[None]])
        x = ss.transition(x_prev[idx], u_t).sample(k_mov).astype(dtype)
        x = x.at[last].set(jnp.where(conditional, x_ref, x[last]))
        inc = emission_log_lik(ss, x, u_t, y_t, m_t).astype(dtype)
        inc = jnp.where(jnp.isnan(inc), -jnp.inf, inc)
        lw, lse = _log_normalise(inc)
        # past the sequence's end: repeat the last step (a select: the step may be junk)
        x = jnp.where(valid_t, x, x_prev)
        lw = jnp.where(valid_t, lw, lw_prev)
        idx = jnp.where(valid_t, idx, jnp.arange(N, dtype=jnp.int32))
        log_z = jnp.where(valid_t, log_z + lse - log_n, log_z)
        return (x, lw, log_z), (x, lw, idx)

    xs = (
        step_keys[:, 0],
        step_keys[:, 1],
        step_keys[:, 2],
        u[1:],
        y[1:],
        mask[1:],
        reference[1:],
        valid[1:],
    )
    log_z1 = jnp.where(valid[0], lse1 - log_n, 0.0)  # a length-0 sequence: 0
    (_, lw_T, log_z), (x_rest, lw_rest, anc) = jax.lax.scan(step, (x1, lw1, log_z1), xs)
    particles = jnp.concatenate([x1[None], x_rest], 0)
    ancestors = jnp.concatenate([jnp.arange(N, dtype=jnp.int32)[None], anc], 0)
    k = jax.random.categorical(k_final, lw_T).astype(jnp.int32)
    new_ref = ancestral_paths(particles, ancestors, k[None])[:, 0]
    return CPFOutput(
        particles=particles,
        ancestors=ancestors,
        log_weights=jnp.concatenate([lw1[None], lw_rest], 0),
        log_marginal=log_z,
        reference=new_ref,
        reference_index=k,
    )


def ancestral_paths(particles, ancestors, indices=None):
    """The ancestral paths of the final particles ``indices`` (default: all ``N``).

    Args:
        particles: ``(T, N, dx)``.
        ancestors: ``(T, N)`` (row 0 unused).
        indices: ``(M,)`` indices of final particles.

    Returns:
        ``(T, M, dx)``: path ``m`` at time ``t`` (``O(M T)`` time and memory).
    """
    N = particles.shape[1]
    j_T = jnp.arange(N, dtype=jnp.int32) if indices is None else jnp.asarray(indices, jnp.int32)

    def back(j, anc_t):  # j: indices at time t; emit them, move to t - 1
        return anc_t[j], j

    j_0, j_rest = jax.lax.scan(back, j_T, ancestors[1:], reverse=True)
    idx = jnp.concatenate([j_0[None], j_rest], 0)  # (T, M)
    return jnp.take_along_axis(particles, idx[..., None], axis=1)


def path_posterior(out: CPFOutput, feature):
    """The weighted ancestral paths of one sweep as a
    :class:`~ppl_dyn.infer.ParticlePosterior`.

    Every one of the ``N`` ancestral paths ``x^i_{1:T}`` carries its final weight
    ``w_T^i`` at every time, so the closed-form M-step statistics computed from it
    (``LinearGaussianMStep.statistics``; with the sweep's ``time_mask`` for ragged
    lengths) equal ``sum_i w_T^i s(x^i_{1:T})``: the PSAEM
    estimate (missing observations enter through their conditional moments given each
    path, as in particle EM). Its ``trajectories`` ``(1, T, dx)`` hold the new reference
    path, one draw from the kernel (what a Gibbs M-step or
    :class:`~ppl_dyn.infer.GradientMStep` takes). ``feature`` maps states ``(N, dx)``
    to the dynamics features ``phi`` (for the pair moments ``sum_i w_T^i x_{t+1}^i phi(x_t^i)^T``).
    """
    from ppl_dyn.infer.particle import ParticlePosterior

    paths = ancestral_paths(out.particles, out.ancestors)  # (T, N, dx)
    lw_T = out.log_weights[-1]
    w_T = jnp.exp(lw_T)
    T = paths.shape[0]
    feats = jax.vmap(feature)(paths[:-1])  # (T-1, N, k)
    pair = jnp.einsum("n,tnd,tnk->tdk", w_T, paths[1:], feats)
    log_v = jnp.broadcast_to(lw_T, (T,) + lw_T.shape)
    return ParticlePosterior(
        particles=paths,
        filter_log_weights=out.log_weights,
        smoothed_log_weights=log_v,
        pair_moments=pair,
        trajectories=out.reference[None],  # the new reference: one draw of the path
        log_marginal=out.log_marginal,
        ess=1.0 / jnp.sum(jnp.exp(2.0 * out.log_weights), -1),
    )


class CPFState(NamedTuple):
    """What :class:`CPFAS` carries between EM iterations.

    Attributes:
        references: the reference paths ``(S, T, dx)``, one per sequence.
        conditional: False before the first sweep (the first sweep is a plain bootstrap
            filter with multinomial resampling that draws the first references).
    """

    references: jax.Array
    conditional: jax.Array


class CPFAS(NamedTuple):
    """The conditional particle filter with ancestor sampling as a stateful E-step
    (:class:`~ppl_dyn.infer.protocols.StatefulEStep`): each EM iteration runs one
    CPF-AS sweep per sequence conditioned on the previous iteration's reference path
    and hands the M-step the ``N`` weighted ancestral paths (:func:`path_posterior`).

    With :class:`~ppl_dyn.infer.psaem.StochasticApproximation` as the M-step this is
    PSAEM (:class:`~ppl_dyn.infer.PSAEM` builds exactly that pair); with a plain
    :class:`~ppl_dyn.infer.LinearGaussianMStep` it is a noisy particle EM
    (``gamma_k = 1``).

    Args:
        num_particles: ``N >= 2``.
        ancestor_sampling: False runs the plain conditional filter (for comparison).
    """

    num_particles: int = 20
    ancestor_sampling: bool = True

    def init(self, ss, y, u) -> CPFState:
        S, T = y.shape[:2]
        refs = jnp.zeros((S, T, ss.state_dim), y.dtype)
        return CPFState(references=refs, conditional=jnp.asarray(False))

    def step(self, rng_key, ss, y, u, state: CPFState, time_mask=None):
        feature = dynamics_features(ss)
        keys = jax.random.split(rng_key, y.shape[0])
        masks = jnp.ones(y.shape[:2], bool) if time_mask is None else time_mask

        def one(key, y_s, u_s, ref, mask_s):
            out = conditional_particle_filter(
                key,
                ss,
                y_s,
                u_s,
                ref,
                self.num_particles,
                conditional=state.conditional,
                ancestor_sampling=self.ancestor_sampling,
                time_mask=mask_s,
            )
            return path_posterior(out, feature), out.reference

        post, refs = jax.vmap(one)(keys, y, u, state.references, masks)
        return post, CPFState(references=refs, conditional=jnp.asarray(True))

    def posterior(self, rng_key, ss, y, u, time_mask=None):
        """One unconditional sweep (a bootstrap filter with multinomial resampling):
        the weighted ancestral paths, for use outside EM."""
        post, _ = self.step(rng_key, ss, y, u, self.init(ss, y, u), time_mask=time_mask)
        return post
