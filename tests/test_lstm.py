"""The stochastic LSTM model against a hand-written LSTM cell and particle EM; the
seed-003 LSTM-from-LDS construction against the LDS output, with its error scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_dyn
from ppl_dyn.infer import EM, GradientMStep, ParticleSmoother
from ppl_dyn.infer.particle import particle_filter
from ppl_dyn.lstm_lds import lds_output, lstm_from_lds, lstm_output
from ppl_dyn.models.lstm import lstm
from ppl_dyn.state_space import bind

H = 2


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _numpy_lstm_step(p, c, h, u):
    """The LSTM equations written out entrywise (seed 003: gates i, f, g, o)."""
    z = p["W"] @ u + p["U"] @ h + p["b"]
    i, f, g, o = (
        _sigmoid(z[:H]),
        _sigmoid(z[H : 2 * H]),
        np.tanh(z[2 * H : 3 * H]),
        _sigmoid(z[3 * H :]),
    )
    c_new = f * c + i * g
    return c_new, o * np.tanh(c_new)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "W": rng.normal(size=(4 * H, 1)),
        "U": 0.8 * rng.normal(size=(4 * H, H)),
        "b": 0.5 * rng.normal(size=4 * H),
        "C": np.array([[1.5, -1.0]]),
        "d": np.array([0.2]),
        "Q": np.full(2 * H, 0.01),
        "R": np.array([0.05]),
        "m0": np.zeros(2 * H),
        "P0": np.full(2 * H, 0.1),
    }


def test_transition_mean_matches_handwritten_lstm_cell_and_emission_reads_h():
    p = _params()
    u = np.random.default_rng(1).normal(size=(5, 1))
    y = np.zeros((5, 1))
    ss, _ = bind(lstm, {k: jnp.asarray(v) for k, v in p.items()}, y=y, u=u, state_dim=H)
    x = np.random.default_rng(2).normal(size=(3, 2 * H))  # a batch of states [c; h]
    got = np.asarray(ss.transition_mean(jnp.asarray(x), jnp.asarray(u[1])))
    for n in range(3):
        c, h = _numpy_lstm_step(p, x[n, :H], x[n, H:], u[1])
        np.testing.assert_allclose(got[n], np.concatenate([c, h]), rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(ss.emission_mean(jnp.asarray(x), jnp.asarray(u[1]))),
        x[:, H:] @ p["C"].T + p["d"],
        rtol=1e-12,
    )
    assert ss.state_dim == 2 * H


def test_simulate_shapes_and_prior_draws():
    out = ppl_dyn.simulate(
        jax.random.key(0), lstm, num_steps=12, num_sequences=2, state_dim=H, obs_dim=1
    )
    assert out["x"].shape == (2, 12, 2 * H) and out["y"].shape == (2, 12, 1)
    assert set(out["params"]) == {"U", "C", "b", "d", "Q", "R", "m0", "P0"}  # no W without u
    assert np.all(np.isfinite(out["y"]))


def test_bad_state_dim_raises_naming_it():
    with pytest.raises(ValueError, match="state_dim"):
        ppl_dyn.simulate(jax.random.key(0), lstm, num_steps=5, state_dim=0, obs_dim=1)


def _log_marginals(param_sets, y, u, key, reps=8, N=300):
    """Bootstrap-filter log-likelihoods at each parameter set: mean and standard error
    over ``reps`` independent runs (one compiled, vmapped filter)."""

    @jax.jit
    def lm(params, k):
        ss, spec = bind(lstm, params, y=y, u=u, state_dim=H)
        return particle_filter(k, ss, spec.y[0], spec.u[0], N).log_marginal

    keys = jax.random.split(key, reps)
    out = []
    for params in param_sets:
        vals = np.asarray(jax.vmap(lm, (None, 0))(params, keys))
        out.append((vals.mean(), vals.std(ddof=1) / np.sqrt(reps)))
    return out


@pytest.mark.slow  # default-suite budget (~15 min on 2 cores): runs in the slow tier
def test_particle_em_with_gradient_mstep_increases_log_marginal():
    p = {k: jnp.asarray(v) for k, v in _params().items()}
    T = 30
    u = np.asarray(jax.random.normal(jax.random.key(3), (T, 1)))
    y = ppl_dyn.simulate(jax.random.key(4), lstm, p, num_steps=T, u=u, state_dim=H, obs_dim=1)["y"]
    # start away from the truth: read-out shrunk, noises inflated
    init = dict(p, C=0.3 * p["C"], d=jnp.zeros(1), R=jnp.array([0.5]), Q=jnp.full(2 * H, 0.05))
    em = EM(
        lstm,
        ParticleSmoother(num_particles=64, mode="ffbsi", num_trajectories=16),
        GradientMStep(num_steps=20, learning_rate=0.05),
    )
    res = em.run(jax.random.key(5), 4, y=y, u=u, state_dim=H, init_params=init, progress_bar=False)
    assert np.all(np.isfinite(res.log_marginals))
    params_after = {k: res.params[k] for k in init}
    (before, se0), (after, se1) = _log_marginals([init, params_after], y, u, jax.random.key(6))
    # the gain must exceed 4 combined Monte Carlo standard errors (and a floor)
    assert after - before > max(4 * np.hypot(se0, se1), 2.0), (before, after, se0, se1)


# -- seed 003: LSTM weights reproducing an LDS -------------------------------------------
def _lds():
    A = np.array([[0.8, 0.3, 0.0], [-0.3, 0.8, 0.1], [0.0, 0.0, 0.5]])
    B = np.array([[1.0, 0.0], [0.5, -0.4], [0.0, 1.0]])
    C = np.array([[1.0, 0.0, -0.5]])
    D = np.array([[0.3, 0.0]])
    u = np.asarray(jax.random.normal(jax.random.key(0), (60, 2)))
    return A, B, C, D, u


def _rel_err(w, A, B, C, D, u, amp=1.0):
    y = lds_output(A, B, C, D, amp * u)
    return np.linalg.norm(lstm_output(w, amp * u) - y) / np.linalg.norm(y)


@pytest.mark.parametrize("method", ["seed", "delay"])
def test_lstm_from_lds_reproduces_lds_output_with_error_quadratic_in_input_scale(method):
    A, B, C, D, u = _lds()
    n, m = B.shape
    w = lstm_from_lds(A, B, C, D, input_scale=1e-3, method=method)
    assert w.U.shape[1] == (n + m if method == "seed" else 2 * n + m)
    assert _rel_err(w, A, B, C, D, u) < 1e-4  # s^2 = 1e-6 times a system constant
    # derived: h = s[x; u] + O(s^3) and the read-out divides by s -> error ~ s^2
    scales = np.logspace(-3.5, -1.5, 5)
    errs = [
        _rel_err(lstm_from_lds(A, B, C, D, input_scale=s, method=method), A, B, C, D, u)
        for s in scales
    ]
    slope = np.polyfit(np.log(scales), np.log(errs), 1)[0]
    assert abs(slope - 2.0) < 0.05, (slope, errs)


def test_lstm_from_lds_error_cubic_in_input_amplitude():
    A, B, C, D, u = _lds()
    w = lstm_from_lds(A, B, C, D, input_scale=1e-3)
    amps = np.logspace(-1, 1, 5)
    abs_errs = [np.linalg.norm(lstm_output(w, a * u) - lds_output(A, B, C, D, a * u)) for a in amps]
    slope = np.polyfit(np.log(amps), np.log(abs_errs), 1)[0]
    assert abs(slope - 3.0) < 0.05, (slope, abs_errs)  # linear up to a cubic distortion


def test_gate_saturation_error_decays_like_exp_minus_gate_bias():
    A, B, C, D, u = _lds()
    betas = np.array([6.0, 8.0, 10.0, 12.0])
    errs = [
        _rel_err(lstm_from_lds(A, B, C, D, input_scale=1e-6, gate_bias=b), A, B, C, D, u)
        for b in betas
    ]
    slope = np.polyfit(betas, np.log(errs), 1)[0]
    assert abs(slope + 1.0) < 0.1, (slope, errs)


def test_normalize_states_keeps_the_map_and_shrinks_error_for_a_companion_form():
    # the seed's fourth-order system (its discrete zero/pole/gain form) in companion form
    den = np.polymul([1, -1.826, 0.8353], [1, -1.72, 0.9608])
    num = 0.078673 * np.polymul(np.polymul([1, 3.517], [1, -0.9608]), [1, 0.2599])
    A = np.zeros((4, 4))
    A[0] = -den[1:]
    A[1:, :-1] = np.eye(3)
    B, C, D = np.eye(4)[:, :1], num[None, :], np.zeros((1, 1))
    u = np.asarray(jax.random.normal(jax.random.key(1), (51, 1)))
    raw = _rel_err(lstm_from_lds(A, B, C, D, input_scale=1e-3), A, B, C, D, u)
    norm = _rel_err(
        lstm_from_lds(A, B, C, D, input_scale=1e-3, normalize_states=True), A, B, C, D, u
    )
    assert norm < 1e-4 and norm < raw / 100, (raw, norm)


def test_lstm_from_lds_weights_drive_the_stochastic_model():
    A, B, C, D, u = _lds()
    w = lstm_from_lds(A, B, C, D, input_scale=1e-3)
    Hn = w.U.shape[1]
    p = dict(
        w.as_params(),
        Q=jnp.full(2 * Hn, 1e-30),
        R=jnp.full(1, 1e-30),
        m0=jnp.zeros(2 * Hn),
        P0=jnp.full(2 * Hn, 1e-30),
    )
    p["C"], p["d"] = jnp.asarray(w.C), jnp.asarray(w.d)
    # x_1 ~ N(m0 = 0, tiny): the model's first state is h_0 = 0, so shift the inputs
    out = ppl_dyn.simulate(
        jax.random.key(0), lstm, p, num_steps=u.shape[0], u=u, state_dim=Hn, obs_dim=1
    )
    ref = lstm_output(w, u[1:])  # the model's step t consumes u_t, from x_1 = 0
    np.testing.assert_allclose(np.asarray(out["y"])[1:], ref, atol=1e-6)


def test_lstm_from_lds_rejects_bad_shapes_and_singular_a():
    A, B, C, D, _ = _lds()
    with pytest.raises(ValueError, match="B must"):
        lstm_from_lds(A, B[:2], C)
    with pytest.raises(ValueError, match="D must"):
        lstm_from_lds(A, B, C, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="singular"):
        lstm_from_lds(np.zeros((3, 3)), B, C)
    with pytest.raises(ValueError, match="input_scale"):
        lstm_from_lds(A, B, C, input_scale=0.0)
