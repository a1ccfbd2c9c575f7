"""The drivers' compile configuration, in one place.

How our programs are compiled is decided here, not in the algorithm code:

* :func:`jit_model`: ``jax.jit`` with NumPyro's argument checks off (validated eagerly
  before) and the XLA options for the program's E-step (:func:`compiler_options`);
* :func:`compiler_options`: E-steps only declare that their programs are small-matrix
  work (``small_matrix_programs = True``); on the CPU that selects XLA's loop emitter;
* :func:`compile_ahead`: ``EM.run`` compiles its step in a background thread while it
  validates the starting values;
* :func:`cached_program`: one cache of the built programs (EM steps and the plug-ins'
  initial states, smoothers, SGD steps, predictors), keyed by what they are built from.
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Any, Callable, Hashable, Optional

import jax
import numpy as np

from ppl_dyn._validation import device_array

__all__ = [
    "without_validation",
    "jit_model",
    "compiler_options",
    "small_matrix_compiler_options",
    "compile_ahead",
    "cached_program",
    "clear_programs",
    "SMALL_MATRIX_CPU_OPTIONS",
]


def without_validation(fn):
    """``fn`` run with NumPyro's distribution argument checks switched off.

    NumPyro validates distribution arguments by default. Under ``jax.jit`` the checks
    cannot raise (the values are tracers), but evaluating them still costs: their
    constant parts (triangular masks, diagonals) run eagerly, op by op, each compiling
    its own small XLA program -- about 1.3 s of a fresh process's first EM step on the
    LDS. Our jitted entry points validate the parameters eagerly beforehand
    (:func:`inspect_checked`), so the traced body runs without the checks.
    """
    from numpyro.distributions.distribution import validation_enabled

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with validation_enabled(False):
            return fn(*args, **kwargs)

    return wrapped


def jit_model(fn, e_step=None, **jit_kwargs):
    """``jax.jit`` of :func:`without_validation` ``(fn)``: what our compiled E-steps,
    EM steps and samplers are built with. ``e_step``: the E-step inside ``fn``; its
    :func:`compiler_options` go to XLA."""
    fn = without_validation(fn)
    plain = jax.jit(fn, **jit_kwargs)
    options = compiler_options(e_step)
    if not options:
        return plain
    # XLA takes options from the top-level program only (a jit inside a user's jit or
    # grad raises): called with tracers, the plain jit runs and becomes part of theirs
    tuned = jax.jit(fn, compiler_options=options, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        leaves = jax.tree_util.tree_leaves((args, kwargs))
        traced = any(isinstance(v, jax.core.Tracer) for v in leaves)
        return (plain if traced else tuned)(*args, **kwargs)

    call.lower = tuned.lower
    call._cache_size = lambda: tuned._cache_size() + plain._cache_size()  # compilations
    return call


def compiler_options(e_step) -> Optional[dict]:
    """The XLA compiler options for a program built around ``e_step`` on the default
    backend: :func:`small_matrix_compiler_options` when the E-step says its programs are
    small-matrix work (a ``small_matrix_programs = True`` attribute: the Kalman-type
    E-steps), else None (XLA's defaults). The E-steps state a fact about their programs;
    which flags that means is decided here, in one place."""
    if getattr(e_step, "small_matrix_programs", False) is True:
        return small_matrix_compiler_options(jax.default_backend())
    return None


# XLA's CPU fusion emitters (the default) take about twice as long to compile the
# small-matrix programs of the Kalman-type E-steps as the older loop emitter, for the same
# run time. EM step, T=1000, compile / run per iteration, default -> this:
#   LDS + KalmanSmoother, dx=2, dy=1:  1.63 s -> 0.80 s,  2.37 -> 2.33 ms
#   LDS + KalmanSmoother, dx=5, dy=10: 3.79 s -> 2.01 s,  5.73 -> 5.58 ms
#   tanh-RNN + EKS, dx=2 / dx=5:       2.39 -> 1.23 s / 2.64 -> 1.63 s, same run time
# Not for the particle E-steps: their large element-wise blocks ran 1.5x slower.
SMALL_MATRIX_CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def small_matrix_compiler_options(backend: str):
    """XLA compiler options for a program of small-matrix work on ``backend`` (only
    those this jaxlib's XLA knows: newer ones dropped the loop emitter's switch)."""
    if backend != "cpu":
        return None
    known = {k: v for k, v in SMALL_MATRIX_CPU_OPTIONS.items() if _cpu_option_known(k, v)}
    return known or None


@functools.lru_cache(maxsize=None)
def _cpu_option_known(name: str, value) -> bool:
    """Whether XLA's CPU compiler accepts the option (one tiny compile, once)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
    except Exception:  # JaxRuntimeError: "No such compile option"
        return False
    return True


def compile_ahead(step, init_params, dynamic, rng_key, extra):
    """Trace and lower the EM step with the given starting values, then compile it in a
    background thread while :meth:`EM.init` validates those values (XLA compiles without
    holding Python's lock; the validation is Python and small eager programs). Returns
    the thread (join it before the first call: the call then finds the trace, lowering
    and executable in JAX's caches), or None when the values cannot be traced as they
    are. A guess that differs from what ``init`` returns (extra or missing sites, other
    dtypes) only costs the wasted compilation; an invalid value raises in ``init``, not
    here. Measured (fresh process, LDS dx=2, T=1000, 100 iterations): 1.40 -> 1.27 s.
    Splitting the step into two programs compiled on two threads gained nothing more
    (XLA's CPU compiler already uses both cores)."""
    try:
        given = getattr(init_params, "params", init_params)  # a dict or an EMResult
        params = {k: device_array(v) for k, v in given.items()}
        # the same call signature as the loop's (the empty states as keywords): a
        # different one would miss JAX's caches and compile the step twice
        lowered = step.lower(params, dynamic, rng_key, np.int32(0), *extra, e_state=(), m_state=())
    except Exception:
        return None

    def work():
        try:
            lowered.compile()
        except Exception:  # the real first call compiles again and reports it
            pass

    thread = threading.Thread(target=work, name="ppl_dyn-compile-ahead", daemon=True)
    thread.start()
    return thread


_PROGRAMS: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
MAX_PROGRAMS = 256  # the least recently used program is dropped beyond this


def cached_program(key: Hashable, build: Callable[[], Any]):
    """``build()``, cached under ``key``: the drivers' programs are jitted functions
    built from a model, plug-ins and static arguments, and JAX's own caches only hit
    for the same function object. A key that cannot be hashed (a static argument that
    is an unhashable value) builds afresh each call. ``key`` starts with the builder's
    name, so that two kinds of program never share an entry."""
    try:
        hash(key)
    except TypeError:
        return build()
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    value = build()
    _PROGRAMS[key] = value
    if len(_PROGRAMS) > MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return value


def clear_programs() -> None:
    """Forget every cached program (tests that count compilations start here)."""
    _PROGRAMS.clear()
