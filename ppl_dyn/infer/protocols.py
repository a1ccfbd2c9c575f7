"""The plug-in contract between the EM driver, E-steps and M-steps.

Statistics are the currency. An E-step turns a bound model and data into a posterior
over the states; the M-step asks that posterior for the expectations it needs
(``statistics``) and maps them to new parameters (``update``). The driver
(:class:`~ppl_dyn.infer.EM`) runs any E-step with any M-step that accept the model.

Stateless plug-ins (the smoothers, :class:`~ppl_dyn.infer.LinearGaussianMStep`) have
only the methods of :class:`EStep` / :class:`MStep`. A plug-in that carries something
from one iteration to the next adds ``init`` and ``step`` (:class:`StatefulEStep`,
:class:`StatefulMStep`), with its state a NamedTuple (any pytree of arrays), in the
manner of Optax's ``GradientTransformation``: the conditional particle filter keeps its
reference paths (:class:`~ppl_dyn.infer.cpf.CPFAS`), the stochastic-approximation M-step
its running average of the statistics and its step sizes
(:class:`~ppl_dyn.infer.psaem.StochasticApproximation`). PSAEM is then ``EM(model,
CPFAS(N), StochasticApproximation(LinearGaussianMStep()))``: one driver, one loop.

The helpers below are how the driver calls a plug-in of either kind; a stateless one
gets and returns the empty state ``()``.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

from ppl_dyn.infer._run import accepts_keyword, posterior_with_mask

__all__ = [
    "EStep",
    "StatefulEStep",
    "MStep",
    "StatefulMStep",
    "is_stateful",
    "init_e_state",
    "e_step_call",
    "init_m_state",
    "m_step_call",
]


@runtime_checkable
class EStep(Protocol):
    """An E-step: the posterior of the states of every sequence.

    ``posterior(rng_key, ss, y, u)`` with ``ss`` the bound
    :class:`~ppl_dyn.StateSpace`, ``y`` ``(S, T, dy)`` and ``u`` ``(S, T, du)`` returns a
    posterior with a ``log_marginal`` ``(S,)`` and the methods the M-step asks for (e.g.
    ``linear_statistics``, ``trajectories``). It may take ``time_mask=`` ``(S, T)`` for
    ragged lengths."""

    def posterior(self, rng_key, ss, y, u) -> Any: ...


@runtime_checkable
class StatefulEStep(EStep, Protocol):
    """An E-step with a state carried between EM iterations.

    ``init(ss, y, u)`` returns the first state; ``step(rng_key, ss, y, u, state,
    time_mask=None)`` returns ``(posterior, new_state)``. Both run inside the driver's
    compiled step, so the state is a pytree of arrays whose shapes do not change."""

    def init(self, ss, y, u) -> Any: ...

    def step(self, rng_key, ss, y, u, state, time_mask=None) -> tuple[Any, Any]: ...


@runtime_checkable
class MStep(Protocol):
    """An M-step: ``check`` (its requirements of the model, before anything is traced),
    ``statistics(posterior, ss, y, u)`` (the expectations it needs, asked of the
    posterior; ``time_mask=`` for ragged lengths) and ``update(stats, ss, free, *,
    rng_key, model, model_kwargs)`` returning ``(new_params, floor_hits)``: a pure map
    from statistics to parameters that imports no E-step."""

    def check(self, structure, free_names, method: str = "EM") -> None: ...

    def statistics(self, posterior, ss, y, u) -> Any: ...

    def update(self, stats, ss, free, **kwargs) -> tuple[dict, dict]: ...


@runtime_checkable
class StatefulMStep(MStep, Protocol):
    """An M-step with a state carried between EM iterations.

    ``init(stats, num_iters)`` gets zeros shaped like the statistics and the run's
    length (None when unknown) and returns the first state; ``step(stats, state, ss,
    free, *, rng_key, model, model_kwargs)`` returns ``(new_params, floor_hits,
    new_state)``."""

    def init(self, stats, num_iters: Optional[int]) -> Any: ...

    def step(self, stats, state, ss, free, **kwargs) -> tuple[dict, dict, Any]: ...


def is_stateful(plugin) -> bool:
    """Whether ``plugin`` carries a state (has callable ``init`` and ``step``)."""
    return callable(getattr(plugin, "init", None)) and callable(getattr(plugin, "step", None))


def init_e_state(e_step, ss, y, u):
    """The E-step's first state (``()`` for a stateless one)."""
    return e_step.init(ss, y, u) if is_stateful(e_step) else ()


def e_step_call(e_step, rng_key, ss, y, u, state, time_mask=None):
    """``(posterior, new_state)`` of either kind of E-step; the time mask goes to the
    E-steps that take one."""
    if not is_stateful(e_step):
        return posterior_with_mask(e_step, rng_key, ss, y, u, time_mask), state
    if time_mask is not None and accepts_keyword(e_step.step, "time_mask"):
        return e_step.step(rng_key, ss, y, u, state, time_mask=time_mask)
    return e_step.step(rng_key, ss, y, u, state)


def init_m_state(m_step, stats, num_iters: Optional[int] = None):
    """The M-step's first state (``()`` for a stateless one); ``stats``: zeros shaped
    like its statistics."""
    return m_step.init(stats, num_iters) if is_stateful(m_step) else ()


def m_step_call(m_step, stats, state, ss, free, **kwargs):
    """``(new_params, floor_hits, new_state)`` of either kind of M-step."""
    if is_stateful(m_step):
        return m_step.step(stats, state, ss, free, **kwargs)
    new, floors = m_step.update(stats, ss, free, **kwargs)
    return new, floors, state
