"""CPF-AS (``ppl_dyn.infer.cpf``) against independent oracles.

Oracles: the dense joint-Gaussian LDS posterior (tests/oracles.py: numpy conditioning,
no Kalman code), a numpy genealogy tracer (tests/particle_oracles.py), scipy Gaussian
log-densities for the likelihood trace, and the sufficient statistics of every ancestral
path written out in numpy. Statistical checks use independent chains (standard errors
from the spread of chain means); a negative control (wrong ancestor-sampling weights) is
marked ``slow``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import oracles as O
import particle_oracles as PO
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

import ppl_dyn.infer.cpf as cpf_mod
from ppl_dyn.infer import LinearGaussianMStep
from ppl_dyn.infer.cpf import ancestral_paths, conditional_particle_filter, path_posterior
from ppl_dyn.models import lds
from ppl_dyn.state_space import bind

PARAMS = O.scalar_lds_params()


def data(T, seed=3, missing=(7, 8)):
    _, y = O.sample_lds(np.random.default_rng(seed), PARAMS, T)
    y = np.array(y)
    y[list(missing)] = np.nan
    return y


# --------------------------------------------------------------------------------------
# 1. invariance: a long CPF-AS chain at small N has the smoothing marginals
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _chain_runner(T, N, K):
    y = data(T)

    @jax.jit
    def run(keys, ancestor_sampling):
        ss, spec = bind(lds, PARAMS, y=y, state_dim=1)

        def one(key):
            def body(carry, k):
                ref, first = carry
                out = conditional_particle_filter(
                    k,
                    ss,
                    spec.y[0],
                    spec.u[0],
                    ref,
                    N,
                    conditional=~first,
                    ancestor_sampling=ancestor_sampling,
                )
                return (out.reference, jnp.asarray(False)), out.reference[:, 0]

            init = (jnp.zeros((T, 1)), jnp.asarray(True))
            return jax.lax.scan(body, init, jax.random.split(key, K))[1]

        return jax.vmap(one)(keys)

    return y, run


def _chain_z_scores(xs, ref, burn):
    """z-scores of the chain-averaged means and variances against the oracle; the
    standard errors come from the spread of the independent chains' averages."""
    xs = xs[:, burn:]  # (M, K', T)
    M = xs.shape[0]
    m, P = ref["means"][:, 0], ref["covs"][:, 0, 0]
    chain_mean = xs.mean(1)
    chain_var = ((xs - m) ** 2).mean(1)  # E[(x_t - m_t)^2] = P_t under the target
    se_m = chain_mean.std(0, ddof=1) / np.sqrt(M)
    se_v = chain_var.std(0, ddof=1) / np.sqrt(M)
    z = np.concatenate([(chain_mean.mean(0) - m) / se_m, (chain_var.mean(0) - P) / se_v])
    return z, se_m, se_v


def test_cpf_as_chain_matches_dense_posterior_at_five_particles():
    """N = 5, T = 30 (two missing observations), 32 chains x 600 sweeps: the marginal
    means and variances of the reference paths agree with the dense-Gaussian smoother
    (60 z-scores, each ~ t_31 under the null). Without ancestor sampling the same kernel
    is still invariant but mixes far worse at early times (path degeneracy)."""
    T, N, K, M = 30, 5, 600, 32
    y, run = _chain_runner(T, N, K)
    ref = O.dense_posterior(PARAMS, y)
    keys = jax.random.split(jax.random.key(0), M)
    xs = np.asarray(run(keys, True))
    z, se_m, se_v = _chain_z_scores(xs, ref, burn=50)
    assert np.max(np.abs(z)) < 4.5, np.max(np.abs(z))
    assert np.mean(z**2) < 2.0, np.mean(z**2)
    # power: the test resolves biases of a few hundredths of a posterior s.d.
    sd = np.sqrt(ref["covs"][:, 0, 0])
    assert np.max(se_m / sd) < 0.06 and np.max(se_v / sd**2) < 0.1
    # plain CPF (no ancestor sampling): the early states are rarely renewed, so the
    # chain averages scatter much more than with CPF-AS (same number of sweeps)
    xs_plain = np.asarray(run(keys, False))
    _, se_m_plain, _ = _chain_z_scores(xs_plain, ref, burn=50)
    renewed = lambda a: np.mean(a[:, 51:, 0] != a[:, 50:-1, 0])  # noqa: E731 - x_1 moves
    assert se_m_plain[0] > 3 * se_m[0], (se_m_plain[0], se_m[0])
    assert renewed(xs_plain) < 0.05 < 0.4 < renewed(xs), (renewed(xs_plain), renewed(xs))


@pytest.mark.slow
def test_wrong_ancestor_weights_are_detected(monkeypatch):
    """Negative control: drawing the reference's ancestor from Cat(w_{t-1}) alone
    (dropping p(x'_t | x_{t-1}^j)) breaks invariance, and the z-test above sees it."""
    T, N, K, M = 30, 5, 600, 32
    orig = cpf_mod.pairwise_transition_log_prob
    monkeypatch.setattr(cpf_mod, "pairwise_transition_log_prob", lambda *a: 0.0 * orig(*a))
    y = data(T)
    _chain_runner.cache_clear()
    try:
        _, run = _chain_runner(T, N, K)
        xs = np.asarray(run(jax.random.split(jax.random.key(0), M), True))
    finally:
        _chain_runner.cache_clear()
    z, _, _ = _chain_z_scores(xs, O.dense_posterior(PARAMS, y), burn=50)
    assert np.max(np.abs(z)) > 10, np.max(np.abs(z))


