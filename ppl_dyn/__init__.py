"""ppl_dyn: learning stochastic dynamical systems written as NumPyro models.

The library never changes JAX's precision on import; enable float64 yourself with
``jax.config.update("jax_enable_x64", True)`` when you need it.
"""

from ppl_dyn import handlers, infer, mcmc, models
from ppl_dyn.arviz_io import to_inference_data
from ppl_dyn.infer._run import pad_sequences
from ppl_dyn.predict import Prediction, predict, prediction_rmse
from ppl_dyn.predictive import PredictiveBands, forecast, posterior_predictive
from ppl_dyn.simulate import simulate
from ppl_dyn.state_space import LinearStructure, Regression, StateSpace, bind, markov

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
