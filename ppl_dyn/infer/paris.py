r"""PaRIS: forward-only particle smoothing of additive functionals at linear cost.

The particle-based, rapid incremental smoother of Olsson & Westerborn (2017, Bernoulli
23(3)) estimates smoothed expectations of additive functionals
:math:`S_T = \sum_t s_t(x_{t-1}, x_t)` in one forward pass. Each particle :math:`i`
carries :math:`\tau_t^i \approx \mathbb E[S_t \mid x_t = x_t^i, y_{1:t}]`; at each step
:math:`K` backward indices :math:`J^{i,k} \sim B_t(i, \cdot)`, with

.. math::
    B_t(i, j) = \frac{w_{t-1}^j\, p(x_t^i \mid x_{t-1}^j)}
                     {\sum_l w_{t-1}^l\, p(x_t^i \mid x_{t-1}^l)},

replace the exact :math:`O(N)` sum of forward-only FFBSm (Del Moral, Doucet & Singh 2010):

.. math::
    \tau_t^i = \frac1K \sum_{k=1}^K \big[\tau_{t-1}^{J^{i,k}}
               + s_t(x_{t-1}^{J^{i,k}}, x_t^i)\big],\qquad \tau_1^i = s_1(x_1^i),

and the estimate is :math:`\sum_i w_T^i \tau_T^i`. Given the particles,
:math:`\mathbb E[\tau_t^i]` over the backward draws is the forward-only FFBSm value (by
induction), so the estimate is the FFBSm number plus zero-mean noise.

* Cost :math:`O(N K T)` (plus the kernel's proposals), memory :math:`O(N \dim s)`,
  independent of :math:`T`: one ``lax.scan`` that runs the bootstrap filter and the
  PaRIS update together.
* :math:`K \ge 2` is needed for stability (variance growing linearly in :math:`T`).
  :math:`K = 1` is allowed but degenerate: the backward draws then form a genealogy that
  coalesces like the filter's own ancestry, and the variance grows quadratically.
* Backward kernels (:mod:`ppl_dyn.infer.backward`): ``"hybrid"`` (rejection with
  proposal :math:`\mathrm{Cat}(w_{t-1})` and acceptance
  :math:`p(x_t^i \mid x_{t-1}^j) / \sup p`, at most ``max_trials`` rounds, then the exact
  :math:`O(N)` draw: exact given the particles) and ``"mcmc"`` (``num_mcmc_steps``
  independent Metropolis-Hastings moves started at the genealogical ancestor: fixed
  cost, consistent but not exact given the particles). Each of the :math:`K` draws is
  an independent chain / rejection sampler.

The functional is the one the closed-form M-step needs: the
:class:`~ppl_dyn.infer.stats.LinearStats` of a model with a
:class:`~ppl_dyn.LinearStructure` (dynamics regression terms, emission terms with
missing entries imputed per particle as in
:func:`~ppl_dyn.infer.particle.particle_linear_statistics`, and the initial-state
terms). The tau recursion is written with coefficients ``(c_old, c_new)``:
``tau_t = c_old * mean_k tau_{t-1}[J] + c_new * s_t``; batch smoothing uses ``(1, 1)``
and online EM (:mod:`ppl_dyn.infer.online`) the stochastic-approximation pair
``(1 - gamma_t, gamma_t)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from ppl_dyn.infer._pattern import COMPLETE
from ppl_dyn.infer.backward import (
    BackwardKernel,
    backward_indices_hybrid,
    backward_indices_mcmc,
)
from ppl_dyn.infer.particle import (
    FilterOutput,
    _imputed_y_moments,
    check_filter_args,
    filter_init,
    filter_step,
    scan_with_noise,
)
from ppl_dyn.infer.stats import InitStats, LinearStats, RegressionStats, sum_stats
from ppl_dyn.requirements import is_builtin_model, verify_structure
from ppl_dyn.state_space import StateSpace


class PARISInfo(NamedTuple):
    """Diagnostics of the backward draws of one pass (sums over ``t = 2..T``).

    Attributes:
        num_proposals: proposals evaluated (MCMC: ``N K (T-1) num_mcmc_steps``; hybrid:
            rejection proposals of the rounds run, counting unaccepted draws only).
        num_accepted: accepted proposals (MCMC moves, or draws accepted by rejection).
        num_fallback: draws made by the exact ``O(N)`` fallback (hybrid; 0 for MCMC).
    """

    num_proposals: jax.Array
    num_accepted: jax.Array
    num_fallback: jax.Array


class PARISPosterior(NamedTuple):
    """What :class:`PARISSmoother` returns (leading sequence axis ``S``).

    The smoothing distribution itself is not stored (that is the point of PaRIS); the
    posterior carries the accumulated statistics.

    Attributes:
        stats: :class:`~ppl_dyn.infer.stats.LinearStats` of each sequence (leaves with a
            leading ``S`` axis); :meth:`LinearGaussianMStep.statistics` sums them.
        log_marginal: log of the unbiased particle estimate of ``p(y)`` ``(S,)``.
        ess: filter effective sample sizes ``(S, T)``.
        info: :class:`PARISInfo` per sequence.
    """

    stats: LinearStats
    log_marginal: jax.Array
    ess: jax.Array
    info: PARISInfo

    def linear_statistics(self, ss, y, u, time_mask=None):
        """The statistics accumulated in the forward pass, summed over sequences (the
        pass took the time mask already: nothing left to drop)."""
        del ss, y, u, time_mask
        return paris_linear_statistics(self)


DEFAULT_KERNEL = BackwardKernel()


def _require_structure(ss: StateSpace):
    if ss.structure is None:
        raise ValueError(
            "PaRIS accumulates the closed-form M-step statistics and needs a model "
            "declaring a LinearStructure; use ParticleSmoother(mode='ffbsi') with "
            "GradientMStep for other models"
        )
    return ss.structure


# --------------------------------------------------------------------------------------
# the additive functional s_t (per particle)
# --------------------------------------------------------------------------------------


def _regressors(features, u_t, lead_shape):
    du = u_t.shape[-1]
    u_b = jnp.broadcast_to(u_t, lead_shape + (du,)).astype(features.dtype)
    ones = jnp.ones(lead_shape + (1,), features.dtype)
    return jnp.concatenate([features, u_b, ones], -1)


def dynamics_terms(ss: StateSpace, x_prev_J, x_t, u_t) -> RegressionStats:
    """``(1/K) sum_k s^dyn(x_{t-1}^{J^{i,k}}, x_t^i)`` per particle, ``x_prev_J``
    ``(N, K, dx)``: ``z = x_t``, ``r = [phi(x_{t-1}); u_t; 1]``."""
    st = ss.structure
    N, K, dx = x_prev_J.shape
    F = st.dynamics.features(x_prev_J.reshape(N * K, dx)).reshape(N, K, -1)
    r = _regressors(F, u_t, (N, K))  # (N, K, p)
    r_bar = jnp.mean(r, 1)
    S_rr = jnp.einsum("nkp,nkq->npq", r, r) / K
    S_zr = x_t[:, :, None] * r_bar[:, None, :]
    S_zz = x_t[:, :, None] * x_t[:, None, :]
    return RegressionStats(S_zr, S_rr, S_zz, jnp.ones((N,), x_t.dtype))


def emission_terms(ss: StateSpace, x_t, u_t, y_t, mask_t, complete=False) -> RegressionStats:
    """``s^emi(x_t^i)`` per particle: ``z = y_t`` (missing entries imputed from their
    conditional Gaussian given ``x_t^i`` and the observed entries), ``r = [psi(x_t); u_t;
    1]``. ``complete``: the data have no missing entry (known when the program is
    traced): the imputation is not traced."""
    st = ss.structure
    N = x_t.shape[0]
    if complete:
        Ey = jnp.broadcast_to(y_t, (N,) + y_t.shape).astype(x_t.dtype)
        Rc = jnp.zeros(y_t.shape * 2, x_t.dtype)
    else:
        Ey, Rc = _imputed_y_moments(ss, x_t, u_t, y_t, mask_t)  # (N, dy), (dy, dy)
    r = _regressors(st.emission.features(x_t), u_t, (N,))  # (N, q)
    S_zr = Ey[:, :, None] * r[:, None, :]
    S_rr = r[:, :, None] * r[:, None, :]
    S_zz = Ey[:, :, None] * Ey[:, None, :] + Rc
    return RegressionStats(S_zr, S_rr, S_zz, jnp.ones((N,), x_t.dtype))


def initial_tau(ss: StateSpace, x1, u1, y1, mask1, complete=False) -> LinearStats:
    """``tau_1^i = s_1(x_1^i)``: emission and initial-state terms (no transition)."""
    emi = emission_terms(ss, x1, u1, y1, mask1, complete)
    dyn = jax.tree_util.tree_map(jnp.zeros_like, dynamics_terms(ss, x1[:, None, :], x1, u1))
    init = InitStats(x1, x1[:, :, None] * x1[:, None, :], jnp.ones(x1.shape[:1], x1.dtype))
    return LinearStats(dyn, emi, init)


def weighted_sum(tau: LinearStats, log_weights) -> LinearStats:
    """``sum_i w^i tau^i`` (all ``-inf`` weights give zeros, not NaN)."""
    w = jnp.where(jnp.isfinite(log_weights), jnp.exp(log_weights), 0.0)
    return jax.tree_util.tree_map(lambda a: jnp.tensordot(w, a, axes=1), tau)


# --------------------------------------------------------------------------------------
# one PaRIS step given the particles at t-1 and t
# --------------------------------------------------------------------------------------


def backward_draws(kernel: BackwardKernel, key, ss, x_prev, lw_prev, x_t, anc, u_t):
    """``(N, K)`` indices ``J^{i,k} ~ B_t(i, .)`` and ``(proposals, accepted, fallback)``.

    The ``N K`` draws are rows of the kernels of :mod:`ppl_dyn.infer.backward` (each row
    its own rejection sampler or MH chain; MCMC chains start at the ancestor ``a_t^i``).
    """
    N, K = x_t.shape[0], kernel.num_backward
    rows = jnp.repeat(x_t, K, axis=0)  # row i K + k
    if kernel.name == "mcmc":
        J, nacc = backward_indices_mcmc(
            key, ss, x_prev, lw_prev, rows, u_t, jnp.repeat(anc, K), kernel.num_mcmc_steps
        )
        info = (
            jnp.asarray(N * K * kernel.num_mcmc_steps, jnp.int32),
            jnp.sum(nacc),
            jnp.zeros((), jnp.int32),
        )
    else:
        J, ntr, acc = backward_indices_hybrid(
            key, ss, x_prev, lw_prev, rows, u_t, kernel.max_trials
        )
        n_acc = jnp.sum(acc.astype(jnp.int32))
        info = (jnp.sum(ntr), n_acc, N * K - n_acc)
    return J.reshape(N, K), info


def paris_update(
    kernel: BackwardKernel,
    key,
    ss,
    x_prev,
    lw_prev,
    tau_prev,
    x_t,
    anc,
    u_t,
    y_t,
    m_t,
    c_old=1.0,
    c_new=1.0,
    complete=False,
):
    """``tau_t = c_old * (1/K) sum_k tau_{t-1}^{J^{i,k}} + c_new * s_t`` and the draw
    diagnostics (``complete``: see :func:`emission_terms`)."""
    J, info = backward_draws(kernel, key, ss, x_prev, lw_prev, x_t, anc, u_t)
    old = jax.tree_util.tree_map(lambda a: jnp.mean(a[J], axis=1), tau_prev)
    new = LinearStats(
        dynamics_terms(ss, x_prev[J], x_t, u_t),
        emission_terms(ss, x_t, u_t, y_t, m_t, complete),
        jax.tree_util.tree_map(jnp.zeros_like, tau_prev.init),
    )
    tau = jax.tree_util.tree_map(lambda a, b: c_old * a + c_new * b, old, new)
    return tau, info


# --------------------------------------------------------------------------------------
# the bootstrap filter step (as in particle.particle_filter, same key usage)
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# whole passes
# --------------------------------------------------------------------------------------


def _sum_info(infos):
    return PARISInfo(*(jnp.sum(a) for a in infos))


def paris_on_particles(
    rng_key, ss: StateSpace, filt: FilterOutput, y, u, kernel: BackwardKernel = DEFAULT_KERNEL
):
    """PaRIS statistics on a stored particle system (one sequence).

    Useful to separate the filter's randomness from the backward draws' (the tests
    average over reruns on one particle system). Keys: ``jax.random.split(rng_key,
    T - 1)``, one per step, as in :func:`paris_filter`.

    Returns:
        ``(stats, info)``: ``sum_i w_T^i tau_T^i`` as :class:`LinearStats` and
        :class:`PARISInfo`.
    """
    _require_structure(ss)
    kernel = kernel.check()
    X, LW, anc = filt.particles, filt.log_weights, filt.ancestors
    T = X.shape[0]
    mask = ~jnp.isnan(y)
    tau1 = initial_tau(ss, X[0], u[0], y[0], mask[0])
    keys = jax.random.split(rng_key, max(T - 1, 0))

    def step(tau, inp):
        key, x_prev, lw_prev, x_t, a_t, u_t, y_t, m_t = inp
        tau, info = paris_update(kernel, key, ss, x_prev, lw_prev, tau, x_t, a_t, u_t, y_t, m_t)
        return tau, info

    xs = (keys, X[:-1], LW[:-1], X[1:], anc[1:], u[1:], y[1:], mask[1:])
    tau, infos = jax.lax.scan(step, tau1, xs)
    return weighted_sum(tau, LW[-1]), _sum_info(infos)


class PARISOutput(NamedTuple):
    stats: LinearStats  # sum_i w_T^i tau_T^i
    log_marginal: jax.Array
    ess: jax.Array  # (T,)
    info: PARISInfo


def paris_filter(
    rng_key,
    ss: StateSpace,
    y,
    u,
    num_particles: int,
    kernel: BackwardKernel = DEFAULT_KERNEL,
    resampling: str = "systematic",
    ess_threshold: float = 0.5,
    time_mask=None,
    complete: bool = False,
) -> PARISOutput:
    """Bootstrap filter and PaRIS in one forward ``lax.scan`` (one sequence).

    Memory is ``O(N dim s)``: no particle history is stored. With ``k_f, k_b =
    jax.random.split(rng_key)`` the particles are those of
    ``particle_filter(k_f, ...)`` and the backward draws those of
    ``paris_on_particles(k_b, ...)`` (same results, bit for bit).

    ``time_mask`` ``(T,)``: False past the sequence's end (ragged lengths). The sequence
    has ended there: the particles, weights, ``tau`` and the log-marginal keep their
    values from the last step inside (a length-0 sequence gives zero statistics and
    log-marginal 0). The keys of step ``t`` do not depend on ``T`` (``jax.random.split``
    of a partitionable key), so the result equals the run on the sequence cut at its
    length, to rounding. ``complete``: ``y`` has no missing entry (known when the program
    is traced; see :func:`emission_terms`).
    """
    _require_structure(ss)
    kernel = kernel.check()
    check_filter_args(num_particles, resampling, ess_threshold)
    T = y.shape[0]
    mask = ~jnp.isnan(y)
    k_f, k_b = jax.random.split(rng_key)
    k_init, k_rest = jax.random.split(k_f)
    step_keys = jax.random.split(k_rest, (max(T - 1, 0), 2))
    back_keys = jax.random.split(k_b, max(T - 1, 0))
    valid = jnp.ones((T,), bool) if time_mask is None else jnp.asarray(time_mask, bool)
    x1, lw1, logZ1, ess1 = filter_init(k_init, ss, y[0], u[0], mask[0], num_particles)
    tau1 = initial_tau(ss, x1, u[0], y[0], mask[0], complete)
    tau1 = jax.tree_util.tree_map(lambda a: jnp.where(valid[0], a, 0.0), tau1)
    logZ1 = jnp.where(valid[0], logZ1, 0.0)

    def step(carry, inp):
        x_prev, lw_prev, logZ, tau = carry
        k_res, k_mov, k_back, u_t, y_t, m_t, valid_t, eps = inp
        degenerate = ~jnp.isfinite(logZ)
        x, lw, anc, step_lz, ess, _ = filter_step(
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
        new_tau, info = paris_update(
            kernel, k_back, ss, x_prev, lw_prev, tau, x, anc, u_t, y_t, m_t, complete=complete
        )
        new = (x, lw, logZ + step_lz, new_tau)
        # past the sequence's end: the carry stays (a select: the step may be junk)
        carry = jax.tree_util.tree_map(lambda a, b: jnp.where(valid_t, a, b), new, carry)
        info = tuple(jnp.where(valid_t, a, 0) for a in info)
        return carry, (ess, info)

    xs = (step_keys[:, 0], step_keys[:, 1], back_keys, u[1:], y[1:], mask[1:], valid[1:])
    # the filter's noise drawn per block of steps, as particle_filter draws it
    carry = (x1, lw1, logZ1, tau1)
    (_, lw, logZ, tau), (ess, infos) = scan_with_noise(
        step, carry, xs, k_rest, ss, num_particles, y.dtype
    )
    return PARISOutput(
        weighted_sum(tau, lw), logZ, jnp.concatenate([ess1[None], ess]), _sum_info(infos)
    )


class PARISSmoother(NamedTuple):
    """PaRIS E-step for the closed-form M-step (``O(N K T)``, memory ``O(N dim s)``).

    Forward only: a bootstrap filter and the PaRIS recursion run in one ``lax.scan``,
    accumulating the :class:`~ppl_dyn.infer.stats.LinearStats` of a model with a
    :class:`~ppl_dyn.LinearStructure`. Use it as ``EM(model, PARISSmoother(...))``.

    Args:
        num_particles: ``N``.
        num_backward: ``K`` backward draws per particle and step. ``K >= 2`` keeps the
            variance linear in ``T``; ``K = 1`` is allowed but degenerate (quadratic
            variance growth, like the filter's genealogy).
        kernel: ``"mcmc"`` (the default: independent Metropolis-Hastings moves started
            at the ancestor; fixed cost, consistent, but not exact given the particles)
            or ``"hybrid"`` (rejection with the exact fallback: exact draws given the
            particles, the setting of the PaRIS theory; random cost, slower on CPU), or
            a :class:`~ppl_dyn.infer.backward.BackwardKernel` value (the same value
            ``ParticleSmoother(mode="ffbsi", kernel=...)`` takes); a value's fields then
            replace ``num_backward``, ``num_mcmc_steps`` and ``max_trials``.
        resampling: ``"systematic"``, ``"stratified"`` or ``"multinomial"``.
        ess_threshold: resample when ``ESS < ess_threshold * N``.
        num_mcmc_steps: MH moves per draw (``kernel="mcmc"``).
        max_trials: rejection rounds before the exact fallback (``kernel="hybrid"``).
        data_pattern: the missing-data pattern of the data (``ppl_dyn.infer._pattern``),
            set by the drivers through :meth:`with_data_pattern`; leave it None.

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import lds
        >>> from ppl_dyn.infer import EM, PARISSmoother
        >>> y = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=50,
        ...                      state_dim=1, obs_dim=1)["y"]
        >>> res = EM(lds, PARISSmoother(100)).run(jax.random.key(1), 3, y=y,
        ...                                        state_dim=1, progress_bar=False)
        >>> len(res.log_marginals)
        3
    """

    # a random likelihood estimate: handlers.marginalize (NUTS) refuses this E-step
    deterministic = False

    num_particles: int = 100
    num_backward: int = 2
    kernel: Union[str, BackwardKernel] = "mcmc"
    resampling: str = "systematic"
    ess_threshold: float = 0.5
    num_mcmc_steps: int = 1
    max_trials: int = 10
    data_pattern: Optional[str] = None

    def with_data_pattern(self, pattern: Optional[str]) -> "PARISSmoother":
        """This E-step told the missing-data pattern of the data it will see (set by
        the drivers, which know the data: complete data skip the imputation terms)."""
        return self._replace(data_pattern=pattern)

    def backward_kernel(self) -> BackwardKernel:
        if isinstance(self.kernel, BackwardKernel):
            return self.kernel.check()
        return BackwardKernel(
            self.kernel, self.num_backward, self.num_mcmc_steps, self.max_trials
        ).check()

    def posterior(self, rng_key, ss: StateSpace, y, u, time_mask=None) -> PARISPosterior:
        """Pure E-step on normalised data ``y`` ``(S, T, dy)``, ``u`` ``(S, T, du)``.

        ``time_mask`` ``(S, T)``: False past each sequence's end (ragged lengths). The
        forward pass stops accumulating there (:func:`paris_filter`), so the statistics
        and log-marginal of each sequence are those of the sequence cut at its length;
        :meth:`LinearGaussianMStep.statistics` sums them as they are."""
        kernel = self.backward_kernel()
        check_filter_args(self.num_particles, self.resampling, self.ess_threshold)
        keys = jax.random.split(rng_key, y.shape[0])
        if time_mask is None:
            time_mask = jnp.ones(y.shape[:2], bool)

        def one(key, y_s, u_s, mask_s):
            return paris_filter(
                key,
                ss,
                y_s,
                u_s,
                self.num_particles,
                kernel,
                self.resampling,
                self.ess_threshold,
                mask_s,
                self.data_pattern == COMPLETE,
            )

        out = jax.vmap(one)(keys, y, u, time_mask)
        return PARISPosterior(out.stats, out.log_marginal, out.ess, out.info)

    def smooth(
        self, params: dict, model, *args, rng_key=None, lengths=None, **kwargs
    ) -> PARISPosterior:
        """PaRIS statistics of ``model`` at ``params`` (``rng_key`` required). Ragged
        sequences: lists of arrays or ``lengths=``, as in :meth:`EM.run`."""
        from ppl_dyn._validation import check_rng_key
        from ppl_dyn.infer._run import smooth_eager

        check_rng_key(rng_key)
        self.backward_kernel()
        check_filter_args(self.num_particles, self.resampling, self.ess_threshold)

        def check(info):  # the statistics PaRIS accumulates are the declared ones
            if info.spec.structure is not None and not is_builtin_model(model):
                verify_structure(info)

        return smooth_eager(self, params, model, args, kwargs, rng_key, lengths, check)


def paris_linear_statistics(post: PARISPosterior) -> LinearStats:
    """The M-step statistics of a :class:`PARISPosterior`: the per-sequence sums."""
    return sum_stats(post.stats)


__all__ = [
    "BackwardKernel",
    "PARISInfo",
    "PARISOutput",
    "PARISPosterior",
    "PARISSmoother",
    "paris_filter",
    "paris_linear_statistics",
    "paris_on_particles",
]
