"""ppl_dyn.standardize: per-column statistics of a training span, NaN-aware."""

import numpy as np
import pytest

import ppl_dyn


def test_statistics_come_from_the_fitted_span_only():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(3, 40, 2)) * [2.0, 5.0] + [1.0, -3.0]
    y[0, 5, 1] = np.nan
    y[:, 30:] += 100.0  # a held-out tail that must not move the statistics
    st = ppl_dyn.standardize(y, fit_steps=30)
    head = y[:, :30].reshape(-1, 2)
    np.testing.assert_allclose(st.mean, np.nanmean(head, 0), rtol=1e-14)
    np.testing.assert_allclose(st.scale, np.nanstd(head, 0), rtol=1e-14)
    np.testing.assert_allclose(st.inverse(st.y), y, rtol=1e-13, atol=1e-12)  # NaN stays
    assert np.isnan(st.y[0, 5, 1])
    np.testing.assert_allclose(st.inverse_scale(np.ones(2)), st.scale)
    one = ppl_dyn.standardize(y[0, :, 0])  # (T,) -> (T, 1)
    assert one.y.shape == (40, 1)


@pytest.mark.parametrize(
    "y, kw, problem",
    [
        (np.ones((10, 1)), {}, "column 0 of y is constant"),
        (np.c_[np.arange(10.0), np.full(10, np.nan)], {}, "column 1 of y has no observed"),
        (np.arange(10.0), {"fit_steps": 11}, r"fit_steps must be in \[1, 10\]"),
        (np.zeros((2, 2, 2, 2)), {}, "y must be"),
    ],
)
def test_bad_input_is_named(y, kw, problem):
    with pytest.raises(ValueError, match=problem):
        ppl_dyn.standardize(y, **kw)
