"""Extended Kalman smoother, Gaussian-feature statistics, RBF M-step, nested fitting.

Oracles: the dense joint Gaussian (EKS on an LDS), the Kalman smoother, a particle
smoother (weakly nonlinear model), Monte Carlo draws from the smoothed Gaussian clouds
with tolerances from their standard errors (statistics), and autodiff of the explicitly
written Q-function (the M-step is its stationary point).
"""

import jax
import jax.numpy as jnp
import numpy as np
import oracles as O
import pytest

import ppl_dyn
from ppl_dyn.infer import (
    EM,
    ExtendedKalmanSmoother,
    KalmanSmoother,
    LinearGaussianMStep,
    ParticleSmoother,
    factor_analysis_init,
)
from ppl_dyn.infer.mstep import regression_blocks
from ppl_dyn.infer.stats import feature_statistics
from ppl_dyn.models import lds, rbf, rbf_features, rbf_grid, tanh_rnn
from ppl_dyn.state_space import bind


def _max_rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / (1.0 + np.max(np.abs(b))))


# ------------------------------------------------------------------------------------
# EKS = Kalman = dense Gaussian on linear models
# ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dx,dy,du", [(2, 1, 1), (2, 4, 0)])
def test_eks_equals_kalman_and_dense_on_lds(dx, dy, du):
    rng = np.random.default_rng(3)
    params, y, u = O.random_system(rng, dx, dy, 0.9, 40, du=du)
    y = y.copy()
    y[5, 0] = np.nan  # partly or wholly missing steps
    y[9, :] = np.nan
    kw = dict(y=y, state_dim=dx, **({"u": u} if u is not None else {}))
    ek = ExtendedKalmanSmoother().smooth(params, lds, **kw)
    ka = KalmanSmoother().smooth(params, lds, **kw)
    ref = O.dense_posterior(params, y, u)
    for f in ("means", "covs", "cross_covs", "filtered_means", "predicted_log_probs"):
        assert _max_rel(getattr(ek, f), getattr(ka, f)) < 1e-11, f
    assert _max_rel(ek.means, ref["means"]) < 1e-9
    assert _max_rel(ek.covs, ref["covs"]) < 1e-9
    assert _max_rel(ek.cross_covs, ref["cross"]) < 1e-9
    assert abs(float(ek.log_marginal) - ref["log_marginal"]) < 1e-8 * abs(ref["log_marginal"])
    # iterating the linearisation changes nothing on a linear model
    it = ExtendedKalmanSmoother(num_iterations=3).smooth(params, lds, **kw)
    assert _max_rel(it.means, ref["means"]) < 1e-9
    assert abs(float(it.log_marginal) - ref["log_marginal"]) < 1e-8 * abs(ref["log_marginal"])


def test_eks_batched_sequences_match_one_by_one():
    rng = np.random.default_rng(4)
    params, y0, _ = O.random_system(rng, 2, 1, 0.9, 30)
    _, y1 = O.sample_lds(rng, params, 30)
    both = ExtendedKalmanSmoother().smooth(params, lds, y=np.stack([y0, y1]), state_dim=2)
    one = ExtendedKalmanSmoother().smooth(params, lds, y=y1, state_dim=2)
    assert both.means.shape == (2, 30, 2)
    assert _max_rel(both.means[1], one.means) < 1e-12


# ------------------------------------------------------------------------------------
# EKS on nonlinear models
# ------------------------------------------------------------------------------------

WEAK = dict(
    A=np.array([[0.6, 0.2], [-0.2, 0.5]]),
    C=np.array([[1.0, 0.5]]),
    Q=0.05 * np.eye(2),
    R=0.1 * np.eye(1),
    m0=np.zeros(2),
    P0=0.1 * np.eye(2),
)


