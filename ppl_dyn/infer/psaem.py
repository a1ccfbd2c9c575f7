r"""Particle stochastic approximation EM (PSAEM; Lindsten 2013) with CPF-AS.

At iteration ``k`` (``docs/psaem.md``):

1. run CPF-AS (:mod:`ppl_dyn.infer.cpf`) at :math:`\theta_{k-1}` conditioned on the
   reference path :math:`x'_{1:T}[k-1]`;
2. :math:`\hat S_k = (1-\gamma_k)\hat S_{k-1} + \gamma_k \sum_i w_T^i\, s(x^i_{1:T})`
   over the ``N`` weighted ancestral paths (the additive
   :class:`~ppl_dyn.infer.LinearStats` of the closed-form M-step);
3. :math:`\theta_k = \Lambda(\hat S_k)`: the *same* M-step map as EM
   (:meth:`LinearGaussianMStep.update`), so frozen (conditioned) sites stay fixed;
4. the new reference is the ancestral path of ``k ~ Cat(w_T)``.

With :math:`\sum_k\gamma_k=\infty`, :math:`\sum_k\gamma_k^2<\infty` the iterates converge
(under regularity conditions) to a stationary point of the likelihood for a *fixed*
number of particles ``N >= 2``; ``gamma_k = 1`` is a noisy particle EM whose iterates
keep fluctuating.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ppl_dyn.infer._pattern import with_data_pattern
from ppl_dyn.infer.cpf import CPFAS
from ppl_dyn.infer.em import EM, EMResult
from ppl_dyn.infer.mstep import GradientMStep, LinearGaussianMStep

__all__ = [
    "PSAEM",
    "PSAEMState",
    "PSAEMResult",
    "SAState",
    "StochasticApproximation",
    "step_size_schedule",
]


def step_size_schedule(burn_in: int = 20, alpha: float = 0.7, scale: float = 1.0) -> Callable:
    r"""The step sizes :math:`\gamma_k` (``k = 1, 2, ...``): ``1`` for ``k <= burn_in``,
    then :math:`\mathrm{scale}\,(k - \mathrm{burn\_in})^{-\alpha}`.

    With :math:`\alpha \in (0.5, 1]` the schedule satisfies the stochastic-approximation
    conditions :math:`\sum\gamma_k = \infty`, :math:`\sum\gamma_k^2 < \infty`. Svensson's
    choice (1 for ``k <= 20``, 0.9 up to 50, then :math:`0.9(k-50)^{-0.7}`) is close to
    ``step_size_schedule(50, 0.7, 0.9)``.

    Args:
        burn_in: iterations with :math:`\gamma_k = 1` (plain particle EM: the iterates
            move fast from a poor start).
        alpha: decay exponent, in ``(0.5, 1]``.
        scale: factor after the burn-in, in ``(0, 1]``.
    """
    if not isinstance(burn_in, (int, np.integer)) or isinstance(burn_in, bool) or burn_in < 0:
        raise ValueError(f"burn_in must be an int >= 0; got {burn_in!r}")
    if not 0.5 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in (0.5, 1]; got {alpha!r}")
    if not 0.0 < float(scale) <= 1.0:
        raise ValueError(f"scale must lie in (0, 1]; got {scale!r}")
    burn_in, alpha, scale = int(burn_in), float(alpha), float(scale)

    def gamma(k: int) -> float:
        return 1.0 if k <= burn_in else scale * float(k - burn_in) ** (-alpha)

    return gamma


def _step_sizes(step_size, num_iters: int) -> np.ndarray:
    """``gamma_1..gamma_K`` as an array, validated; ``gamma_1`` is always 1."""
    if step_size is None:
        step_size = step_size_schedule(burn_in=num_iters // 4)
    if callable(step_size):
        g = np.array([float(step_size(k)) for k in range(1, num_iters + 1)])
    elif np.ndim(step_size) == 0:
        g = np.full(num_iters, float(step_size))
    else:
        g = np.asarray(step_size, float).reshape(-1)
        if g.shape[0] < num_iters:
            raise ValueError(
                f"step_size has {g.shape[0]} entries; num_iters={num_iters} needs as many"
            )
        g = g[:num_iters].copy()
    bad = ~(np.isfinite(g) & (g > 0) & (g <= 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"step_size must lie in (0, 1]; gamma_{i + 1} = {g[i]!r}")
    g[0] = 1.0  # S_0 is undefined: the first statistics are taken as they are
    return g


class SAState(NamedTuple):
    """What :class:`StochasticApproximation` carries between iterations.

    Attributes:
        average: the running average :math:`\\hat S_k` of the statistics.
        count: iterations done ``k``.
        step_sizes: :math:`\\gamma_1, \\ldots, \\gamma_K` ``(K,)`` (past ``K`` the
            last one is used).
    """

    average: Any
    count: jax.Array
    step_sizes: jax.Array


class StochasticApproximation:
    r"""A stochastic-approximation M-step (:class:`~ppl_dyn.infer.protocols.StatefulMStep`):
    :math:`\hat S_k = (1-\gamma_k)\hat S_{k-1} + \gamma_k S_k`, then the wrapped
    closed-form M-step's map :math:`\theta_k = \Lambda(\hat S_k)`.

    ``EM(model, CPFAS(N), StochasticApproximation(LinearGaussianMStep()))`` is PSAEM
    (what :class:`PSAEM` runs); the same M-step averages the statistics of any other
    stochastic E-step (e.g. a small-``N`` :class:`~ppl_dyn.infer.ParticleSmoother`).

    Args:
        m_step: a closed-form M-step whose statistics are additive (default
            :class:`LinearGaussianMStep`).
        step_size: as :class:`PSAEM`'s ``step_size`` (None: ``step_size_schedule(
            burn_in=num_iters // 4)``; a constant; a callable ``k -> gamma_k``; or a
            tuple of at least ``num_iters`` values). ``gamma_1`` is always 1.
    """

    def __init__(self, m_step=None, step_size=None):
        m_step = LinearGaussianMStep() if m_step is None else m_step
        if step_size is not None and not callable(step_size) and np.ndim(step_size) > 0:
            step_size = tuple(float(g) for g in np.ravel(step_size))
        self.m_step = m_step
        self.step_size = step_size

    def with_data_pattern(self, pattern):
        """This M-step with the wrapped one told the data's missing-data pattern."""
        return type(self)(with_data_pattern(self.m_step, pattern), self.step_size)

    # The compiled EM step depends on the wrapped M-step only (the step sizes travel in
    # the state), so two schedules share one compilation: equality and hash say so.
    def __eq__(self, other):
        return type(other) is type(self) and other.m_step == self.m_step

    def __hash__(self):
        return hash((type(self), self.m_step))

    def __repr__(self):
        return f"StochasticApproximation({self.m_step!r}, step_size={self.step_size!r})"

    @property
    def map_estimate(self) -> bool:
        return bool(getattr(self.m_step, "map_estimate", False))

    def check(self, structure, free_names, method: str = "PSAEM") -> None:
        if isinstance(self.m_step, GradientMStep):
            raise ValueError(
                f"m_step: {method} averages sufficient statistics, so it needs a "
                "closed-form M-step (LinearGaussianMStep); GradientMStep has none"
            )
        self.m_step.check(structure, free_names, method)

    def verify_model(self, info) -> None:
        verify = getattr(self.m_step, "verify_model", None)
        if verify is not None:
            verify(info)

    def log_prior(self, params, model, model_kwargs):
        return self.m_step.log_prior(params, model, model_kwargs)

    def statistics(self, posterior, ss, y, u, time_mask=None):
        if time_mask is None:
            return self.m_step.statistics(posterior, ss, y, u)
        return self.m_step.statistics(posterior, ss, y, u, time_mask=time_mask)

    def update(self, stats, ss, free, **kwargs):
        """The wrapped M-step's map (no averaging): what :meth:`step` applies to the
        running average."""
        return self.m_step.update(stats, ss, free, **kwargs)

    def init(self, stats, num_iters: Optional[int] = None) -> SAState:
        if num_iters is None:
            if (
                self.step_size is not None
                and np.ndim(self.step_size) == 0
                and not callable(self.step_size)
            ):
                num_iters = 1  # a constant step size needs no horizon
            else:
                raise ValueError(
                    "StochasticApproximation needs the run's length (num_iters) to lay "
                    "out its step sizes: pass num_iters= to EM.init"
                )
        leaves = jax.tree_util.tree_leaves(stats)
        dtype = jnp.result_type(*leaves) if leaves else jnp.result_type(float)
        gammas = jnp.asarray(_step_sizes(self.step_size, int(num_iters)), dtype)
        return SAState(average=stats, count=jnp.asarray(0, jnp.int32), step_sizes=gammas)

    def step(self, stats, state: SAState, ss, free, **kwargs):
        last = state.step_sizes.shape[0] - 1
        gamma = state.step_sizes[jnp.minimum(state.count, last)]
        average = jax.tree_util.tree_map(
            lambda a, b: (1.0 - gamma) * a + gamma * b, state.average, stats
        )
        new, floors = self.update(average, ss, free, **kwargs)
        return new, floors, SAState(average, state.count + 1, state.step_sizes)


