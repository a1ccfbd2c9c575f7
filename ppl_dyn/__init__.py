"""ppl_dyn: learning stochastic dynamical systems written as NumPyro models.

The library never changes JAX's precision on import; enable float64 yourself with
``jax.config.update("jax_enable_x64", True)`` when you need it.
"""

# a process started by ppl_dyn.distributed's launcher joins the others now: importing the
# rest starts JAX's backend, after which jax.distributed.initialize can no longer run
from ppl_dyn import distributed  # isort: skip  (first: imports nothing but the stdlib)

distributed.initialize_from_environment()

from ppl_dyn import handlers, infer, mcmc, models  # noqa: E402
from ppl_dyn.arviz_io import to_inference_data  # noqa: E402
from ppl_dyn.infer._run import pad_sequences  # noqa: E402
from ppl_dyn.predict import Prediction, predict, prediction_rmse  # noqa: E402
from ppl_dyn.predictive import PredictiveBands, forecast, posterior_predictive  # noqa: E402
from ppl_dyn.simulate import simulate  # noqa: E402
from ppl_dyn.state_space import (  # noqa: E402
    LinearStructure,
    Regression,
    StateSpace,
    bind,
    markov,
)

__version__ = "0.1.0"

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
    "markov",
    "bind",
    "StateSpace",
    "LinearStructure",
    "Regression",
    "__version__",
]