def test_eks_close_to_particle_smoother_on_weakly_nonlinear_model():
    """Small states keep tanh nearly linear: EKS means within a small fraction of the
    posterior standard deviation of a large-N FFBSm (Monte Carlo error ~ sd / 20)."""
    kw = dict(state_dim=2, bias=False)
    sim = ppl_dyn.simulate(jax.random.key(5), tanh_rnn, WEAK, num_steps=60, obs_dim=1, **kw)
    y = sim["y"]
    ek = ExtendedKalmanSmoother().smooth(WEAK, tanh_rnn, y=y, **kw)
    ss, spec = bind(tanh_rnn, {k: jnp.asarray(v) for k, v in WEAK.items()}, y=y, **kw)
    pf = ParticleSmoother(num_particles=2000).posterior(jax.random.key(6), ss, spec.y, spec.u)
    sd = np.sqrt(np.diagonal(np.asarray(ek.covs), axis1=-2, axis2=-1))
    z = np.abs(np.asarray(ek.means) - np.asarray(pf.means[0])) / sd
    assert np.sqrt(np.mean(z**2)) < 0.15, np.sqrt(np.mean(z**2))
    # and it is a better state estimate than the prior mean
    assert np.mean((np.asarray(ek.means) - np.asarray(sim["x"])) ** 2) < np.mean(
        np.asarray(sim["x"]) ** 2
    )


def test_ieks_converges_to_the_map_trajectory():
    """Iterated EKS is Gauss-Newton on log p(x_{1:T}, y): at convergence the gradient of
    the log joint density (written out here independently) vanishes at its means."""
    from jax.scipy.stats import multivariate_normal as mvn

    p = dict(WEAK, A=np.array([[1.5, 0.3], [-0.3, 1.2]]))  # bistable: strongly nonlinear
    kw = dict(state_dim=2, bias=False)
    y = ppl_dyn.simulate(jax.random.key(7), tanh_rnn, p, num_steps=40, obs_dim=1, **kw)["y"]

    def log_joint(x):
        lp = mvn.logpdf(x[0], p["m0"], p["P0"])
        lp += jnp.sum(mvn.logpdf(x[1:], jnp.tanh(x[:-1]) @ p["A"].T, p["Q"]))
        return lp + jnp.sum(mvn.logpdf(y, jnp.tanh(x) @ p["C"].T, p["R"]))

    grad = jax.jit(jax.grad(log_joint))
    g1 = np.max(np.abs(grad(ExtendedKalmanSmoother(1).smooth(p, tanh_rnn, y=y, **kw).means)))
    g40 = np.max(np.abs(grad(ExtendedKalmanSmoother(40).smooth(p, tanh_rnn, y=y, **kw).means)))
    assert g1 > 0.5  # one pass is not the MAP here ...
    assert g40 < 1e-3 * g1  # ... forty relinearised passes are


def test_eks_rejects_bad_iterations():
    with pytest.raises(ValueError, match="num_iterations"):
        ExtendedKalmanSmoother(num_iterations=0).smooth(
            WEAK, tanh_rnn, y=np.zeros((5, 1)), state_dim=2, bias=False
        )


# ------------------------------------------------------------------------------------
# statistics under Gaussian clouds against Monte Carlo
# ------------------------------------------------------------------------------------


def _smooth_and_update(model, params, ridge=0.0, **kw):
    """EKS posterior, M-step statistics and update, jitted (eager JAX compiles every
    small operation separately, which dominates these tests' run time)."""
    dyn = {k: v for k, v in kw.items() if isinstance(v, (np.ndarray, jax.Array))}
    static = {k: v for k, v in kw.items() if k not in dyn}
    mstep = LinearGaussianMStep(ridge=ridge)

    @jax.jit
    def run(params, dyn):
        ss, spec = bind(model, params, **static, **dyn)
        post = ExtendedKalmanSmoother().posterior(None, ss, spec.y, spec.u)
        stats = mstep.statistics(post, ss, spec.y, spec.u)
        new, _ = mstep.update(stats, ss, frozenset(params))
        return post, stats, new

    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    post, stats, new = run(jparams, dyn)
    ss, _ = bind(model, jparams, **kw)
    return ss, post, stats, new


