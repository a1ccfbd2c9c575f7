"""Closed-form M-step and the EM driver against independent oracles.

Oracles: the explicit EM Q-function of tests/oracles.py (PRML 13.3 written from
smoothed moments of the dense joint Gaussian, missing observation entries treated as
latent), pykalman's EM, hand-computed pooled initial-state updates, and the ascent
property of EM. Configurations share shapes so that each compiles once.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import oracles as O
import pytest

from ppl_dyn.infer import EM, KalmanSmoother, fit_em
from ppl_dyn.models import lds

# name -> (dx, dy, T, S, du, missing fraction, noise kind, bias)
CONFIGS = {
    "single_full": (2, 3, 40, None, 0, 0.0, "full", True),
    "multi_inputs_missing": (2, 2, 25, 3, 1, 0.15, "full", True),
    "diag_missing": (3, 2, 40, None, 0, 0.1, "diag", True),
}


def noise_kwargs(kind):
    return dict(dynamics_noise=kind, emission_noise=kind, init_noise=kind)


def make_data(name, seed):
    """Data drawn from a random 'true' LDS, plus a different random starting point."""
    dx, dy, T, S, du, miss, kind, bias = CONFIGS[name]
    rng = np.random.default_rng(seed)
    truth = O.random_lds_params(rng, dx, dy, 0.9, du=du, bias=bias, **noise_kwargs(kind))
    n_seq = 1 if S is None else S
    us = [rng.normal(size=(T, du)) if du else None for _ in range(n_seq)]
    ys = [O.sample_lds(rng, truth, T, us[s])[1] for s in range(n_seq)]
    for y in ys:
        y[rng.random(y.shape) < miss] = np.nan
        if miss > 0:
            y[T // 2] = np.nan  # a whole missing step as well
    start = O.random_lds_params(rng, dx, dy, 0.5, du=du, bias=bias, **noise_kwargs(kind))
    if S is None:
        y_arg, u_arg = ys[0], us[0]
    else:
        y_arg = np.stack(ys)
        u_arg = None if du == 0 else np.stack(us)
    return dict(
        y=y_arg,
        u=u_arg,
        ys=ys,
        us=us,
        truth=truth,
        start=start,
        dx=dx,
        kw=dict(noise_kwargs(kind), bias=bias),
    )


def run_em(data, num_iters, init_params=None, model=lds, seed=0):
    kw = dict(data["kw"])
    if data["u"] is not None:
        kw["u"] = data["u"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # floor warnings are checked
        return EM(model, KalmanSmoother()).run(
            jax.random.key(seed),
            num_iters,
            y=data["y"],
            state_dim=data["dx"],
            init_params=init_params,
            progress_bar=False,
            rtol=None,
            **kw,
        )


def dense_moments(params, data):
    us = data["us"] if data["u"] is not None else [None] * len(data["ys"])
    return [O.dense_posterior(params, y, u) for y, u in zip(data["ys"], us, strict=True)]


def q_value(params, moments, data):
    us = data["us"] if data["u"] is not None else None
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    return float(O.em_q_function(jp, moments, us))


def q_grad(params, free, moments, data):
    us = data["us"] if data["u"] is not None else None
    consts = {k: jnp.asarray(v) for k, v in params.items() if k not in free}
    frees = {k: jnp.asarray(params[k]) for k in free}
    return jax.grad(lambda f: O.em_q_function({**consts, **f}, moments, us))(frees)


def n_obs(data):
    return sum(int(np.sum(~np.isnan(y))) for y in data["ys"])


def assert_stationary(grad, params, data, tol=1e-6):
    """``max|dQ/dtheta| * scale(theta) <= tol * N`` per site (dimensionless)."""
    N = n_obs(data)
    for k, g in grad.items():
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), k
        scale = max(1.0, float(np.max(np.abs(np.asarray(params[k])))))
        assert np.max(np.abs(g)) * scale <= tol * N, (k, np.max(np.abs(g)), scale, N)


def perturb(params, free, rng, eps):
    out = dict(params)
    for k in free:
        v = np.asarray(params[k], float)
        if k in ("Q", "R", "P0") and v.ndim == 2:  # congruence keeps it PD
            M = np.eye(v.shape[0]) + eps * rng.normal(size=v.shape)
            out[k] = M @ v @ M.T
        elif k in ("Q", "R", "P0"):
            out[k] = v * np.exp(eps * rng.normal(size=v.shape))
        else:
            out[k] = v + eps * max(1.0, np.max(np.abs(v))) * rng.normal(size=v.shape)
    return out


def assert_monotone(lls, what=""):
    lls = np.asarray(lls)
    assert np.all(np.isfinite(lls)), what
    drops = lls[1:] - (lls[:-1] - 1e-9 * np.abs(lls[:-1]))
    k = int(np.argmin(drops))
    assert np.all(drops >= 0), f"{what}: l[{k + 1}] = {lls[k + 1]!r} < l[{k}] = {lls[k]!r}"


# --------------------------------------------------------------------------------------
# 0. the oracle Q-function itself: Fisher's identity grad Q(theta; theta) = grad log p
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["multi_inputs_missing", "diag_missing"])
def test_oracle_q_function_satisfies_fisher_identity(name):
    data = make_data(name, seed=99)
    p = data["start"]
    g = q_grad(p, list(p), dense_moments(p, data), data)
    us = data["us"]

    def ll(q):
        return sum(O.dense_log_marginal(q, y, u) for y, u in zip(data["ys"], us, strict=True))

    rng = np.random.default_rng(0)
    for k in p:
        E = rng.normal(size=np.shape(p[k]))
        if np.ndim(p[k]) == 2 and k in ("Q", "R", "P0"):
            E = 0.5 * (E + E.T)
        h = 1e-6
        fd = (ll({**p, k: p[k] + h * E}) - ll({**p, k: p[k] - h * E})) / (2 * h)
        an = float(np.sum(np.asarray(g[k]) * E))
        assert abs(an - fd) <= 1e-6 * (1 + abs(fd)), (k, an, fd)


# --------------------------------------------------------------------------------------
# 1. EM ascent
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_em_log_marginal_is_non_decreasing(name):
    for seed in range(10):
        data = make_data(name, seed)
        res = run_em(data, 50, seed=seed)  # prior draws as the starting point
        assert res.log_marginals.shape == (50,)
        assert_monotone(res.log_marginals, f"{name} seed {seed} floors {res.floor_counts}")
        # the reported log-marginals are those of the parameters entering each iteration
        if seed == 0:
            res1 = run_em(data, 1, init_params=res.state.params, seed=seed)
            us = data["us"]
            pairs = zip(data["ys"], us, strict=True)
            ll = sum(O.dense_log_marginal(res.params, y, u) for y, u in pairs)
            assert abs(res1.log_marginals[0] - ll) <= 1e-9 * abs(ll)
            assert res1.log_marginals[0] >= res.log_marginals[-1] - 1e-9 * abs(ll)


# --------------------------------------------------------------------------------------
# 2. the M-step maximises the explicit Q-function
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mstep_zeroes_gradient_of_explicit_q_function(name):
    for seed in range(3):
        data = make_data(name, 100 + seed)
        old = data["start"]
        res = run_em(data, 1, init_params=old)
        assert all(v == 0 for v in res.floor_counts.values()), res.floor_counts
        new = {k: np.asarray(v) for k, v in res.params.items()}
        assert set(new) == set(old)
        mom = dense_moments(old, data)
        # the log-marginal reported for iteration 0 is that of the old parameters
        ll_old = sum(m["log_marginal"] for m in mom)
        assert abs(res.log_marginals[0] - ll_old) <= 1e-9 * abs(ll_old)
        grad = q_grad(new, list(new), mom, data)
        assert_stationary(grad, new, data)
        q_new, q_old = q_value(new, mom, data), q_value(old, mom, data)
        assert q_new >= q_old
        rng = np.random.default_rng(seed)
        for _ in range(10):
            for eps in (1e-3, 1e-1):
                assert q_value(perturb(new, list(new), rng, eps), mom, data) <= q_new


# --------------------------------------------------------------------------------------
# 3. frozen (conditioned) sites
# --------------------------------------------------------------------------------------

FROZEN = {
    "A": ("A",),
    "Q": ("Q",),
    "m0_P0": ("m0", "P0"),
    "m0_only": ("m0",),
}


@pytest.mark.parametrize("which", list(FROZEN))
def test_frozen_sites_unchanged_and_free_sites_zero_restricted_q_gradient(which):
    data = make_data("single_full", 200)
    frozen = {k: data["truth"][k] for k in FROZEN[which]}
    model = numpyro.handlers.condition(lds, data=frozen)
    old = {**data["start"], **frozen}
    res = run_em(data, 1, init_params=old, model=model)
    for k, v in frozen.items():
        assert np.array_equal(np.asarray(res.params[k]), v), k
        assert k not in res.state.params
    free = [k for k in old if k not in frozen]
    assert sorted(res.state.params) == sorted(free)
    new = {k: np.asarray(v) for k, v in res.params.items()}
    mom = dense_moments(old, data)
    grad = q_grad(new, free, mom, data)
    assert_stationary(grad, new, data)
    assert q_value(new, mom, data) >= q_value(old, mom, data)
    rng = np.random.default_rng(1)
    for _ in range(10):
        assert q_value(perturb(new, free, rng, 1e-2), mom, data) <= q_value(new, mom, data)
    if which in ("A", "m0_only"):
        # here the constrained optimum of the other sites differs from the unconstrained
        # one (Q given a fixed A; P0 around a fixed m0): the freezing must be honoured
        unconstrained = run_em(data, 1, init_params=old)
        assert any(
            not np.allclose(np.asarray(unconstrained.params[k]), new[k], rtol=1e-6) for k in free
        )
    # many iterations: still exactly frozen, still ascending
    res50 = run_em(data, 30, init_params=old, model=model)
    for k, v in frozen.items():
        assert np.array_equal(np.asarray(res50.params[k]), v), k
    assert_monotone(res50.log_marginals, which)


# --------------------------------------------------------------------------------------
# 4. pooling of the initial state over sequences (hand computation from the smoother)
# --------------------------------------------------------------------------------------


def _first_step_moments(params, data):
    kw = dict(data["kw"])
    post = KalmanSmoother().smooth(
        params, lds, y=data["y"], u=data["u"], state_dim=data["dx"], **kw
    )
    return np.asarray(post.means[:, 0]), np.asarray(post.covs[:, 0])


def test_initial_state_update_pools_sequences():
    data = make_data("multi_inputs_missing", 300)
    old = data["start"]
    res = run_em(data, 1, init_params=old)
    m1, P1 = _first_step_moments(old, data)
    S = m1.shape[0]
    mu = m1.mean(0)
    P0 = sum(P1[s] + np.outer(m1[s] - mu, m1[s] - mu) for s in range(S)) / S
    np.testing.assert_allclose(np.asarray(res.params["m0"]), mu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(res.params["P0"]), P0, rtol=1e-10, atol=1e-12)
    # the smoother's first-step moments themselves against the dense oracle
    for s, m in enumerate(dense_moments(old, data)):
        np.testing.assert_allclose(m1[s], m["means"][0], rtol=1e-9, atol=1e-9)


def test_initial_covariance_update_with_frozen_mean_pools_around_it():
    data = make_data("multi_inputs_missing", 301)
    m0 = data["truth"]["m0"] + 1.0
    model = numpyro.handlers.condition(lds, data={"m0": m0})
    old = {**data["start"], "m0": m0}
    res = run_em(data, 1, init_params=old, model=model)
    m1, P1 = _first_step_moments(old, data)
    S = m1.shape[0]
    P0 = sum(P1[s] + np.outer(m1[s] - m0, m1[s] - m0) for s in range(S)) / S
    np.testing.assert_allclose(np.asarray(res.params["P0"]), P0, rtol=1e-10, atol=1e-12)
    assert np.array_equal(np.asarray(res.params["m0"]), m0)


# --------------------------------------------------------------------------------------
# 5. pykalman's EM
# --------------------------------------------------------------------------------------


def test_em_log_likelihood_trajectory_matches_pykalman():
    pykalman = pytest.importorskip("pykalman")
    rng = np.random.default_rng(400)
    dx, dy, T = 2, 3, 40
    truth = O.random_lds_params(rng, dx, dy, 0.9, bias=False)
    _, y = O.sample_lds(rng, truth, T)
    start = O.random_lds_params(rng, dx, dy, 0.5, bias=False)
    kf = pykalman.KalmanFilter(
        transition_matrices=start["A"],
        observation_matrices=start["C"],
        transition_covariance=start["Q"],
        observation_covariance=start["R"],
        initial_state_mean=start["m0"],
        initial_state_covariance=start["P0"],
    )
    # every parameter our LDS (bias=False) learns, updated from one smoother pass
    em_vars = [
        "transition_matrices",
        "observation_matrices",
        "transition_covariance",
        "observation_covariance",
        "initial_state_mean",
        "initial_state_covariance",
    ]
    ref = []
    for _ in range(5):
        ref.append(kf.loglikelihood(y))
        kf = kf.em(y, n_iter=1, em_vars=em_vars)
    data = dict(y=y, u=None, dx=dx, kw=dict(bias=False))
    res = run_em(data, 5, init_params=start)
    np.testing.assert_allclose(res.log_marginals, np.asarray(ref), rtol=1e-8)
    # and the parameters after 5 iterations
    res6 = run_em(data, 5, init_params=start)
    for ours, theirs in [
        ("A", kf.transition_matrices),
        ("C", kf.observation_matrices),
        ("Q", kf.transition_covariance),
        ("R", kf.observation_covariance),
        ("m0", kf.initial_state_mean),
        ("P0", kf.initial_state_covariance),
    ]:
        np.testing.assert_allclose(
            np.asarray(res6.params[ours]), theirs, rtol=1e-6, atol=1e-9, err_msg=ours
        )


# --------------------------------------------------------------------------------------
# 6. driver plumbing and degenerate cases
# --------------------------------------------------------------------------------------


def test_fit_em_equals_em_run():
    data = make_data("single_full", 500)
    a = run_em(data, 7, init_params=data["start"], seed=3)
    b = fit_em(
        lds,
        KalmanSmoother(),
        jax.random.key(3),
        7,
        y=data["y"],
        state_dim=data["dx"],
        init_params=data["start"],
        progress_bar=False,
        rtol=None,
        **data["kw"],
    )
    np.testing.assert_array_equal(a.log_marginals, b.log_marginals)
    assert sorted(a.params) == sorted(b.params)
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]))
    assert a.num_iters == b.num_iters == 7
    # and the prior-initialised version (same key -> same draws)
    c = run_em(data, 3, seed=4)
    d = fit_em(
        lds,
        KalmanSmoother(),
        jax.random.key(4),
        3,
        y=data["y"],
        state_dim=data["dx"],
        progress_bar=False,
        **data["kw"],
    )
    np.testing.assert_array_equal(c.log_marginals, d.log_marginals)


def test_em_update_continues_run_and_returns_old_log_marginal():
    data = make_data("single_full", 501)
    res = run_em(data, 3, init_params=data["start"])
    em = EM(lds, KalmanSmoother())
    state, ll = em.update(res.state, y=data["y"], state_dim=data["dx"], **data["kw"])
    ll_ref = O.dense_log_marginal(res.params, data["y"])
    assert abs(float(ll) - ll_ref) <= 1e-9 * abs(ll_ref)
    cont = run_em(data, 4, init_params=data["start"])
    for k in state.params:
        np.testing.assert_allclose(
            np.asarray(state.params[k]), np.asarray(cont.state.params[k]), rtol=1e-12, atol=1e-14
        )


def test_rtol_stops_early_and_reports_converged():
    data = make_data("single_full", 502)
    res = run_em(data, 1, init_params=data["truth"])  # warm up shapes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = EM(lds, KalmanSmoother()).run(
            jax.random.key(0),
            500,
            y=data["y"],
            state_dim=2,
            init_params=data["truth"],
            progress_bar=False,
            rtol=1e-4,
        )
    lls = res.log_marginals
    assert res.converged and res.num_iters == len(lls) < 500
    assert abs(lls[-1] - lls[-2]) <= 1e-4 * abs(lls[-2])
    assert np.all(np.abs(np.diff(lls[:-1])) > 1e-4 * np.abs(lls[:-2]))


def test_single_sequence_learned_P0_300_iterations_no_nan():
    data = make_data("single_full", 600)
    res = run_em(data, 300, seed=6)
    assert np.all(np.isfinite(res.log_marginals))
    for k, v in res.params.items():
        assert np.all(np.isfinite(np.asarray(v))), k
    for k in ("Q", "R", "P0"):
        assert np.linalg.eigvalsh(np.asarray(res.params[k]))[0] > 0, k


@pytest.mark.parametrize("T", [1, 3])
def test_fewer_steps_than_state_dim_runs_without_nan(T):
    rng = np.random.default_rng(700)
    dx, dy = 4, 1
    truth = O.random_lds_params(rng, dx, dy, 0.9)
    _, y = O.sample_lds(rng, truth, T)
    data = dict(y=y, u=None, dx=dx, kw={})
    start = O.random_lds_params(rng, dx, dy, 0.5)
    res = run_em(data, 20, init_params=start)
    assert np.all(np.isfinite(res.log_marginals))
    for k, v in res.params.items():
        assert np.all(np.isfinite(np.asarray(v))), k
    for k in ("Q", "R", "P0"):
        assert np.linalg.eigvalsh(np.asarray(res.params[k]))[0] > 0, k
    if T == 1:  # no transitions: the dynamics sites keep their starting values
        for k in ("A", "b", "Q"):
            np.testing.assert_array_equal(np.asarray(res.params[k]), start[k], err_msg=k)


def test_the_m_step_takes_statistics_from_any_posterior_that_computes_them():
    """LinearGaussianMStep.statistics asks the posterior (its linear_statistics method):
    a user's own posterior type plugs in without an edit of the M-step, and one without
    the method is refused by name."""
    from typing import NamedTuple

    import jax
    import numpy as np
    import pytest

    import ppl_dyn
    from ppl_dyn.infer import KalmanSmoother, LinearGaussianMStep
    from ppl_dyn.models import lds

    sim = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=50, state_dim=1, obs_dim=2)
    ss, spec = ppl_dyn.bind(lds, sim["params"], y=sim["y"], state_dim=1)
    post = KalmanSmoother().posterior(None, ss, spec.y, spec.u)

    class MyPosterior(NamedTuple):
        inner: object

        def linear_statistics(self, ss, y, u, time_mask=None):
            return self.inner.linear_statistics(ss, y, u, time_mask)

    m = LinearGaussianMStep()
    ref = m.statistics(post, ss, spec.y, spec.u)
    got = m.statistics(MyPosterior(post), ss, spec.y, spec.u)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match="linear_statistics"):
        m.statistics(post._asdict(), ss, spec.y, spec.u)
