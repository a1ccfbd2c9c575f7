"""Shipped datasets: shapes, known values from the sources, missing entries, and a fit.

The spot values are the published numbers (Cobb 1978 table; NOAA yearly sunspot series;
Keeling's Mauna Loa record), not values read back from our own loader's output.
"""

import jax
import numpy as np
import oracles as O
import pytest

from ppl_dyn import datasets


def test_nile():
    d = datasets.nile()
    assert d.y.shape == (100, 1) and d.time[0] == 1871 and d.time[-1] == 1970
    assert d.y[0, 0] == 1120 and d.y[1, 0] == 1160  # first two years (Cobb 1978)
    assert not np.isnan(d.y).any()


def test_sunspots_and_co2():
    s = datasets.sunspots()
    assert s.y.shape == (309, 1) and s.time[0] == 1700 and s.y[0, 0] == 5
    c = datasets.co2()
    assert c.y.shape == (2284, 1)
    assert np.isnan(c.y).sum() == 59
    assert 1958.2 < c.time[0] < 1958.3 and c.y[0, 0] == pytest.approx(316.1)
    assert np.all(np.diff(c.time) > 0)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="available"):
        datasets.load("nope")
    assert datasets.names() == ["co2", "discoveries", "lynx", "nile", "sunspots"]


def test_lynx_and_discoveries():
    """Published values: lynx 1821 = 269, 1934 = 3396, the maximum 6991 (1904)
    (Brockwell & Davis series G); discoveries 1860 = 5, maximum 12 (1885)."""
    lx = datasets.lynx()
    assert lx.y.shape == (114, 1) and lx.time[0] == 1821 and lx.time[-1] == 1934
    assert lx.y[0, 0] == 269 and lx.y[-1, 0] == 3396
    assert lx.y.max() == 6991 and lx.time[np.argmax(lx.y)] == 1904
    d = datasets.discoveries()
    assert d.y.shape == (100, 1) and d.time[0] == 1860 and d.y[0, 0] == 5
    assert d.y.max() == 12 and d.time[np.argmax(d.y)] == 1885
    assert np.all(d.y == np.round(d.y)) and not np.isnan(d.y).any()


def test_nile_local_level_fit_matches_dense_likelihood():
    """A local-level model on the Nile data: EM's final log-likelihood equals the dense
    Gaussian oracle at the fitted parameters, and the fitted noise variances are in the
    range reported in the literature (Durbin & Koopman: sigma_eps^2 ~ 15099,
    sigma_eta^2 ~ 1469; EM here starts from other values, so we check the order)."""
    from ppl_dyn.infer import EM, KalmanSmoother
    from ppl_dyn.models import lds

    y = datasets.nile().y
    fixed = dict(A=np.eye(1), C=np.eye(1), m0=np.array([1120.0]), P0=np.array([[1e7]]))
    import numpyro

    model = numpyro.handlers.condition(lds, fixed)
    res = EM(model, KalmanSmoother()).run(
        jax.random.key(0),
        300,
        y=y,
        state_dim=1,
        bias=False,
        progress_bar=False,
        init_params=dict(Q=np.array([[1000.0]]), R=np.array([[10000.0]])),
    )
    p = {k: np.asarray(v) for k, v in res.params.items()}
    assert abs(res.log_marginals[-1] - O.dense_log_marginal(p, y)) < 1e-3
    assert 10000 < p["R"][0, 0] < 20000 and 500 < p["Q"][0, 0] < 3000