def _mc_statistics(rng, ss, post, y, u, M):
    """Monte Carlo sums of E[z r^T], E[r r^T], E[z z^T] for both regressions, with
    standard errors, by drawing the smoothed pair and single-step Gaussian clouds."""
    st = ss.structure
    m, P, X = (np.asarray(a) for a in (post.means, post.covs, post.cross_covs))
    T, dx = m.shape
    R = np.asarray(ss.emission_cov(jnp.asarray(u[0])))
    out = {"dyn": [], "emi": []}
    for t in range(T):
        if t > 0:  # pair (x_{t-1}, x_t)
            mu = np.concatenate([m[t - 1], m[t]])
            S = np.block([[P[t - 1], X[t - 1].T], [X[t - 1], P[t]]])
            L = np.linalg.cholesky(S + 1e-13 * np.eye(2 * dx))
            d = mu + rng.normal(size=(M, 2 * dx)) @ L.T
            phi = np.asarray(st.dynamics.features(jnp.asarray(d[:, :dx])))
            r = np.concatenate([phi, np.broadcast_to(u[t], (M, u.shape[1])), np.ones((M, 1))], 1)
            out["dyn"].append((d[:, dx:], r))
        L = np.linalg.cholesky(P[t] + 1e-13 * np.eye(dx))
        x = m[t] + rng.normal(size=(M, dx)) @ L.T
        psi = np.asarray(st.emission.features(jnp.asarray(x)))
        mean_y = np.asarray(ss.emission_mean(jnp.asarray(x), jnp.asarray(u[t])))
        o = ~np.isnan(y[t])
        yt = np.broadcast_to(np.where(o, y[t], 0.0), (M, y.shape[1])).copy()
        if (~o).any():  # draw missing entries from p(y_m | y_o, x)
            K = R[np.ix_(~o, o)] @ np.linalg.inv(R[np.ix_(o, o)]) if o.any() else None
            cm = mean_y[:, ~o]
            if K is not None:
                cm = cm + (yt[:, o] - mean_y[:, o]) @ K.T
            Rc = R[np.ix_(~o, ~o)] - (K @ R[np.ix_(o, ~o)] if K is not None else 0)
            yt[:, ~o] = cm + rng.normal(size=(M, (~o).sum())) @ np.linalg.cholesky(Rc).T
        r = np.concatenate([psi, np.broadcast_to(u[t], (M, u.shape[1])), np.ones((M, 1))], 1)
        out["emi"].append((yt, r))
    res = {}
    for key, pairs in out.items():
        sums = {"S_zr": 0.0, "S_rr": 0.0, "S_zz": 0.0}
        var = {"S_zr": 0.0, "S_rr": 0.0, "S_zz": 0.0}
        for z, r in pairs:
            for name, prod in (
                ("S_zr", z[:, :, None] * r[:, None, :]),
                ("S_rr", r[:, :, None] * r[:, None, :]),
                ("S_zz", z[:, :, None] * z[:, None, :]),
            ):
                sums[name] = sums[name] + prod.mean(0)
                var[name] = var[name] + prod.var(0) / M
        res[key] = {k: (sums[k], np.sqrt(var[k])) for k in sums}
    return res


def _check_against_mc(stats, mc):
    worst = 0.0
    for key, reg in (("dyn", stats.dynamics), ("emi", stats.emission)):
        for name in ("S_zr", "S_rr", "S_zz"):
            val, se = mc[key][name]
            a = np.asarray(getattr(reg, name))[0] if np.ndim(getattr(reg, name)) == 3 else None
            a = np.asarray(getattr(reg, name)) if a is None else a
            z = np.abs(a - val) / (se + 1e-12 * (1 + np.abs(val)))
            worst = max(worst, float(np.max(z)))
    return worst


