"""MAP-EM (``LinearGaussianMStep(map_estimate=True)``): EM on the log posterior with the
model's own conjugate priors.

Oracles: the dense joint Gaussian for ``log p(y | theta)`` (tests/oracles.py), SciPy's
densities for the priors (``norm``, ``invwishart``, ``invgamma``), and SciPy's
optimiser on their sum, which never sees the Kalman filter or the M-step."""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from oracles import dense_log_marginal
from scipy import optimize, stats

import ppl_dyn
from ppl_dyn.infer import EM, KalmanSmoother, LinearGaussianMStep
from ppl_dyn.models import lds
from ppl_dyn.requirements import UnsupportedModelError

MAP = LinearGaussianMStep(map_estimate=True)


def scipy_log_prior(p, dx, dy, diag=False):
    """The priors lds writes (docs/models.md), as SciPy densities."""
    lp = stats.norm(0, 0.5 / np.sqrt(dx)).logpdf(p["A"]).sum()
    for k in ("C", "b", "d", "m0"):
        lp += stats.norm(0, 1).logpdf(p[k]).sum()
    for k, dim, scale in (("Q", dx, 0.1), ("R", dy, 0.1), ("P0", dx, 1.0)):
        v = np.asarray(p[k], float)
        if diag and k == "R":
            lp += stats.invgamma(2.0, scale=scale).logpdf(v).sum()
        else:
            lp += stats.invwishart(dim + 2.0, scale * np.eye(dim)).logpdf(
                v if dim > 1 else v.item()
            )
    return float(lp)


def test_log_prior_is_the_models_prior_density():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(20, 2))
    res = EM(lds, KalmanSmoother(), MAP).run(
        jax.random.key(0), 3, y=y, state_dim=2, progress_bar=False
    )
    # log_priors[k] is at the parameters entering iteration k: rerun one step from the end
    em = EM(lds, KalmanSmoother(), MAP)
    free = {k: v for k, v in res.params.items()}
    again = em.run(jax.random.key(0), 1, y=y, state_dim=2, init_params=free, progress_bar=False)
    p = {k: np.asarray(v) for k, v in res.params.items()}
    np.testing.assert_allclose(again.log_priors[0], scipy_log_prior(p, 2, 2), rtol=1e-12)
    np.testing.assert_allclose(again.log_marginals[0], dense_log_marginal(p, y), rtol=1e-10)
    np.testing.assert_allclose(again.objective, again.log_marginals + again.log_priors)


@pytest.mark.parametrize("emission_noise", ["full", "diag"])
def test_map_em_never_decreases_the_log_posterior(emission_noise):
    sim = ppl_dyn.simulate(jax.random.key(3), lds, num_steps=60, state_dim=2, obs_dim=3)
    model = lambda **kw: lds(emission_noise=emission_noise, **kw)  # noqa: E731
    res = EM(model, KalmanSmoother(), MAP).run(
        jax.random.key(1), 150, y=sim["y"], state_dim=2, progress_bar=False
    )
    obj = res.objective
    steps = np.diff(obj)
    assert np.all(steps >= -1e-9 * np.abs(obj[:-1])), steps.min()
    assert obj[-1] > obj[0] + 1.0
    # the likelihood alone is not what it maximises: compare with plain EM from the same
    # start (ML reaches a higher likelihood, a lower posterior)
    ml = EM(model, KalmanSmoother()).run(
        jax.random.key(1), 150, y=sim["y"], state_dim=2, progress_bar=False
    )
    assert ml.log_priors is None and np.array_equal(ml.objective, ml.log_marginals)
    assert ml.log_marginals[-1] > res.log_marginals[-1]


def _unpack(z):
    m = lambda v: np.array([[v]])  # noqa: E731
    return {"A": m(z[0]), "C": m(z[1]), "m0": z[2:3],
            "Q": m(np.exp(z[3])), "R": m(np.exp(z[4])), "P0": m(np.exp(z[5]))}  # fmt: skip


def _pack(p):
    logs = [np.log(p[k][0, 0]) for k in ("Q", "R", "P0")]
    return np.array([p["A"][0, 0], p["C"][0, 0], p["m0"][0], *logs])


