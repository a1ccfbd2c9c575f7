"""Particle filter / smoothers (``ppl_dyn.infer.particle``) against independent oracles.

Oracles: the dense joint-Gaussian LDS posterior and likelihood (tests/oracles.py), a
dense numpy FFBSm written from the seed's two-slice formulas (tests/particle_oracles.py),
the particle EM Q-function written directly from particles and weights, and negative
controls (ancestor tracing, the seed's literal eq 23) showing that the checks can fail.
Statistical checks use fixed seeds; the long versions are marked ``slow``.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import oracles as O
import particle_oracles as PO
import pytest

from ppl_dyn.infer import EM, KalmanSmoother, LinearGaussianMStep, ParticleSmoother
from ppl_dyn.infer.particle import ffbsi, ffbsm, particle_filter
from ppl_dyn.models import lds, tanh_rnn
from ppl_dyn.state_space import bind

SCHEMES = ["systematic", "stratified", "multinomial"]


def lds_1d(T, seed=0, A=0.9, Q=0.5, R=0.5):
    """A scalar LDS and one simulated sequence."""
    params = dict(
        A=np.array([[A]]),
        C=np.array([[1.0]]),
        Q=np.array([[Q]]),
        R=np.array([[R]]),
        m0=np.array([0.3]),
        P0=np.array([[1.0]]),
        b=np.array([0.1]),
        d=np.array([-0.2]),
    )
    _, y = O.sample_lds(np.random.default_rng(seed), params, T)
    return params, y


def lds_2d(T, seed=1):
    params, y, _ = O.random_system(np.random.default_rng(seed), 2, 1, 0.9, T)
    return params, y


def bound(params, y, model=lds, dx=None):
    dx = np.shape(params["A"])[0] if dx is None else dx
    return bind(model, params, y=y, state_dim=dx)


def identity(x):
    return x


# Jitted entry points with the parameters as *arguments*, so that tests sharing shapes
# share one compilation (ParticleSmoother.smooth compiles afresh on every call).


@functools.partial(jax.jit, static_argnames=("dx", "n", "scheme"))
def run_filter(key, params, y, thr, *, dx, n, scheme="systematic"):
    ss, spec = bind(lds, params, y=y, state_dim=dx)
    return particle_filter(key, ss, spec.y[0], spec.u[0], n, scheme, thr)


@functools.partial(jax.jit, static_argnames=("dx", "chunk"))
def run_ffbsm(params, y, filt, *, dx, chunk=None):
    ss, spec = bind(lds, params, y=y, state_dim=dx)
    return ffbsm(ss, filt, spec.u[0], identity, chunk)


@functools.partial(jax.jit, static_argnames=("dx", "m"))
def run_ffbsi(key, params, y, filt, *, dx, m):
    ss, spec = bind(lds, params, y=y, state_dim=dx)
    return ffbsi(key, ss, filt, spec.u[0], m)


# --------------------------------------------------------------------------------------
# 1. the likelihood estimate is unbiased
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _unbiased_setup(T):
    params, y = lds_1d(T, seed=3)
    ss, spec = bound(params, y)
    log_z = O.dense_log_marginal(params, y)

    @functools.partial(jax.jit, static_argnums=(2, 3))
    def log_z_hat(keys, thr, scheme, n):
        run = lambda k: particle_filter(k, ss, spec.y[0], spec.u[0], n, scheme, thr)
        return jax.vmap(lambda k: run(k).log_marginal)(keys)

    return log_z, log_z_hat


def _check_unbiased(scheme, thr, T, N, R, seed):
    log_z, log_z_hat = _unbiased_setup(T)
    keys = jax.random.split(jax.random.key(seed), R)
    ratio = np.exp(np.asarray(log_z_hat(keys, thr, scheme, N)) - log_z)
    assert np.all(np.isfinite(ratio))
    mean, se = ratio.mean(), ratio.std(ddof=1) / np.sqrt(R)
    assert abs(mean - 1.0) <= 3 * se, (scheme, thr, mean, se)
    return mean, se


@pytest.mark.parametrize("thr", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_likelihood_estimate_is_unbiased(scheme, thr):
    _check_unbiased(scheme, thr, T=20, N=64, R=400, seed=11)


@pytest.mark.slow
@pytest.mark.parametrize("thr", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_likelihood_estimate_is_unbiased_large(scheme, thr):
    _, se = _check_unbiased(scheme, thr, T=50, N=64, R=4000, seed=12)
    assert se < 0.1  # the check has power: a 30% bias would be detected


@pytest.mark.parametrize("block_numbers", [256, 2**16])
def test_block_drawn_noise_keeps_the_estimate_unbiased(monkeypatch, block_numbers):
    """The Gaussian noise is drawn per block of steps: 256 numbers -> blocks of 4 steps
    (4 full blocks and a tail of 3 of the 19 steps); 2**16 -> one tail block."""
    from ppl_dyn.infer import particle as P

    monkeypatch.setattr(P, "NOISE_BLOCK_NUMBERS", block_numbers)
    params, y = lds_1d(20, seed=3)
    ss, spec = bound(params, y)
    log_z = O.dense_log_marginal(params, y)
    run = jax.jit(jax.vmap(lambda k: particle_filter(k, ss, spec.y[0], spec.u[0], 64).log_marginal))
    ratio = np.exp(np.asarray(run(jax.random.split(jax.random.key(21), 400))) - log_z)
    mean, se = ratio.mean(), ratio.std(ddof=1) / np.sqrt(len(ratio))
    assert abs(mean - 1.0) <= 3 * se, (mean, se)


def test_block_drawn_noise_is_fresh_every_step(monkeypatch):
    """Without resampling the particles are prior simulations, so the increments
    x_t - A x_{t-1} are the noise itself: mean 0, variance Q and no correlation between
    steps (within a block, across a block boundary and into the tail). A noise row
    used twice would give a correlation of 1."""
    from ppl_dyn.infer import particle as P

    monkeypatch.setattr(P, "NOISE_BLOCK_NUMBERS", 4 * 2000)  # blocks of 4 steps
    params, y = lds_1d(20, seed=3)
    ss, spec = bound(params, y)
    filt = jax.jit(lambda k: particle_filter(k, ss, spec.y[0], spec.u[0], 2000, ess_threshold=0.0))(
        jax.random.key(5)
    )
    assert not np.any(np.asarray(filt.resampled))
    X = np.asarray(filt.particles)[..., 0]  # (T, N)
    a, b = float(params["A"][0, 0]), float(params["b"][0])
    inc = X[1:] - a * X[:-1] - b  # (T-1, N)
    q = float(np.asarray(params["Q"])[0, 0])
    n = inc.shape[1]
    assert np.max(np.abs(inc.mean(1))) < 4.5 * np.sqrt(q / n)
    assert np.max(np.abs(inc.var(1) / q - 1)) < 4.5 * np.sqrt(2 / n)
    corr = np.array([np.corrcoef(inc[t], inc[t + 1])[0, 1] for t in range(len(inc) - 1)])
    assert np.max(np.abs(corr)) < 4.5 / np.sqrt(n), corr


def test_log_marginal_bias_is_negative_and_shrinks_with_n():
    """Jensen: E[log Z_hat] < log Z, with the gap shrinking roughly like 1/N."""
    log_z, log_z_hat = _unbiased_setup(20)
    keys = jax.random.split(jax.random.key(5), 400)  # N = 64 shares test 1's compilation
    gaps = [float(np.mean(log_z_hat(keys, 0.5, "systematic", n)) - log_z) for n in (8, 64)]
    assert gaps[0] < gaps[1] < 0 and abs(gaps[1]) < abs(gaps[0]) / 3, gaps


# --------------------------------------------------------------------------------------
# 2. FFBSm two-slice identities (dense numpy recomputation)
# --------------------------------------------------------------------------------------


N_STD, T_STD = 50, 20  # the shapes most tests share (one compilation each)


@pytest.mark.parametrize("dx", [1, 2])
def test_ffbsm_matches_dense_two_slice_formulas(dx):
    params, y = lds_1d(T_STD) if dx == 1 else lds_2d(T_STD)
    filt = run_filter(jax.random.key(2), params, y, 0.5, dx=dx, n=N_STD)
    assert bool(jnp.any(filt.resampled)) and not bool(jnp.all(filt.resampled))
    log_v, pair = run_ffbsm(params, y, filt, dx=dx)
    ref_log_v, W, ref_pair = PO.dense_ffbsm(filt.particles, filt.log_weights, params)
    np.testing.assert_allclose(np.asarray(log_v), ref_log_v, atol=1e-10, rtol=0)
    np.testing.assert_allclose(np.asarray(pair), ref_pair, atol=1e-10, rtol=0)
    # two-slice marginalisation identities of the oracle itself
    np.testing.assert_allclose(W.sum(2), np.exp(ref_log_v[:-1]), atol=1e-12)
    np.testing.assert_allclose(W.sum(1), np.exp(ref_log_v[1:]), atol=1e-12)
    np.testing.assert_allclose(np.exp(ref_log_v).sum(1), 1.0, atol=1e-12)
    # the smoothed weights really differ from the filter weights (the check has teeth)
    assert np.max(np.abs(np.exp(ref_log_v[:-1]) - np.exp(np.asarray(filt.log_weights[:-1])))) > 0.01


@pytest.mark.parametrize("chunk", [7, 1, 64])
def test_chunking_does_not_change_ffbsm(chunk):
    params, y = lds_2d(T_STD)
    filt = run_filter(jax.random.key(4), params, y, 0.5, dx=2, n=N_STD, scheme="stratified")
    ref = run_ffbsm(params, y, filt, dx=2, chunk=None)
    got = run_ffbsm(params, y, filt, dx=2, chunk=chunk)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-13, rtol=1e-13)


def test_public_smoother_equals_dense_oracle_and_ignores_chunk_size():
    """ParticleSmoother.smooth (chunk_size=7, N=50) against the dense FFBSm oracle on its
    own filter output and against the unchunked ffbsm."""
    params, y = lds_2d(T_STD)
    kw = dict(y=y, state_dim=2, rng_key=jax.random.key(1))
    p7 = ParticleSmoother(N_STD, chunk_size=7).smooth(params, lds, **kw)
    assert p7.trajectories is None and p7.particles.shape == (T_STD, N_STD, 2)
    lv, _, pr = PO.dense_ffbsm(p7.particles, p7.filter_log_weights, params)
    np.testing.assert_allclose(np.asarray(p7.smoothed_log_weights), lv, atol=1e-10)
    np.testing.assert_allclose(np.asarray(p7.pair_moments), pr, atol=1e-10)
    filt = run_filter(jax.random.key(0), params, y, 0.5, dx=2, n=N_STD)._replace(
        particles=p7.particles, log_weights=p7.filter_log_weights
    )
    ref_v, ref_pair = run_ffbsm(params, y, filt, dx=2, chunk=None)
    np.testing.assert_allclose(np.asarray(p7.smoothed_log_weights), np.asarray(ref_v), atol=1e-13)
    np.testing.assert_allclose(np.asarray(p7.pair_moments), np.asarray(ref_pair), atol=1e-13)
    # means / covs properties are the v-weighted moments
    v = np.exp(lv)
    m = np.einsum("tn,tnd->td", v, np.asarray(p7.particles))
    np.testing.assert_allclose(np.asarray(p7.means), m, atol=1e-10)


# --------------------------------------------------------------------------------------
# 3. convergence to the RTS smoother
# --------------------------------------------------------------------------------------


def _kalman_targets(params, y):
    ref = O.dense_posterior(params, y)
    m, P, X = ref["means"], ref["covs"], ref["cross"]
    pair = X + m[1:, :, None] * m[:-1, None, :]  # E[x_{t+1} x_t^T]
    return np.concatenate([m.ravel(), P.ravel(), pair.ravel()])


@functools.lru_cache(maxsize=None)
def _replicate_runner(T):
    params, y = lds_1d(T, seed=7)
    ss, spec = bound(params, y)

    @functools.partial(jax.jit, static_argnums=1)
    def run(keys, n):
        def one(k):
            post = ParticleSmoother(n, chunk_size=256).posterior(k, ss, spec.y, spec.u)
            post = jax.tree_util.tree_map(lambda a: a[0], post)
            return jnp.concatenate(
                [post.means.ravel(), post.covs.ravel(), post.pair_moments.ravel()]
            )

        return jax.lax.map(one, keys)

    return _kalman_targets(params, y), run


def test_smoother_agrees_with_rts_within_monte_carlo_error():
    truth, run = _replicate_runner(20)
    R = 32
    est = np.asarray(run(jax.random.split(jax.random.key(0), R), 1000))
    se = est.std(0, ddof=1) / np.sqrt(R)
    z = (est.mean(0) - truth) / se
    assert np.max(np.abs(z)) < 4.0, np.max(np.abs(z))
    assert np.mean(z**2) < 2.0, np.mean(z**2)
    # power: one replicate is visibly off at N = 1000, the average is much closer
    assert np.sqrt(np.mean((est.mean(0) - truth) ** 2)) < 0.3 * np.sqrt(np.mean((est - truth) ** 2))


@pytest.mark.slow
def test_smoother_error_decreases_like_root_n():
    truth, run = _replicate_runner(20)
    T = 20
    Ns = [100, 400, 1600]
    blocks = {"means": slice(0, T), "vars": slice(T, 2 * T), "pairs": slice(2 * T, None)}
    rms = {k: [] for k in blocks}
    for n in Ns:
        est = np.asarray(run(jax.random.split(jax.random.key(n), 12), n))
        for k, s in blocks.items():
            rms[k].append(np.sqrt(np.mean((est[:, s] - truth[s]) ** 2)))
    for k, errs in rms.items():
        slope = np.polyfit(np.log(Ns), np.log(errs), 1)[0]
        assert -0.75 <= slope <= -0.3, (k, slope, errs)


# --------------------------------------------------------------------------------------
# 4. FFBSi: unbiased for FFBSm given the particles; not genealogy tracing
# --------------------------------------------------------------------------------------


def test_ffbsi_averages_equal_ffbsm_given_the_particles():
    params, y = lds_2d(T_STD, seed=5)
    filt = run_filter(jax.random.key(3), params, y, 0.5, dx=2, n=N_STD)
    log_v, pair = run_ffbsm(params, y, filt, dx=2)
    M = 20000
    traj = np.asarray(run_ffbsi(jax.random.key(8), params, y, filt, dx=2, m=M))  # (M, T, dx)
    X = np.asarray(filt.particles)
    # every trajectory point is one of the filter particles at that time
    for t in (0, 10, T_STD - 1):
        d = np.abs(traj[:, t, None, :] - X[t][None]).sum(-1).min(1)
        assert np.all(d == 0)
    v = np.exp(np.asarray(log_v))
    m_ffbsm = np.einsum("tn,tnd->td", v, X)
    z_m = (traj.mean(0) - m_ffbsm) / (traj.std(0, ddof=1) / np.sqrt(M))
    prods = traj[:, 1:, :, None] * traj[:, :-1, None, :]  # (M, T-1, dx, dx)
    z_p = (prods.mean(0) - np.asarray(pair)) / (prods.std(0, ddof=1) / np.sqrt(M))
    assert np.max(np.abs(z_m)) < 4.5, np.max(np.abs(z_m))
    assert np.max(np.abs(z_p)) < 4.5, np.max(np.abs(z_p))
    # entries are strongly correlated over t, so the mean square is loosely bounded
    assert np.mean(z_m**2) < 3.0 and np.mean(z_p**2) < 3.0
    # power: the filter (not smoothed) means differ from FFBSm by many standard errors
    m_filt = np.einsum("tn,tnd->td", np.exp(np.asarray(filt.log_weights)), X)
    z_f = (traj.mean(0) - m_filt) / (traj.std(0, ddof=1) / np.sqrt(M))
    assert np.max(np.abs(z_f[:-1])) > 20


def test_ffbsi_is_not_genealogy_tracing():
    """At t = 0 of a long AR(1) (T = 200, N = 500, resampling at every step), FFBSi keeps
    the smoothed spread; tracing the ancestors of the final particles collapses to a few
    lines (negative control: the same variance-ratio check fails for it). Ratios are
    averaged over independent filter runs, since a single collapsed genealogy gives a
    very noisy variance."""
    params, y = lds_1d(200, seed=2, A=0.9, Q=0.19, R=0.1)
    ss, spec = bound(params, y)
    N, reps, M = 500, 8, 250
    var_kalman = O.dense_posterior(params, y)["covs"][0, 0, 0]

    @jax.jit
    def run(keys):
        def one(k):
            return particle_filter(k, ss, spec.y[0], spec.u[0], N, "systematic", 1.0)

        filts = jax.vmap(one)(keys)
        first = jax.tree_util.tree_map(lambda a: a[:4], filts)
        traj = jax.vmap(lambda k, f: ffbsi(k, ss, f, spec.u[0], M))(keys[:4], first)
        return filts, traj

    filts, traj = run(jax.random.split(jax.random.key(6), reps))
    ratio_ffbsi = np.mean(np.var(np.asarray(traj)[:, :, 0, 0], axis=1)) / var_kalman
    ratio_gen, distinct = [], []
    for r in range(reps):
        idx = PO.genealogy_indices(filts.ancestors[r])
        x0 = np.asarray(filts.particles[r])[0, idx[0], 0]
        w = np.exp(np.asarray(filts.log_weights[r, -1]))
        ratio_gen.append(np.sum(w * (x0 - np.sum(w * x0)) ** 2) / var_kalman)
        distinct.append(len(np.unique(idx[0])))
    assert 0.8 <= ratio_ffbsi <= 1.25, ratio_ffbsi
    assert np.mean(ratio_gen) < 0.5, ratio_gen
    assert max(distinct) < 0.05 * N, distinct


# --------------------------------------------------------------------------------------
# 5. log-domain robustness and missing data
# --------------------------------------------------------------------------------------


def _no_nan(post):
    for name in ("filter_log_weights", "smoothed_log_weights", "pair_moments", "ess"):
        a = np.asarray(getattr(post, name))
        assert not np.any(np.isnan(a)), name


@pytest.mark.parametrize(
    "scheme", ["systematic"] + [pytest.param(s, marks=pytest.mark.slow) for s in SCHEMES[1:]]
)
def test_float32_hundred_sigma_outlier_stays_finite(scheme):
    params, y = lds_1d(T_STD)
    ref = O.dense_posterior(params, y)
    y = y.copy()
    sd = np.sqrt(ref["Cyy"][7, 0, 0] + params["R"][0, 0])
    y[7] += 100 * sd  # a 100-sigma outlier: log-weight increments of order -5000
    with jax.enable_x64(False):
        post = ParticleSmoother(64, scheme).smooth(
            params, lds, y=y.astype(np.float32), state_dim=1, rng_key=jax.random.key(1)
        )
        assert post.particles.dtype == jnp.float32
        assert np.isfinite(float(post.log_marginal))
        assert float(post.log_marginal) < -1000
        _no_nan(post)
        assert np.all(np.isfinite(np.asarray(post.means)))
        assert np.isfinite(np.asarray(post.filter_log_weights[7])).any()


def test_float32_inputs_give_float32_posterior():
    """KalmanSmoother keeps float32 for float32 params/data (test_kalman); the particle
    smoother promotes everything to float64 under x64 (numpyro samples the particles in
    the default float dtype). Demonstrates the inconsistency."""
    params, y = lds_1d(10)
    p32 = {k: np.asarray(v, np.float32) for k, v in params.items()}
    post = ParticleSmoother(16).smooth(
        p32, lds, y=y.astype(np.float32), state_dim=1, rng_key=jax.random.key(0)
    )
    dtypes = {f: getattr(post, f).dtype for f in post._fields if getattr(post, f) is not None}
    assert all(d == jnp.float32 for d in dtypes.values()), dtypes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_impossible_observation_mid_sequence_gives_minus_inf(scheme):
    params, y = lds_1d(T_STD)
    y = y.copy()
    y[5] = 1e200  # squared residual overflows: every log-weight is -inf
    for thr in (0.5, 1.0):  # ESS-triggered and forced resampling
        f = run_filter(jax.random.key(3), params, y, thr, dx=1, n=N_STD, scheme=scheme)
        assert float(f.log_marginal) == -np.inf
        lw = np.asarray(f.log_weights)
        assert not np.any(np.isnan(lw)) and not np.any(np.isnan(np.asarray(f.ess)))
        assert np.all(lw[5:] == -np.inf) and np.all(np.isfinite(lw[:5]))
        log_v, pair = run_ffbsm(params, y, f, dx=1)
        assert not np.any(np.isnan(np.asarray(log_v))) and not np.any(np.isnan(np.asarray(pair)))


def test_impossible_observation_at_first_step_gives_minus_inf():
    """BUG: at t = 0 the filter normalises all -inf log-weights without a guard
    (``_normalise(lw1)`` gives -inf - (-inf) = NaN), so log_marginal and every weight
    are NaN instead of -inf (all three resampling schemes)."""
    params, y = lds_1d(T_STD)
    y = y.copy()
    y[0] = 1e200
    bad = {}
    for scheme in SCHEMES:
        f = run_filter(jax.random.key(3), params, y, 0.5, dx=1, n=N_STD, scheme=scheme)
        lw = np.asarray(f.log_weights)
        if not (float(f.log_marginal) == -np.inf and not np.isnan(lw).any()):
            bad[scheme] = (float(f.log_marginal), int(np.isnan(lw).sum()))
    assert not bad, f"(log_marginal, number of NaN log-weights) per scheme: {bad}"


def test_all_missing_gives_zero_log_marginal_and_prior_means():
    params, y = lds_1d(20)
    y = np.full_like(y, np.nan)
    N = 2000
    post = ParticleSmoother(N).smooth(params, lds, y=y, state_dim=1, rng_key=jax.random.key(4))
    assert float(post.log_marginal) == 0.0
    _no_nan(post)
    np.testing.assert_allclose(np.asarray(post.filter_log_weights), -np.log(N), atol=1e-12)
    m, P, _ = O.prior_moments(params, 20)
    v = np.exp(np.asarray(post.smoothed_log_weights))
    ess = 1.0 / np.sum(v**2, 1)
    z = (np.asarray(post.means)[:, 0] - m[:, 0]) / np.sqrt(P[:, 0, 0] / ess)
    assert np.max(np.abs(z)) < 4.5, z
    np.testing.assert_allclose(np.asarray(post.covs)[:, 0, 0], P[:, 0, 0], rtol=0.2)


def test_missing_step_contributes_zero_increment():
    """A NaN step adds nothing to log Z: same particles, same weights as a run where
    that step's emission is dropped (checked against a fully-missing-step oracle)."""
    params, y = lds_1d(T_STD)
    y = y.copy()
    y[4] = np.nan
    f = run_filter(jax.random.key(5), params, y, 0.0, dx=1, n=N_STD)
    assert float(f.log_marginal) > -np.inf
    # never resampling: the weights after the missing step equal the weights before it
    np.testing.assert_allclose(
        np.asarray(f.log_weights[4]), np.asarray(f.log_weights[3]), atol=1e-12
    )


