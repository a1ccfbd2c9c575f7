"""BPTT baselines: the gradient against finite differences, the loss against a hand
computation, training on a noiseless deterministic tanh-RNN sequence, forecasts against
an explicit closed-loop rollout, and shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_dyn
from ppl_dyn import baselines
from ppl_dyn.baselines import Baseline


def _noiseless_rnn_sequence(T=150):
    """The seed-000 synthetic RNN (A = [[1, 1], [-0.05, 0.98]], read-out (1 0)) without
    noise: x_t = A tanh(x_{t-1}), y_t = tanh(x_t)_1, an almost harmonic oscillation."""
    A = np.array([[1.0, 1.0], [-0.05, 0.98]])
    x = np.array([0.5, 0.0])
    ys = []
    for _ in range(T):
        x = A @ np.tanh(x)
        ys.append(np.tanh(x)[:1])
    return np.array(ys)


@pytest.mark.parametrize("cell", ["tanh", "lstm"])
def test_bptt_gradient_matches_central_finite_differences(cell):
    net = Baseline(cell, 3)
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 12, 2))
    y[0, 4, 1] = np.nan  # a missing entry: skipped in the loss, replaced as an input
    u = rng.normal(size=(2, 12, 1))
    p = baselines.init_params(jax.random.key(1), net, obs_dim=2, input_dim=1)
    g = jax.grad(lambda q: baselines.loss(q, net, y, u))(p)
    for _ in range(3):
        v = {k: jnp.asarray(rng.normal(size=a.shape)) for k, a in p.items()}
        eps = 1e-6
        fp = baselines.loss({k: p[k] + eps * v[k] for k in p}, net, y, u)
        fm = baselines.loss({k: p[k] - eps * v[k] for k in p}, net, y, u)
        fd = (fp - fm) / (2 * eps)
        ad = sum(jnp.vdot(g[k], v[k]) for k in p)
        assert abs(float(fd - ad)) < 1e-7 * max(1.0, abs(float(ad))), (float(fd), float(ad))


def test_loss_matches_hand_computed_tiny_case():
    # one hidden unit, T = 3: x_t = a tanh(x_{t-1}) + w y_{t-1} + c, yhat_t = g tanh(x_t) + e
    a, w, c, g, e = 0.5, -0.7, 0.1, 2.0, 0.3
    p = {
        "A": jnp.array([[a]]),
        "B": jnp.array([[w]]),
        "b": jnp.array([c]),
        "C": jnp.array([[g]]),
        "d": jnp.array([e]),
    }
    y = np.array([[0.4], [-0.2], [0.9]])
    x, y_prev, sq = 0.0, 0.0, 0.0
    for t in range(3):
        x = a * np.tanh(x) + w * y_prev + c
        sq += (y[t, 0] - (g * np.tanh(x) + e)) ** 2
        y_prev = y[t, 0]
    np.testing.assert_allclose(
        float(baselines.loss(p, Baseline("tanh", 1), y)), 0.5 * sq / 3, rtol=1e-13
    )


@pytest.mark.parametrize("cell", ["tanh", "lstm"])
def test_bptt_fits_noiseless_rnn_sequence(cell):
    y = _noiseless_rnn_sequence()
    net = Baseline(cell, 4)
    fit = baselines.fit_bptt(
        jax.random.key(0),
        net,
        y=y,
        num_steps=1000,
        learning_rate=0.02,
        progress_bar=False,
        washout=5,
    )
    assert fit.losses.shape == (1000,)
    assert fit.final_loss < 1e-3 * fit.losses[0], (fit.losses[0], fit.final_loss)
    pred = baselines.predict(fit.params, net, y=y, horizons=(1, 5))
    rmse = ppl_dyn.prediction_rmse(pred, y)
    # after a short warm-up from the zero state the one-step forecasts are near exact
    err1 = np.sqrt(np.mean((np.asarray(pred.mean[1])[10:-1] - y[11:]) ** 2))
    assert err1 < 0.02 * np.std(y), (err1, rmse)
    assert rmse[5] < 0.5 * np.std(y), rmse


def test_predict_matches_explicit_closed_loop_rollout():
    net = Baseline("lstm", 3)
    y = np.random.default_rng(2).normal(size=(15, 1))
    p = baselines.init_params(jax.random.key(3), net, obs_dim=1)
    pred = baselines.predict(p, net, y=y, horizons=(1, 3))
    yhat = np.asarray(baselines.one_step_predictions(p, net, y))
    np.testing.assert_allclose(np.asarray(pred.mean[1])[:-1], yhat[1:], rtol=1e-12)
    # horizon 3 from t = 6: read y_1..y_7, then feed back two own predictions
    t = 6
    y_ext = y[: t + 1].copy()
    for _ in range(2):
        nxt = np.asarray(baselines.one_step_predictions(p, net, np.vstack([y_ext, [[0.0]]])))[-1]
        y_ext = np.vstack([y_ext, nxt[None]])
    last = np.asarray(baselines.one_step_predictions(p, net, np.vstack([y_ext, [[0.0]]])))[-1]
    np.testing.assert_allclose(np.asarray(pred.mean[3])[t], last, rtol=1e-10)
    assert pred.lower is None and pred.horizons == (1, 3)


def test_bad_shapes_raise_naming_the_argument():
    net = Baseline("tanh", 2)
    y = np.zeros((10, 1))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="y must have shape"):
        baselines.fit_bptt(key, net, y=np.zeros(10), num_steps=2, progress_bar=False)
    with pytest.raises(ValueError, match="u must have shape"):
        baselines.fit_bptt(key, net, y=y, u=np.zeros((9, 1)), num_steps=2, progress_bar=False)
    with pytest.raises(ValueError, match="hidden_dim"):
        baselines.fit_bptt(key, Baseline("tanh", 0), y=y, num_steps=2, progress_bar=False)
    with pytest.raises(ValueError, match="cell"):
        baselines.fit_bptt(key, Baseline("gru", 2), y=y, num_steps=2, progress_bar=False)
    with pytest.raises(ValueError, match="num_steps"):
        baselines.fit_bptt(key, net, y=y, num_steps=0, progress_bar=False)
    with pytest.raises(ValueError, match="rng_key"):
        baselines.fit_bptt(None, net, y=y, num_steps=2, progress_bar=False)
    p = baselines.init_params(key, net, obs_dim=1)
    with pytest.raises(ValueError, match=r"params\['B'\] must have shape \(2, 2\).*obs_dim=2"):
        baselines.predict(p, net, y=np.zeros((10, 2)))
    with pytest.raises(ValueError, match="horizons"):
        baselines.predict(p, net, y=y, horizons=(0,))