# --------------------------------------------------------------------------------------
# 2. one sweep: the reference slot, genealogy, likelihood trace and path statistics
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _one_sweep(T, N):
    y = data(T, seed=5, missing=(4,))

    @jax.jit
    def run(key, reference, conditional):
        ss, spec = bind(lds, PARAMS, y=y, state_dim=1)
        out = conditional_particle_filter(
            key, ss, spec.y[0], spec.u[0], reference, N, conditional=conditional
        )
        post = jax.tree_util.tree_map(lambda a: a[None], path_posterior(out, lambda x: x))
        stats = LinearGaussianMStep().statistics(post, ss, spec.y, spec.u)
        return out, ancestral_paths(out.particles, out.ancestors), stats

    return y, run


def test_sweep_keeps_the_reference_and_traces_ancestry_like_numpy():
    T, N = 12, 7
    y, run = _one_sweep(T, N)
    reference = np.linspace(-1.0, 1.0, T)[:, None]
    out, paths, stats = run(jax.random.key(1), jnp.asarray(reference), jnp.asarray(True))
    X = np.asarray(out.particles)
    anc = np.asarray(out.ancestors)
    np.testing.assert_array_equal(X[:, N - 1], reference)  # the reference stays in slot N-1
    assert anc.min() >= 0 and anc.max() < N
    np.testing.assert_array_equal(anc[0], np.arange(N))
    idx = PO.genealogy_indices(anc)  # numpy genealogy
    np.testing.assert_array_equal(np.asarray(paths), X[np.arange(T)[:, None], idx])
    k = int(out.reference_index)
    np.testing.assert_array_equal(np.asarray(out.reference), X[np.arange(T), idx[:, k]])
    lw = np.asarray(out.log_weights)
    np.testing.assert_allclose(logsumexp(lw, axis=1), 0.0, atol=1e-12)
    # likelihood trace: sum_t log mean_i g(y_t | x_t^i), the missing step contributes 0
    g = norm.logpdf(y[:, :1], X[..., 0] * 1.0 - 0.2, np.sqrt(0.5))  # (T, N)
    g[4] = 0.0
    want = np.sum(logsumexp(g, axis=1) - np.log(N))
    np.testing.assert_allclose(float(out.log_marginal), want, rtol=1e-12)
    # the weights at t are g(y_t | x_t^i) normalised (resampling at every step)
    np.testing.assert_allclose(lw, g - logsumexp(g, axis=1, keepdims=True), atol=1e-12)
    # the path statistics are sum_i w_T^i s(x^i_{1:T}) written out per path
    w = np.exp(lw[-1])
    P = np.asarray(paths)[..., 0]  # (T, N)
    Ey = np.where(np.isnan(y[:, :1]), P - 0.2, y[:, :1])  # E[y_t | x_t] where missing
    Eyy = Ey**2 + np.where(np.isnan(y[:, :1]), 0.5, 0.0)
    r_dyn = np.stack([P[:-1], np.ones_like(P[:-1])], -1)  # (T-1, N, 2)
    r_emi = np.stack([P, np.ones_like(P)], -1)
    want = {
        "dyn_zr": np.einsum("n,tn,tnk->k", w, P[1:], r_dyn),
        "dyn_rr": np.einsum("n,tnj,tnk->jk", w, r_dyn, r_dyn),
        "dyn_zz": np.einsum("n,tn->", w, P[1:] ** 2),
        "emi_zr": np.einsum("n,tn,tnk->k", w, Ey, r_emi),
        "emi_rr": np.einsum("n,tnj,tnk->jk", w, r_emi, r_emi),
        "emi_zz": np.einsum("n,tn->", w, Eyy),
        "init_m": w @ P[0],
        "init_mm": w @ P[0] ** 2,
    }
    got = {
        "dyn_zr": stats.dynamics.S_zr[0],
        "dyn_rr": stats.dynamics.S_rr,
        "dyn_zz": stats.dynamics.S_zz[0, 0],
        "emi_zr": stats.emission.S_zr[0],
        "emi_rr": stats.emission.S_rr,
        "emi_zz": stats.emission.S_zz[0, 0],
        "init_m": stats.init.sum_m[0],
        "init_mm": stats.init.sum_mm[0, 0],
    }
    for name, v in want.items():
        np.testing.assert_allclose(np.asarray(got[name]), v, rtol=1e-10, err_msg=name)
    assert float(stats.dynamics.n) == T - 1 and float(stats.emission.n) == T


def test_unconditional_sweep_ignores_the_reference():
    """conditional=False is a bootstrap filter: the reference never enters (a reference
    at 1e6 would dominate nothing), and all ancestors are ordinary draws."""
    T, N = 12, 7
    _, run = _one_sweep(T, N)  # shares the compilation of the test above
    a = run(jax.random.key(2), jnp.asarray(np.zeros((T, 1))), jnp.asarray(False))[0]
    b = run(jax.random.key(2), jnp.asarray(np.full((T, 1), 1e6)), jnp.asarray(False))[0]
    np.testing.assert_array_equal(np.asarray(a.particles), np.asarray(b.particles))
    assert np.all(np.abs(np.asarray(a.particles)) < 1e3)
    # conditional: the reference enters slot N - 1
    c = run(jax.random.key(2), jnp.asarray(np.full((T, 1), 1e6)), jnp.asarray(True))[0]
    assert np.all(np.asarray(c.particles)[:, N - 1] == 1e6)


def test_conditional_filter_rejects_one_particle():
    with pytest.raises(ValueError, match="num_particles"):
        conditional_particle_filter(jax.random.key(0), None, None, None, None, 1)
