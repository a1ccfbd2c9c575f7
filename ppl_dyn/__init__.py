"""ppl_dyn: learning stochastic dynamical systems written as NumPyro models.

The library never changes JAX's precision on import; enable float64 yourself with
``jax.config.update("jax_enable_x64", True)`` when you need it.

The names below load on first use (PEP 562): ``import ppl_dyn`` itself imports neither
JAX nor NumPyro, so the command line answers ``--help`` or a bad argument at once, and a
process started by ``python -m ppl_dyn.launch`` can join ``jax.distributed`` before
anything starts JAX's backend.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

# a process started by ppl_dyn.launch joins the others first (imports only the stdlib
# and, when it joins, JAX)
from ppl_dyn import distributed
from ppl_dyn._version import __version__

distributed.initialize_from_environment()

_SUBMODULES = {"handlers", "infer", "mcmc", "models", "requirements", "datasets"}
_ATTRIBUTES = {
    "to_inference_data": "ppl_dyn.arviz_io",
    "pad_sequences": "ppl_dyn.infer._run",
    "predict": "ppl_dyn.predict",
    "prediction_rmse": "ppl_dyn.predict",
    "Prediction": "ppl_dyn.predict",
    "posterior_predictive": "ppl_dyn.predictive",
    "forecast": "ppl_dyn.predictive",
    "PredictiveBands": "ppl_dyn.predictive",
    "simulate": "ppl_dyn.simulate",
    "backtest": "ppl_dyn.backtest",
    "standardize": "ppl_dyn.preprocess",
    "Backtest": "ppl_dyn.backtest",
    "markov": "ppl_dyn.state_space",
    "bind": "ppl_dyn.state_space",
    "StateSpace": "ppl_dyn.state_space",
    "LinearStructure": "ppl_dyn.state_space",
    "Regression": "ppl_dyn.state_space",
    "Features": "ppl_dyn.features",
    "keep_freed_memory": "ppl_dyn._malloc",
}

__all__ = [
    "infer",
    "models",
    "handlers",
    "mcmc",
    "to_inference_data",
    "posterior_predictive",
    "forecast",
    "PredictiveBands",
    "simulate",
    "pad_sequences",
    "predict",
    "prediction_rmse",
    "Prediction",
    "backtest",
    "Backtest",
    "standardize",
    "markov",
    "bind",
    "StateSpace",
    "LinearStructure",
    "Regression",
    "Features",
    "keep_freed_memory",
    "__version__",
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"ppl_dyn.{name}")
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module 'ppl_dyn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | set(_ATTRIBUTES))


class _Package(types.ModuleType):
    """``ppl_dyn.predict``, ``ppl_dyn.simulate`` and ``ppl_dyn.backtest`` are functions,
    although modules of those names exist: loading the module must not replace the
    function. (Python binds a submodule on its package when it first loads it; with the
    package's names loaded on first use, that would happen after the function was
    bound, or before it.)"""

    def __setattr__(self, name, value):
        if name in ("predict", "simulate", "backtest") and isinstance(value, types.ModuleType):
            return  # the module stays importable by its full name (sys.modules)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what static tools (and readers) see
    from ppl_dyn import handlers, infer, mcmc, models  # noqa: F401
    from ppl_dyn.arviz_io import to_inference_data  # noqa: F401
    from ppl_dyn.backtest import Backtest, backtest  # noqa: F401
    from ppl_dyn.features import Features  # noqa: F401
    from ppl_dyn.infer._run import pad_sequences  # noqa: F401
    from ppl_dyn.predict import Prediction, predict, prediction_rmse  # noqa: F401
    from ppl_dyn.predictive import PredictiveBands, forecast, posterior_predictive  # noqa: F401
    from ppl_dyn.preprocess import standardize  # noqa: F401
    from ppl_dyn.simulate import simulate  # noqa: F401
    from ppl_dyn.state_space import (  # noqa: F401
        LinearStructure,
        Regression,
        StateSpace,
        bind,
        markov,
    )
