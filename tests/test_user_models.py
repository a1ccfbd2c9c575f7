"""The user-model matrix: every plug-in on models written the way a user writes them.

Each cell either checks the answer against an oracle that does not use the library
(the dense joint Gaussian for the linear-Gaussian models, quadrature on a fine grid
for the scalar-state ones, the model's equations written out with SciPy, a long
particle run where nothing exact exists) or checks that the plug-in refuses the model
at once, by name, saying which plug-in fits. The models are in ``user_models.py``;
``docs/choosing.md`` publishes the matrix. Cells that run samplers or long fits are
in the slow tier (``-m slow``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
import user_models as um
from numpyro.infer.util import log_density

import ppl_dyn
from ppl_dyn.handlers import marginalize, noncentered
from ppl_dyn.infer import (
    EM,
    PGAS,
    PSAEM,
    ExtendedKalmanSmoother,
    KalmanSmoother,
    LinearGaussianMStep,
    OnlineEM,
    PARISSmoother,
    ParticleSmoother,
    fit_sgd,
)
from ppl_dyn.requirements import UnsupportedModelError, model_kind

T = 30
NAMES = list(um.MODELS)
LG = [n for n in NAMES if um.KIND[n] == "linear-gaussian"]
NOT_LG = [n for n in NAMES if um.KIND[n] != "linear-gaussian"]
GENERAL = [n for n in NAMES if um.KIND[n] == "general"]


def tiered(cases, default):
    """``cases`` as pytest parameters, those not in ``default`` in the slow tier (the
    default run keeps one or two of each kind of model; ``-m slow`` runs the rest)."""
    out = []
    for case in cases:
        marks = () if case in default else (pytest.mark.slow,)
        out.append(pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=marks))
    return out


@functools.lru_cache(maxsize=None)
def data(name: str):
    """Simulated data with missing entries (a whole step; one entry of a vector)."""
    d = um.simulate_data(name, num_steps=T, seed=1)
    y = d["y"].copy()
    y[4] = np.nan
    if y.shape[1] > 1:
        y[9, 0] = np.nan  # partly observed step
    return y, d["u"], d["x"]


def kw(name: str) -> dict:
    y, u, _ = data(name)
    return {"y": y} if u is None else {"y": y, "u": u}


def params(name: str) -> dict:
    return {k: jnp.asarray(v) for k, v in um.TRUE_PARAMS[name].items()}


@functools.lru_cache(maxsize=None)
def oracle_log_marginal(name: str) -> float:
    y, u, _ = data(name)
    if name in LG:
        return um.dense_log_marginal(name, um.TRUE_PARAMS[name], y, u)
    if name in um.SCALAR_STATE:
        return grid(name)["log_marginal"]
    # pendulum: no exact answer; long particle filters (4 x N = 50,000: sd 0.01 here)
    from ppl_dyn.infer.particle import particle_filter

    ss, spec = ppl_dyn.bind(um.MODELS[name], params(name), **kw(name))
    run = jax.jit(lambda k: particle_filter(k, ss, spec.y[0], spec.u[0], 50_000).log_marginal)
    return float(np.mean([run(jax.random.key(100 + i)) for i in range(4)]))


@functools.lru_cache(maxsize=None)
def grid(name: str, forecast_steps: int = 0) -> dict:
    y, _, _ = data(name)
    return um.grid_smoother(name, um.TRUE_PARAMS[name], y, forecast_steps)


def test_models_are_classified_by_what_they_are():
    """The proofs of ppl_dyn.requirements sort the models as their equations say."""
    for name in NAMES:
        ss, _ = ppl_dyn.bind(um.MODELS[name], params(name), **kw(name))
        assert model_kind(ss) == um.KIND[name], name


# --------------------------------------------------------------------------------------
# Kalman and extended Kalman smoothers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_kalman_matches_dense_joint_gaussian_or_refuses(name):
    model = um.MODELS[name]
    if name in NOT_LG:
        fits = "ExtendedKalmanSmoother" if um.KIND[name] == "gaussian" else "ParticleSmoother"
        with pytest.raises(UnsupportedModelError, match=f"KalmanSmoother needs.*{fits}"):
            KalmanSmoother().smooth(params(name), model, **kw(name))
        return
    y, u, _ = data(name)
    post = KalmanSmoother().smooth(params(name), model, **kw(name))
    means, covs = um.dense_posterior(name, um.TRUE_PARAMS[name], y, u)
    np.testing.assert_allclose(float(post.log_marginal), oracle_log_marginal(name), atol=1e-8)
    np.testing.assert_allclose(np.asarray(post.means), means, atol=1e-8)
    np.testing.assert_allclose(np.asarray(post.covs), covs, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_eks_exact_on_linear_models_close_on_gaussian_ones_refuses_others(name):
    model = um.MODELS[name]
    if um.KIND[name] == "general":
        with pytest.raises(UnsupportedModelError, match="ExtendedKalmanSmoother.*ParticleSmoother"):
            ExtendedKalmanSmoother().smooth(params(name), model, **kw(name))
        return
    post = ExtendedKalmanSmoother().smooth(params(name), model, **kw(name))
    if name in LG:  # the EKS of an affine model is the Kalman smoother
        np.testing.assert_allclose(float(post.log_marginal), oracle_log_marginal(name), atol=1e-8)
    else:  # a linearisation: within half a nat of the exact / long-run value here
        assert abs(float(post.log_marginal) - oracle_log_marginal(name)) < 0.5


# --------------------------------------------------------------------------------------
# particle smoothers (any model)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", tiered(NAMES, ("local_level_input", "poisson_counts", "pendulum", "time_varying_B"))
)
def test_particle_log_marginal_within_monte_carlo_error(name):
    """log Z_hat over 8 independent filters: within 4 standard errors (plus the
    Jensen bias, var/2) of the exact value (dense / grid) or a long particle run."""
    model = um.MODELS[name]
    e_step = ParticleSmoother(num_particles=400)
    keys = jax.random.split(jax.random.key(7), 8)
    runs = np.array(
        [
            float(e_step.smooth(params(name), model, rng_key=k, **kw(name)).log_marginal)
            for k in keys
        ]
    )
    sd = runs.std(ddof=1)
    assert abs(runs.mean() - oracle_log_marginal(name)) < 4 * sd / np.sqrt(8) + sd**2 / 2 + 0.02


PATH_CASES = [(n, "ffbsi-mcmc") for n in LG + list(um.SCALAR_STATE)] + [
    ("dynamic_regression", "ffbsi"), ("poisson_counts", "ffbsi"),
    ("time_varying_B", "ffbsi-hybrid"), ("stochastic_volatility", "ffbsi-hybrid"),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, mode",
    tiered(PATH_CASES, (("dynamic_regression", "ffbsi-mcmc"), ("poisson_counts", "ffbsi-mcmc"),
                        ("dynamic_regression", "ffbsi"), ("time_varying_B", "ffbsi-hybrid"))),
)  # fmt: skip
def test_particle_paths_match_exact_smoothed_means(name, mode):
    """Backward-simulated paths (exact FFBSi, its MCMC and rejection kernels; any model):
    their mean over paths is the smoothed mean, within Monte Carlo error, of the dense
    Gaussian or the grid smoother. The rejection kernel needs a density bound: a
    Gaussian transition with state-independent noise gives it (proved from the model)."""
    y, u, _ = data(name)
    e_step = ParticleSmoother(num_particles=500, mode=mode, num_trajectories=300)
    post = e_step.smooth(params(name), um.MODELS[name], rng_key=jax.random.key(3), **kw(name))
    paths = np.asarray(post.trajectories)  # (M, T, dx)
    if name in LG:
        exact, covs = um.dense_posterior(name, um.TRUE_PARAMS[name], y, u)
        sd = np.sqrt(np.einsum("tii->ti", covs))
    else:
        exact = grid(name)["means"][:, None]
        sd = paths.std(0)
    # paths share ancestors: allow a 5x inflation of the iid standard error
    z = (paths.mean(0) - exact) / (sd / np.sqrt(paths.shape[0]))
    assert np.max(np.abs(z)) < 5 * 4, np.max(np.abs(z))


# --------------------------------------------------------------------------------------
# the plug-ins that need a declared LinearStructure refuse the others by name
# --------------------------------------------------------------------------------------

UNSTRUCTURED = [n for n in NAMES if n != "structured_lds"]


@pytest.mark.parametrize("name", UNSTRUCTURED)
def test_structure_plugins_refuse_models_without_linear_structure(name):
    model, k = um.MODELS[name], kw(name)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="LinearStructure.*GradientMStep"):
        EM(model, ParticleSmoother(num_particles=10)).run(
            key, 1, init_params=params(name), progress_bar=False, **k
        )
    with pytest.raises(ValueError, match="PSAEM needs it.*GradientMStep"):
        PSAEM(model, num_particles=10).run(key, 1, init_params=params(name), **k)
    with pytest.raises(ValueError, match="LinearStructure"):
        PARISSmoother(num_particles=10).smooth(params(name), model, rng_key=key, **k)
    with pytest.raises(ValueError, match="LinearStructure"):
        PGAS(model, num_particles=10).run(key, 1, init_params=params(name), **k)
    with pytest.raises(ValueError, match="LinearStructure"):
        OnlineEM(model, num_particles=10).run(
            key, init_params=params(name), progress_bar=False, **k
        )


def test_structured_lds_closed_form_em_climbs_the_dense_likelihood():
    """The user's declared LinearStructure gets the exact M-step: every EM iterate's
    log-likelihood equals the dense oracle's, and it never decreases."""
    name = "structured_lds"
    y, u, _ = data(name)
    start = dict(params(name), A=jnp.array([[0.5, 0.0], [0.0, 0.5]]), q=jnp.array([0.3, 0.3]))
    res = EM(um.MODELS[name], KalmanSmoother(), LinearGaussianMStep()).run(
        jax.random.key(0), 6, init_params=start, progress_bar=False, **kw(name)
    )
    lls = np.asarray(res.log_marginals)
    assert np.all(np.diff(lls) > -1e-9)
    final = {k: np.asarray(v) for k, v in res.params.items()}
    em_next = EM(um.MODELS[name], KalmanSmoother()).run(
        jax.random.key(0), 1, init_params=final, progress_bar=False, **kw(name)
    )
    dense = um.dense_log_marginal(name, final, y, u)
    np.testing.assert_allclose(float(em_next.log_marginals[0]), dense, atol=1e-8)


