"""Online EM with PaRIS statistics (``ppl_dyn.infer.online``) against independent oracles.

The model is a scalar LDS with ``C`` frozen at 1 and no offsets, so that ``A``, ``Q`` and
``R`` are identified (no basis ambiguity). Oracle: the maximum-likelihood estimate on
the same series, computed here with a numpy Kalman filter and scipy's optimiser (the
fixed point that batch exact EM converges to), and its standard errors from the
observed information (a finite-difference Hessian of that log-likelihood). Online EM
with Polyak averaging is asymptotically efficient, so its estimate must be within a few
of those standard errors of the MLE; the starting point is many standard errors away.
"""

import functools

import jax
import numpy as np
import oracles as O
import pytest
from numpyro.handlers import condition
from scipy.optimize import minimize

from ppl_dyn.infer import EM, KalmanSmoother, LinearGaussianMStep, OnlineEM
from ppl_dyn.models import lds

TRUTH = dict(
    A=np.array([[0.8]]),
    C=np.array([[1.0]]),
    Q=np.array([[0.3]]),
    R=np.array([[0.5]]),
    m0=np.array([0.0]),
    P0=np.array([[1.0]]),
)
START = dict(
    A=np.array([[0.3]]),
    Q=np.array([[1.0]]),
    R=np.array([[1.0]]),
    m0=np.array([0.0]),
    P0=np.array([[1.0]]),
)
MODEL = condition(lds, {"C": np.array([[1.0]])})
KW = dict(state_dim=1, bias=False)


def kalman_loglik(theta, y, m0=0.0, P0=1.0, per_step=False):
    """Exact log p(y | A, Q, R) of ``x_t = A x_{t-1} + N(0, Q)``, ``y_t = x_t + N(0, R)``
    by the scalar Kalman filter (numpy, written from the recursions); ``per_step``: the
    one-step predictive terms ``log p(y_t | y_{1:t-1})``."""
    A, Q, R = theta
    m, P, ll = m0, P0, []
    for t, yt in enumerate(y):
        if t > 0:
            m, P = A * m, A * A * P + Q
        S = P + R
        ll.append(-0.5 * (np.log(2 * np.pi * S) + (yt - m) ** 2 / S))
        K = P / S
        m, P = m + K * (yt - m), (1 - K) * P
    return np.array(ll) if per_step else float(np.sum(ll))


@functools.lru_cache(maxsize=None)
def mle(T, seed):
    """Data, the MLE of (A, Q, R) and its standard errors (observed information)."""
    _, y = O.sample_lds(np.random.default_rng(seed), TRUTH, T)
    y1 = y[:, 0]
    obj = lambda z: -kalman_loglik((z[0], np.exp(z[1]), np.exp(z[2])), y1)  # noqa: E731
    z0 = np.array([0.5, 0.0, 0.0])
    res = minimize(
        obj, z0, method="Nelder-Mead", options=dict(xatol=1e-7, fatol=1e-9, maxiter=4000)
    )
    theta = np.array([res.x[0], np.exp(res.x[1]), np.exp(res.x[2])])
    # observed information in (A, Q, R) by central differences
    h = 1e-3 * np.maximum(np.abs(theta), 0.1)
    H = np.zeros((3, 3))
    f = lambda th: kalman_loglik(th, y1)  # noqa: E731
    for i in range(3):
        for j in range(3):
            ei, ej = np.eye(3)[i] * h[i], np.eye(3)[j] * h[j]
            H[i, j] = (
                f(theta + ei + ej) - f(theta + ei - ej) - f(theta - ei + ej) + f(theta - ei - ej)
            ) / (4 * h[i] * h[j])
    se = np.sqrt(np.diag(np.linalg.inv(-H)))
    return y, theta, se


def as_vec(params):
    return np.array([float(np.ravel(params[k])[0]) for k in ("A", "Q", "R")])


def test_mle_oracle_is_a_maximum():
    """The oracle itself: a stationary point with negative definite Hessian, near the
    truth (the data are informative), the start far from it."""
    y, theta, se = mle(2000, 0)
    assert np.all(np.abs(theta - as_vec(TRUTH)) < 4 * se), (theta, se)
    assert np.all(np.abs(as_vec(START) - theta) > 10 * se)