@pytest.mark.parametrize("model_name", ["tanh_rnn", "rbf"])
def test_gaussian_feature_statistics_match_monte_carlo(model_name):
    rng = np.random.default_rng(11)
    T, M = 12, 40000
    u = rng.normal(size=(T, 1))
    if model_name == "tanh_rnn":
        model = tanh_rnn
        params = dict(
            WEAK,
            A=np.array([[1.2, 0.4], [-0.5, 0.9]]),
            B=np.array([[0.5], [0.0]]),
            C=np.array([[1.0, -0.5], [0.3, 0.8]]),
            D=np.zeros((2, 1)),
            b=np.array([0.1, -0.2]),
            d=np.array([0.0, 0.5]),
            R=np.array([[0.2, 0.05], [0.05, 0.1]]),
        )
        kw = dict(state_dim=2)
    else:
        model = rbf
        centres, widths = rbf_grid((-2.0, 2.0), 5)
        h = np.array([[1.0, -0.5, 0.3, 0.8, -1.0]])
        params = dict(
            A=np.concatenate([h, [[0.5]]], 1),
            B=np.array([[0.7]]),
            b=np.array([0.1]),
            C=np.array([[1.0], [-0.5]]),
            D=np.zeros((2, 1)),
            d=np.zeros(2),
            Q=np.array([[0.3]]),
            R=np.array([[0.2, 0.05], [0.05, 0.1]]),
            m0=np.zeros(1),
            P0=np.eye(1),
        )
        kw = dict(state_dim=1, centres=centres, widths=widths)
    sim = ppl_dyn.simulate(jax.random.key(12), model, params, u=u, num_steps=T, obs_dim=2, **kw)
    y = np.asarray(sim["y"]).copy()
    y[3, 0] = np.nan  # partly missing
    y[7, :] = np.nan  # wholly missing
    ss, post, stats, _ = _smooth_and_update(model, params, y=y, u=u, **kw)
    one = jax.tree_util.tree_map(lambda a: a[0], post)
    mc = _mc_statistics(rng, ss, one, y, u, M)
    worst = _check_against_mc(stats, mc)
    assert worst < 5.0, worst
    # negative control: dropping the Cov[x_t, x_{t-1}] E[J]^T term must be detected
    _, _, jac = feature_statistics(ss.structure.dynamics, one.means[:-1], one.covs[:-1])
    term = jnp.einsum("tij,tkj->ik", one.cross_covs, jac)
    pad = stats.dynamics.S_zr.shape[-1] - term.shape[-1]
    S_bad = stats.dynamics.S_zr - jnp.pad(term, ((0, 0), (0, pad)))
    bad = stats._replace(dynamics=stats.dynamics._replace(S_zr=S_bad))
    assert _check_against_mc(bad, mc) > 8.0


# ------------------------------------------------------------------------------------
# the M-step is the stationary point of Q; ridge; normal equations
# ------------------------------------------------------------------------------------


def _rbf_problem(T=150, seed=0):
    from ppl_dyn.reproduce.ghahramani import simulate

    x, u, y = simulate(seed, T)
    centres, widths = rbf_grid((-2.5, 2.5), 7)
    params = dict(
        A=np.concatenate([np.zeros((1, 7)), [[0.8]]], 1),
        B=np.array([[1.0]]),
        b=np.zeros(1),
        C=np.ones((1, 1)),
        D=np.zeros((1, 1)),
        d=np.zeros(1),
        Q=np.array([[0.1]]),
        R=np.array([[0.05]]),
        m0=np.zeros(1),
        P0=np.eye(1),
    )
    return params, dict(y=y, u=u, state_dim=1, centres=centres, widths=widths)