# --------------------------------------------------------------------------------------
# SGD and NUTS on the marginal (differentiable E-steps)
# --------------------------------------------------------------------------------------


def _log_prior(model, values: dict, k: dict) -> float:
    """Sum of the parameter sites' prior log-densities (NumPyro's own)."""
    tr = numpyro.handlers.trace(
        numpyro.handlers.substitute(numpyro.handlers.seed(model, 0), data=values)
    ).get_trace(**k)
    return float(
        sum(
            jnp.sum(s["fn"].log_prob(s["value"]))
            for n, s in tr.items()
            if s["type"] == "sample" and n in values
        )
    )


@pytest.mark.parametrize(
    "name", tiered(NAMES, [n for n in NAMES if n not in ("expand_broadcast", "structured_lds")])
)
def test_marginalize_factor_is_the_exact_log_marginal_or_refuses(name):
    """log_density of marginalize(model) = log prior + dense log p(y | theta) for the
    linear-Gaussian models; the others refuse by name (the EKS is an explicit choice)."""
    model, k = um.MODELS[name], kw(name)
    values = params(name)
    if name in NOT_LG:
        with pytest.raises(UnsupportedModelError, match="KalmanSmoother needs"):
            log_density(marginalize(model), (), k, values)
        return
    lp, _ = log_density(marginalize(model), (), k, values)
    expected = _log_prior(model, values, k) + oracle_log_marginal(name)
    np.testing.assert_allclose(float(lp), expected, atol=1e-7)