# --------------------------------------------------------------------------------------
# 6. the tanh-RNN M-step maximises the particle Q-function
# --------------------------------------------------------------------------------------

TANH_TRUTH = dict(
    A=np.array([[1.2, -0.4], [0.5, 0.9]]),
    b=np.array([0.1, -0.2]),
    C=np.array([[1.0, -0.7]]),
    d=np.array([0.3]),
    Q=np.array([[0.1, 0.02], [0.02, 0.08]]),
    R=np.array([[0.05]]),
    m0=np.array([0.2, -0.1]),
    P0=np.eye(2),
)


def _simulate_tanh(params, T, seed):
    rng = np.random.default_rng(seed)
    x = np.zeros((T, 2))
    x[0] = rng.multivariate_normal(params["m0"], params["P0"])
    for t in range(1, T):
        x[t] = (
            params["A"] @ np.tanh(x[t - 1])
            + params["b"]
            + rng.multivariate_normal(np.zeros(2), params["Q"])
        )
    y = (
        np.tanh(x) @ params["C"].T
        + params["d"]
        + rng.multivariate_normal(np.zeros(1), params["R"], size=T)
    )
    return y


def _logN(r, S):
    """log N(r; 0, S) for r (..., d) (jnp, differentiable in S)."""
    d = S.shape[-1]
    _, logdet = jnp.linalg.slogdet(S)
    quad = jnp.einsum("...i,ij,...j->...", r, jnp.linalg.inv(S), r)
    return -0.5 * (quad + logdet + d * np.log(2 * np.pi))