@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_rbf_mstep_zeroes_gradient_of_q(ridge):
    params, kw = _rbf_problem()
    ss, post, stats, new = _smooth_and_update(rbf, params, ridge=ridge, **kw)
    s = stats.dynamics
    reg = ss.structure.dynamics
    blocks = regression_blocks(reg, 8, 1)
    n_rbf = 7

    def q(W, Sigma):  # expected complete-data log-likelihood of the dynamics + ridge
        WS = W @ s.S_zr.T
        M = s.S_zz - WS - WS.T + W @ s.S_rr @ W.T
        Si = jnp.linalg.inv(Sigma)
        val = -0.5 * jnp.trace(Si @ M) - 0.5 * s.n * jnp.linalg.slogdet(Sigma)[1]
        # ridge: a Gaussian prior on the RBF weights with covariance Sigma / ridge
        return val - 0.5 * ridge * jnp.trace(Si @ W[:, :n_rbf] @ W[:, :n_rbf].T)

    W = jnp.concatenate([new[name].reshape(1, -1) for name, _ in blocks], 1)
    gW = jax.grad(q, 0)(W, new["Q"])
    scale = float(jnp.max(jnp.abs(s.S_zr)))
    assert float(jnp.max(jnp.abs(gW))) < 1e-8 * scale
    if ridge == 0.0:
        gS = jax.grad(q, 1)(W, new["Q"])
        assert float(jnp.max(jnp.abs(gS))) < 1e-8 * float(s.n / new["Q"][0, 0])
    # a perturbation lowers Q (it is a maximum, not a saddle)
    W2 = W.at[0, 2].add(0.05)
    assert q(W2, new["Q"]) < q(W, new["Q"])


def test_mstep_normal_equations_match_least_squares_on_pooled_samples():
    """The closed-form RBF weights equal least squares on many pairs drawn from the
    smoothed clouds, within its Monte Carlo error."""
    rng = np.random.default_rng(21)
    params, kw = _rbf_problem(T=60, seed=1)
    _, post, _, new = _smooth_and_update(rbf, params, **kw)
    W = np.concatenate(
        [np.asarray(new["A"]), np.asarray(new["B"]), np.asarray(new["b"])[:, None]], 1
    )
    m, P, X = (np.asarray(a)[0] for a in (post.means, post.covs, post.cross_covs))
    u = kw["u"]
    ests = []
    for _ in range(8):  # batches -> standard error of the least-squares estimate
        Z, Rg = [], []
        for t in range(1, m.shape[0]):
            S = np.array([[P[t - 1, 0, 0], X[t - 1, 0, 0]], [X[t - 1, 0, 0], P[t, 0, 0]]])
            d = (
                np.array([m[t - 1, 0], m[t, 0]])
                + rng.normal(size=(4000, 2)) @ np.linalg.cholesky(S + 1e-13 * np.eye(2)).T
            )
            phi = np.asarray(rbf_features(jnp.asarray(d[:, :1]), kw["centres"], kw["widths"]))
            Rg.append(np.concatenate([phi, np.full((4000, 1), u[t, 0]), np.ones((4000, 1))], 1))
            Z.append(d[:, 1:])
        ests.append(np.linalg.lstsq(np.concatenate(Rg), np.concatenate(Z), rcond=None)[0].T)
    ests = np.array(ests)
    se = ests.std(0, ddof=1) / np.sqrt(len(ests))
    z = np.abs(ests.mean(0) - W) / se
    assert np.max(z) < 5.0, np.max(z)


# ------------------------------------------------------------------------------------
# plug-in interchange, nested initialisation, reproduction
# ------------------------------------------------------------------------------------


