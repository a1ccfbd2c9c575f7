"""Draw states and observations from a model with NumPyro's own machinery."""

from __future__ import annotations

from typing import Callable, Optional

import jax
from numpyro import handlers

from ppl_dyn._validation import check_rng_key
from ppl_dyn.state_space import is_markov_site


def simulate(
    rng_key: jax.Array,
    model: Callable,
    params: Optional[dict] = None,
    *,
    num_steps: int,
    num_sequences: Optional[int] = None,
    **model_kwargs,
) -> dict:
    """Simulate a state-space model.

    Args:
        rng_key: a JAX PRNG key (required; there is no default key).
        model: a model function that declares its dynamics with :func:`ppl_dyn.markov`.
        params: values of parameter sites; sites not given are drawn from their priors.
        num_steps: number of time steps ``T``.
        num_sequences: number of independent sequences ``S`` (adds a leading axis);
            passed to the model only when given.
        **model_kwargs: the model's other arguments (``state_dim``, ``obs_dim``, ``u``, ...).

    Returns:
        ``{"x": states, "y": observations, "params": all parameter values}`` with
        ``x`` of shape ``(T, state_dim)`` or ``(S, T, state_dim)`` and ``y`` likewise.

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import lds
        >>> out = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=10,
        ...                        num_sequences=2, state_dim=2, obs_dim=1)
        >>> out["y"].shape, out["x"].shape
        ((2, 10, 1), (2, 10, 2))
    """
    check_rng_key(rng_key)
    if "y" in model_kwargs:
        raise ValueError("simulate draws y; do not pass y")
    fn = handlers.seed(handlers.substitute(model, data=params or {}), rng_seed=rng_key)
    tr = handlers.trace(fn)
    if num_sequences is not None:  # a model for one sequence need not take the keyword
        model_kwargs["num_sequences"] = num_sequences
    result = tr(num_steps=num_steps, **model_kwargs)
    if not isinstance(result, dict):
        raise ValueError("the model must return the value of ppl_dyn.markov(...)")
    values = {
        k: s["value"]
        for k, s in tr.trace.items()
        if s["type"] == "sample" and not is_markov_site(s)
    }
    return {**result, "params": values}