def particle_q(theta, X, v, W, y):
    """Sum_i v_1^i log N(x_1^i; m0, P0) + sum_t sum_ij W_t^ij log N(x_{t+1}^j; A tanh x_t^i
    + b, Q) + sum_t sum_i v_t^i log N(y_t; C tanh x_t^i + d, R)."""
    init = jnp.sum(v[0] * _logN(X[0] - theta["m0"], theta["P0"]))
    mu = jnp.tanh(X[:-1]) @ theta["A"].T + theta["b"]  # (T-1, N_i, dx)
    r = X[1:, None, :, :] - mu[:, :, None, :]  # (T-1, i, j, dx)
    trans = jnp.sum(W * _logN(r, theta["Q"]))
    ry = y[:, None, :] - (jnp.tanh(X) @ theta["C"].T + theta["d"])
    emis = jnp.sum(v * _logN(ry, theta["R"]))
    return init + trans + emis


@pytest.fixture(scope="module")
def tanh_mstep():
    return tanh_mstep_setup()


def tanh_mstep_setup():
    y = _simulate_tanh(TANH_TRUTH, 60, seed=0)
    old = dict(TANH_TRUTH)
    old.update(
        A=0.7 * TANH_TRUTH["A"],
        b=TANH_TRUTH["b"] + 0.2,
        C=0.8 * TANH_TRUTH["C"],
        d=TANH_TRUTH["d"] - 0.1,
        Q=1.5 * TANH_TRUTH["Q"],
        R=2.0 * TANH_TRUTH["R"],
        m0=TANH_TRUTH["m0"] + 0.3,
        P0=0.7 * TANH_TRUTH["P0"],
    )
    ss, spec = bind(tanh_rnn, old, y=y, state_dim=2, obs_dim=1)
    post = jax.jit(
        lambda k: ParticleSmoother(200, chunk_size=None).posterior(k, ss, spec.y, spec.u)
    )(jax.random.key(0))
    ms = LinearGaussianMStep()
    stats = ms.statistics(post, ss, spec.y, spec.u)
    new, floors = ms.update(stats, ss, frozenset(old))
    X = np.asarray(post.particles[0])
    LW = np.asarray(post.filter_log_weights[0])
    log_v, W, _ = PO.dense_ffbsm(X, LW, old, feature=np.tanh)
    return dict(
        y=y,
        old=old,
        new={k: np.asarray(v) for k, v in new.items()},
        floors=floors,
        X=X,
        LW=LW,
        log_v=log_v,
        W=W,
        post=post,
    )


