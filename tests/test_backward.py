"""Linear-cost backward kernels (``ppl_dyn.infer.backward``) against independent oracles.

Oracles: the backward kernel ``B_t(m, i)`` and the FFBSm two-slice weights built densely
in numpy/scipy (tests/particle_oracles.py), the dense joint-Gaussian LDS posterior
(tests/oracles.py), closed-form acceptance probabilities of the rejection and
independent-MH kernels, and complete-data statistics summed path by path in numpy.
Every Monte Carlo check uses a standard error computed from the draws themselves, and
each has a negative control (a wrong target that the same check rejects).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import oracles as O
import particle_oracles as PO
import pytest
from scipy import stats as sps

from ppl_dyn.infer import EM, KalmanSmoother, LinearGaussianMStep, ParticleSmoother
from ppl_dyn.infer.backward import (
    backward_indices_hybrid,
    backward_indices_mcmc,
    categorical_inverse_cdf,
    ffbsi_hybrid,
    ffbsi_mcmc,
    path_statistics,
)
from ppl_dyn.infer.particle import ParticlePosterior, particle_filter
from ppl_dyn.models import lds, tanh_rnn
from ppl_dyn.state_space import bind

N_STD, T_STD = 50, 20


def lds_1d(T, seed=0):
    params = dict(
        A=np.array([[0.9]]), C=np.array([[1.0]]), Q=np.array([[0.5]]), R=np.array([[0.5]]),
        m0=np.array([0.3]), P0=np.array([[1.0]]), b=np.array([0.1]), d=np.array([-0.2]),
    )  # fmt: skip
    _, y = O.sample_lds(np.random.default_rng(seed), params, T)
    return params, y


def lds_2d(T, seed=5):
    params, y, _ = O.random_system(np.random.default_rng(seed), 2, 1, 0.9, T)
    return params, y


@functools.partial(jax.jit, static_argnames=("dx", "n"))
def run_filter(key, params, y, *, dx, n):
    ss, spec = bind(lds, params, y=y, state_dim=dx)
    return particle_filter(key, ss, spec.y[0], spec.u[0], n, "systematic", 0.5)


@functools.lru_cache(maxsize=None)
def fixed_system():
    """One stored particle system (LDS, dx = 2, N = 50, T = 20) and its dense oracle."""
    params, y = lds_2d(T_STD)
    filt = run_filter(jax.random.key(3), params, y, dx=2, n=N_STD)
    X, LW = np.asarray(filt.particles), np.asarray(filt.log_weights)
    log_v, W, pair = PO.dense_ffbsm(X, LW, params)
    return params, y, filt, dict(X=X, LW=LW, log_v=log_v, W=W, pair=pair)


def kernel_matrix(params, LW, X, t, x_next):
    """Exact backward kernel ``B[m, i] = w_t^i p(x^m | x_t^i) / sum_k (...)`` (numpy)."""
    a = LW[t][None, :] + PO.transition_log_matrix(params, x_next, X[t])
    return np.exp(a - np.logaddexp.reduce(a, axis=1, keepdims=True))


def chi2_pvalue(draws, probs):
    """Chi-square goodness of fit of integer draws to ``probs`` (bins with expected
    count < 5 pooled into one)."""
    n = len(draws)
    counts = np.bincount(draws, minlength=len(probs)).astype(float)
    assert np.all(counts[probs == 0] == 0), "a zero-probability index was drawn"
    exp = n * probs
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    keep = ex > 0
    return sps.chisquare(obs[keep], ex[keep]).pvalue


def ss_of(params, dx=2, gaussian=True):
    """The LDS state space; ``gaussian=False`` hides its Gaussian transition behind a
    (trivial) mask, so the kernels must treat it as a general density."""
    ss, _ = bind(lds, params, y=np.zeros((T_STD, 1)), state_dim=dx)
    if gaussian:
        return ss
    transition = ss.transition
    return ss._replace(
        structure=None, transition=lambda x, u: transition(x, u).mask(jnp.bool_(True))
    )


def log_eps_bar(params):
    Q = np.asarray(params["Q"], float)
    Q = np.diag(Q) if Q.ndim == 1 else Q
    return -0.5 * np.linalg.slogdet(2 * np.pi * Q)[1]


ROWS = (0, 17, 33)  # particles at t + 1 whose backward kernels are tested
T_KERNEL = 10


def kernel_case(reps):
    params, _, _, ref = fixed_system()
    X, LW = ref["X"], ref["LW"]
    x_pts = X[T_KERNEL + 1][list(ROWS)]
    B = kernel_matrix(params, LW, X, T_KERNEL, x_pts)  # (3, N)
    x_next = np.repeat(x_pts, reps, axis=0)
    return params, X, LW, B, x_next


# --------------------------------------------------------------------------------------
# 1. the categorical sampler
# --------------------------------------------------------------------------------------


def test_inverse_cdf_sampler_matches_weights_and_skips_zero_weights():
    w = np.random.default_rng(0).dirichlet(np.ones(30))
    w[[0, 7, 29]] = 0.0  # zero weights at both ends and inside
    w /= w.sum()
    with np.errstate(divide="ignore"):
        lw = jnp.asarray(np.log(w) + 3.0)  # unnormalised
    draws = np.asarray(categorical_inverse_cdf(jax.random.key(0), lw, (40000,)))
    assert draws.dtype == np.int32
    assert chi2_pvalue(draws, w) > 1e-3
    # negative control: the same draws do not fit the uniform distribution
    assert chi2_pvalue(draws, np.where(w > 0, 1.0, 0.0) / np.sum(w > 0)) < 1e-6


# --------------------------------------------------------------------------------------
# 2. hybrid rejection: exact draws, acceptance counts, fallback
# --------------------------------------------------------------------------------------


HYBRID_CASES = ((10, True), (2, True), (0, True), (2, False))
REPS = 4000


@functools.lru_cache(maxsize=None)
def hybrid_draws():
    """Hybrid draws for every case of HYBRID_CASES (one compilation for all)."""
    params, X, LW, B, x_next = kernel_case(REPS)

    @jax.jit
    def draw(key, params, X, LW, x_next):
        u = jnp.zeros((0,), X.dtype)
        out = []
        for trials, gaussian in HYBRID_CASES:
            ss = ss_of(params, gaussian=gaussian)
            bound = None if gaussian else log_eps_bar_jnp(params)
            key, k = jax.random.split(key)
            out.append(backward_indices_hybrid(k, ss, X, LW, x_next, u, trials, bound))
        return out

    res = draw(jax.random.key(0), params, X[T_KERNEL], LW[T_KERNEL], x_next)
    return dict(zip(HYBRID_CASES, [tuple(np.asarray(a) for a in r) for r in res], strict=True))


def log_eps_bar_jnp(params):
    return -0.5 * jnp.linalg.slogdet(2 * jnp.pi * params["Q"])[1]


@pytest.mark.parametrize("trials, gaussian", HYBRID_CASES)
def test_hybrid_backward_frequencies_match_exact_kernel(trials, gaussian):
    """Chi-square of the hybrid draws against the dense B_t(m, .), with the fallback
    never (max_trials=10 mostly accepts), often (2) or always (0) used; the last case
    goes through a transition not recognised as Gaussian (its density by log_prob),
    given the Gaussian bound explicitly."""
    reps = REPS
    params, X, LW, B, x_next = kernel_case(reps)
    le = log_eps_bar(params)
    idx, ntr, acc = (a.reshape(len(ROWS), reps) for a in hybrid_draws()[trials, gaussian])
    for r in range(len(ROWS)):
        assert chi2_pvalue(idx[r], B[r]) > 1e-4, (r, trials)
    # negative control: the proposal Cat(w_t) alone is rejected by the same check
    w = np.exp(LW[T_KERNEL])
    assert min(chi2_pvalue(idx[r], w / w.sum()) for r in range(len(ROWS))) < 1e-6
    # acceptance counts against the closed form: rho_m = sum_i w_i p(x^m|x^i) / eps_bar,
    # P(accepted within K rounds) = 1 - (1 - rho)^K, E[trials] = (1 - (1 - rho)^K) / rho
    lam = PO.transition_log_matrix(params, x_next[::reps], X[T_KERNEL])
    rho = np.exp(np.logaddexp.reduce(LW[T_KERNEL][None] + lam, axis=1) - le)
    assert np.all((rho > 0) & (rho < 1))
    q = 1 - (1 - rho) ** trials
    assert np.all(ntr[~acc] == trials) and np.all((ntr[acc] >= 1) & (ntr[acc] <= trials))
    if trials == 0:
        assert not acc.any() and not ntr.any()
        return
    z_acc = (acc.mean(1) - q) / np.sqrt(q * (1 - q) / reps)
    e_tr = q / rho
    z_tr = (ntr.mean(1) - e_tr) / (ntr.std(1, ddof=1) / np.sqrt(reps))
    assert np.max(np.abs(z_acc)) < 4 and np.max(np.abs(z_tr)) < 4, (z_acc, z_tr)
    if trials == 2:
        assert (~acc).mean() > 0.2  # the fallback really carried many rows


@functools.partial(jax.jit, static_argnames=("m",))
def _hybrid_reruns(keys, params, y, filt, *, m):
    ss, spec = bind(lds, params, y=y, state_dim=2)
    return jax.vmap(lambda k: ffbsi_hybrid(k, ss, filt, spec.u[0], m))(keys)


def test_hybrid_ffbsi_reruns_average_to_ffbsm_given_the_particles():
    """Conditionally on one stored particle system, averages over R reruns of hybrid
    FFBSi equal FFBSm (dense oracle): the hybrid draws are exact."""
    params, y, filt, ref = fixed_system()
    R, M = 200, 100
    out = _hybrid_reruns(jax.random.split(jax.random.key(8), R), params, y, filt, m=M)
    traj = np.asarray(out.trajectories)  # (R, M, T, dx)
    X = ref["X"]
    for t in (0, 10, T_STD - 1):  # every path point is a filter particle at that time
        d = np.abs(traj[:, :, t, None, :] - X[t]).sum(-1).min(-1)
        assert np.all(d == 0)
    v = np.exp(ref["log_v"])
    m_ffbsm = np.einsum("tn,tnd->td", v, X)
    # per rerun: path averages of the complete-data statistics x_t and x_{t+1} x_t^T
    means = traj.mean(1)  # (R, T, dx)
    pairs = np.einsum("rmti,rmtj->rtij", traj[:, :, 1:], traj[:, :, :-1]) / M
    z_m = (means.mean(0) - m_ffbsm) / (means.std(0, ddof=1) / np.sqrt(R))
    z_p = (pairs.mean(0) - ref["pair"]) / (pairs.std(0, ddof=1) / np.sqrt(R))
    # one scalar statistic (the trace of the summed pair moment): |z| < 4
    s = np.trace(pairs.sum(1), axis1=-2, axis2=-1)
    z = (s.mean() - np.trace(ref["pair"].sum(0))) / (s.std(ddof=1) / np.sqrt(R))
    assert abs(z) < 4, z
    assert np.max(np.abs(z_m)) < 4.5 and np.max(np.abs(z_p)) < 4.5
    assert np.mean(z_m**2) < 3.0 and np.mean(z_p**2) < 3.0
    # power: the filter means differ from the FFBSm means by many standard errors
    m_filt = np.einsum("tn,tnd->td", np.exp(ref["LW"]), X)
    z_f = (means.mean(0) - m_filt) / (means.std(0, ddof=1) / np.sqrt(R))
    assert np.max(np.abs(z_f[:-1])) > 20
    info = out.info
    assert info.acceptance_rate.shape == (R, T_STD - 1)
    rate = np.asarray(info.acceptance_rate)
    assert np.all((rate > 0) & (rate <= 1))
    assert np.all(np.asarray(info.num_fallback) <= M) and np.asarray(info.num_fallback).sum() > 0


def test_hybrid_requires_a_bound_without_gaussian_transition():
    params, y, filt, _ = fixed_system()
    ss = ss_of(params, gaussian=False)
    u = jnp.zeros((T_STD, 0))
    with pytest.raises(ValueError, match="log_bound"):
        ffbsi_hybrid(jax.random.key(0), ss, filt, u, 10)
    with pytest.raises(ValueError, match="log_bound"):
        backward_indices_hybrid(
            jax.random.key(0), ss, filt.particles[0], filt.log_weights[0], filt.particles[1],
            u[0],
        )  # fmt: skip
    with pytest.raises(ValueError, match="max_trials"):
        ffbsi_hybrid(jax.random.key(0), ss_of(params), filt, u, 10, max_trials=-1)


# --------------------------------------------------------------------------------------
# 3. independent Metropolis-Hastings
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def mcmc_draws():
    """IMH draws (one compilation): one move from exact draws of B_t (numpy), one move
    from a fixed bad start, and 30 moves from the same bad start."""
    params, X, LW, B, x_next = kernel_case(REPS)
    rng = np.random.default_rng(0)
    exact = np.concatenate([rng.choice(N_STD, size=REPS, p=B[r]) for r in range(len(ROWS))])
    bad = np.full(len(ROWS) * REPS, int(np.argmin(B[0] + (B[0] == 0))))

    @jax.jit
    def draw(key, params, X, LW, x_next, exact, bad):
        ss, u = ss_of(params), jnp.zeros((0,), X.dtype)
        k1, k2, k3 = jax.random.split(key, 3)
        return (
            backward_indices_mcmc(k1, ss, X, LW, x_next, u, exact, 1),
            backward_indices_mcmc(k2, ss, X, LW, x_next, u, bad, 1),
            backward_indices_mcmc(k3, ss, X, LW, x_next, u, bad, 30),
        )

    out = draw(jax.random.key(1), params, X[T_KERNEL], LW[T_KERNEL], x_next, exact, bad)
    out = [tuple(np.asarray(a).reshape(len(ROWS), REPS) for a in r) for r in out]
    return exact.reshape(len(ROWS), REPS), out


def test_one_imh_step_leaves_the_backward_kernel_invariant():
    """Start each row at an exact draw from B_t(m, .) (numpy), apply one IMH move:
    the draws still follow B_t(m, .) (chi-square), and the number of accepted moves
    matches the closed-form stationary acceptance probability. Negative control: a
    start at one fixed low-probability index is not corrected by one move."""
    reps = REPS
    params, X, LW, B, x_next = kernel_case(reps)
    init, ((idx, nacc), (idx_bad, _), _) = mcmc_draws()
    for r in range(len(ROWS)):
        assert chi2_pvalue(idx[r], B[r]) > 1e-4, r
    # the move really moved: about the stationary acceptance probability
    # a_m = sum_{i, i'} B(m, i) w(i') min(1, p(x^m | x^i') / p(x^m | x^i))
    w = np.exp(LW[T_KERNEL])
    lam = PO.transition_log_matrix(params, x_next[::reps], X[T_KERNEL])
    a = np.array([
        np.sum(B[r][:, None] * w[None, :] * np.minimum(1, np.exp(lam[r][None] - lam[r][:, None])))
        for r in range(len(ROWS))
    ])  # fmt: skip
    z = (nacc.mean(1) - a) / np.sqrt(a * (1 - a) / reps)
    assert np.all((0.05 < a) & (a < 0.95)) and np.max(np.abs(z)) < 4, (a, z)
    assert np.all(idx[nacc == 0] == init[nacc == 0])
    # negative control: everyone starts at the same (low-probability) index
    assert chi2_pvalue(idx_bad[0], B[0]) < 1e-6


def test_imh_steps_converge_from_a_bad_start():
    """Many IMH moves forget a bad start: after 30 moves the draws follow B_t(m, .)."""
    params, X, LW, B, x_next = kernel_case(REPS)
    _, (_, _, (idx, _)) = mcmc_draws()
    assert min(chi2_pvalue(idx[r], B[r]) for r in range(len(ROWS))) > 1e-4


@functools.lru_cache(maxsize=None)
def _rts_runner(T):
    params, y = lds_1d(T, seed=7)
    ss, spec = bind(lds, params, y=y, state_dim=1)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def run(keys, n, mode):
        def one(k):
            e = ParticleSmoother(n, mode=mode, num_trajectories=n, num_mcmc_steps=2)
            post = jax.tree_util.tree_map(lambda a: a[0], e.posterior(k, ss, spec.y, spec.u))
            est = jnp.concatenate(
                [post.means.ravel(), post.covs.ravel(), post.pair_moments.ravel()]
            )
            # the smoothed weights are path frequencies c / M, the means path averages
            c = jnp.exp(post.smoothed_log_weights) * n
            off = jnp.max(jnp.abs(c - jnp.round(c)))
            gap = jnp.max(jnp.abs(post.means - jnp.mean(post.trajectories, 0)))
            return est, jnp.stack([off, gap])

        return jax.lax.map(one, keys)

    ref = O.dense_posterior(params, y)
    m, P, Xc = ref["means"], ref["covs"], ref["cross"]
    truth = np.concatenate([m.ravel(), P.ravel(), (Xc + m[1:, :, None] * m[:-1, None, :]).ravel()])
    return truth, run


def test_ffbsi_mcmc_smoothed_moments_agree_with_rts():
    """Smoothed means, variances and pair moments of ParticleSmoother(mode="ffbsi-mcmc")
    agree with the dense LDS posterior within Monte Carlo error (replicates over
    filter and backward draws)."""
    truth, run = _rts_runner(20)
    R = 32
    est, consistency = run(jax.random.split(jax.random.key(0), R), 1000, "ffbsi-mcmc")
    est = np.asarray(est)
    assert np.max(np.asarray(consistency)) < 1e-9
    se = est.std(0, ddof=1) / np.sqrt(R)
    z = (est.mean(0) - truth) / se
    assert np.max(np.abs(z)) < 4.0, np.max(np.abs(z))
    assert np.mean(z**2) < 2.0, np.mean(z**2)
    # power: one replicate is visibly off, the average is much closer
    rms = lambda e: np.sqrt(np.mean((e - truth) ** 2))  # noqa: E731
    assert rms(est.mean(0)) < 0.3 * rms(est)


@pytest.mark.slow
def test_ffbsi_hybrid_smoothed_moments_agree_with_rts():
    truth, run = _rts_runner(20)
    R = 32
    est, consistency = run(jax.random.split(jax.random.key(1), R), 1000, "ffbsi-hybrid")
    est = np.asarray(est)
    assert np.max(np.asarray(consistency)) < 1e-9
    z = (est.mean(0) - truth) / (est.std(0, ddof=1) / np.sqrt(R))
    assert np.max(np.abs(z)) < 4.0 and np.mean(z**2) < 2.0


# --------------------------------------------------------------------------------------
# 4. EM statistics along the paths
# --------------------------------------------------------------------------------------

TANH = dict(
    A=np.array([[1.2, -0.4], [0.5, 0.9]]), b=np.array([0.1, -0.2]),
    C=np.array([[1.0, -0.7]]), d=np.array([0.3]),
    Q=np.array([[0.1, 0.02], [0.02, 0.08]]), R=np.array([[0.05]]),
    m0=np.array([0.2, -0.1]), P0=np.eye(2),
)  # fmt: skip


@pytest.mark.parametrize("direct", [False, True])
def test_path_statistics_equal_the_average_of_per_path_complete_data_statistics(direct):
    """The M-step statistics from ``path_statistics`` (through the public
    LinearGaussianMStep route) equal the average over the paths of the complete-data
    sufficient statistics, summed in numpy path by path (tanh-RNN: tanh features; the
    identity holds for any set of paths, so random index paths are used). ``direct``:
    the posterior carries the path indices, so the statistics come from the M path
    states (O(M T)), not from path counts over all N particles."""
    _, _, filt, _ = fixed_system()  # any particles and any paths will do
    rng = np.random.default_rng(4)
    T, M = T_STD, 37
    y = rng.normal(size=(T, 1))
    ss, spec = bind(tanh_rnn, TANH, y=y, state_dim=2, obs_dim=1)
    assert ss.structure.dynamics.feature == "tanh" and ss.structure.emission.feature == "tanh"
    indices = rng.integers(0, N_STD, size=(T, M))
    indices[:, :5] = indices[:, :1]  # repeated paths are counted with multiplicity

    @jax.jit
    def run(particles, indices):
        log_v, pair = path_statistics(particles, indices, ss.structure.dynamics.features)
        post = ParticlePosterior(
            particles,
            filt.log_weights,
            log_v,
            pair,
            None,
            filt.log_marginal,
            filt.ess,
            path_indices=indices if direct else None,
        )
        post = jax.tree_util.tree_map(lambda a: a[None], post)
        return LinearGaussianMStep().statistics(post, ss, spec.y, spec.u)

    st = run(filt.particles, jnp.asarray(indices, jnp.int32))
    P = np.swapaxes(np.take_along_axis(np.asarray(filt.particles), indices[..., None], 1), 0, 1)
    one = np.ones((M, T, 1))
    r_dyn = np.concatenate([np.tanh(P[:, :-1]), one[:, 1:]], -1)  # [tanh x_{t-1}; 1]
    z_dyn = P[:, 1:]
    S_zr = np.einsum("mti,mtj->ij", z_dyn, r_dyn) / M
    S_rr = np.einsum("mti,mtj->ij", r_dyn, r_dyn) / M
    S_zz = np.einsum("mti,mtj->ij", z_dyn, z_dyn) / M
    r_emi = np.concatenate([np.tanh(P), one], -1)
    E_zr = np.einsum("ti,mtj->ij", y, r_emi) / M
    E_rr = np.einsum("mti,mtj->ij", r_emi, r_emi) / M
    np.testing.assert_allclose(np.asarray(st.dynamics.S_zr), S_zr, atol=1e-10)
    np.testing.assert_allclose(np.asarray(st.dynamics.S_rr), S_rr, atol=1e-10)
    np.testing.assert_allclose(np.asarray(st.dynamics.S_zz), S_zz, atol=1e-10)
    np.testing.assert_allclose(np.asarray(st.emission.S_zr), E_zr, atol=1e-10)
    np.testing.assert_allclose(np.asarray(st.emission.S_rr), E_rr, atol=1e-10)
    np.testing.assert_allclose(np.asarray(st.emission.S_zz), y.T @ y, atol=1e-10)
    np.testing.assert_allclose(np.asarray(st.init.sum_m), P[:, 0].mean(0), atol=1e-12)
    np.testing.assert_allclose(np.asarray(st.init.sum_mm), P[:, 0].T @ P[:, 0] / M, atol=1e-12)


# --------------------------------------------------------------------------------------
# 5. EM with the new modes; jit, vmap and argument checks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("ffbsi-mcmc", marks=pytest.mark.slow),  # default-suite budget
        pytest.param("ffbsi-hybrid", marks=pytest.mark.slow),
    ],
)
def test_particle_em_with_linear_cost_backward_reaches_exact_em_likelihood(mode):
    params, y = lds_1d(100, seed=8)
    y = np.stack([y[:50], y[50:]])  # two sequences: the E-step is a vmap over them
    start = dict(params)
    start.update(A=np.array([[0.3]]), C=np.array([[0.6]]), Q=np.array([[1.5]]),
                 R=np.array([[1.2]]), b=np.array([0.5]), d=np.array([0.4]),
                 m0=np.array([0.0]), P0=np.array([[2.0]]))  # fmt: skip
    kw = dict(y=y, state_dim=1, init_params=start, progress_bar=False)
    e_step = ParticleSmoother(500, mode=mode, num_trajectories=500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        exact = EM(lds, KalmanSmoother()).run(jax.random.key(0), 30, **kw)
        part = EM(lds, e_step).run(jax.random.key(0), 30, **kw)
    ll = lambda p: float(np.sum(KalmanSmoother().smooth(p, lds, y=y, state_dim=1).log_marginal))  # noqa: E731
    ll_start, ll_exact, ll_part = ll(start), ll(exact.params), ll(part.params)
    assert ll_exact - ll_start > 20
    assert abs(ll_part - ll_exact) < 1.0, (ll_start, ll_exact, ll_part)
    assert abs(np.sum(part.log_marginals[-1]) - ll_part) < 3.0


@pytest.mark.slow  # default-suite budget
def test_jit_and_vmap_over_sequences_agree_with_loops():
    """vmap over two stored particle systems equals a sequential loop over them (same
    keys, both kernels), inside one jit."""
    params, y, filt, _ = fixed_system()
    ss, spec = bind(lds, params, y=y, state_dim=2)
    u = spec.u[0]
    other = run_filter(jax.random.key(9), params, y, dx=2, n=N_STD)
    filts = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), filt, other)
    keys = jax.random.split(jax.random.key(5), 2)

    def both(k, f):
        k1, k2 = jax.random.split(k)
        return ffbsi_mcmc(k1, ss, f, u, 16, 2), ffbsi_hybrid(k2, ss, f, u, 16, 3)

    @jax.jit
    def run(keys, filts):  # vmap, and a sequential loop (lax.map) over the same inputs
        return jax.vmap(both)(keys, filts), jax.lax.map(lambda a: both(*a), (keys, filts))

    batched, looped = run(keys, filts)
    for s in range(2):
        got = jax.tree_util.tree_map(lambda a, s=s: a[s], looped)
        for g, b in zip(got, batched, strict=True):
            np.testing.assert_array_equal(np.asarray(g.indices), np.asarray(b.indices[s]))
            np.testing.assert_array_equal(np.asarray(g.trajectories),
                                          np.asarray(b.trajectories[s]))  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="ffbsi-rejection"), "mode"),
        (dict(mode="ffbsi-mcmc", num_mcmc_steps=0), "num_mcmc_steps"),
        (dict(mode="ffbsi-mcmc", num_trajectories=0), "num_trajectories"),
        (dict(mode="ffbsi-hybrid", max_trials=-1), "max_trials"),
        (dict(mode="ffbsi-hybrid", max_trials=2.5), "max_trials"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    params, y = lds_1d(5)
    with pytest.raises(ValueError, match=match):
        ParticleSmoother(8, **kwargs).smooth(params, lds, y=y, state_dim=1,
                                             rng_key=jax.random.key(0))  # fmt: skip


def test_mcmc_primitive_checks_its_arguments():
    params, _, filt, _ = fixed_system()
    ss = ss_of(params)
    args = (jax.random.key(0), ss, filt.particles[0], filt.log_weights[0], filt.particles[1],
            jnp.zeros((0,)))  # fmt: skip
    with pytest.raises(ValueError, match="init_indices"):
        backward_indices_mcmc(*args, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="num_steps"):
        backward_indices_mcmc(*args, jnp.zeros((N_STD,), jnp.int32), -1)
    with pytest.raises(ValueError, match="num_mcmc_steps"):
        ffbsi_mcmc(jax.random.key(0), ss, filt, jnp.zeros((T_STD, 0)), 4, 0)


@pytest.mark.slow  # default-suite budget (~15 min on 2 cores): runs in the slow tier
def test_hybrid_reports_its_fallback_rate_and_warns_when_it_is_high():
    """The rate is the share of backward draws made by the exact O(N) draw, checked
    against the low-level pass's own counts; a transition density far narrower than the
    particle cloud (a loose rejection bound) leaves most rows to it and warns."""
    import ppl_dyn
    from ppl_dyn.infer.backward import ffbsi_hybrid

    def run(q, trials):
        p = {"A": np.eye(1) * 0.9, "C": np.eye(1), "Q": np.eye(1) * q, "R": np.eye(1) * 1.0,
             "b": np.zeros(1), "d": np.zeros(1), "m0": np.zeros(1), "P0": np.eye(1)}  # fmt: skip
        y = ppl_dyn.simulate(jax.random.key(0), lds, p, num_steps=40, state_dim=1, obs_dim=1)["y"]
        e = ParticleSmoother(num_particles=300, mode="ffbsi-hybrid", num_trajectories=50,
                             max_trials=trials)  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            post = e.smooth(p, lds, y=y, state_dim=1, rng_key=jax.random.key(1))
        ss, spec = bind(lds, p, y=y, state_dim=1)
        filt = particle_filter(jax.random.split(jax.random.key(1))[0], ss, spec.y[0],
                               spec.u[0], 300)  # fmt: skip
        back = ffbsi_hybrid(jax.random.key(2), ss, filt, spec.u[0], 50, trials)
        direct = float(jnp.sum(back.info.num_fallback)) / (39 * 50)
        msgs = [str(w.message) for w in caught if "fallback" in str(w.message)]
        return float(post.backward_fallback_rate), direct, msgs

    rate_wide, direct_wide, msgs_wide = run(1.0, 10)
    rate_narrow, direct_narrow, msgs_narrow = run(1e-4, 2)
    assert 0.0 <= rate_wide < 0.1 and not msgs_wide
    assert rate_narrow > 0.5 and msgs_narrow and "ffbsi-mcmc" in msgs_narrow[0]
    # the same order as the low-level pass on a filter of its own (other random numbers)
    assert abs(rate_wide - direct_wide) < 0.1 and abs(rate_narrow - direct_narrow) < 0.15
    other = ParticleSmoother(num_particles=50, mode="ffbsm")
    y = np.zeros((10, 1))
    pm = {"A": np.eye(1) * 0.9, "C": np.eye(1), "Q": np.eye(1), "R": np.eye(1),
          "b": np.zeros(1), "d": np.zeros(1), "m0": np.zeros(1), "P0": np.eye(1)}  # fmt: skip
    plain = other.smooth(pm, lds, y=y, state_dim=1, rng_key=jax.random.key(0))
    assert plain.backward_fallback_rate is None
