"""Shared plumbing for the eager public entry points (validation, static/dynamic split)."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import numpy as np

from ppl_dyn._validation import check_inputs, check_observations, check_params
from ppl_dyn.infer._compile import cached_program, jit_model
from ppl_dyn.infer._pattern import data_pattern, with_data_pattern
from ppl_dyn.state_space import bind, inspect_model


def is_array(v: Any) -> bool:
    return isinstance(v, (jax.Array, np.ndarray))


def split_static(kwargs: dict):
    """Array-valued keyword arguments are traced; everything else is static."""
    dynamic = {k: v for k, v in kwargs.items() if is_array(v)}
    static = {k: v for k, v in kwargs.items() if not is_array(v)}
    return dynamic, static


def static_items(static: dict) -> tuple:
    """The static arguments as a tuple for a program's cache key
    (:func:`~ppl_dyn.infer._compile.cached_program`): sorted when they can be hashed,
    else as given (the key then cannot be hashed and the program is built afresh)."""
    try:
        items = tuple(sorted(static.items()))
        hash(items)
        return items
    except TypeError:
        return tuple(static.items())


def _as_float_dtype(dtypes):
    dt = np.result_type(*dtypes) if dtypes else np.dtype(float)
    return dt if np.issubdtype(dt, np.floating) else np.dtype(jax.numpy.result_type(float))


def _check_lengths(lengths, num_sequences: int, num_steps: int, allow_zero: bool = False):
    """``lengths`` as an int array ``(S,)`` with values in ``[1, T]`` (``[0, T]`` with
    ``allow_zero``, for internal padding sequences); ``ValueError`` naming it otherwise."""
    arr = np.asarray(lengths)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or arr.shape[0] != num_sequences:
        raise ValueError(
            f"lengths must have one entry per sequence ({num_sequences}); got shape "
            f"{np.shape(lengths)}"
        )
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer)
        or (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)))
    ):
        raise ValueError(f"lengths must be integers; got {np.asarray(lengths).tolist()!r}")
    arr = arr.astype(np.int64)
    low = 0 if allow_zero else 1
    bad = (arr < low) | (arr > num_steps)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"lengths[{i}] = {int(arr[i])} is outside [{low}, {num_steps}] (num_steps of y)"
        )
    return arr


def _sequence_list(seqs, name: str):
    out = []
    for i, a in enumerate(seqs):
        if isinstance(a, np.ma.MaskedArray):
            a = np.ma.filled(a.astype(float), np.nan)
        a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"{name}[{i}] must have shape (num_steps, dim); got shape {a.shape}")
        out.append(a)
    if not out:
        raise ValueError(f"{name} is an empty list; need at least one sequence")
    dims = sorted({a.shape[1] for a in out})
    if len(dims) > 1:
        i = next(i for i, a in enumerate(out) if a.shape[1] != out[0].shape[1])
        raise ValueError(
            f"the sequences in {name} disagree in dimension: {name}[0] has "
            f"{out[0].shape[1]}, {name}[{i}] has {out[i].shape[1]}"
        )
    return out


def pad_sequences(y, u=None):
    """Pad sequences of different lengths to one array.

    Args:
        y: a list of observation arrays ``(L_s, obs_dim)``.
        u: optional list of input arrays ``(L_s, input_dim)`` (same lengths), or one
            input array of shape ``(T, input_dim)`` shared by all sequences.

    Returns:
        ``(y, u, lengths)``: ``y`` ``(S, T, obs_dim)`` padded with NaN after each
        sequence's end (``T = max L_s``), ``u`` ``(S, T, input_dim)`` padded with zeros
        (or as given), and ``lengths`` ``(S,)``.

    NaN padding is enough for a marginal likelihood (NUTS on the marginal form, SGD):
    unobserved steps after the end add 0 to ``log p(y)``. EM needs the lengths too, to
    drop the padded steps from its statistics: pass ``lengths=`` with padded arrays.

    Example:
        >>> import numpy as np, ppl_dyn
        >>> y, u, lengths = ppl_dyn.pad_sequences([np.zeros((3, 2)), np.ones((5, 2))])
        >>> y.shape, lengths.tolist()
        ((2, 5, 2), [3, 5])
    """
    if not isinstance(y, (list, tuple)):
        raise ValueError(f"y must be a list of arrays (num_steps, obs_dim); got {type(y).__name__}")
    ys = _sequence_list(y, "y")
    lengths = np.array([a.shape[0] for a in ys], dtype=np.int64)
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"y[{i}] has 0 time steps; every sequence needs num_steps >= 1")
    S, T = len(ys), int(lengths.max())
    dtype = _as_float_dtype([a.dtype for a in ys])
    y_pad = np.full((S, T, ys[0].shape[1]), np.nan, dtype)
    for i, a in enumerate(ys):
        y_pad[i, : a.shape[0]] = a
    if isinstance(u, (list, tuple)):
        us = _sequence_list(u, "u")
        if len(us) != S:
            raise ValueError(f"u has {len(us)} sequences but y has {S}")
        for i, a in enumerate(us):
            if a.shape[0] != lengths[i]:
                raise ValueError(f"u[{i}] has {a.shape[0]} time steps but y[{i}] has {lengths[i]}")
        u_pad = np.zeros((S, T, us[0].shape[1]), _as_float_dtype([a.dtype for a in us]))
        for i, a in enumerate(us):
            u_pad[i, : a.shape[0]] = a
        u = u_pad
    return y_pad, u, lengths


def ragged_data(kwargs: dict, lengths=None):
    """Sequences of different lengths as NaN-padded arrays and a time mask.

    ``y`` (and ``u``) may be lists of per-sequence arrays, or padded arrays
    ``(S, T, dim)`` with ``lengths`` ``(S,)``. Returns ``(kwargs, time_mask)`` with ``y``
    NaN after each sequence's end and ``time_mask`` ``(S, T)`` (True for ``t < L_s``);
    ``time_mask`` is None when neither a list nor ``lengths`` was given (data unchanged).
    """
    y, u = kwargs.get("y"), kwargs.get("u")
    if not isinstance(y, (list, tuple)) and lengths is None:
        if isinstance(u, (list, tuple)):
            raise ValueError(
                "u is a list of per-sequence arrays but y is not: pass y as a list too, "
                "or pad both (ppl_dyn.pad_sequences) and pass lengths="
            )
        return kwargs, None
    kwargs = dict(kwargs)
    if isinstance(y, (list, tuple)):
        y_pad, u_pad, found = pad_sequences(y, u if isinstance(u, (list, tuple)) else None)
        if lengths is not None:
            given = _check_lengths(lengths, len(found), y_pad.shape[1])
            if not np.array_equal(given, found):
                raise ValueError(
                    f"lengths {given.tolist()} disagree with the lengths of the sequences "
                    f"in y {found.tolist()}"
                )
        lengths = found
        if isinstance(u, (list, tuple)):
            u = u_pad
    else:
        if y is None:
            raise ValueError("lengths= needs observations y")
        if isinstance(y, np.ma.MaskedArray):
            y = np.ma.filled(y.astype(float), np.nan)
        y_pad = np.array(y, dtype=_as_float_dtype([np.asarray(y).dtype]))
        if y_pad.ndim != 3:
            raise ValueError(
                "lengths= needs y with a sequence axis, shape (num_sequences, num_steps, "
                f"obs_dim); got shape {y_pad.shape}"
            )
        lengths = _check_lengths(lengths, y_pad.shape[0], y_pad.shape[1])
        if isinstance(u, (list, tuple)):
            us = _sequence_list(u, "u")
            if len(us) != y_pad.shape[0]:
                raise ValueError(f"u has {len(us)} sequences but y has {y_pad.shape[0]}")
            T = y_pad.shape[1]
            u_pad = np.zeros((len(us), T, us[0].shape[1]), _as_float_dtype([a.dtype for a in us]))
            for i, a in enumerate(us):
                if a.shape[0] != lengths[i]:
                    raise ValueError(
                        f"u[{i}] has {a.shape[0]} time steps but lengths[{i}] = {lengths[i]}"
                    )
                u_pad[i, : a.shape[0]] = a
            u = u_pad
    S, T = y_pad.shape[:2]
    time_mask = np.arange(T)[None, :] < lengths[:, None]
    y_pad[~time_mask] = np.nan  # steps after the end are unobserved
    kwargs["y"] = y_pad
    if u is not None:
        kwargs["u"] = u
        shape = np.shape(u)
        if len(shape) == 3 and tuple(shape[:2]) != (S, T):
            raise ValueError(
                f"u must have shape ({S}, {T}, input_dim) or ({T}, input_dim) to match the "
                f"padded y; got shape {tuple(shape)}"
            )
    return kwargs, time_mask


def pad_to_multiple(kwargs: dict, time_mask, multiple: int):
    """Append length-0 sequences (all-NaN ``y``, zero ``u``, False mask) so that the
    number of sequences is a multiple of ``multiple``; they add nothing to the
    statistics or the log-marginal. Returns ``(kwargs, time_mask)`` (``y`` batched)."""
    kwargs = dict(kwargs)
    y = np.asarray(kwargs["y"])
    if y.ndim == 2:
        y = y[None]
    S, T = y.shape[:2]
    if time_mask is None:
        time_mask = np.ones((S, T), bool)
    extra = (-S) % multiple
    if extra:
        y = np.concatenate([y, np.full((extra,) + y.shape[1:], np.nan, y.dtype)], 0)
        time_mask = np.concatenate([time_mask, np.zeros((extra, T), bool)], 0)
        u = kwargs.get("u")
        if u is not None and np.ndim(u) == 3:
            u = np.asarray(u)
            kwargs["u"] = np.concatenate([u, np.zeros((extra,) + u.shape[1:], u.dtype)], 0)
    kwargs["y"] = y
    return kwargs, time_mask


def accepts_keyword(fn, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


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


def prepare_eager(model, params, args, kwargs, check=None):
    """Validate data and parameters (and ``check(info)`` the model, when given), then
    bind the model (eagerly)."""
    if args:
        raise ValueError("pass data to the model as keyword arguments (y=..., u=...)")
    kwargs = validate_data(kwargs)
    info = inspect_checked(model, params, True, **kwargs)
    if check is not None:
        check(info)
    return bind(model, params, **kwargs)


def smooth_eager(e_step, params, model, args, kwargs, rng_key=None, lengths=None, check=None):
    """Validate, then run ``e_step.posterior`` jitted with the parameters and data as
    arguments (one compilation per model, E-step and static arguments). Ragged data
    (lists, or ``lengths``) are padded; the time mask is a traced argument."""
    kwargs, time_mask = ragged_data(kwargs, lengths)
    _, spec = prepare_eager(model, params, args, kwargs, check)
    dynamic, static = split_static(validate_data(kwargs))
    args = (model, e_step, static_items(static), data_pattern(dynamic.get("y"), time_mask))
    fn = cached_program(("smoother",) + args, lambda: _make_smoother(*args))
    key = jax.random.key(0) if rng_key is None else rng_key
    extra = () if time_mask is None else (time_mask,)
    post = fn(dict(params), dynamic, key, *extra)
    if not spec.batched:
        post = jax.tree_util.tree_map(lambda a: a[0], post)
    return post


def posterior_with_mask(e_step, rng_key, ss, y, u, time_mask=None):
    """``e_step.posterior``, passing the time mask to E-steps that take one (the others
    see NaN-padded steps, which add nothing to their posterior of the observed span)."""
    if time_mask is not None and accepts_keyword(e_step.posterior, "time_mask"):
        return e_step.posterior(rng_key, ss, y, u, time_mask=time_mask)
    return e_step.posterior(rng_key, ss, y, u)


def mask_arg(time_mask) -> tuple:
    """The optional trailing ``time_mask`` argument of a compiled step: ``()`` without
    ragged lengths (the step compiles without it), else ``(time_mask,)``."""
    return () if time_mask is None else (time_mask,)


def check_mask_support(m_step, time_mask) -> None:
    """``ValueError`` when ragged data (a time mask) meet an M-step whose
    ``statistics`` cannot drop the padded steps."""
    if time_mask is not None and not accepts_keyword(m_step.statistics, "time_mask"):
        raise ValueError(
            f"ragged lengths (lengths=, lists of sequences, or a mesh that pads the "
            f"sequences) need an M-step whose statistics() takes time_mask; "
            f"{type(m_step).__name__}.statistics does not"
        )


def statistics_with_mask(m_step, post, ss, y, u, time_mask=None):
    """``m_step.statistics``, passing the time mask only when there is one (M-steps
    without ragged support keep their plain signature)."""
    if time_mask is None:
        return m_step.statistics(post, ss, y, u)
    return m_step.statistics(post, ss, y, u, time_mask=time_mask)


def _make_smoother(model, e_step, static_items, pattern=None):
    static = dict(static_items)
    e_step = with_data_pattern(e_step, pattern)  # only the path for that pattern traces

    def run(params, dynamic, rng_key, time_mask=None):
        ss, spec = bind(model, params, **static, **dynamic)
        return posterior_with_mask(e_step, rng_key, ss, spec.y, spec.u, time_mask)

    return jit_model(run, e_step)


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
            and reg.feature_map.state_columns == "last"
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