def test_tanh_mstep_zeroes_the_gradient_of_the_particle_q_function(tanh_mstep):
    s = tanh_mstep
    assert not any(int(f) for f in s["floors"].values())
    # the library's smoothed weights are the ones the dense oracle recomputes
    np.testing.assert_allclose(
        np.asarray(s["post"].smoothed_log_weights[0]), s["log_v"], atol=1e-10
    )
    args = (
        jnp.asarray(s["X"]),
        jnp.asarray(np.exp(s["log_v"])),
        jnp.asarray(s["W"]),
        jnp.asarray(s["y"]),
    )
    q = jax.jit(particle_q)
    grad = jax.jit(jax.grad(particle_q))
    th_old = {k: jnp.asarray(v) for k, v in s["old"].items()}
    th_new = {k: jnp.asarray(v) for k, v in s["new"].items()}
    g_old, g_new = grad(th_old, *args), grad(th_new, *args)
    scale = np.sqrt(sum(float(jnp.sum(g**2)) for g in g_old.values()))
    assert scale > 10.0  # the old parameters are far from the maximiser
    for k in ("A", "b", "C", "d", "m0", "Q", "R", "P0"):
        gn = float(jnp.linalg.norm(g_new[k]))
        assert gn <= 1e-6 * scale, (k, gn, scale)
    q_old, q_new = float(q(th_old, *args)), float(q(th_new, *args))
    assert q_new >= q_old
    # and it is a maximum: random perturbations of the new parameters lower Q
    rng = np.random.default_rng(0)
    for _ in range(5):
        th = {k: v + 1e-3 * rng.normal(size=v.shape) for k, v in th_new.items()}
        th = {k: (0.5 * (v + v.T) if k in ("Q", "R", "P0") else v) for k, v in th.items()}
        assert float(q(th, *args)) < q_new


