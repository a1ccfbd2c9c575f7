"""Shared test configuration: float64 everywhere.

``jax_numpy_rank_promotion = "raise"`` is deliberately NOT set: numpyro's own
``MultivariateNormal.sample`` (used by ``ppl_dyn.simulate``) relies on rank promotion.
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(__file__))  # so that `import oracles` works
