"""Shared plumbing for the eager public entry points (validation, static/dynamic split)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from ppl_dyn._validation import check_inputs, check_observations, check_params
from ppl_dyn.state_space import bind, inspect_model


def is_array(v: Any) -> bool:
    return isinstance(v, (jax.Array, np.ndarray))


def split_static(kwargs: dict):
    """Array-valued keyword arguments are traced; everything else is static."""
    dynamic = {k: v for k, v in kwargs.items() if is_array(v)}
    static = {k: v for k, v in kwargs.items() if not is_array(v)}
    return dynamic, static


def hashable_items(static: dict):
    try:
        items = tuple(sorted(static.items()))
        hash(items)
        return items
    except TypeError:
        return None


def validate_data(kwargs: dict) -> dict:
    """Eager checks of ``y`` and ``u``; masked arrays become NaN-filled arrays."""
    kwargs = dict(kwargs)
    y = kwargs.get("y")
    if isinstance(y, np.ma.MaskedArray):
        kwargs["y"] = np.ma.filled(y.astype(float), np.nan)
    check_observations(kwargs.get("y"))
    check_inputs(kwargs.get("u"))
    return kwargs


def inspect_checked(model, values: dict, require_all: bool, rng_key=None, **kwargs):
    """Inspect ``model`` with ``values`` substituted (fast: no prior draws for them) and
    validate them; a value that breaks the model is reported by name."""
    try:
        info = inspect_model(model, rng_key=rng_key, values=values, **kwargs)
    except Exception:
        # find which value is wrong from a run with prior draws only
        info = inspect_model(model, rng_key=rng_key, **kwargs)
        check_params(values, info.free, require_all=False)
        raise
    check_params(values, info.free, require_all=require_all)
    return info


def prepare_eager(model, params, args, kwargs):
    """Validate data and parameters, then bind the model (eagerly)."""
    if args:
        raise ValueError("pass data to the model as keyword arguments (y=..., u=...)")
    kwargs = validate_data(kwargs)
    inspect_checked(model, params, True, **kwargs)
    return bind(model, params, **kwargs)
