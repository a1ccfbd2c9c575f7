"""The identified LDS (``lds(..., identified=True)``): one parameter point per
distribution of the observations, so NUTS does not wander along the change-of-basis
ridge."""

import arviz as az
import jax
import numpy as np
import oracles as O
import pytest
from numpyro import handlers
from numpyro.infer import MCMC, NUTS

import ppl_dyn
from ppl_dyn.handlers import marginalize
from ppl_dyn.infer import KalmanSmoother
from ppl_dyn.models import lds, lds_canonical_params


def _system(dy=3):
    rng = np.random.default_rng(0)
    return {
        "A": np.array([[0.8, 0.2], [-0.2, 0.7]]), "C": rng.normal(size=(dy, 2)),
        "Q": np.array([[0.2, 0.05], [0.05, 0.1]]), "R": 0.1 * np.eye(dy),
        "b": np.array([0.3, -0.2]), "d": np.linspace(0.1, 0.3, dy),
        "m0": np.array([1.0, -1.0]), "P0": np.array([[1.0, 0.3], [0.3, 0.5]]),
    }  # fmt: skip


def test_canonical_parameters_keep_the_exact_likelihood_and_the_form():
    p = _system()
    y = np.asarray(
        ppl_dyn.simulate(jax.random.key(0), lds, p, num_steps=60, state_dim=2, obs_dim=3)["y"]
    )
    can = lds_canonical_params(p)
    assert "b" not in can and "Q" not in can and "C" not in can
    assert np.all(can["C_diag"] > 0)
    ll = KalmanSmoother().smooth(can, lds, y=y, state_dim=2, identified=True).log_marginal
    np.testing.assert_allclose(float(ll), O.dense_log_marginal(p, y), atol=1e-8)
    # the model builds C lower-trapezoidal with the given diagonal, and Q = I
    tr = handlers.trace(handlers.substitute(handlers.seed(lds, 0), data=can)).get_trace(
        y=y, state_dim=2, identified=True
    )
    C, Q = np.asarray(tr["C"]["value"]), np.asarray(tr["Q"]["value"])
    assert C[0, 1] == 0.0
    np.testing.assert_array_equal(np.diag(C), can["C_diag"])
    np.testing.assert_array_equal(Q, np.eye(2))


def test_identified_form_needs_as_many_observations_as_states():
    with pytest.raises(ValueError, match="obs_dim >= state_dim"):
        ppl_dyn.simulate(
            jax.random.key(0), lds, num_steps=5, state_dim=2, obs_dim=1, identified=True
        )


@pytest.mark.slow
def test_nuts_on_identified_marginal_lds_has_no_divergences():
    """The setting of the issue: a stable 2-state system, T = 200, 2 chains x 300 + 300,
    NUTS with default settings, on the identified form with P0 conditioned (one sequence
    does not inform it: docs/mcmc.md). Measured (2-core CPU, seeds 1-6): 0 divergences
    in every run, max split R-hat over all sites 1.008-1.022. (With P0 sampled, seed 3
    gave 17 divergences in P0's prior tail.) The R-hat bound is loose on purpose: with
    exactly independent draws the largest of 17 split R-hats at 600 draws exceeds 1.01 in
    about a quarter of runs."""
    p = {"A": np.array([[0.8, 0.2], [-0.2, 0.7]]), "C": np.array([[1.0, 0.0], [0.5, 1.0]]),
         "Q": 0.1 * np.eye(2), "R": 0.1 * np.eye(2), "b": np.zeros(2), "d": np.zeros(2),
         "m0": np.zeros(2), "P0": np.eye(2)}  # fmt: skip
    y = np.asarray(ppl_dyn.simulate(jax.random.key(0), lds, p, num_steps=200, state_dim=2,
                                    obs_dim=2)["y"])  # fmt: skip
    model = handlers.condition(lds, {"P0": np.eye(2)})
    mcmc = MCMC(NUTS(marginalize(model)), num_warmup=300, num_samples=300, num_chains=2,
                chain_method="sequential", progress_bar=False)  # fmt: skip
    mcmc.run(jax.random.key(3), y=y, state_dim=2, identified=True)
    assert int(mcmc.get_extra_fields()["diverging"].sum()) == 0
    idata = az.from_numpyro(mcmc)
    assert "P0" not in idata.posterior
    rhat = az.rhat(idata, var_names=["A", "C_diag", "C_lower", "R", "d", "m0"])
    worst = max(float(np.max(v)) for v in rhat.data_vars.values())
    assert worst < 1.03, worst


def test_iid_draws_alone_exceed_an_rhat_of_1_01_often():
    """Why the slow test above does not ask for R-hat < 1.01: split R-hat of exactly
    independent normal draws, 2 chains x 300, maximum over 17 sites, exceeds 1.01 in a
    sizeable fraction of runs (simulated: about 23%; 200 runs here)."""
    rng = np.random.default_rng(0)
    runs = 200
    over = sum(
        max(float(az.rhat(x)) for x in rng.normal(size=(17, 2, 300))) > 1.01 for _ in range(runs)
    )
    frac = over / runs
    se = np.sqrt(0.23 * 0.77 / runs)
    assert abs(frac - 0.23) < 4 * se + 0.05, frac  # well away from 0: the target is noise
