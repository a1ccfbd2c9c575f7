"""Draw states and observations from a model with NumPyro's own machinery."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np
from numpyro import handlers

from ppl_dyn._validation import check_rng_key, device_array
from ppl_dyn.infer._compile import cached_program, without_validation
from ppl_dyn.infer._run import inspect_checked, is_array, split_static, static_items
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

    The draw is one compiled program per model, static arguments and shapes (cached):
    the first call compiles it, later calls with new keys, values or inputs of the same
    shapes only run it. Given values are checked first (by name).

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
    if num_sequences is not None:  # a model for one sequence need not take the keyword
        model_kwargs["num_sequences"] = num_sequences
    model_kwargs["num_steps"] = num_steps
    given = dict(params or {})
    # the given values are checked eagerly (shape, support, positive definiteness) by
    # name: inside the compiled draw a bad value would only give NaN
    inspect_checked(model, given, False, **model_kwargs)
    dynamic, static = split_static(model_kwargs)
    items = static_items(static)
    fn = cached_program(("simulator", model, items), lambda: _simulator(model, items))
    values = {k: device_array(np.asarray(v)) if not is_array(v) else v for k, v in given.items()}
    result, drawn = fn(rng_key, values, dynamic)
    if not isinstance(result, dict):
        raise ValueError("the model must return the value of ppl_dyn.markov(...)")
    return {**result, "params": drawn}


def _simulator(model, static_items):
    """The model's draw, compiled once per model, static arguments and shapes: the
    parameters (given or drawn from their priors inside), the states and observations."""
    static = dict(static_items)

    def draw(rng_key, params, dynamic):
        fn = handlers.seed(handlers.substitute(model, data=params), rng_seed=rng_key)
        tr = handlers.trace(fn)
        result = tr(**static, **dynamic)
        values = {
            k: site["value"]
            for k, site in tr.trace.items()
            if site["type"] == "sample" and not is_markov_site(site)
        }
        return result, values

    return jax.jit(without_validation(draw))
