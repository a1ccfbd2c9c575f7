"""PaRIS (``ppl_dyn.infer.paris``) against independent oracles.

Oracles: a dense numpy forward-only FFBSm recursion (Del Moral, Doucet & Singh 2010)
written here from the formulas, cross-checked against the dense backward FFBSm of
``tests/particle_oracles.py``; the exact Kalman/RTS expected statistics (dense joint
Gaussian route: ``gaussian_linear_statistics`` of the ``KalmanSmoother`` posterior, itself
tested against ``tests/oracles.py``); exact EM. Negative controls: the path-space
(genealogy) estimator and ``K = 1``. Statistical checks use fixed seeds and computed
standard errors.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import oracles as O
import particle_oracles as PO
import pytest
from scipy.special import logsumexp

from ppl_dyn.infer import EM, KalmanSmoother, LinearGaussianMStep, PARISSmoother
from ppl_dyn.infer.paris import (
    BackwardKernel,
    PARISPosterior,
    filter_init,
    filter_step,
    initial_tau,
    paris_on_particles,
    paris_update,
    weighted_sum,
)
from ppl_dyn.infer.particle import particle_filter
from ppl_dyn.infer.stats import gaussian_linear_statistics
from ppl_dyn.models import lds, tanh_rnn
from ppl_dyn.state_space import bind

T_STD, N_STD = 20, 50
LEAVES = [
    ("dynamics", "S_zr"),
    ("dynamics", "S_rr"),
    ("dynamics", "S_zz"),
    ("dynamics", "n"),
    ("emission", "S_zr"),
    ("emission", "S_rr"),
    ("emission", "S_zz"),
    ("emission", "n"),
    ("init", "sum_m"),
    ("init", "sum_mm"),
    ("init", "n"),
]


def system_2d(seed=5, T=T_STD):
    """A 2-d LDS with 2-d observations, one entry and one whole step missing."""
    params, y, _ = O.random_system(np.random.default_rng(seed), 2, 2, 0.9, T)
    y = y.copy()
    y[5, 1] = np.nan
    y[9, :] = np.nan
    return params, y


def flat(stats):
    """LinearStats (leaves with optional leading axes) -> one vector per leading index."""
    parts = [np.asarray(getattr(getattr(stats, a), b)) for a, b in LEAVES]
    lead = parts[0].ndim - 2
    return np.concatenate([p.reshape(p.shape[:lead] + (-1,)) for p in parts], -1)


# --------------------------------------------------------------------------------------
# dense numpy oracles
# --------------------------------------------------------------------------------------


def emission_terms_np(params, X, y_t):
    """Per particle ``(S_zr, S_rr, S_zz)`` of the emission regression, ``z = y_t`` with
    missing entries replaced by their conditional Gaussian given ``x`` and ``y_obs``."""
    C, d, R = (np.asarray(params[k], float) for k in ("C", "d", "R"))
    mu = X @ C.T + d
    o = ~np.isnan(y_t)
    m = ~o
    Ey = np.where(o[None, :], np.nan_to_num(y_t)[None, :], mu)
    Rc = np.zeros_like(R)
    if m.any() and o.any():
        K = R[np.ix_(m, o)] @ np.linalg.inv(R[np.ix_(o, o)])
        Ey[:, m] = mu[:, m] + (y_t[o][None, :] - mu[:, o]) @ K.T
        Rc[np.ix_(m, m)] = R[np.ix_(m, m)] - K @ R[np.ix_(o, m)]
    elif m.any():
        Rc = R.copy()
    r = np.concatenate([X, np.ones((len(X), 1))], 1)
    return (
        Ey[:, :, None] * r[:, None, :],
        r[:, :, None] * r[:, None, :],
        Ey[:, :, None] * Ey[:, None, :] + Rc,
    )


def dense_forward_only(X, LW, params, y, anc=None):
    """Forward-only FFBSm: ``tau_t^i = sum_j B_t(i, j) [tau_{t-1}^j + s_t(x_{t-1}^j,
    x_t^i)]`` with the dense backward kernel; ``anc`` given: ``B_t(i, .)`` is the point
    mass at the filter's ancestor (the path-space estimator, a negative control).
    Returns the flat LinearStats vector ``sum_i w_T^i tau_T^i``."""
    X, LW = np.asarray(X, float), np.asarray(LW, float)
    T, N, dx = X.shape
    ez, er, ezz = emission_terms_np(params, X[0], y[0])
    tau = dict(
        dz=np.zeros((N, dx, dx + 1)),
        dr=np.zeros((N, dx + 1, dx + 1)),
        dzz=np.zeros((N, dx, dx)),
        ez=ez,
        er=er,
        ezz=ezz,
        m=X[0].copy(),
        mm=X[0][:, :, None] * X[0][:, None, :],
    )
    for t in range(1, T):
        if anc is None:
            a = LW[t - 1][None, :] + PO.transition_log_matrix(params, X[t], X[t - 1])
            B = np.exp(a - logsumexp(a, axis=1, keepdims=True))  # rows: x_t^i, cols: j
        else:
            B = np.eye(N)[np.asarray(anc[t])]
        tau = {k: np.einsum("ij,j...->i...", B, v) for k, v in tau.items()}
        r = np.concatenate([X[t - 1], np.ones((N, 1))], 1)
        tau["dz"] += X[t][:, :, None] * (B @ r)[:, None, :]
        tau["dr"] += np.einsum("ij,jp,jq->ipq", B, r, r)
        tau["dzz"] += X[t][:, :, None] * X[t][:, None, :]
        ez, er, ezz = emission_terms_np(params, X[t], y[t])
        tau["ez"] += ez
        tau["er"] += er
        tau["ezz"] += ezz
    w = np.exp(LW[-1])
    s = {k: np.tensordot(w, v, 1) for k, v in tau.items()}
    one = lambda v: np.array([float(v)])  # noqa: E731
    return np.concatenate(
        [
            s["dz"].ravel(),
            s["dr"].ravel(),
            s["dzz"].ravel(),
            one(T - 1),
            s["ez"].ravel(),
            s["er"].ravel(),
            s["ezz"].ravel(),
            one(T),
            s["m"],
            s["mm"].ravel(),
            one(1),
        ]
    )


def dense_backward_ffbsm_stats(X, LW, params, y):
    """The same statistics from the backward FFBSm marginals ``v`` and pair weights ``W``
    of ``particle_oracles.dense_ffbsm`` (a different algorithm, same number)."""
    X = np.asarray(X, float)
    T, N, dx = X.shape
    log_v, W, _ = PO.dense_ffbsm(X, LW, params)
    v = np.exp(log_v)
    r = np.concatenate([X, np.ones((T, N, 1))], 2)
    dz = np.einsum("tij,tjd,tip->dp", W, X[1:], r[:-1])
    dr = np.einsum("ti,tip,tiq->pq", v[:-1], r[:-1], r[:-1])
    dzz = np.einsum("ti,tid,tie->de", v[1:], X[1:], X[1:])
    ez, er, ezz = 0.0, 0.0, 0.0
    for t in range(T):
        a, b, c = emission_terms_np(params, X[t], y[t])
        ez = ez + np.tensordot(v[t], a, 1)
        er = er + np.tensordot(v[t], b, 1)
        ezz = ezz + np.tensordot(v[t], c, 1)
    m = v[0] @ X[0]
    mm = np.einsum("i,id,ie->de", v[0], X[0], X[0])
    return np.concatenate(
        [
            dz.ravel(),
            dr.ravel(),
            dzz.ravel(),
            [T - 1.0],
            ez.ravel(),
            er.ravel(),
            ezz.ravel(),
            [float(T)],
            m,
            mm.ravel(),
            [1.0],
        ]
    )


# --------------------------------------------------------------------------------------
# jitted entry points (parameters as arguments: shared compilations)
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("n",))
def run_filter(key, params, y, *, n):
    ss, spec = bind(lds, params, y=y, state_dim=2)
    return particle_filter(key, ss, spec.y[0], spec.u[0], n, "systematic", 0.5)


@functools.partial(jax.jit, static_argnames=("kernel",))
def run_paris_stored(keys, params, y, filt, *, kernel):
    ss, spec = bind(lds, params, y=y, state_dim=2)
    return jax.vmap(lambda k: paris_on_particles(k, ss, filt, spec.y[0], spec.u[0], kernel))(keys)


@pytest.fixture(scope="module")
def stored_system():
    params, y = system_2d()
    filt = run_filter(jax.random.key(2), params, y, n=N_STD)
    assert bool(jnp.any(filt.resampled)) and not bool(jnp.all(filt.resampled))
    oracle = dense_forward_only(filt.particles, filt.log_weights, params, y)
    return params, y, filt, oracle


# --------------------------------------------------------------------------------------
# 1. given the particles, PaRIS averages to the forward-only / FFBSm statistics
# --------------------------------------------------------------------------------------


def test_dense_forward_only_oracle_equals_backward_ffbsm(stored_system):
    """The oracle itself: the forward-only recursion and the backward FFBSm two-slice
    weights give the same statistics on one particle system (an algebraic identity)."""
    params, y, filt, oracle = stored_system
    ref = dense_backward_ffbsm_stats(filt.particles, filt.log_weights, params, y)
    np.testing.assert_allclose(oracle, ref, rtol=1e-10, atol=1e-10)


def test_paris_average_over_reruns_equals_forward_only_ffbsm(stored_system):
    """Hybrid kernel (exact draws given the particles): E[PaRIS | particles] is the
    forward-only FFBSm value. z-test of the mean of R reruns with its computed standard
    error; the path-space estimator on the same particles is many standard errors away."""
    params, y, filt, oracle = stored_system
    R = 1000
    kernel = BackwardKernel("hybrid", 2)
    stats, info = run_paris_stored(
        jax.random.split(jax.random.key(0), R), params, y, filt, kernel=kernel
    )
    est = flat(stats)  # (R, n_stats)
    # both branches of the hybrid kernel ran: rejection acceptances and exact fallbacks
    assert int(np.sum(info.num_accepted)) > 0 and int(np.sum(info.num_fallback)) > 0
    mean, sd = est.mean(0), est.std(0, ddof=1)
    scale = np.maximum(np.abs(oracle), 1.0)
    fixed = sd < 1e-12 * scale  # counts, observed-y blocks: no Monte Carlo noise
    np.testing.assert_allclose(mean[fixed], oracle[fixed], rtol=1e-10, atol=1e-10)
    se = sd[~fixed] / np.sqrt(R)
    z = (mean[~fixed] - oracle[~fixed]) / se
    assert np.max(np.abs(z)) < 4.0, np.max(np.abs(z))
    assert np.mean(z**2) < 3.0, np.mean(z**2)
    # power: the genealogy-tracing estimator differs from FFBSm by many standard errors
    path = dense_forward_only(filt.particles, filt.log_weights, params, y, anc=filt.ancestors)
    z_path = (mean[~fixed] - path[~fixed]) / se
    assert np.max(np.abs(z_path)) > 20, np.max(np.abs(z_path))


# --------------------------------------------------------------------------------------
# 2. unconditionally, PaRIS agrees with the exact Kalman/RTS statistics
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("e_step",))
def run_paris_replicates(keys, params, y, *, e_step):
    ss, spec = bind(lds, params, y=y, state_dim=2)
    return jax.vmap(lambda k: e_step.posterior(k, ss, spec.y, spec.u))(keys)


@jax.jit
def _kalman_stats(params, y):
    ss, spec = bind(lds, params, y=y, state_dim=2)
    post = KalmanSmoother().posterior(None, ss, spec.y, spec.u)
    return gaussian_linear_statistics(post, ss, spec.y, spec.u)


def kalman_stats(params, y):
    return flat(_kalman_stats(params, y))


def _check_against_kalman(kernel, R, N, seed):
    params, y = system_2d()
    truth = kalman_stats(params, y)
    post = run_paris_replicates(
        jax.random.split(jax.random.key(seed), R), params, y, e_step=PARISSmoother(N, kernel=kernel)
    )
    assert isinstance(post, PARISPosterior)
    est = flat(post.stats)[:, 0]  # (R, n_stats), one sequence
    sd = est.std(0, ddof=1)
    fixed = sd < 1e-12 * np.maximum(np.abs(truth), 1.0)
    np.testing.assert_allclose(est.mean(0)[fixed], truth[fixed], rtol=1e-10, atol=1e-10)
    z = (est.mean(0)[~fixed] - truth[~fixed]) / (sd[~fixed] / np.sqrt(R))
    assert np.max(np.abs(z)) < 4.0, np.max(np.abs(z))
    assert np.mean(z**2) < 2.5, np.mean(z**2)
    # power: one replicate is visibly off; the average of R is much closer
    err_one = np.sqrt(np.mean((est[:, ~fixed] - truth[~fixed]) ** 2))
    err_avg = np.sqrt(np.mean((est.mean(0)[~fixed] - truth[~fixed]) ** 2))
    assert err_avg < 0.4 * err_one, (err_avg, err_one)
    # the log-marginal estimates average (in the ratio scale) to the exact likelihood
    ratio = np.exp(np.asarray(post.log_marginal)[:, 0] - O.dense_log_marginal(params, y))
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std(ddof=1) / np.sqrt(R)


def test_paris_mcmc_statistics_agree_with_kalman_rts():
    _check_against_kalman("mcmc", R=32, N=400, seed=0)


@pytest.mark.slow
def test_paris_hybrid_statistics_agree_with_kalman_rts():
    _check_against_kalman("hybrid", R=32, N=400, seed=1)


# --------------------------------------------------------------------------------------
# 3. variance versus T: linear for K = 2, degenerate for K = 1
# --------------------------------------------------------------------------------------


def running_estimates(key, ss, y, u, n, kernel):
    """The PaRIS estimate of ``sum_t E[x_t x_{t-1}]`` at every ``t`` (library steps)."""
    mask = ~jnp.isnan(y)
    k0, kr = jax.random.split(key)
    x1, lw1, lz1, _ = filter_init(k0, ss, y[0], u[0], mask[0], n)
    tau1 = initial_tau(ss, x1, u[0], y[0], mask[0])

    def step(c, inp):
        x, lw, lz, tau = c
        t, u_t, y_t, m_t = inp
        k1, k2, k3 = jax.random.split(jax.random.fold_in(kr, t), 3)
        xn, lwn, anc, dl, _, _ = filter_step(
            ss, "systematic", 0.5, k1, k2, x, lw, ~jnp.isfinite(lz), u_t, y_t, m_t
        )
        tau, _ = paris_update(kernel, k3, ss, x, lw, tau, xn, anc, u_t, y_t, m_t)
        return (xn, lwn, lz + dl, tau), weighted_sum(tau, lwn).dynamics.S_zr[0, 0]

    xs = (jnp.arange(1, y.shape[0]), u[1:], y[1:], mask[1:])
    return jax.lax.scan(step, (x1, lw1, lz1, tau1), xs)[1]


def _variance_growth(T, N, R, checkpoints, kernel_name):
    params = dict(
        A=np.array([[0.9]]),
        C=np.array([[1.0]]),
        Q=np.array([[0.5]]),
        R=np.array([[0.5]]),
        m0=np.array([0.0]),
        P0=np.array([[1.0]]),
    )
    _, y = O.sample_lds(np.random.default_rng(0), params, T)

    @jax.jit
    def run(keys, params, y):
        ss, spec = bind(lds, params, y=y, state_dim=1, bias=False)
        one = lambda k, K: running_estimates(  # noqa: E731
            k, ss, spec.y[0], spec.u[0], N, BackwardKernel(kernel_name, K)
        )
        return {K: jax.vmap(functools.partial(one, K=K))(keys) for K in (1, 2)}

    out = run(jax.random.split(jax.random.key(0), R), params, y)
    idx = np.asarray(checkpoints) - 2  # estimate after t steps sits at index t - 2
    return {K: np.asarray(v)[:, idx].var(0, ddof=1) for K, v in out.items()}


@pytest.mark.slow
def test_paris_variance_grows_linearly_for_k2_and_degenerates_for_k1():
    """Var(S_T) over independent runs (N = 50): for K = 2 it grows no faster than T
    (ratio of variances <= 1.5 x ratio of lengths), for K = 1 it is several times larger
    at the longest T and the gap widens with T. Measured (hybrid/mcmc, R = 200, T = 400):
    Var/T ~ 0.75 for K = 2 and ~ 4 for K = 1 (the single-path regime)."""
    cps = [25, 200]
    var = _variance_growth(T=200, N=50, R=160, checkpoints=cps, kernel_name="mcmc")
    growth_k2 = var[2][1] / var[2][0]
    assert growth_k2 < 1.5 * cps[1] / cps[0], (growth_k2, var)
    ratio = var[1] / var[2]
    assert ratio[1] > 3.0, (ratio, var)
    assert ratio[1] > 1.5 * ratio[0], ratio  # K = 1 gets relatively worse with T


@pytest.mark.slow
def test_paris_variance_versus_t_large():
    cps = [50, 100, 200, 400]
    for name in ("hybrid", "mcmc"):
        var = _variance_growth(T=400, N=50, R=400, checkpoints=cps, kernel_name=name)
        per_t = var[2] / np.asarray(cps)
        assert per_t.max() / per_t.min() < 2.5, (name, per_t)  # linear in T
        ratio = var[1] / var[2]
        assert ratio[-1] > 3.5 and ratio[-1] > 1.5 * ratio[0], (name, ratio)


# --------------------------------------------------------------------------------------
# 4. EM with the PaRIS E-step reaches the exact EM likelihood
# --------------------------------------------------------------------------------------


@pytest.mark.slow  # two EM compilations (~40 s on the shared 2-core machine)
def test_paris_em_reaches_exact_em_likelihood():
    truth = O.scalar_lds_params()
    _, y = O.sample_lds(np.random.default_rng(8), truth, 100)
    start = dict(truth)
    start.update(
        A=np.array([[0.3]]),
        C=np.array([[0.6]]),
        Q=np.array([[1.5]]),
        R=np.array([[1.2]]),
        b=np.array([0.5]),
        d=np.array([0.4]),
        m0=np.array([0.0]),
        P0=np.array([[2.0]]),
    )
    kw = dict(y=y, state_dim=1, init_params=start, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        exact = EM(lds, KalmanSmoother()).run(jax.random.key(0), 30, **kw)
        part = EM(lds, PARISSmoother(500)).run(jax.random.key(0), 30, **kw)
    ll = lambda p: float(KalmanSmoother().smooth(p, lds, y=y, state_dim=1).log_marginal)  # noqa: E731
    ll_start, ll_exact, ll_part = ll(start), ll(exact.params), ll(part.params)
    assert ll_exact - ll_start > 20  # EM made real progress
    # Monte Carlo tolerance: at N = 500, T = 100 the M-step statistics have relative
    # error ~ 1/sqrt(N T) ~ 0.5%; the log-likelihood is flat at its maximum, so a
    # parameter error of that size costs far less than 1 nat
    assert abs(ll_part - ll_exact) < 1.0, (ll_start, ll_exact, ll_part)
    assert abs(part.log_marginals[-1] - ll_part) < 3.0


# --------------------------------------------------------------------------------------
# 5. plumbing: fused pass = stored pass, the M-step dispatch, edge cases, bad arguments
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fused_pass_equals_filter_then_stored_paris():
    """With ``k_f, k_b = split(key)`` the one-scan pass (``PARISSmoother.posterior``)
    reproduces particle_filter(k_f) followed by paris_on_particles(k_b): the same
    particles and backward draws (equal up to floating-point summation order)."""
    params, y = system_2d()
    kernel = BackwardKernel("hybrid", 2)
    keys = jax.random.split(jax.random.key(11), 4)
    post = run_paris_replicates(keys, params, y, e_step=PARISSmoother(N_STD, kernel="hybrid"))
    for r in range(2):
        key = jax.random.split(keys[r], 1)[0]  # the posterior's key of sequence 0
        k_f, k_b = jax.random.split(key)
        filt = run_filter(k_f, params, y, n=N_STD)
        back = jnp.concatenate([k_b[None], jax.random.split(k_b, 999)])  # test 1's shape
        stored, _ = run_paris_stored(back, params, y, filt, kernel=kernel)
        np.testing.assert_allclose(flat(post.stats)[r, 0], flat(stored)[0], rtol=1e-12, atol=1e-12)
        assert float(post.log_marginal[r, 0]) == float(filt.log_marginal)
        np.testing.assert_array_equal(np.asarray(post.ess[r, 0]), np.asarray(filt.ess))


def test_m_step_passes_paris_statistics_through():
    params, y = system_2d()
    ss, spec = bind(lds, params, y=y, state_dim=2)
    keys = jax.random.split(jax.random.key(3), 32)  # shares test 2's compilation
    post = run_paris_replicates(keys, params, y, e_step=PARISSmoother(400, kernel="mcmc"))
    post = jax.tree_util.tree_map(lambda a: a[0], post)  # one replicate, S = 1
    got = LinearGaussianMStep().statistics(post, ss, spec.y, spec.u)
    np.testing.assert_array_equal(flat(got), flat(post.stats)[0])


def test_k1_and_one_step_runs():
    params, y = system_2d()
    kw = dict(y=y[:1], state_dim=2, rng_key=jax.random.key(0))
    post = PARISSmoother(16, num_backward=1).smooth(params, lds, **kw)
    s = flat(post.stats)
    assert np.all(np.isfinite(s))
    assert float(post.stats.dynamics.n) == 0.0
    # a sum of normalised weights: 1 up to rounding (1 + 2.2e-16 under JAX 0.10.2)
    np.testing.assert_allclose(float(post.stats.emission.n), 1.0, rtol=1e-13)
    assert np.all(np.asarray(post.stats.dynamics.S_rr) == 0.0)  # T = 1: no transition


def test_model_without_linear_structure_raises():
    import numpyro
    import numpyro.distributions as dist

    import ppl_dyn

    def sv(y=None, *, num_steps=None):
        phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
        ppl_dyn.markov(
            init=dist.Normal(0.0, 1.0).expand([1]).to_event(1),
            transition=lambda x, u: dist.Normal(phi * x, 0.3).to_event(1),
            emission=lambda x, u: dist.Normal(0.0, jnp.exp(0.5 * x)).to_event(1),
            y=y,
            num_steps=num_steps,
            obs_dim=1,
        )

    y = np.random.default_rng(0).normal(size=(10, 1))
    with pytest.raises(ValueError, match="LinearStructure"):
        PARISSmoother(8).smooth({"phi": 0.5}, sv, y=y, rng_key=jax.random.key(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel="exact"), "kernel"),
        (dict(num_backward=0), "num_backward"),
        (dict(num_particles=0), "num_particles"),
        (dict(num_mcmc_steps=0), "num_mcmc_steps"),
        (dict(max_trials=-1), "max_trials"),
        (dict(resampling="foo"), "resampling"),
        (dict(ess_threshold=1.5), "ess_threshold"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    params, y = system_2d()
    with pytest.raises(ValueError, match=match):
        PARISSmoother(**kwargs).smooth(params, lds, y=y, state_dim=2, rng_key=jax.random.key(0))


def test_missing_rng_key_raises():
    params, y = system_2d()
    with pytest.raises(ValueError, match="rng_key"):
        PARISSmoother(8).smooth(params, lds, y=y, state_dim=2)


@pytest.mark.slow
def test_tanh_rnn_statistics_are_finite():
    """Nonlinear features (tanh) flow through the same recursion."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=(15, 1))
    params = dict(
        A=0.5 * np.eye(2),
        b=np.zeros(2),
        C=np.array([[1.0, -0.5]]),
        d=np.zeros(1),
        Q=0.2 * np.eye(2),
        R=np.array([[0.3]]),
        m0=np.zeros(2),
        P0=np.eye(2),
    )
    post = PARISSmoother(32).smooth(
        params, tanh_rnn, y=y, state_dim=2, obs_dim=1, rng_key=jax.random.key(0)
    )
    s = flat(post.stats)
    assert np.all(np.isfinite(s))
    # the dynamics regressor is [tanh(x); 1]: |E tanh| <= 1 on the S_zr "1" column rows
    S_rr = np.asarray(post.stats.dynamics.S_rr)
    assert np.all(np.abs(S_rr[:2, 2]) <= 14.0 + 1e-9) and np.isclose(S_rr[2, 2], 14.0)