def test_marginalize_refuses_a_particle_e_step():
    with pytest.raises(ValueError, match="deterministic.*ParticleSmoother.*NUTS"):
        marginalize(um.MODELS["poisson_counts"], ParticleSmoother())


SGD_CASES = ["dynamic_regression", "time_varying_B", "pendulum", "poisson_counts"]


@pytest.mark.parametrize("name", SGD_CASES)
def test_fit_sgd_objective_is_the_exact_log_marginal_or_refuses(name):
    model, k = um.MODELS[name], kw(name)
    if name in NOT_LG:
        with pytest.raises(UnsupportedModelError, match="KalmanSmoother needs"):
            fit_sgd(model, jax.random.key(0), 1, init_params=params(name), progress_bar=False, **k)
        return
    import optax

    res = fit_sgd(
        model, jax.random.key(0), 1, init_params=params(name), optimizer=optax.sgd(0.0),
        progress_bar=False, **k,
    )  # fmt: skip
    np.testing.assert_allclose(float(res.log_marginals[0]), oracle_log_marginal(name), atol=1e-8)


# --------------------------------------------------------------------------------------
# latent-state NUTS: the density NUTS and BlackJAX sample, for any emission
# --------------------------------------------------------------------------------------


def _state_sites(x):
    """The sites markov() samples for one unbatched sequence: x_1 (1, dx), x (T-1, 1, dx)."""
    x = jnp.asarray(x)
    return {"x_1": x[:1], "x": x[1:, None, :]}