def test_literal_seed_eq23_gives_a_different_dynamics_matrix(tanh_mstep):
    """Negative control: the same regression fed with the seed's eq 23 as printed gives
    a visibly different A, whereas the corrected weights reproduce the library's A."""
    s = tanh_mstep
    X, v = s["X"], np.exp(s["log_v"])
    F = np.tanh(X)
    ones = np.ones(X.shape[:2] + (1,))
    Rg = np.concatenate([F, ones], -1)  # regressor [tanh(x_t); 1] per particle
    S_rr = np.einsum("tn,tnk,tnl->kl", v[:-1], Rg[:-1], Rg[:-1])

    def solve(Wts):
        S_zr = np.einsum("tij,tjd,tik->dk", Wts, X[1:], Rg[:-1])
        return PO.weighted_regression(S_zr, S_rr)

    W_ok = solve(s["W"])
    np.testing.assert_allclose(W_ok[:, :2], s["new"]["A"], atol=1e-8)
    np.testing.assert_allclose(W_ok[:, 2], s["new"]["b"], atol=1e-8)
    W_lit = PO.literal_eq23_weights(X, s["LW"], s["log_v"], s["old"], feature=np.tanh)
    A_lit = solve(W_lit)[:, :2]
    assert np.max(np.abs(A_lit - s["new"]["A"])) > 0.05, A_lit


