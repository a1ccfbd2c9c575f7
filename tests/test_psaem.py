"""PSAEM and PGAS (``ppl_dyn.infer.psaem`` / ``pgas``) against independent references.

* PSAEM: the exact-EM fixed point (EM with the Kalman smoother, run to convergence from
  the same start) on a 1-d-state LDS whose free parameters (A, b, Q) are identified
  (C, d, R, m0, P0 frozen); the two step-size regimes are told apart by the spread of
  their iterates.
* PGAS: a grid posterior of the free parameter(s), with the likelihood from the dense
  joint-Gaussian oracle (tests/oracles.py), within Monte Carlo standard errors of
  independent chains; ArviZ export.
"""

import functools

import jax
import numpy as np
import numpyro
import oracles as O
import pytest
from psaem_checks import (
    FREE,
    INIT,
    assert_sa_reaches_fixed_point,
    em_fixed_point,
    run_noisy_and_sa,
)
from psaem_checks import (
    K as NUM_ITERS,
)
from scipy.special import logsumexp
from scipy.stats import invgamma

import ppl_dyn
from ppl_dyn.infer import (
    PGAS,
    PSAEM,
    GradientMStep,
    LinearGaussianMStep,
    MNIWPrior,
    step_size_schedule,
)
from ppl_dyn.models import lds

TRUE = O.scalar_lds_params()


def conditioned(free):
    return numpyro.handlers.condition(lds, {k: v for k, v in TRUE.items() if k not in free})


def data(T, seed=3):
    return O.sample_lds(np.random.default_rng(seed), TRUE, T)[1]


# --------------------------------------------------------------------------------------
# PSAEM
# --------------------------------------------------------------------------------------

PSAEM_MODEL = conditioned(FREE)  # one model object: the jitted step is cached on it


@functools.lru_cache(maxsize=None)
def _em_fixed_point(T):
    y = data(T)
    return y, em_fixed_point(PSAEM_MODEL, y)


def test_psaem_converges_to_the_exact_em_fixed_point():
    """T = 100, N = 10, 300 iterations from the EM start.

    gamma = 1 (noisy particle EM): after a transient the iterates fluctuate around the
    EM fixed point with a spread sigma_1 that does not shrink. Decaying schedule (gamma
    = 1 for 50 iterations, then (k - 50)^-0.7): the stochastic-approximation average
    removes that noise. Tolerance: the SA iterate at k = 300 averages about 1/gamma_300
    ~ 50 correlated draws; its run-to-run s.d., measured over 6 seeds, is about
    0.22 sigma_1 (theory: sigma_1 sqrt(tau gamma_K) with integrated autocorrelation
    tau ~ 2-3), so |theta_300 - theta_EM| < 0.75 sigma_1 is a ~3.4 s.d. bound, one a
    single gamma = 1 iterate (s.d. sigma_1) would miss about half the time.
    """
    y, em = _em_fixed_point(100)
    noisy, sa = run_noisy_and_sa(PSAEM_MODEL, y)
    assert np.all(noisy.step_sizes == 1.0) and sa.step_sizes[-1] < 0.03
    for name in FREE:
        # noisy EM: the spread does not shrink
        h1 = noisy.params_history[name].reshape(NUM_ITERS)
        ratio = h1[200:].std() / h1[100:200].std()
        assert 0.5 < ratio < 2.0, (name, ratio)
    assert_sa_reaches_fixed_point(noisy, sa, em)
    # frozen sites never move
    for name in ("C", "R", "d", "m0", "P0"):
        np.testing.assert_array_equal(np.asarray(sa.params[name]), TRUE[name])
    assert sa.log_marginals.shape == (NUM_ITERS,) and np.all(np.isfinite(sa.log_marginals))


@pytest.mark.slow
def test_psaem_error_shrinks_with_the_iterations():
    """Over 4 seeds the RMS distance to the EM fixed point at K = 600 is smaller than at
    K = 150 (theory: a factor sqrt(gamma_600 / gamma_150) ~ 0.55)."""
    y, em = _em_fixed_point(100)
    kw = dict(init_params=INIT, y=y, state_dim=1, progress_bar=False)
    alg = PSAEM(PSAEM_MODEL, 10, step_size=step_size_schedule(50, 0.7))
    err = {}
    for K in (150, 600):
        e = []
        for seed in range(4):
            res = alg.run(jax.random.key(10 + seed), K, **kw)
            e.append([(float(np.ravel(res.params[k])[0]) - em[k]) / abs(em[k]) for k in FREE])
        err[K] = np.sqrt(np.mean(np.square(e)))
    assert err[600] < 0.8 * err[150], err


@pytest.mark.slow
def test_psaem_names_the_site_of_a_non_finite_update():
    class BadMStep(LinearGaussianMStep):
        def update(self, stats, ss, free, **kw):
            new, floors = super().update(stats, ss, free, **kw)
            new["Q"] = new["Q"] * np.nan
            return new, floors

    y = data(20)
    with pytest.raises(FloatingPointError, match="'Q'"):
        PSAEM(PSAEM_MODEL, 4, m_step=BadMStep()).run(
            jax.random.key(0), 2, init_params=INIT, y=y, state_dim=1, progress_bar=False
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_particles=1), "num_particles"),
        (dict(num_particles=10, m_step=GradientMStep()), "m_step"),
        (dict(num_particles=10, step_size=1.5), "step_size"),
        (dict(num_particles=10, step_size=[1.0, 0.5]), "step_size"),
        (dict(num_particles=10, step_size=lambda k: 0.0), "step_size"),
    ],
)
def test_psaem_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PSAEM(PSAEM_MODEL, **kwargs).run(
            jax.random.key(0), 5, y=data(10), state_dim=1, progress_bar=False
        )