@pytest.mark.parametrize("name", NAMES)
def test_latent_state_density_equals_the_written_out_joint(name):
    """NumPyro's log_density of the model with given states (what NUTS and BlackJAX
    sample) = log prior + log p(x_1) + sum log p(x_t | x_{t-1}) + sum log p(y_t | x_t)
    with missing entries dropped, written out with SciPy."""
    model, k = um.MODELS[name], kw(name)
    y, u, x = data(name)
    values = params(name)
    lp, _ = log_density(model, (), k, {**values, **_state_sites(x)})
    init, trans, emis = um.log_joint_terms(name, um.TRUE_PARAMS[name], x, y, u)
    expected = _log_prior(model, values, k) + init + trans.sum() + emis.sum()
    np.testing.assert_allclose(float(lp), expected, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("name", ["local_level_input", "pendulum", "stochastic_volatility"])
def test_noncentered_density_is_standard_normal_innovations_times_emission(name):
    """noncentered(model) at the innovations of given states: the states come back
    exactly, and the density is N(z; 0, I) times the written-out emission terms."""
    from ppl_dyn.state_space import innovations_from_states

    model, k = um.MODELS[name], kw(name)
    y, u, x = data(name)
    values = params(name)
    ss, spec = ppl_dyn.bind(model, values, **k)
    z = innovations_from_states(spec, jnp.asarray(x))
    lp, tr = log_density(noncentered(model), (), k, {**values, "x_innovations": z})
    np.testing.assert_allclose(np.asarray(tr["x_1"]["value"])[0], x[0], atol=1e-10)
    np.testing.assert_allclose(np.asarray(tr["x"]["value"])[:, 0], x[1:], atol=1e-10)
    _, _, emis = um.log_joint_terms(name, um.TRUE_PARAMS[name], x, y, u)
    std_normal = -0.5 * np.sum(np.asarray(z) ** 2) - 0.5 * z.size * np.log(2 * np.pi)
    expected = _log_prior(model, values, k) + std_normal + emis.sum()
    np.testing.assert_allclose(float(lp), expected, rtol=1e-10, atol=1e-8)


def test_joint_emission_with_partly_missing_rows_is_refused_by_name():
    """A joint non-Gaussian emission has no marginal over a subset of entries."""
    import numpyro.distributions as dist

    def model(y=None, *, num_steps=None):
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        return ppl_dyn.markov(
            dist.Normal(0.0, 1.0).expand([2]).to_event(1),
            lambda x, u: dist.Normal(x, s).to_event(1),
            lambda x, u: dist.MultivariateStudentT(4.0, x, jnp.eye(2)),
            y=y, num_steps=num_steps, obs_dim=2,
        )  # fmt: skip

    y = np.zeros((5, 2))
    y[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"y\[0, 2\] is partly missing.*MultivariateStudentT"):
        log_density(
            model, (), {"y": y}, {"s": 1.0, "x_1": jnp.zeros((1, 2)), "x": jnp.zeros((4, 1, 2))}
        )


# --------------------------------------------------------------------------------------
# results: ArviZ export, posterior predictive, forecasts
# --------------------------------------------------------------------------------------


def _draws(name: str, num_draws: int = 2, with_states: bool = False) -> dict:
    """A dict of draws (1 chain) at the true parameters (and the simulated states)."""
    out = {k: jnp.broadcast_to(v, (1, num_draws) + v.shape) for k, v in params(name).items()}
    if with_states:
        _, _, x = data(name)
        for k, v in _state_sites(x).items():
            out[k] = jnp.broadcast_to(v, (1, num_draws) + v.shape)
    return out


@pytest.mark.parametrize("name", ["dynamic_regression", "expand_broadcast", "poisson_counts"])
def test_inference_data_log_likelihood_for_parameter_draws(name):
    """Per-step one-step-ahead log-densities that sum to the exact log p(y | theta)
    (linear-Gaussian), or to the particle filter's estimate (within Monte Carlo error
    of the grid value) where no Gaussian smoother applies."""
    idata = ppl_dyn.to_inference_data(_draws(name), model=um.MODELS[name], **kw(name))
    ll = idata.log_likelihood["y"].values  # (chain, draw, time)
    assert ll.shape == (1, 2, T)
    total = ll.sum(-1)[0, 0]
    if name in LG:
        np.testing.assert_allclose(total, oracle_log_marginal(name), atol=1e-8)
    else:
        assert abs(total - oracle_log_marginal(name)) < 0.5


@pytest.mark.parametrize("name", ["bernoulli_series", "expand_broadcast"])
def test_inference_data_log_likelihood_for_state_draws(name):
    """Latent-state draws: log p(y_t | x_t, theta) at the sampled states, from the
    model's own emission (SciPy's written-out terms)."""
    y, u, x = data(name)
    idata = ppl_dyn.to_inference_data(
        _draws(name, with_states=True), model=um.MODELS[name], **kw(name)
    )
    _, _, emis = um.log_joint_terms(name, um.TRUE_PARAMS[name], x, y, u)
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0, 0], emis, atol=1e-10)
    assert idata.posterior["x"].dims == ("chain", "draw", "time", "state")