# --------------------------------------------------------------------------------------
# 7. particle EM on an LDS reaches the exact EM likelihood
# --------------------------------------------------------------------------------------


def test_particle_em_reaches_exact_em_likelihood():
    params, y = lds_1d(100, seed=8)
    start = dict(params)
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
        part = EM(lds, ParticleSmoother(500)).run(jax.random.key(0), 30, **kw)
    ll = lambda p: float(KalmanSmoother().smooth(p, lds, y=y, state_dim=1).log_marginal)
    ll_start, ll_exact, ll_part = ll(start), ll(exact.params), ll(part.params)
    assert ll_exact - ll_start > 20  # EM made real progress
    assert abs(ll_part - ll_exact) < 1.0, (ll_start, ll_exact, ll_part)
    # the particle estimates of log p(y | theta_k) track the exact ones
    assert abs(part.log_marginals[-1] - ll_part) < 3.0


# --------------------------------------------------------------------------------------
# 8. edge cases and argument validation
# --------------------------------------------------------------------------------------


def test_one_particle_and_one_step_run():
    params, y = lds_2d(10)
    kw = dict(state_dim=2, rng_key=jax.random.key(0))
    post = ParticleSmoother(1, mode="ffbsi", num_trajectories=3).smooth(params, lds, y=y, **kw)
    assert post.particles.shape == (10, 1, 2) and post.trajectories.shape == (3, 10, 2)
    np.testing.assert_allclose(np.asarray(post.smoothed_log_weights), 0.0, atol=1e-12)
    assert np.isfinite(float(post.log_marginal))
    # with one particle every trajectory is the particle path
    np.testing.assert_array_equal(
        np.asarray(post.trajectories[1]), np.asarray(post.particles[:, 0])
    )
    post = ParticleSmoother(16, mode="ffbsi", num_trajectories=3).smooth(params, lds, y=y[:1], **kw)
    assert post.particles.shape == (1, 16, 2) and post.pair_moments.shape == (0, 2, 2)
    assert post.trajectories.shape == (3, 1, 2)
    np.testing.assert_allclose(
        np.asarray(post.smoothed_log_weights), np.asarray(post.filter_log_weights)
    )
    # T = 1: log Z_hat = log mean_i p(y_1 | x_1^i), computed here from the particles
    ll = PO.gauss_logpdf_rows(
        np.asarray(y[:1]), np.asarray(post.particles[0]) @ params["C"].T + params["d"], params["R"]
    )[0]
    np.testing.assert_allclose(float(post.log_marginal), np.log(np.mean(np.exp(ll))), rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(resampling="foo"), "resampling"),
        (dict(mode="bar"), "mode"),
        (dict(num_particles=0), "num_particles"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    params, y = lds_1d(5)
    with pytest.raises(ValueError, match=match):
        ParticleSmoother(**kwargs).smooth(params, lds, y=y, state_dim=1, rng_key=jax.random.key(0))


def test_missing_rng_key_raises():
    params, y = lds_1d(5)
    with pytest.raises(ValueError, match="rng_key"):
        ParticleSmoother(8).smooth(params, lds, y=y, state_dim=1)
    with pytest.raises(ValueError, match="rng_key"):
        ParticleSmoother(8).smooth(params, lds, y=y, state_dim=1, rng_key=None)


# --- G8: resampling unbiasedness of the schemes the filter uses --------------------------


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "multinomial"])
@pytest.mark.parametrize("n", [5, 10, 1000])
def test_resampling_offspring_counts_are_unbiased(scheme, n):
    from ppl_dyn.infer.resampling import RESAMPLERS

    K = 1000
    w = np.random.default_rng(n).dirichlet(np.ones(n))
    draw = jax.jit(jax.vmap(lambda k: RESAMPLERS[scheme](k, jnp.asarray(w), n)))
    idx = np.asarray(draw(jax.random.split(jax.random.key(7), K)))
    counts = np.stack([np.bincount(row, minlength=n) for row in idx])  # (K, n)
    mean = counts.mean(0)
    se = counts.std(0, ddof=1) / np.sqrt(K)
    expected = n * w
    # z-test per particle where the count varies; Bonferroni over n particles
    varying = se > 0
    z = np.abs(mean[varying] - expected[varying]) / se[varying]
    assert np.all(z < 4.5), (scheme, n, z.max())
    # a deterministic count (systematic with w_i N integral-ish) must equal floor/ceil
    assert np.all(np.abs(mean[~varying] - expected[~varying]) < 1.0)