def test_step_size_schedule_values_and_validation():
    g = step_size_schedule(burn_in=3, alpha=0.7, scale=0.9)
    np.testing.assert_allclose(
        [g(k) for k in range(1, 7)], [1, 1, 1, 0.9, 0.9 * 2**-0.7, 0.9 * 3**-0.7]
    )
    for bad in (dict(alpha=0.5), dict(alpha=1.2), dict(burn_in=-1), dict(scale=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            step_size_schedule(**bad)


# --------------------------------------------------------------------------------------
# PGAS
# --------------------------------------------------------------------------------------


def _grid_posterior_A(y, prior_sd):
    """p(A | y) on a grid: dense-Gaussian likelihood times the N(0, prior_sd^2) prior."""
    grid = np.linspace(0.2, 1.4, 241)
    lp = np.array([O.dense_log_marginal({**TRUE, "A": np.array([[a]])}, y) for a in grid])
    lp = lp - 0.5 * grid**2 / prior_sd**2
    w = np.exp(lp - logsumexp(lp))
    mean = w @ grid
    return mean, np.sqrt(w @ (grid - mean) ** 2)


def test_pgas_matches_grid_posterior_and_exports_to_arviz():
    """A free (everything else frozen), T = 50 with a missing step. The MNIW prior
    A | Q ~ N(0, Q / 2) with Q = 0.5 frozen is N(0, 0.5^2): the built-in lds prior of A,
    so the reference is the grid posterior under that prior. 8 chains x 300 draws; the
    standard error comes from the spread of the chain means."""
    y = np.array(data(50))
    y[20] = np.nan
    model = conditioned(("A",))
    pgas = PGAS(model, num_particles=10, priors={"dynamics": MNIWPrior(col_precision=2.0)})
    res = pgas.run(
        jax.random.key(0),
        300,
        num_warmup=50,
        num_chains=8,
        keep_states=True,
        y=y,
        state_dim=1,
        progress_bar=False,
    )
    mean, sd = _grid_posterior_A(y, 0.5)
    A = res.samples["A"][..., 0, 0]  # (8, 300)
    se = A.mean(1).std(ddof=1) / np.sqrt(A.shape[0])
    assert abs(A.mean() - mean) < 4 * se, (A.mean(), mean, se)
    assert se < 0.1 * sd  # the check has power
    assert abs(A.std() / sd - 1) < 0.1, (A.std(), sd)
    assert res.states.shape == (8, 300, 50, 1) and set(res.samples) == {"A"}

    import arviz as az

    idata = ppl_dyn.to_inference_data(res, log_likelihood=False)
    post = idata.posterior
    assert post["A"].dims == ("chain", "draw", "state", "state_col")
    assert post["x"].dims == ("chain", "draw", "time", "state")
    assert post.sizes["chain"] == 8 and post.sizes["draw"] == 300
    np.testing.assert_array_equal(post["time"].values, np.arange(50))
    assert idata.attrs["inference_library"] == "pgas"
    summary = az.summary(idata, var_names=["A"])
    assert summary.shape[0] == 1 and summary["r_hat"].iloc[0] < 1.05


@pytest.mark.slow
def test_pgas_joint_mniw_draws_match_grid_posterior_of_A_and_Q():
    """A and Q free under the MNIW prior Q ~ IW(3, 0.1), A | Q ~ N(0, Q / 0.5): the
    marginal posterior means of A and Q against a 2-d grid of the exact likelihood."""
    y = data(40, seed=7)
    model = conditioned(("A", "Q"))
    prior = MNIWPrior(col_precision=0.5, df=3.0, scale=0.1)
    res = PGAS(model, num_particles=10, priors={"dynamics": prior}).run(
        jax.random.key(3),
        400,
        num_warmup=100,
        num_chains=8,
        y=y,
        state_dim=1,
        progress_bar=False,
    )
    a_grid = np.linspace(0.2, 1.3, 89)
    q_grid = np.linspace(0.1, 1.6, 91)
    lp = np.empty((a_grid.size, q_grid.size))
    for i, a in enumerate(a_grid):
        for j, q in enumerate(q_grid):
            p = {**TRUE, "A": np.array([[a]]), "Q": np.array([[q]])}
            lp[i, j] = O.dense_log_marginal(p, y) - 0.5 * 0.5 * a**2 / q - 0.5 * np.log(q)
    lp += invgamma.logpdf(q_grid, 1.5, scale=0.05)[None, :]  # IW(3, 0.1) in 1-d
    w = np.exp(lp - logsumexp(lp))
    for name, grid_mean in (("A", w.sum(1) @ a_grid), ("Q", w.sum(0) @ q_grid)):
        draws = res.samples[name][..., 0, 0]
        se = draws.mean(1).std(ddof=1) / np.sqrt(draws.shape[0])
        assert abs(draws.mean() - grid_mean) < 4 * se + 2e-3, (name, draws.mean(), grid_mean, se)


def test_pgas_rejects_what_it_cannot_update():
    y = data(10)
    with pytest.raises(ValueError, match="Q"):
        PGAS(lds).run(
            jax.random.key(0), 2, y=y, state_dim=1, dynamics_noise="diag", progress_bar=False
        )
    with pytest.raises(ValueError, match="priors"):
        PGAS(lds, priors={"transition": MNIWPrior()}).run(
            jax.random.key(0), 2, y=y, state_dim=1, progress_bar=False
        )
    with pytest.raises(ValueError, match="num_particles"):
        PGAS(lds, num_particles=1)
    with pytest.raises(ValueError, match="thinning"):
        PGAS(lds).run(jax.random.key(0), 2, thinning=0, y=y, state_dim=1)