@pytest.mark.parametrize("name", ["time_varying_B", "poisson_counts"])
def test_forecast_mean_matches_exact_forecast(name):
    """Forecasts from the model's own distributions: the mean of 4,000 paths is the
    exact E[y_{T+k} | y] (dense Gaussian / grid) within 4 standard errors."""
    y, u, _ = data(name)
    k = 3
    u_future = None if u is None else np.linspace(-0.5, 0.5, k)[:, None]
    bands = ppl_dyn.forecast(
        jax.random.key(5), _draws(name, 1), k, model=um.MODELS[name], u_future=u_future,
        num_paths=4000, **kw(name),
    )  # fmt: skip
    sims = bands.samples[0]  # (paths, k, dy)
    if name in LG:
        exact = um.dense_forecast_mean(name, um.TRUE_PARAMS[name], y, u, k, u_future)
    else:
        exact = grid(name, k)["forecast_means"][:, None]
    se = sims.std(0) / np.sqrt(sims.shape[0])
    assert np.max(np.abs((sims.mean(0) - exact) / se)) < 4


@pytest.mark.parametrize("name", ["dynamic_regression", "bernoulli_series"])
def test_posterior_predictive_mean_matches_exact_smoothed_mean(name):
    y, u, _ = data(name)
    bands = ppl_dyn.posterior_predictive(
        jax.random.key(6), _draws(name, 1), model=um.MODELS[name], num_paths=3000, **kw(name)
    )
    sims = bands.samples[0]  # (paths, T, dy)
    if name in LG:
        means, _ = um.dense_posterior(name, um.TRUE_PARAMS[name], y, u)
        m0, P0, F, c, Q, H, e, R = um.lgssm_matrices(name, um.TRUE_PARAMS[name], u, T)
        exact = np.einsum("tij,tj->ti", H, means) + e
        se = sims.std(0) / np.sqrt(sims.shape[0])
        assert np.max(np.abs((sims.mean(0) - exact) / se)) < 4.5
    else:  # paths from a particle smoother: its own Monte Carlo error on top
        exact = grid(name)["y_means"][:, None]
        assert np.max(np.abs(sims.mean(0) - exact)) < 0.12


# --------------------------------------------------------------------------------------
# a declared LinearStructure is checked against the distributions, not trusted
# --------------------------------------------------------------------------------------


