"""benchmarks/forecasting.py runs (its smoke size: the Nile, short fits) and its
scoring helpers agree with direct computation."""

import importlib.util
import pathlib

import numpy as np
import pytest
from scipy import integrate, stats

ROOT = pathlib.Path(__file__).parent.parent


def _script():
    path = ROOT / "benchmarks" / "forecasting.py"
    spec = importlib.util.spec_from_file_location("forecasting", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gaussian_crps_is_the_integral_of_the_squared_cdf_gap():
    mod = _script()
    for m, sd, y in ((0.0, 1.0, 0.3), (2.0, 0.5, -1.0), (-1.0, 3.0, 4.0)):
        cdf = stats.norm(m, sd).cdf
        integral = integrate.quad(lambda x, F=cdf: F(x) ** 2, -np.inf, y)[0]
        integral += integrate.quad(lambda x, F=cdf: (1 - F(x)) ** 2, y, np.inf)[0]
        crps, _ = mod.gaussian_scores(m, sd, y)
        np.testing.assert_allclose(crps, integral, rtol=1e-7)


@pytest.mark.slow  # default-suite budget (~15 min on 2 cores): runs in the slow tier
def test_quick_run_writes_a_table_with_every_method(tmp_path):
    mod = _script()
    out = tmp_path / "table.md"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for method in ("AR(", "ARIMA(", "exp. smoothing", "ppl_dyn LDS", "ppl_dyn tanh-RNN",
                   "ppl_dyn RBF"):  # fmt: skip
        assert method in text, method
    assert "**nile**" in text
