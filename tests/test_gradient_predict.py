"""GradientMStep against the closed-form maximiser of the same Monte Carlo Q-function;
prediction against the Kalman filter's exact forecasts; noisy-EM options."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import ppl_dyn
from ppl_dyn.infer import EM, GradientMStep, KalmanSmoother, ParticleSmoother
from ppl_dyn.models import lds
from ppl_dyn.state_space import bind


def local_level(y=None, *, num_steps=None, num_sequences=None):
    """A model we do not ship: random walk observed in noise (scale sites)."""
    q = numpyro.sample("q", dist.HalfNormal(2.0))
    r = numpyro.sample("r", dist.HalfNormal(2.0))
    return ppl_dyn.markov(
        dist.Normal(0.0, 1.0).expand([1]).to_event(1),
        lambda x, u: dist.Normal(x, q).to_event(1),
        lambda x, u: dist.Normal(x, r).to_event(1),
        y=y,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=1,
    )


def test_gradient_mstep_reaches_closed_form_maximiser_of_trajectory_q():
    key = jax.random.key(0)
    y = ppl_dyn.simulate(key, local_level, {"q": 0.3, "r": 0.5}, num_steps=200)["y"]
    params = {"q": jnp.asarray(1.0), "r": jnp.asarray(1.0)}
    ss, spec = bind(local_level, params, y=y)
    post = ParticleSmoother(num_particles=200, mode="ffbsi", num_trajectories=40).posterior(
        jax.random.key(1), ss, spec.y, spec.u
    )
    m = GradientMStep(num_steps=600, learning_rate=0.05)
    stats = m.statistics(post, ss, spec.y, spec.u)
    new, floors = m.update(stats, ss, frozenset(params), model=local_level, model_kwargs={"y": y})
    # closed form: q^2 = mean squared increment, r^2 = mean squared residual
    X = np.asarray(post.trajectories[0, :, :, 0])  # (M, T)
    q_hat = np.sqrt(np.mean(np.diff(X, axis=1) ** 2))
    r_hat = np.sqrt(np.mean((np.asarray(y)[None, :, 0] - X) ** 2))
    np.testing.assert_allclose(float(new["q"]), q_hat, rtol=2e-3)
    np.testing.assert_allclose(float(new["r"]), r_hat, rtol=2e-3)
    assert floors == {}


def test_gradient_mstep_requires_trajectories():
    y = np.zeros((10, 1))
    with pytest.raises(ValueError, match="ffbsi"):
        EM(local_level, ParticleSmoother(num_particles=8), GradientMStep()).run(
            jax.random.key(0), 2, y=y, progress_bar=False
        )


def test_gradient_em_increases_likelihood_and_honours_frozen_site():
    y = ppl_dyn.simulate(jax.random.key(3), local_level, {"q": 0.3, "r": 0.5}, num_steps=150)["y"]
    frozen = numpyro.handlers.condition(local_level, data={"r": 0.5})
    res = EM(
        frozen,
        ParticleSmoother(num_particles=100, mode="ffbsi", num_trajectories=25),
        GradientMStep(num_steps=50, learning_rate=0.05),
    ).run(jax.random.key(4), 15, y=y, init_params={"q": 2.0}, progress_bar=False)
    assert float(res.params["r"]) == 0.5
    lls = res.log_marginals
    assert np.mean(lls[-5:]) > lls[0] + 5.0
    assert abs(float(res.params["q"]) - 0.3) < 0.15


def _lds_params():
    return {
        "A": jnp.array([[0.9, 0.2], [-0.2, 0.9]]),
        "C": jnp.array([[1.0, 0.5]]),
        "Q": 0.1 * jnp.eye(2),
        "R": 0.2 * jnp.eye(1),
        "b": jnp.array([0.1, 0.0]),
        "d": jnp.array([0.3]),
        "m0": jnp.zeros(2),
        "P0": jnp.eye(2),
    }


@pytest.mark.parametrize("method", ["rollout", "particles"])
def test_lds_forecasts_match_kalman_exact_forecasts(method):
    p = _lds_params()
    y = ppl_dyn.simulate(jax.random.key(0), lds, p, num_steps=80, state_dim=2, obs_dim=1)["y"]
    post = KalmanSmoother().smooth(p, lds, y=y, state_dim=2)
    m = np.asarray(post.filtered_means)
    A, C, b, d = (np.asarray(p[k]) for k in ("A", "C", "b", "d"))
    pred = ppl_dyn.predict(
        p,
        lds,
        y=y,
        horizons=(1, 3),
        state_dim=2,
        method=method,
        rng_key=jax.random.key(1),
        num_particles=4000,
    )
    for k in (1, 3):
        x = m.copy()
        for _ in range(k):
            x = x @ A.T + b
        exact = x @ C.T + d  # E[y_{t+k} | y_{1:t}] for a linear model
        err = np.asarray(pred.mean[k]) - exact
        # Monte Carlo error of a filtered mean with N = 4000 particles is about
        # sd / sqrt(ESS); the forecast maps it through |C A^k| (< 1.5 here)
        sd = np.sqrt(float(np.asarray(post.filtered_covs)[:, 0, 0].mean()))
        mc_se = 1.5 * sd / np.sqrt(4000 * 0.3)
        assert np.sqrt(np.mean(err**2)) < 4 * mc_se
        assert np.max(np.abs(err)) < 0.1
    if method == "particles":
        lo, hi = np.asarray(pred.lower[1]), np.asarray(pred.upper[1])
        inside = (np.asarray(y)[1:] >= lo[:-1]) & (np.asarray(y)[1:] <= hi[:-1])
        assert 0.85 < inside.mean() <= 1.0  # 95% bands cover about 95%


def test_prediction_rmse_counts_only_targets_inside_the_data():
    class P:
        horizons = (2,)
        mean = {2: np.arange(5.0)[:, None]}

    y = np.arange(5.0)[:, None]
    # forecasts made at t = 0..2 for targets 2..4: errors (0-2, 1-3, 2-4) = -2 each
    assert ppl_dyn.prediction_rmse(P, y)[2] == pytest.approx(2.0)


def test_windowed_convergence_and_spread_for_particle_em():
    p = _lds_params()
    y = ppl_dyn.simulate(jax.random.key(5), lds, p, num_steps=60, state_dim=2, obs_dim=1)["y"]
    seen = []

    def schedule(k):
        n = 32 if k < 4 else 64
        seen.append(n)
        return ParticleSmoother(num_particles=n)

    res = EM(lds, ParticleSmoother(num_particles=32)).run(
        jax.random.key(6),
        40,
        y=y,
        state_dim=2,
        rtol=1e-2,
        smoothing_window=3,
        e_step_schedule=schedule,
        init_params=p,
        progress_bar=False,
    )
    assert res.converged and res.num_iters < 40
    assert res.num_iters >= 6  # two full windows are needed
    assert res.log_marginal_sd is not None and res.log_marginal_sd > 0
    assert seen[:4] == [32] * 4 and set(seen[4:]) == {64}