def _structured_variant(emission_scale=None, poisson=False):
    """structured_lds with a user error: the emission's noise written as a standard
    deviation where the declaration says variance, or a Poisson emission."""
    import numpyro.distributions as dist

    from ppl_dyn import LinearStructure, Regression

    def model(y=None, *, u=None, num_steps=None, num_sequences=None):
        A = numpyro.sample("A", dist.Normal(0.0, 0.3).expand([2, 2]).to_event(2))
        C = numpyro.sample("C", dist.Normal(0.0, 1.0).expand([1, 2]).to_event(2))
        q = numpyro.sample("q", dist.InverseGamma(2.0, 0.1).expand([2]).to_event(1))
        r = numpyro.sample("r", dist.InverseGamma(2.0, 0.1).expand([1]).to_event(1))
        m0 = numpyro.sample("m0", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        p0 = numpyro.sample("p0", dist.InverseGamma(2.0, 1.0).expand([2]).to_event(1))
        st = LinearStructure(
            dynamics=Regression(weight="A", noise="q", diagonal_noise=True),
            emission=Regression(weight="C", noise="r", diagonal_noise=True),
            init_mean="m0", init_cov="p0", diagonal_init=True,
        )  # fmt: skip

        def emission(x, u_t):
            if poisson:
                return dist.Poisson(jnp.exp(x @ C.T)).to_event(1)
            return dist.Normal(x @ C.T, r if emission_scale == "sd" else jnp.sqrt(r)).to_event(1)

        return ppl_dyn.markov(
            dist.Normal(m0, jnp.sqrt(p0)).to_event(1),
            lambda x, u_t: dist.Normal(x @ A.T, jnp.sqrt(q)).to_event(1),
            emission, y=y, u=u, num_steps=num_steps, num_sequences=num_sequences,
            obs_dim=1, structure=st,
        )  # fmt: skip

    return model


@pytest.mark.parametrize("error", ["sd", "poisson"])
def test_declared_structure_that_does_not_match_the_model_is_refused(error):
    model = _structured_variant("sd" if error == "sd" else None, poisson=error == "poisson")
    y = np.abs(np.random.default_rng(0).normal(size=(20, 1))).round()
    start = {
        "A": 0.5 * np.eye(2), "C": np.ones((1, 2)), "q": np.full(2, 0.1), "r": np.full(1, 0.3),
        "m0": np.zeros(2), "p0": np.ones(2),
    }  # fmt: skip
    match = "emission covariance differs" if error == "sd" else "emission \\(Poisson\\) is not"
    with pytest.raises(ValueError, match=match):
        EM(model, ParticleSmoother(num_particles=10)).run(
            jax.random.key(0), 1, y=y, init_params=start, progress_bar=False
        )
    with pytest.raises(ValueError, match=match):  # PaRIS accumulates the declared ones
        PARISSmoother(num_particles=10).smooth(start, model, y=y, rng_key=jax.random.key(0))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(model="lds", state_dim=2),
        dict(model="lds", state_dim=2, dynamics_noise="diag", emission_noise="diag",
             init_noise="diag", bias=False),
        dict(model="lds", state_dim=2, inputs=True),
        dict(model="tanh_rnn", state_dim=2, inputs=True),
        dict(model="rbf", state_dim=1, centres=np.linspace(-2, 2, 4)[:, None],
             widths=np.full(4, 1.0)),
    ],
)  # fmt: skip
def test_builtin_declarations_match_their_distributions(kwargs):
    """The built-in models skip the run-time check (is_builtin_model): their
    declarations are verified here, for every option."""
    from ppl_dyn import models
    from ppl_dyn.infer.mstep import verify_structure
    from ppl_dyn.state_space import inspect_model

    kwargs = dict(kwargs)
    model = getattr(models, kwargs.pop("model"))
    rng = np.random.default_rng(0)
    if kwargs.pop("inputs", False):
        kwargs["u"] = rng.normal(size=(15, 2))
    info = inspect_model(model, rng_key=jax.random.key(3), y=rng.normal(size=(15, 2)), **kwargs)
    verify_structure(info)


# --------------------------------------------------------------------------------------
# the rest of the matrix: gradient M-step, predict, ArviZ, samplers (slow tier)
# --------------------------------------------------------------------------------------


def test_builtin_lds_with_diagonal_noise_latent_density_equals_the_written_out_joint():
    """The built-in LDS with diagonal noise under latent-state NUTS (it used to fail with
    a broadcast error): its density is the sum of the written-out Gaussian terms."""
    import oracles as O
    from scipy import stats as sps

    from ppl_dyn.models import lds

    rng = np.random.default_rng(2)
    p = O.random_lds_params(rng, 2, 2, 0.8, bias=True)
    p = {**p, "Q": np.diag(p["Q"]), "R": np.diag(p["R"]), "P0": np.diag(p["P0"])}
    k = dict(state_dim=2, dynamics_noise="diag", emission_noise="diag", init_noise="diag")
    sim = ppl_dyn.simulate(jax.random.key(0), lds, p, num_steps=12, obs_dim=2, **k)
    y, x = np.array(sim["y"]), np.asarray(sim["x"])
    y[3, 1] = np.nan
    values = {kk: jnp.asarray(v) for kk, v in p.items()}
    lp, _ = log_density(lds, (), dict(y=y, **k), {**values, **_state_sites(x)})
    expected = _log_prior(lds, values, dict(y=y, **k))
    expected += sps.multivariate_normal.logpdf(x[0], p["m0"], np.diag(p["P0"]))
    for t in range(1, 12):
        mean = p["A"] @ x[t - 1] + p["b"]
        expected += sps.multivariate_normal.logpdf(x[t], mean, np.diag(p["Q"]))
    for t in range(12):
        o = ~np.isnan(y[t])
        mean = p["C"] @ x[t] + p["d"]
        expected += np.sum(sps.norm.logpdf(y[t][o], mean[o], np.sqrt(p["R"][o])))
    np.testing.assert_allclose(float(lp), expected, rtol=1e-10)


