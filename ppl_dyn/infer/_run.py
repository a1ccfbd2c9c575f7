"""Shared plumbing for the eager public entry points (validation, static/dynamic split)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from ppl_dyn._validation import check_inputs, check_observations, check_params
from ppl_dyn.infer._pattern import assume_pattern, data_pattern
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


def smooth_eager(e_step, params, model, args, kwargs, rng_key=None):
    """Validate, then run ``e_step.posterior`` jitted with the parameters and data as
    arguments (one compilation per model, E-step and static arguments)."""
    _, spec = prepare_eager(model, params, args, kwargs)
    dynamic, static = split_static(validate_data(kwargs))
    items = hashable_items(static)
    pattern = data_pattern(dynamic.get("y"))
    if items is None:
        fn = _make_smoother(model, e_step, tuple(static.items()), pattern)
    else:
        fn = _cached_smoother(model, e_step, items, pattern)
    key = jax.random.key(0) if rng_key is None else rng_key
    post = fn(dict(params), dynamic, key)
    if not spec.batched:
        post = jax.tree_util.tree_map(lambda a: a[0], post)
    return post


def _make_smoother(model, e_step, static_items, pattern=None):
    static = dict(static_items)

    @assume_pattern(pattern)
    def run(params, dynamic, rng_key):
        ss, spec = bind(model, params, **static, **dynamic)
        return e_step.posterior(rng_key, ss, spec.y, spec.u)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def _cached_smoother(model, e_step, static_items, pattern=None):
    return _make_smoother(model, e_step, static_items, pattern)


def site_shapes(model, kwargs) -> tuple[dict, Any]:
    """Shapes and dtypes of the free parameter sites, and the model's structure, from an
    abstract run (``jax.eval_shape``: no prior draws are computed)."""
    found = {}

    def run(key):
        info = inspect_model(model, rng_key=key, **kwargs)
        found["structure"] = info.spec.structure
        return {k: s["value"] for k, s in info.free.items()}

    shapes = jax.eval_shape(run, jax.random.key(0))
    return shapes, found.get("structure")


def adapt_params(model, given: dict, kwargs) -> dict:
    """Carry parameter values from another model of the family into ``model``.

    Sites the model lacks are dropped; values of the right shape are kept; a dynamics or
    emission weight of shape ``(dz, dx)`` (from an LDS) entering a map with RBF features
    ``[rho(x); x]`` becomes ``[0 | W]`` (RBF weights zero: the nested initialisation of
    Ghahramani & Roweis). Any other mismatch raises ``ValueError``.
    """
    shapes, structure = site_shapes(model, kwargs)
    out = {}
    for name, value in given.items():
        if name not in shapes:
            continue
        want = tuple(shapes[name].shape)
        value = np.asarray(value)
        if value.shape == want:
            out[name] = value
            continue
        regs = () if structure is None else (structure.dynamics, structure.emission)
        reg = next((r for r in regs if r.weight == name), None)
        if (
            reg is not None
            and reg.feature == "rbf"
            and value.ndim == 2
            and len(want) == 2
            and value.shape[0] == want[0]
            and want[1] > value.shape[1]
        ):
            pad = np.zeros((want[0], want[1] - value.shape[1]), value.dtype)
            out[name] = np.concatenate([pad, value], 1)
            continue
        raise ValueError(
            f"initial value for site {name!r} has shape {value.shape}; the model expects {want}"
        )
    return out
