"""Shared test configuration: float64 everywhere.

``jax_numpy_rank_promotion = "raise"`` is deliberately NOT set: numpyro's own
``MultivariateNormal.sample`` (used by ``ppl_dyn.simulate``) relies on rank promotion.
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
# the CLI's persistent compilation cache stays off in tests (a test that calls cli.main in
# this process would otherwise turn it on for every later test of the worker); the cache
# itself is tested in a subprocess (test_cli.py)
os.environ.setdefault("PPL_DYN_CACHE_DIR", "off")

sys.path.insert(0, os.path.dirname(__file__))  # so that `import oracles` works