@pytest.mark.parametrize(
    "name, e_step",
    tiered([("local_level_input", "kalman"), ("state_dependent_noise", "eks"),
            ("poisson_counts", "particle")], [("local_level_input", "kalman")]),
)  # fmt: skip
def test_gradient_mstep_climbs_the_exact_likelihood(name, e_step):
    """EM with GradientMStep, fed by the paths each E-step can draw (exact FFBS from the
    Kalman smoother, the EKS's Gauss-Markov approximation, FFBSi-MCMC particles): the
    exact log-likelihood (dense / grid) of the fit beats that of the start by > 1 nat."""
    from ppl_dyn.infer import GradientMStep

    y, u, _ = data(name)
    start = dict(um.TRUE_PARAMS[name])
    bad = {"local_level_input": ("r", 1.0), "state_dependent_noise": ("r", 1.5),
           "poisson_counts": ("sigma", 1.2)}[name]  # fmt: skip
    start[bad[0]] = bad[1]
    e = {
        "kalman": KalmanSmoother(),
        "eks": ExtendedKalmanSmoother(),
        "particle": ParticleSmoother(num_particles=200, mode="ffbsi-mcmc", num_trajectories=50),
    }[e_step]
    res = EM(um.MODELS[name], e, GradientMStep(num_steps=30, learning_rate=0.05)).run(
        jax.random.key(0), 8, init_params=start, progress_bar=False, **kw(name)
    )
    fit = {k: np.asarray(v) for k, v in res.params.items()}

    def exact(p):
        if name in LG:
            return um.dense_log_marginal(name, p, y, u)
        return um.grid_smoother(name, p, y)["log_marginal"]

    assert exact(fit) > exact(start) + 1.0, (exact(start), exact(fit))


@pytest.mark.parametrize("name", tiered(["time_varying_B", "poisson_counts"], ["time_varying_B"]))
def test_predict_one_step_means_match_exact_predictions(name):
    """ppl_dyn.predict's one-step-ahead means against the exact E[y_{t+1} | y_{1:t}]
    (dense Gaussian / grid): the Kalman filter (chosen for the linear-Gaussian model)
    to 1e-8 by the rollout, its simulated paths and the particle filter (counts) within
    Monte Carlo error."""
    y, u, _ = data(name)
    exact = []
    for t in range(1, T):
        if name in LG:
            exact.append(um.dense_forecast_mean(name, um.TRUE_PARAMS[name], y[:t], u[:t], 1,
                                                u[t:t + 1])[0, 0])  # fmt: skip
        else:
            exact.append(um.grid_smoother(name, um.TRUE_PARAMS[name], y[:t], 1)[
                "forecast_means"][0])  # fmt: skip
    exact = np.array(exact)
    for method in ("rollout", "particles"):
        pred = ppl_dyn.predict(
            params(name), um.MODELS[name], horizons=(1,), rng_key=jax.random.key(4),
            num_particles=4000, method=method, **kw(name),
        )  # fmt: skip
        got = np.asarray(pred.mean[1])[:-1, 0]  # predicts y_{t+1}, t = 0..T-2
        if name in LG:
            assert pred.filter == "kalman"
            np.testing.assert_allclose(float(pred.log_marginal), oracle_log_marginal(name),
                                       atol=1e-8)  # fmt: skip
            tol = 1e-8 if method == "rollout" else 0.05
        else:
            assert pred.filter == "particle"
            tol = 0.1 * max(1.0, np.max(np.abs(exact)))
        assert np.max(np.abs(got - exact)) < tol, (method, np.max(np.abs(got - exact)))


