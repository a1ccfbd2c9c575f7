"""A feature map as a value (``ppl_dyn.Features``): a user's own map in a user's model
plugs into the closed-form M-step.

Oracles: the built-in ``"tanh"`` map (the same function declared by the user gives the
same statistics and update, to rounding), a Gauss-Hermite rule written here (a user's
Gaussian moments give the EKS statistics of the built-in rule), and properties of the
M-step that the declaration steers (the spectral-radius bound acts on the state columns
only, the ridge on the others); wrong declarations are refused by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import ppl_dyn
from ppl_dyn import Features, LinearStructure, Regression
from ppl_dyn.infer import EM, ExtendedKalmanSmoother, LinearGaussianMStep, ParticleSmoother

jax.config.update("jax_enable_x64", True)


def user_tanh_moments(m, P, num_nodes=64):
    """E[tanh x], E[tanh x tanh x^T], E[d tanh/dx] under N(m, P), dx = 1, by
    probabilists' Gauss-Hermite (numpy's nodes)."""
    z, w = np.polynomial.hermite_e.hermegauss(num_nodes)
    w = jnp.asarray(w / w.sum())
    x = m[0] + jnp.sqrt(P[0, 0]) * jnp.asarray(z)
    t = jnp.tanh(x)
    return (
        jnp.sum(w * t)[None],
        jnp.sum(w * t * t)[None, None],
        jnp.sum(w * (1 - t * t))[None, None],
    )


MY_TANH = Features("my_tanh", lambda x: jnp.tanh(x), elementwise=True)
MY_TANH_GH = MY_TANH._replace(name="my_tanh_gh", moments=user_tanh_moments)


def make_tanh_model(feature):
    def model(y=None, num_steps=None):
        A = numpyro.sample("A", dist.Normal(0.0, 1.0).expand([1, 1]).to_event(2))
        C = numpyro.sample("C", dist.Normal(0.0, 1.0).expand([1, 1]).to_event(2))
        q = numpyro.sample("q", dist.InverseGamma(2.0, 0.1).expand([1]).to_event(1))
        r = numpyro.sample("r", dist.InverseGamma(2.0, 0.1).expand([1]).to_event(1))
        structure = LinearStructure(
            dynamics=Regression(weight="A", noise="q", feature=feature, diagonal_noise=True),
            emission=Regression(weight="C", noise="r", diagonal_noise=True),
            init_mean="m0",
            init_cov="p0",
            diagonal_init=True,
        )
        m0 = numpyro.sample("m0", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        p0 = numpyro.sample("p0", dist.InverseGamma(2.0, 1.0).expand([1]).to_event(1))
        return ppl_dyn.markov(
            dist.Normal(m0, jnp.sqrt(p0)).to_event(1),
            lambda x, u: dist.Normal(jnp.tanh(x) @ A.T, jnp.sqrt(q)).to_event(1),
            lambda x, u: dist.Normal(x @ C.T, jnp.sqrt(r)).to_event(1),
            y=y,
            num_steps=num_steps,
            obs_dim=1,
            structure=structure,
        )

    return model


BUILTIN, USER, USER_GH = (make_tanh_model(f) for f in ("tanh", MY_TANH, MY_TANH_GH))
TRUE = dict(
    A=jnp.array([[1.5]]), C=jnp.array([[1.0]]), q=jnp.array([0.1]), r=jnp.array([0.05]),
    m0=jnp.zeros(1), p0=jnp.ones(1),
)  # fmt: skip
Y = np.asarray(ppl_dyn.simulate(jax.random.key(0), BUILTIN, TRUE, num_steps=80)["y"])
assert Y.shape == (80, 1)
START = {k: v * 0.8 if k in ("A", "q") else v for k, v in TRUE.items()}


def one_update(model, e_step, m_step=None):
    res = EM(model, e_step, m_step).run(
        jax.random.key(1), 1, init_params=START, y=Y, progress_bar=False
    )
    return res


def test_user_map_equals_builtin_with_a_particle_e_step():
    a = one_update(BUILTIN, ParticleSmoother(300))
    b = one_update(USER, ParticleSmoother(300))
    np.testing.assert_allclose(a.log_marginals, b.log_marginals, rtol=1e-12)
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=1e-10, atol=1e-12)


def test_gaussian_e_step_needs_the_maps_moments():
    with pytest.raises(ValueError, match="'my_tanh' of A has no Gaussian moments"):
        one_update(USER, ExtendedKalmanSmoother())
    # with the user's own moments: the built-in Gauss-Hermite statistics, to rounding
    a = one_update(BUILTIN, ExtendedKalmanSmoother())
    b = one_update(USER_GH, ExtendedKalmanSmoother())
    np.testing.assert_allclose(a.log_marginals, b.log_marginals, rtol=1e-12)
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(
    "features, match",
    [
        (Features("double", lambda x: 2 * x, state_columns="all"), "declares phi"),
        (
            Features("sq", lambda x: jnp.concatenate([x, x**2], -1), state_columns="last"),
            "last 1 columns",
        ),
        (Features("pair", lambda x: jnp.concatenate([x, x], -1), elementwise=True), "elementwise"),
        (Features("odd", lambda x: x, state_columns="first"), "state_columns must be"),
    ],
)
def test_wrong_declarations_are_refused(features, match):
    with pytest.raises(ValueError, match=match):
        features.check(1)
    model = make_tanh_model(features)
    with pytest.raises(ValueError, match=match):  # at the model check, before any work
        EM(model, ParticleSmoother(50)).init(jax.random.key(0), init_params=START, y=Y)


def quadratic_model(y=None, num_steps=None):
    """x_t = a2 x_{t-1}^2 + a1 x_{t-1} + noise: features [x^2; x], x in the last column."""
    A = numpyro.sample("A", dist.Normal(0.0, 1.0).expand([1, 2]).to_event(2))
    q = numpyro.sample("q", dist.InverseGamma(2.0, 0.1).expand([1]).to_event(1))
    r = numpyro.sample("r", dist.InverseGamma(2.0, 0.1).expand([1]).to_event(1))
    quad = Features("quadratic", lambda x: jnp.concatenate([x**2, x], -1), state_columns="last")
    structure = LinearStructure(
        dynamics=Regression(weight="A", noise="q", feature=quad, diagonal_noise=True),
        emission=Regression(weight="C", noise="r", diagonal_noise=True),
        init_mean="m0",
        init_cov="p0",
        diagonal_init=True,
    )
    C = numpyro.sample("C", dist.Normal(0.0, 1.0).expand([1, 1]).to_event(2))
    m0 = numpyro.sample("m0", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    p0 = numpyro.sample("p0", dist.InverseGamma(2.0, 1.0).expand([1]).to_event(1))
    return ppl_dyn.markov(
        dist.Normal(m0, jnp.sqrt(p0)).to_event(1),
        lambda x, u: dist.Normal(quad(x) @ A.T, jnp.sqrt(q)).to_event(1),
        lambda x, u: dist.Normal(x @ C.T, jnp.sqrt(r)).to_event(1),
        y=y,
        num_steps=num_steps,
        obs_dim=1,
        structure=structure,
    )


def test_bound_and_ridge_act_on_the_declared_columns():
    """The spectral-radius bound scales the state column (``x``) only; a huge ridge
    zeroes the nonlinear column (``x^2``) only."""
    true = dict(A=jnp.array([[0.1, 0.8]]), C=jnp.ones((1, 1)), q=jnp.array([0.05]),
                r=jnp.array([0.02]), m0=jnp.zeros(1), p0=jnp.ones(1))  # fmt: skip
    y = ppl_dyn.simulate(jax.random.key(3), quadratic_model, true, num_steps=150)["y"]
    assert np.shape(y) == (150, 1)
    ss, spec = ppl_dyn.bind(quadratic_model, true, y=np.asarray(y))
    post = jax.jit(lambda k: ParticleSmoother(300).posterior(k, ss, spec.y, spec.u))(
        jax.random.key(4)
    )
    stats = LinearGaussianMStep().statistics(post, ss, spec.y, spec.u)

    def A_after(m_step):  # the M-step on the same statistics
        return np.asarray(m_step.update(stats, ss, frozenset(true))[0]["A"])[0]

    free = A_after(LinearGaussianMStep())
    bounded = A_after(LinearGaussianMStep(max_spectral_radius=0.3))
    ridged = A_after(LinearGaussianMStep(ridge=1e9))
    assert abs(free[1]) > 0.5 and abs(bounded[1]) <= 0.3 + 1e-12
    assert abs(ridged[0]) < 1e-4 * abs(free[0]) and abs(ridged[1]) > 0.5
