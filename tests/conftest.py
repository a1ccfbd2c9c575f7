"""Shared test configuration: float64 everywhere.

``jax_numpy_rank_promotion = "raise"`` is deliberately NOT set: with it, numpyro's own
``MultivariateNormal.sample`` (used by ``ppl_dyn.simulate``) and ppl_dyn's M-step
(``ppl_dyn/infer/mstep.py``: ``_pinv_psd`` and ``floor_covariance`` multiply an
``(n, n)`` eigenvector matrix by an ``(n,)`` vector) raise ``ValueError``. See the
test report.
"""

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(__file__))  # so that `import oracles` works