def test_map_em_reaches_the_maximum_of_the_log_posterior():
    """A scalar LDS without biases on one series: SciPy maximises the dense
    log p(y | theta) + log p(theta) (SciPy's prior densities) from several starts; the
    best of them is MAP-EM's fixed point, up to the sign of the state (a symmetry of
    both). (Both also find the degenerate stationary point C = 0, from other starts.)"""
    model = lambda **kw: lds(bias=False, **kw)  # noqa: E731
    sim = ppl_dyn.simulate(jax.random.key(7), model, num_steps=80, state_dim=1, obs_dim=1)
    y = np.asarray(sim["y"])

    def log_prior(p):
        lp = stats.norm(0, 0.5).logpdf(p["A"]).sum()
        lp += stats.norm(0, 1).logpdf(p["C"]).sum() + stats.norm(0, 1).logpdf(p["m0"]).sum()
        for k, scale in (("Q", 0.1), ("R", 0.1), ("P0", 1.0)):
            lp += stats.invwishart(3.0, scale).logpdf(p[k].item())
        return lp

    def neg(z):  # the posterior density of theta itself: no Jacobian of the log maps
        p = _unpack(z)
        try:
            return -(dense_log_marginal(p, y) + log_prior(p))
        except np.linalg.LinAlgError:  # a trial step far outside
            return 1e10

    res = EM(model, KalmanSmoother(), MAP).run(
        jax.random.key(0), 4000, y=y, state_dim=1, rtol=1e-14, progress_bar=False
    )
    em_z = _pack({k: np.asarray(v, float) for k, v in res.params.items()})
    em_obj = -neg(em_z)
    np.testing.assert_allclose(res.objective[-1], em_obj, rtol=1e-10)  # converged
    best = min(
        (
            optimize.minimize(
                neg,
                np.random.default_rng(seed).normal(scale=0.5, size=6),
                method="BFGS",
                options={"gtol": 1e-9},
            )  # fmt: skip
            for seed in range(3)
        ),
        key=lambda o: o.fun,
    )
    assert abs(em_obj - (-best.fun)) < 1e-7, (em_obj, -best.fun)

    def canon(z):
        z = z.copy()
        if z[1] < 0:
            z[[1, 2]] *= -1  # C and m0 change sign with the state
        return z

    np.testing.assert_allclose(canon(em_z), canon(best.x), atol=1e-4)


def test_a_short_series_cannot_drive_covariances_to_zero():
    """One series: maximum likelihood sends the initial covariance towards 0 (only the
    covariance floor stops it); the MAP covariances stay above the prior's bound
    Psi / (n + nu + d + 1) (here P0 >= I / 8 for one sequence, dx = 2, nu = 4)."""
    sim = ppl_dyn.simulate(jax.random.key(5), lds, num_steps=40, state_dim=2, obs_dim=1)
    kw = dict(y=sim["y"], state_dim=2, progress_bar=False)
    ml = EM(lds, KalmanSmoother()).run(jax.random.key(1), 400, **kw)
    mp = EM(lds, KalmanSmoother(), MAP).run(jax.random.key(1), 400, **kw)
    ml_min = np.linalg.eigvalsh(np.asarray(ml.params["P0"])).min()
    map_min = np.linalg.eigvalsh(np.asarray(mp.params["P0"])).min()
    # measured: ML P0 eigenvalue 4.9e-8 and R 3.0e-6 after 400 iterations (1.5e-8 and
    # 1.6e-9 after 1,500, held only by the floor); MAP 0.125 and 0.020
    assert ml_min < 1e-6 and float(ml.params["R"][0, 0]) < 1e-4, (ml_min, ml.params["R"])
    assert map_min >= 1 / 8 - 1e-12, map_min
    assert float(mp.params["R"][0, 0]) >= 0.1 / (40 + 3 + 1 + 1) - 1e-12
    assert mp.floor_counts == {"P0": 0, "Q": 0, "R": 0}


def test_priors_of_other_families_are_refused_when_the_model_is_bound():
    y = np.random.default_rng(0).normal(size=(30, 1))
    laplace = _with_prior(lds, "A", dist.Laplace(0.0, 1.0))
    with pytest.raises(UnsupportedModelError, match=r"site 'A' has a Laplace prior"):
        EM(laplace, KalmanSmoother(), MAP).init(jax.random.key(0), y=y, state_dim=1)
    with pytest.raises(UnsupportedModelError, match=r"SGD\(map_estimate=True\)"):
        EM(laplace, KalmanSmoother(), MAP).run(jax.random.key(0), 5, y=y, state_dim=1)
    # maximum likelihood ignores the priors: the same model is accepted
    EM(laplace, KalmanSmoother()).init(jax.random.key(0), y=y, state_dim=1)


def _with_prior(model, site, prior):
    """``model`` with the prior of ``site`` replaced (as a user would write another)."""

    class Swap(numpyro.primitives.Messenger):
        def process_message(self, msg):
            if msg["type"] == "sample" and msg["name"] == site:
                fn = msg["fn"]
                msg["fn"] = prior.expand(fn.batch_shape + fn.event_shape).to_event(
                    len(fn.event_shape)
                )

    def wrapped(**kw):
        with Swap():
            return model(**kw)

    return wrapped