def test_predict_warns_when_the_particle_filter_collapses():
    """A fit with a tiny observation noise: every particle but one is impossible. The
    Kalman filter (the default for this linear model) is exact; a particle filter
    forced on it warns and says what to do."""
    name = "local_level_input"
    p = dict(params(name), r=jnp.asarray(1e-5))
    pred = ppl_dyn.predict(p, um.MODELS[name], horizons=(1,), rng_key=jax.random.key(0),
                           **kw(name))  # fmt: skip
    assert pred.filter == "kalman" and np.isfinite(float(pred.log_marginal))
    with pytest.warns(UserWarning, match="degenerated.*Increase num_particles"):
        ppl_dyn.predict(p, um.MODELS[name], horizons=(1,), rng_key=jax.random.key(0),
                        e_step=ParticleSmoother(), num_particles=200, **kw(name))  # fmt: skip


def test_arviz_summary_loo_plots_on_user_model_draws():
    """az.summary, az.loo, az.plot_ts and az.plot_ppc on a count model's export (two
    chains of parameter draws): LOO sums the one-step-ahead terms, the plots find the
    posterior predictive and the forecasts; a one-draw EM export is refused by az.loo."""
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    name = "poisson_counts"
    rng = np.random.default_rng(0)
    draws = {
        k: jnp.asarray(v + 0.02 * rng.normal(size=(2, 4) + np.shape(v)))
        for k, v in um.TRUE_PARAMS[name].items()
    }
    y = um.simulate_data(name, num_steps=T, seed=1)["y"]  # complete: az.plot_ppc's
    # histograms of discrete data do not take missing (NaN) observations
    idata = ppl_dyn.to_inference_data(
        draws, model=um.MODELS[name], posterior_predictive=True, forecast_steps=3,
        rng_key=jax.random.key(0), coords={"time": np.arange(100, 100 + T)}, y=y,
    )  # fmt: skip
    assert list(idata.observed_data["y"].coords["time"].values[:2]) == [100, 101]
    assert az.summary(idata, var_names=["phi", "sigma"]).shape[0] == 2
    with pytest.warns(UserWarning):  # 8 draws: ArviZ warns about the Pareto k estimates
        loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)
    az.plot_ts(idata, y="y", y_hat="y", y_forecasts="y_forecast", plot_dim="time",
               holdout_dim="forecast_time", num_samples=8)  # fmt: skip
    az.plot_ppc(idata, num_pp_samples=8)
    matplotlib.pyplot.close("all")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["local_level_input", "poisson_counts"])
def test_latent_nuts_numpyro_and_blackjax_agree_with_each_other_and_the_marginal(name):
    """Latent-state NUTS by NumPyro and by BlackJAX (run_blackjax) on the same user model:
    posterior means of the parameters agree within 5 Monte Carlo standard errors, and for
    the linear-Gaussian model with NUTS on the exact marginal (states integrated out)."""
    import arviz as az
    from numpyro.infer import MCMC, NUTS

    from ppl_dyn.mcmc import run_blackjax

    model, k = um.MODELS[name], kw(name)
    runs = {}
    m = MCMC(NUTS(model), num_warmup=500, num_samples=1000, num_chains=2,
             chain_method="sequential", progress_bar=False)  # fmt: skip
    m.run(jax.random.key(1), **k)
    runs["numpyro"] = m.get_samples(group_by_chain=True)
    bj = run_blackjax(jax.random.key(2), model, num_warmup=500, num_samples=1000,
                      num_chains=2, **k)  # fmt: skip
    runs["blackjax"] = bj.samples
    if name in LG:
        mm = MCMC(NUTS(marginalize(model)), num_warmup=500, num_samples=1000, num_chains=2,
                  chain_method="sequential", progress_bar=False)  # fmt: skip
        mm.run(jax.random.key(3), **k)
        runs["marginal"] = mm.get_samples(group_by_chain=True)
    site = {"local_level_input": "phi", "poisson_counts": "mu"}[name]
    stats = {}
    for key, s in runs.items():
        v = np.asarray(s[site])
        stats[key] = (v.mean(), float(az.mcse(az.convert_to_dataset(v[..., None]))["x"].values[0]))
    ref_mean, ref_se = stats["numpyro"]
    for key, (mean, se) in stats.items():
        assert abs(mean - ref_mean) < 5 * np.hypot(se, ref_se), (key, stats)
