"""The NumPyro bridge: handler contract, user-written models, simulate, import hygiene."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import oracles as O
import pytest
from numpyro import handlers
from numpyro.primitives import Messenger, apply_stack

import ppl_dyn
from ppl_dyn.infer import KalmanSmoother
from ppl_dyn.models import lds

# --------------------------------------------------------------------------------------
# 1. contract with numpyro that ppl_dyn.markov / bind rely on
# --------------------------------------------------------------------------------------

_PROBE = "ppl_dyn_contract_probe"


class _Recorder(Messenger):
    def __init__(self, stop=False):
        super().__init__()
        self.seen = []
        self.stop = stop

    def process_message(self, msg):
        if msg["type"] == _PROBE:
            self.seen.append({k: msg[k] for k in msg})
            msg["captured"] = True
            if self.stop:
                msg["stop"] = True


def _model_with_probe(payload):
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    msg = {
        "type": _PROBE,
        "fn": lambda: None,
        "args": (),
        "kwargs": {},
        "value": None,
        "payload": payload,
        "captured": False,
    }
    apply_stack(msg)
    return a, b, msg


@pytest.mark.parametrize("stop", [False, True])
def test_numpyro_passes_nameless_custom_message_to_lower_messenger_untouched(stop):
    payload = object()
    fn = handlers.condition(lambda: _model_with_probe(payload), data={"a": 0.5})
    fn = handlers.substitute(fn, data={"b": 0.25})
    fn = handlers.seed(fn, rng_seed=0)
    rec = _Recorder(stop=stop)
    with rec:  # the recorder sits below trace/seed/substitute/condition in the stack
        tr = handlers.trace(fn).get_trace()
    assert len(rec.seen) == 1
    seen = rec.seen[0]
    assert seen["payload"] is payload
    assert set(seen) == {"type", "fn", "args", "kwargs", "value", "payload", "captured"}
    assert seen["value"] is None and seen["args"] == () and seen["kwargs"] == {}
    # not recorded as a site, and the ordinary sites still behave normally
    assert set(tr) == {"a", "b"}
    assert tr["a"]["is_observed"] and float(tr["a"]["value"]) == 0.5
    assert not tr["b"]["is_observed"] and float(tr["b"]["value"]) == 0.25


def test_custom_message_without_a_receiver_is_a_no_op():
    a, b, msg = handlers.seed(lambda: _model_with_probe(None), rng_seed=0)()
    assert msg["captured"] is False and msg["value"] is None


def test_condition_marks_sites_observed_and_bind_keeps_conditioned_value():
    rng = np.random.default_rng(0)
    params, y, _ = O.random_system(rng, 2, 3, 0.8, 6)
    A_frozen = O.random_stable_matrix(rng, 2, 0.3)
    model = handlers.condition(lds, data={"A": A_frozen})
    tr = handlers.trace(handlers.seed(model, rng_seed=0)).get_trace(y=y, state_dim=2)
    assert tr["A"]["is_observed"]
    assert not tr["C"]["is_observed"]
    # params carries another A: the conditioned value must win
    ss, spec = ppl_dyn.bind(model, {**params, "A": np.eye(2) * 7.0}, y=y, state_dim=2)
    np.testing.assert_array_equal(np.asarray(ss.params["A"]), A_frozen)
    x = np.array([0.3, -1.2])
    np.testing.assert_allclose(
        np.asarray(ss.transition_mean(jnp.asarray(x), jnp.zeros(0))),
        A_frozen @ x + params["b"],
        rtol=1e-14,
    )
    # and the smoother uses it: equals the dense oracle at the conditioned A
    post = KalmanSmoother().smooth({**params, "A": np.eye(2) * 7.0}, model, y=y, state_dim=2)
    ref = O.dense_log_marginal({**params, "A": A_frozen}, y)
    assert abs(float(post.log_marginal) - ref) <= 1e-9 * abs(ref)


def test_bind_without_markov_raises():
    def not_a_state_space(y=None):
        numpyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="markov"):
        ppl_dyn.bind(not_a_state_space, {"a": 0.0}, y=np.zeros((3, 1)))


# --------------------------------------------------------------------------------------
# 2. a user-written model
# --------------------------------------------------------------------------------------


def local_level(y=None, *, num_steps=None, num_sequences=None):
    """1-D random walk observed in noise; scalar noise scales via Normal(...).to_event(1)."""
    q = numpyro.sample("q", dist.InverseGamma(2.0, 1.0))
    r = numpyro.sample("r", dist.InverseGamma(2.0, 1.0))
    level0 = numpyro.sample("level0", dist.Normal(0.0, 10.0))
    init = dist.Normal(jnp.reshape(level0, (1,)), 3.0).to_event(1)

    def transition(x_prev, u_t):
        return dist.Normal(x_prev, jnp.sqrt(q)).to_event(1)

    def emission(x_t, u_t):
        return dist.Normal(x_t, jnp.sqrt(r)).to_event(1)

    return ppl_dyn.markov(
        init, transition, emission, y=y, num_steps=num_steps, num_sequences=num_sequences, obs_dim=1
    )


def _local_level_as_lds(q, r, level0):
    return dict(
        A=np.eye(1),
        C=np.eye(1),
        Q=np.array([[q]]),
        R=np.array([[r]]),
        m0=np.array([level0]),
        P0=np.array([[9.0]]),
    )


def test_user_local_level_model_smoothed_matches_dense_oracle():
    rng = np.random.default_rng(3)
    q, r, level0 = 0.3, 0.8, 1.5
    ref_params = _local_level_as_lds(q, r, level0)
    _, y = O.sample_lds(rng, ref_params, 25)
    y[[0, 7, 8]] = np.nan
    post = KalmanSmoother().smooth({"q": q, "r": r, "level0": level0}, local_level, y=y)
    ref = O.dense_posterior(ref_params, y)
    np.testing.assert_allclose(float(post.log_marginal), ref["log_marginal"], rtol=1e-10)
    np.testing.assert_allclose(np.asarray(post.means), ref["means"], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(post.covs), ref["covs"], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(post.cross_covs), ref["cross"], rtol=1e-9, atol=1e-10)


def test_user_model_simulates_through_numpyro():
    out = ppl_dyn.simulate(
        jax.random.key(2),
        local_level,
        {"q": 0.3, "r": 0.8, "level0": 1.5},
        num_steps=7,
        num_sequences=4,
    )
    assert out["x"].shape == (4, 7, 1) and out["y"].shape == (4, 7, 1)
    assert set(out["params"]) == {"q", "r", "level0"}
    assert float(out["params"]["q"]) == 0.3


# --------------------------------------------------------------------------------------
# 3. simulate
# --------------------------------------------------------------------------------------


def test_simulate_shapes_and_given_params():
    rng = np.random.default_rng(4)
    params = O.random_lds_params(rng, 2, 3, 0.8, du=1)
    u = rng.normal(size=(6, 1))
    one = ppl_dyn.simulate(jax.random.key(0), lds, params, num_steps=6, state_dim=2, obs_dim=3, u=u)
    assert one["x"].shape == (6, 2) and one["y"].shape == (6, 3)
    assert set(one["params"]) == set(params)
    for k, v in params.items():
        np.testing.assert_array_equal(np.asarray(one["params"][k]), v)
    many = ppl_dyn.simulate(
        jax.random.key(0), lds, params, num_steps=6, num_sequences=5, state_dim=2, obs_dim=3, u=u
    )
    assert many["x"].shape == (5, 6, 2) and many["y"].shape == (5, 6, 3)
    # prior draws for the sites not given
    prior = ppl_dyn.simulate(jax.random.key(1), lds, num_steps=6, state_dim=2, obs_dim=3)
    assert prior["x"].shape == (6, 2)
    assert {"A", "C", "Q", "R", "m0", "P0", "b", "d"} <= set(prior["params"])


def test_simulated_moments_match_dense_joint_gaussian():
    rng = np.random.default_rng(5)
    T, S = 3, 4000
    params = O.random_lds_params(rng, 1, 2, 0.8, du=1)
    u = rng.normal(size=(T, 1))
    sim = ppl_dyn.simulate(
        jax.random.key(11), lds, params, num_steps=T, num_sequences=S, state_dim=1, obs_dim=2, u=u
    )
    mu, Sigma, dx, dy = O.dense_joint(params, T, u)
    z = np.concatenate(
        [np.asarray(sim["x"]).reshape(S, -1), np.asarray(sim["y"]).reshape(S, -1)], axis=1
    )  # same (x_1..x_T, y_1..y_T) ordering as the oracle
    var = np.diag(Sigma)
    mean_err = np.abs(z.mean(0) - mu) / np.sqrt(var / S)
    assert np.all(mean_err < 5), mean_err
    emp = np.cov(z, rowvar=False)
    se = np.sqrt((np.outer(var, var) + Sigma**2) / S)
    cov_err = np.abs(emp - Sigma) / se
    assert np.all(cov_err < 5), cov_err.max()


# --------------------------------------------------------------------------------------
# 4. import hygiene
# --------------------------------------------------------------------------------------


def test_import_does_not_enable_x64():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    out = subprocess.run(
        [sys.executable, "-c", "import ppl_dyn, jax; print(jax.config.jax_enable_x64)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_explosive_parameters_give_a_non_finite_potential_not_an_exception():
    # NumPyro retries initial points whose potential is non-finite; an exception from its
    # eager argument validation (inf state means at T = 400 with A = 10 I) would stop NUTS
    from numpyro.distributions.transforms import biject_to
    from numpyro.infer.util import potential_energy

    from ppl_dyn.handlers import noncentered

    T = 400
    params = {
        "A": 10.0 * np.eye(2),
        "C": np.ones((1, 2)),
        "Q": np.eye(2),
        "R": np.eye(1),
        "b": np.zeros(2),
        "d": np.zeros(1),
        "m0": np.zeros(2),
        "P0": np.eye(2),
        "x_innovations": np.ones((T, 2)),
    }
    pd = biject_to(dist.constraints.positive_definite)
    z = {
        k: pd.inv(jnp.asarray(v)) if k in ("Q", "R", "P0") else jnp.asarray(v)
        for k, v in params.items()
    }
    pe = potential_energy(noncentered(lds), (), {"y": np.zeros((T, 1)), "state_dim": 2}, z)
    assert not np.isfinite(float(pe))


def test_jitted_entry_points_trace_without_numpyro_validation_and_restore_it():
    # NumPyro validates distribution arguments by default; inside jit the checks cannot
    # raise but cost eager compilations, so our compiled steps trace without them
    from numpyro.distributions.distribution import Distribution

    from ppl_dyn.infer._compile import jit_model, without_validation

    seen = []

    def body(x):
        seen.append(Distribution._validate_args)
        return dist.Normal(x, 1.0).log_prob(0.0)

    before = Distribution._validate_args
    jit_model(body)(jnp.zeros(()))
    assert seen == [False] and Distribution._validate_args == before

    def fails():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        without_validation(fails)()
    assert Distribution._validate_args == before
    # invalid values given eagerly are still rejected, by name
    with pytest.raises(ValueError, match="Q"):
        KalmanSmoother().smooth(
            {
                "A": np.eye(2),
                "C": np.ones((1, 2)),
                "Q": -np.eye(2),
                "R": np.eye(1),
                "b": np.zeros(2),
                "d": np.zeros(1),
                "m0": np.zeros(2),
                "P0": np.eye(2),
            },
            lds,
            y=np.zeros((5, 1)),
            state_dim=2,
        )