class PSAEMState(NamedTuple):
    """What PSAEM carries between iterations.

    Attributes:
        params: values of the free parameter sites.
        stats: the stochastic-approximation average :math:`\\hat S_k`
            (:class:`~ppl_dyn.infer.LinearStats`).
        references: reference paths ``(S, T, dx)``, one per sequence.
        iteration: iterations done.
        rng_key: the run's key (iteration ``k`` draws from it as :class:`EM` does).
    """

    params: dict
    stats: object
    references: jax.Array
    iteration: int
    rng_key: jax.Array


class PSAEMResult(NamedTuple):
    """Outcome of :meth:`PSAEM.run`.

    Attributes:
        params: final values of every parameter site (free and frozen).
        state: the final :class:`PSAEMState`.
        log_marginals: per iteration, the CPF's ``sum_t log mean_i g(y_t | x_t^i)`` at
            the parameters entering it. Conditional on a reference path this is *not* an
            unbiased estimate of ``log p(y | theta)`` (it is pulled towards the
            reference): a progress trace only. For the likelihood of the final
            parameters run a particle filter or, for an LDS, the Kalman filter.
        params_history: free site -> values after each iteration ``(num_iters, ...)``.
        step_sizes: the ``gamma_k`` used ``(num_iters,)`` (``gamma_1 = 1``).
        floor_counts: per covariance site, how many iterations hit the eigenvalue floor.
        num_iters: iterations run.
    """

    params: dict
    state: PSAEMState
    log_marginals: np.ndarray
    params_history: dict
    step_sizes: np.ndarray
    floor_counts: dict
    num_iters: int