def test_lds_fit_carries_into_rbf_model_exactly():
    """An RBF model started from an LDS fit (RBF weights zero) *is* that LDS: its first
    EKS log-likelihood equals the Kalman log-likelihood at the LDS parameters."""
    params, kw = _rbf_problem(T=100)
    lds_kw = dict(y=kw["y"], u=kw["u"], state_dim=1)
    lds_fit = EM(lds, KalmanSmoother()).run(jax.random.key(0), 5, progress_bar=False, **lds_kw)
    exact = float(KalmanSmoother().smooth(lds_fit.params, lds, **lds_kw).log_marginal)
    res = EM(rbf, ExtendedKalmanSmoother()).run(
        jax.random.key(1), 3, init=lds_fit, progress_bar=False, **kw
    )
    assert abs(res.log_marginals[0] - exact) < 1e-9 * abs(exact)
    assert res.log_marginals[-1] > res.log_marginals[0]
    with pytest.raises(ValueError, match="'C'"):
        EM(rbf, ExtendedKalmanSmoother()).run(
            jax.random.key(1), 1, init={"C": np.ones((3, 3))}, progress_bar=False, **kw
        )


def test_factor_analysis_init_beats_prior_draws():
    rng = np.random.default_rng(2)
    params, y, u = O.random_system(rng, 2, 4, 0.9, 300, du=1)
    init = factor_analysis_init(y, u, state_dim=2)
    assert init["C"].shape == (4, 2) and init["B"].shape == (2, 1)
    ll_fa = O.dense_log_marginal(init, y[:60], u[:60])
    prior = EM(lds, KalmanSmoother()).init(jax.random.key(0), y=y[:60], u=u[:60], state_dim=2)
    ll_prior = O.dense_log_marginal(
        {k: np.asarray(v) for k, v in prior.params.items()}, y[:60], u[:60]
    )
    assert ll_fa > ll_prior
    with pytest.raises(ValueError, match="y must have shape"):
        factor_analysis_init(np.zeros(5), state_dim=1)


def test_rbf_mstep_with_particle_smoother_and_tanh_rnn_with_eks():
    """The same closed-form M-step takes particle expectations for the RBF model and
    Gaussian (quadrature) expectations for the tanh-RNN; both EM runs improve the fit."""
    params, kw = _rbf_problem(T=120)
    res = EM(rbf, ParticleSmoother(num_particles=200), LinearGaussianMStep(ridge=1e-3)).run(
        jax.random.key(2), 6, init_params=params, progress_bar=False, **kw
    )
    assert res.log_marginals[-1] > res.log_marginals[0] + 10
    kw2 = dict(state_dim=2, bias=False)
    y = ppl_dyn.simulate(jax.random.key(3), tanh_rnn, WEAK, num_steps=150, obs_dim=1, **kw2)["y"]
    start = dict(WEAK, A=0.5 * np.eye(2), Q=0.3 * np.eye(2))
    res2 = EM(tanh_rnn, ExtendedKalmanSmoother()).run(
        jax.random.key(4), 8, init_params=start, progress_bar=False, y=y, **kw2
    )
    assert res2.log_marginals[-1] > res2.log_marginals[0]


def test_rbf_grid_from_state_samples():
    pts = np.random.default_rng(0).normal(size=(500, 2))
    c, w = rbf_grid(pts, 4)
    assert c.shape == (16, 2) and w.shape == (16,)
    lo, hi = np.quantile(pts, [0.01, 0.99], axis=0)
    assert np.allclose(np.min(c, 0), lo) and np.allclose(np.max(c, 0), hi)
    assert np.isclose(float(w[0]), np.max((hi - lo) / 3))
    with pytest.raises(ValueError, match="points"):
        rbf_grid(np.zeros(3), 4)
    with pytest.raises(ValueError, match="empty"):
        rbf_grid((1.0, 1.0), 4)


def test_ghahramani_reproduction_small():
    from ppl_dyn.reproduce.ghahramani import run

    r = run(seed=0, num_steps=600, lds_iters=30, rbf_iters=6)
    assert r["r2_f_lds"] < 0.93  # the linear map is a poor fit here ...
    assert r["em_iterations_to_r2_095"] is not None and r["em_iterations_to_r2_095"] <= 3
    assert r["r2_f"] >= 0.95  # ... and the RBF model finds the sigmoid
    assert r["loglik_rbf"] > r["loglik_lds"]
    assert r["test_loglik_rbf"] > r["test_loglik_lds"]