def test_online_em_approaches_the_batch_mle():
    """One pass over T = 2000 steps (N = 100 particles, K = 2, MCMC kernel, alpha = 0.6)
    from a start 16-22 standard errors (SE) from the MLE. Tolerance: the Polyak average
    covers the second half of the updates, so it is mostly an estimate from the second
    half of the data, which differs from the full-data MLE by about one SE (sd), and the
    step-size noise of the iterates at gamma_T ~ 0.01 is of the same order; measured over
    4 seeds on this series: |z| <= 3.3 for the average and <= 2.9 for the last iterate.
    So: averaged within 5 SE, last iterate within 6 SE (both far below the start)."""
    y, theta, se = mle(2000, 0)
    burn_in, every = 50, 10
    res = OnlineEM(MODEL, num_particles=100, burn_in=burn_in, update_every=every).run(
        jax.random.key(1), init_params=START, y=y, **KW
    )
    z = (as_vec(res.averaged_params) - theta) / se
    assert np.all(np.abs(z) < 5.0), (as_vec(res.averaged_params), theta, se)
    z_last = (as_vec(res.params) - theta) / se
    assert np.all(np.abs(z_last) < 6.0), (as_vec(res.params), theta, se)
    # frozen and initial-state sites are untouched
    assert float(res.params["C"][0, 0]) == 1.0
    np.testing.assert_array_equal(np.asarray(res.params["P0"]), START["P0"])
    mon = res.monitor
    B = -(-(2000 - 1) // every)
    assert mon.step.shape == (B,) and res.trajectory["A"].shape == (B, 1, 1)
    # burn-in: no update in the blocks ending at step <= burn_in; the trajectory stays put
    np.testing.assert_array_equal(mon.updated, mon.step > burn_in)
    early = ~mon.updated
    assert early.sum() == (burn_in - 1) // every  # blocks end at steps 11, 21, ...
    np.testing.assert_array_equal(res.trajectory["A"][early, 0, 0], START["A"][0, 0])
    assert np.all(mon.param_change[early] == 0.0)
    # convergence monitor: parameter moves shrink (gamma_t decays), and over the second
    # half the one-step predictive log-likelihood is close to the MLE's (exact Kalman
    # per-step values on the same steps), far from the starting parameters'
    ch = mon.param_change[mon.updated]
    assert ch[:10].mean() > 3 * ch[-50:].mean(), (ch[:10].mean(), ch[-50:].mean())
    half = mon.step > 1000
    lp_online = mon.log_predictive[half].mean()
    lp_mle = kalman_loglik(theta, y[:, 0], per_step=True)[1000:].mean()
    lp_start = kalman_loglik(as_vec(START), y[:, 0], per_step=True)[1000:].mean()
    assert lp_mle - lp_start > 0.1  # measured 0.15 nats per step
    assert abs(lp_online - lp_mle) < 0.25 * (lp_mle - lp_start), (lp_online, lp_mle, lp_start)
    # the prequential log-likelihood of the pass is below the maximised one
    assert res.log_marginals.shape == (1,)
    assert res.log_marginals[0] < kalman_loglik(theta, y[:, 0])


def em_map_at_mle(T, seed, N, every):
    """The online machinery with gamma_t = 1/t (the statistic is then the plain average
    of the PaRIS-smoothed terms, i.e. the batch statistic / T) at the MLE, and a single
    M-step at the end (burn_in = T - 5): one batch EM map, whose fixed point is the MLE."""
    y, theta, se = mle(T, seed)
    start = dict(START)
    start.update({k: np.array([[v]]) for k, v in zip("AQR", theta, strict=True)})
    res = OnlineEM(
        MODEL, num_particles=N, burn_in=T - 5, update_every=every, step_size=lambda t: 1.0 / t
    ).run(jax.random.key(0), init_params=start, y=y, **KW)
    assert res.monitor.updated.sum() == 1
    return (as_vec(res.params) - theta) / se


def test_online_statistics_give_the_em_map_fixed_point_at_the_mle():
    """The statistics path of online EM is unbiased enough: the EM map of the averaged
    statistic at the MLE returns the MLE within 1 SE (measured: |z| <= 0.4 at T = 20000,
    N = 200). Shares the compilation of the test above (gammas and burn-in are traced)."""
    z = em_map_at_mle(2000, 0, N=100, every=10)
    assert np.all(np.abs(z) < 1.0), z


@pytest.mark.slow
def test_online_em_long_series_matches_batch_exact_em():
    """T = 20000, two passes, N = 200. Batch exact EM reproduces the MLE. The online
    estimate: the particle statistics carry an O(1/N) bias (the EM map at the MLE is off by
    ~0.4 SE here), and at a fixed point of EM a bias of the map is amplified by
    1 / (1 - EM rate); measured |z| <= 3.2 for the averaged estimate, so 4 SE, against a
    start 45-70 SE away."""
    y, theta, se = mle(20000, 3)
    ex = EM(MODEL, KalmanSmoother()).run(
        jax.random.key(0), 300, init_params=START, y=y, progress_bar=False, **KW
    )
    assert np.all(np.abs(as_vec(ex.params) - theta) < 0.1 * se)
    assert np.all(np.abs(as_vec(START) - theta) > 40 * se)
    res = OnlineEM(MODEL, num_particles=200, burn_in=100, update_every=20, num_passes=2).run(
        jax.random.key(2), init_params=START, y=y, **KW
    )
    assert res.log_marginals.shape == (2,) and res.num_steps == 40000
    z = (as_vec(res.averaged_params) - theta) / se
    assert np.all(np.abs(z) < 4.0), z
    # the second pass predicts better than the first (it starts from learned values)
    assert res.log_marginals[1] > res.log_marginals[0]
    assert np.all(np.abs(em_map_at_mle(20000, 3, N=200, every=20)) < 1.0)


def test_user_step_sizes_and_validation():
    osc = OnlineEM(MODEL, step_size=lambda t: 1.0 / t)
    np.testing.assert_allclose(osc.step_sizes(5), 1.0 / np.arange(1, 6))
    np.testing.assert_allclose(
        OnlineEM(MODEL, step_size=0.75).step_sizes(3), np.arange(1, 4) ** -0.75
    )
    with pytest.raises(ValueError, match="step_size"):
        OnlineEM(MODEL, step_size=lambda t: 2.0 * np.ones_like(t, float)).step_sizes(4)
    with pytest.raises(ValueError, match="step_size"):
        OnlineEM(MODEL, step_size=lambda t: 0.1).step_sizes(4)  # wrong shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step_size=0.5), "step_size"),
        (dict(step_size=1.5), "step_size"),
        (dict(step_size="fast"), "step_size"),
        (dict(burn_in=-1), "burn_in"),
        (dict(update_every=0), "update_every"),
        (dict(num_passes=0), "num_passes"),
        (dict(num_particles=0), "num_particles"),
        (dict(num_backward=0), "num_backward"),
        (dict(kernel="exact"), "kernel"),
        (dict(resampling="foo"), "resampling"),
        (dict(ess_threshold=2.0), "ess_threshold"),
        (dict(monitor_decay=1.0), "monitor_decay"),
        (dict(m_step=object()), "m_step"),
        (dict(m_step=LinearGaussianMStep(map_estimate=True)), "map_estimate"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineEM(MODEL, **kwargs)


def test_bad_data_raise():
    y = np.random.default_rng(0).normal(size=(3, 20, 1))
    with pytest.raises(ValueError, match="one sequence"):
        OnlineEM(MODEL).run(jax.random.key(0), init_params=START, y=y, **KW)
    with pytest.raises(ValueError, match="2 time steps"):
        OnlineEM(MODEL).run(jax.random.key(0), init_params=START, y=y[0, :1], **KW)
    with pytest.raises(ValueError, match="rng_key"):
        OnlineEM(MODEL).run(None, init_params=START, y=y[0], **KW)


def test_online_em_is_the_em_driver_with_a_streaming_e_step():
    """``OnlineEM.run`` is a thin alias: the EM driver running ``OnlineEM.parts`` (the
    streaming PaRIS E-step and the held M-step) from the same start and key gives the
    same iterates, block by block. A user schedule (evaluated on the host inside the
    compiled step) equal to the built-in exponent gives the same run up to rounding."""
    y, _, _ = mle(300, 1)
    alg = OnlineEM(MODEL, num_particles=50, burn_in=30, update_every=25, num_passes=2)
    res = alg.run(jax.random.key(4), init_params=START, y=y, progress_bar=False, **KW)
    e_step, m_step = alg.parts(300)
    assert e_step.update_every == 25 and m_step.hold == int(np.sum(res.monitor.step <= 30))
    # the run's key after OnlineEM's split of the caller's key (initial_params)
    _, run_key = jax.random.split(jax.random.key(4))
    em = EM(MODEL, e_step, m_step).run(
        run_key, 2 * 12, init_params=START, y=y, progress_bar=False, keep_params_history=True, **KW
    )
    for k in ("A", "Q", "R"):
        np.testing.assert_array_equal(res.trajectory[k], em.params_history[k])
    np.testing.assert_allclose(res.log_marginals, em.log_marginals.reshape(2, 12).sum(1))
    # blocks: 12 per pass of 300 steps (steps 2..300 in runs of 25), the first block of
    # each pass also predicting the pass's first observation
    np.testing.assert_array_equal(
        res.monitor.step[:12], [1 + 25 * (b + 1) for b in range(11)] + [300]
    )
    np.testing.assert_array_equal(res.monitor.step[12:], 300 + res.monitor.step[:12])
    lam = OnlineEM(
        MODEL,
        num_particles=50,
        burn_in=30,
        update_every=25,
        num_passes=2,
        step_size=lambda t: np.asarray(t, float) ** -0.6,
    ).run(jax.random.key(4), init_params=START, y=y, progress_bar=False, **KW)
    for k in ("A", "Q", "R"):
        np.testing.assert_allclose(lam.trajectory[k], res.trajectory[k], rtol=1e-8)


def test_streaming_e_step_refuses_what_it_cannot_do():
    from ppl_dyn.handlers import marginalize
    from ppl_dyn.infer import StreamingPARIS

    y = np.random.default_rng(0).normal(size=(40, 1))
    em = EM(MODEL, StreamingPARIS(20), OnlineEM(MODEL).parts(40)[1])
    with pytest.raises(ValueError, match="ragged"):
        em.run(jax.random.key(0), 2, init_params=START, y=[y, y[:30]], progress_bar=False, **KW)
    with pytest.raises(ValueError, match="one sequence"):
        em.run(
            jax.random.key(0), 2, init_params=START, y=np.stack([y, y]), progress_bar=False, **KW
        )
    with pytest.raises(ValueError, match="PARISSmoother"):
        StreamingPARIS(20).posterior(None, None, y, None)
    with pytest.raises(ValueError, match="StreamingPARIS gives a random estimate"):
        marginalize(MODEL, StreamingPARIS(20))