class PSAEM:
    """Particle SAEM with a conditional particle filter with ancestor sampling.

    A thin entry point: ``PSAEM(model, N, step_size, m_step).run(...)`` runs
    ``EM(model, CPFAS(N), StochasticApproximation(m_step, step_size))`` (the one EM
    driver, :mod:`ppl_dyn.infer.protocols`) and reports the parameter history.

    Args:
        model: a model function declaring its dynamics with :func:`ppl_dyn.markov` and a
            :class:`~ppl_dyn.LinearStructure` (built-in ``lds``, ``tanh_rnn``, ``rbf``).
        num_particles: ``N >= 2``; small values (5-50) suffice, the step sizes do the
            averaging.
        step_size: ``None`` (default: ``step_size_schedule(burn_in=num_iters // 4,
            alpha=0.7)``), a constant in ``(0, 1]`` (``1``: noisy particle EM), a callable
            ``k -> gamma_k`` (``k = 1, 2, ...``) or an array of at least ``num_iters``
            values. For convergence the schedule must satisfy ``sum gamma_k = inf`` and
            ``sum gamma_k^2 < inf`` (not checked). ``gamma_1`` is always taken as 1.
        m_step: a closed-form M-step (default :class:`LinearGaussianMStep`); its
            ``update`` maps the averaged statistics to parameters, as in EM.
        ancestor_sampling: False runs the plain conditional filter (for comparison only:
            it mixes poorly, so the iterates move slowly).

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import lds
        >>> from ppl_dyn.infer import PSAEM
        >>> y = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=100,
        ...                      state_dim=1, obs_dim=1)["y"]
        >>> res = PSAEM(lds, num_particles=10).run(jax.random.key(1), 50, y=y,
        ...                                        state_dim=1, progress_bar=False)
        >>> res.params_history["A"].shape
        (50, 1, 1)
    """

    def __init__(
        self,
        model: Callable,
        num_particles: int = 20,
        step_size=None,
        m_step=None,
        *,
        ancestor_sampling: bool = True,
    ):
        if (
            not isinstance(num_particles, (int, np.integer))
            or isinstance(num_particles, bool)
            or num_particles < 2
        ):
            raise ValueError(f"num_particles must be an int >= 2; got {num_particles!r}")
        m_step = LinearGaussianMStep() if m_step is None else m_step
        if isinstance(m_step, GradientMStep):
            raise ValueError(
                "m_step: PSAEM averages sufficient statistics, so it needs a closed-form "
                "M-step (LinearGaussianMStep); GradientMStep has none"
            )
        self.model = model
        self.num_particles = int(num_particles)
        self.step_size = step_size
        self.m_step = m_step
        self.ancestor_sampling = bool(ancestor_sampling)

    def em(self, num_iters: Optional[int] = None) -> EM:
        """The :class:`EM` driver this runs (its E-step :class:`CPFAS`, its M-step
        :class:`StochasticApproximation`). ``num_iters`` validates an array or list
        ``step_size`` against the run's length."""
        sa = StochasticApproximation(self.m_step, self.step_size)
        if num_iters is not None:  # a bad schedule fails before any work
            _step_sizes(sa.step_size, int(num_iters))
        em = EM(self.model, CPFAS(self.num_particles, self.ancestor_sampling), sa)
        em._method = "PSAEM"
        return em

    def run(
        self,
        rng_key: jax.Array,
        num_iters: int,
        *,
        init_params: Union[dict, EMResult, PSAEMResult, None] = None,
        progress_bar: bool = True,
        lengths=None,
        **kwargs,
    ) -> PSAEMResult:
        """Run ``num_iters`` PSAEM iterations.

        Args:
            rng_key: PRNG key (initialisation draws and the particle filters).
            num_iters: number of iterations (>= 1).
            init_params: starting values (a dict, an ``EMResult`` or a ``PSAEMResult``);
                missing free sites are drawn from their priors.
            progress_bar: show a tqdm progress bar.
            lengths: sequences of different lengths, as in :meth:`EM.run`: padded ``y``
                ``(S, T, dy)`` (and ``u``) with ``lengths`` ``(S,)``, or ``y`` (and
                ``u``) as lists of arrays ``(L_s, dim)``. Each CPF-AS sweep stops at its
                sequence's end (:func:`~ppl_dyn.infer.cpf.conditional_particle_filter`
                with ``time_mask``) and the statistics drop the steps past it.
            **kwargs: the model's arguments (``y=...``, ``state_dim=...``, ...).

        Raises:
            FloatingPointError: when an iteration produces a non-finite parameter (the
                message names the iteration and the site) or log-likelihood trace.
        """
        if (
            not isinstance(num_iters, (int, np.integer))
            or isinstance(num_iters, bool)
            or num_iters < 1
        ):
            raise ValueError(f"num_iters must be a positive int; got {num_iters!r}")
        if isinstance(init_params, PSAEMResult):
            init_params = init_params.params
        res = self.em(int(num_iters)).run(
            rng_key,
            int(num_iters),
            init_params=init_params,
            progress_bar=progress_bar,
            keep_params_history=True,
            lengths=lengths,
            **kwargs,
        )
        st = res.state
        return PSAEMResult(
            params=res.params,
            state=PSAEMState(
                st.params, st.m_state.average, st.e_state.references, st.iteration, st.rng_key
            ),
            log_marginals=res.log_marginals,
            params_history=res.params_history,
            step_sizes=np.asarray(st.m_state.step_sizes),
            floor_counts=res.floor_counts,
            num_iters=res.num_iters,
        )
