"""Models written the way a user would, following ``docs/models.md``.

Nothing here uses ``ppl_dyn.models``: every model is a plain NumPyro function with
priors on all its parameter sites that declares its dynamics with ``ppl_dyn.markov``.
They probe the plug-ins with the shapes and idioms users write:

* ``local_level_input``      local level + AR(1), control input in the transition,
                             initial state written ``Normal(m, s).expand([2]).to_event(1)``
* ``dynamic_regression``     ``y_t = u_t . beta_t + noise``, ``beta_t`` a random walk
                             (emission matrix ``H_t = u_t`` changes with time)
* ``poisson_counts``         AR(1) log-intensity, Poisson counts
* ``bernoulli_series``       AR(1) logit, binary observations
* ``stochastic_volatility``  AR(1) log-variance, ``y_t ~ N(0, exp(x_t))``
* ``pendulum``               Euler-discretised pendulum, ``y = sin(angle) + noise``
* ``expand_broadcast``       linear-Gaussian, ``MultivariateNormal(scale_tril=...)`` init,
                             scalar scales broadcast over vector locs, ``.expand`` emission
* ``time_varying_B``         linear-Gaussian with transition ``F_t = a + b u_t``
* ``state_dependent_noise``  Gaussian transition whose scale depends on the state
* ``structured_lds``         (extra) the docs' ``diag_lds`` with an input weight, declaring
                             a ``LinearStructure`` (the closed-form M-step applies)

For each: ``MODELS[name]`` (the function), ``TRUE_PARAMS[name]`` (values of every site),
``simulate_data(name, ...)`` (data from ``ppl_dyn.simulate`` at the true values) and, for
the linear-Gaussian ones (``LINEAR_GAUSSIAN``), ``dense_log_marginal`` /
``dense_posterior_means``: exact answers from the dense joint Gaussian of all ``y``
(NumPy/SciPy only), to serve as oracles.

Importing this module computes nothing. Float64: enable it before use
(``tests/conftest.py`` does ``jax.config.update("jax_enable_x64", True)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import scipy.special
import scipy.stats

import ppl_dyn
from ppl_dyn import LinearStructure, Regression

__all__ = [
    "MODELS",
    "TRUE_PARAMS",
    "INPUT_DIM",
    "LINEAR_GAUSSIAN",
    "GAUSSIAN_NOISE",
    "simulate_data",
    "make_inputs",
    "lgssm_matrices",
    "dense_joint",
    "dense_log_marginal",
    "dense_posterior",
    "dense_posterior_means",
    "dense_forecast_mean",
    "log_joint_terms",
    "grid_smoother",
    "KIND",
]


# --------------------------------------------------------------------------------------
# a. local level + AR(1) with a control input
# --------------------------------------------------------------------------------------


def local_level_input(y=None, *, u=None, num_steps=None, num_sequences=None):
    """x = (level, ar): level_t = level_{t-1} + B_0 u_t + w, ar_t = phi ar_{t-1} + B_1 u_t + w;
    y_t = level_t + ar_t + v."""
    if u is None:
        raise ValueError("local_level_input needs inputs u of shape (T, 1)")
    m0 = numpyro.sample("m0", dist.Normal(0.0, 5.0))
    s0 = numpyro.sample("s0", dist.HalfNormal(5.0))
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    q_level = numpyro.sample("q_level", dist.HalfNormal(1.0))
    q_ar = numpyro.sample("q_ar", dist.HalfNormal(1.0))
    B = numpyro.sample("B", dist.Normal(0.0, 1.0).expand([2, 1]).to_event(2))
    r = numpyro.sample("r", dist.HalfNormal(1.0))
    F = jnp.diag(jnp.stack([jnp.ones_like(phi), phi]))
    q = jnp.stack([q_level, q_ar])
    return ppl_dyn.markov(
        dist.Normal(m0, s0).expand([2]).to_event(1),
        lambda x, u_t: dist.Normal(x @ F.T + u_t @ B.T, q).to_event(1),
        lambda x, u_t: dist.Normal(x[..., :1] + x[..., 1:], r).to_event(1),
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=1,
    )


# --------------------------------------------------------------------------------------
# b. dynamic regression: time-varying emission matrix H_t = u_t
# --------------------------------------------------------------------------------------


def dynamic_regression(y=None, *, u=None, num_steps=None, num_sequences=None):
    """beta_t = beta_{t-1} + w (random walk, dim 2); y_t = u_t . beta_t + v."""
    if u is None:
        raise ValueError("dynamic_regression needs regressors u of shape (T, 2)")
    m0 = numpyro.sample("m0", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    q = numpyro.sample("q", dist.HalfNormal(0.5).expand([2]).to_event(1))
    r = numpyro.sample("r", dist.HalfNormal(1.0))
    return ppl_dyn.markov(
        dist.Normal(m0, 1.0).to_event(1),
        lambda x, u_t: dist.Normal(x, q).to_event(1),
        lambda x, u_t: dist.Normal(jnp.sum(x * u_t, -1, keepdims=True), r).to_event(1),
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=1,
    )


# --------------------------------------------------------------------------------------
# c. Poisson counts with an AR(1) log-intensity
# --------------------------------------------------------------------------------------


def poisson_counts(y=None, *, u=None, num_steps=None, num_sequences=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    init = dist.Normal(mu, sigma / jnp.sqrt(1.0 - phi**2)).expand([1]).to_event(1)
    return ppl_dyn.markov(
        init,
        lambda x, u_t: dist.Normal(mu + phi * (x - mu), sigma).to_event(1),
        lambda x, u_t: dist.Poisson(jnp.exp(x)).to_event(1),
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=1,
    )


# --------------------------------------------------------------------------------------
# d. binary series with an AR(1) logit
# --------------------------------------------------------------------------------------


def bernoulli_series(y=None, *, u=None, num_steps=None, num_sequences=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    init = dist.Normal(jnp.reshape(mu, (1,)), sigma / jnp.sqrt(1.0 - phi**2)).to_event(1)
    return ppl_dyn.markov(
        init,
        lambda x, u_t: dist.Normal(mu + phi * (x - mu), sigma).to_event(1),
        lambda x, u_t: dist.Bernoulli(logits=x).to_event(1),
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=1,
    )


# --------------------------------------------------------------------------------------
# e. stochastic volatility
# --------------------------------------------------------------------------------------


def stochastic_volatility(y=None, *, u=None, num_steps=None, num_sequences=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    init = dist.Normal(mu, sigma / jnp.sqrt(1.0 - phi**2)).expand([1]).to_event(1)
    return ppl_dyn.markov(
        init,
        lambda x, u_t: dist.Normal(mu + phi * (x - mu), sigma).to_event(1),
        lambda x, u_t: dist.Normal(0.0, jnp.exp(x / 2)).to_event(1),
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=1,
    )


# --------------------------------------------------------------------------------------
# f. pendulum (Euler discretisation), nonlinear transition and emission
# --------------------------------------------------------------------------------------


def pendulum(y=None, *, u=None, num_steps=None, num_sequences=None, dt=0.05):
    g = numpyro.sample("g", dist.LogNormal(jnp.log(9.81), 0.3))
    q = numpyro.sample("q", dist.HalfNormal(0.2).expand([2]).to_event(1))
    r = numpyro.sample("r", dist.HalfNormal(0.5))

    def transition(x, u_t):
        angle, vel = x[..., 0], x[..., 1]
        mean = jnp.stack([angle + dt * vel, vel - g * jnp.sin(angle) * dt], -1)
        return dist.Normal(mean, q).to_event(1)

    return ppl_dyn.markov(
        dist.Normal(jnp.array([1.0, 0.0]), jnp.array([0.3, 0.3])).to_event(1),
        transition,
        lambda x, u_t: dist.Normal(jnp.sin(x[..., :1]), r).to_event(1),
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=1,
    )


# --------------------------------------------------------------------------------------
# g. linear-Gaussian written with .expand, broadcasting scalar scales, MVN scale_tril
# --------------------------------------------------------------------------------------


def expand_broadcast(y=None, *, u=None, num_steps=None, num_sequences=None):
    """x_t = A x_{t-1} + w, w ~ N(0, q^2 I); both entries of y_t observe c . x_t + v."""
    A = numpyro.sample("A", dist.Normal(0.0, 0.3).expand([2, 2]).to_event(2))
    c = numpyro.sample("c", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    q = numpyro.sample("q", dist.HalfNormal(0.5))
    r = numpyro.sample("r", dist.HalfNormal(0.5))
    m0 = numpyro.sample("m0", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    l0 = numpyro.sample("l0", dist.HalfNormal(1.0).expand([2]).to_event(1))

    def emission(x, u_t):
        loc = jnp.sum(x * c, -1, keepdims=True)  # (..., 1)
        return dist.Normal(loc, r).expand(loc.shape[:-1] + (2,)).to_event(1)

    return ppl_dyn.markov(
        dist.MultivariateNormal(m0, scale_tril=jnp.diag(l0)),
        lambda x, u_t: dist.Normal(x @ A.T, q).to_event(1),
        emission,
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=2,
    )


# --------------------------------------------------------------------------------------
# h. linear-Gaussian with a transition matrix that depends on the input
# --------------------------------------------------------------------------------------


def time_varying_B(y=None, *, u=None, num_steps=None, num_sequences=None):
    """x_t = (a + b u_t) x_{t-1} + B u_t + w; y_t = x_t + v (state dim 1, input dim 1)."""
    if u is None:
        raise ValueError("time_varying_B needs inputs u of shape (T, 1)")
    a = numpyro.sample("a", dist.Uniform(-1.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 0.5))
    B = numpyro.sample("B", dist.Normal(0.0, 1.0))
    q = numpyro.sample("q", dist.HalfNormal(1.0))
    r = numpyro.sample("r", dist.HalfNormal(1.0))
    return ppl_dyn.markov(
        dist.Normal(jnp.zeros(1), 1.0).to_event(1),
        lambda x, u_t: dist.Normal((a + b * u_t) * x + B * u_t, q).to_event(1),
        lambda x, u_t: dist.Normal(x, r).to_event(1),
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=1,
    )


# --------------------------------------------------------------------------------------
# i. state-dependent transition noise (not linear-Gaussian)
# --------------------------------------------------------------------------------------


def state_dependent_noise(y=None, *, u=None, num_steps=None, num_sequences=None):
    """x_t ~ N(phi x_{t-1}, s0^2 + s1^2 x_{t-1}^2); y_t ~ N(x_t, r^2)."""
    phi = numpyro.sample("phi", dist.Uniform(-1.0, 1.0))
    s0 = numpyro.sample("s0", dist.HalfNormal(1.0))
    s1 = numpyro.sample("s1", dist.HalfNormal(1.0))
    r = numpyro.sample("r", dist.HalfNormal(1.0))
    return ppl_dyn.markov(
        dist.Normal(jnp.zeros(1), 1.0).to_event(1),
        lambda x, u_t: dist.Normal(phi * x, jnp.sqrt(s0**2 + s1**2 * x**2)).to_event(1),
        lambda x, u_t: dist.Normal(x, r).to_event(1),
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=1,
    )


# --------------------------------------------------------------------------------------
# j. (extra) the docs' diag_lds with an input weight, declaring a LinearStructure
# --------------------------------------------------------------------------------------


def structured_lds(y=None, *, u=None, num_steps=None, num_sequences=None, state_dim=2, obs_dim=1):
    if u is None:
        raise ValueError("structured_lds needs inputs u of shape (T, 1)")
    du = int(np.shape(u)[-1])
    A = numpyro.sample("A", dist.Normal(0.0, 0.3).expand([state_dim, state_dim]).to_event(2))
    B = numpyro.sample("B", dist.Normal(0.0, 1.0).expand([state_dim, du]).to_event(2))
    C = numpyro.sample("C", dist.Normal(0.0, 1.0).expand([obs_dim, state_dim]).to_event(2))
    q = numpyro.sample("q", dist.InverseGamma(2.0, 0.1).expand([state_dim]).to_event(1))
    r = numpyro.sample("r", dist.InverseGamma(2.0, 0.1).expand([obs_dim]).to_event(1))
    m0 = numpyro.sample("m0", dist.Normal(0.0, 1.0).expand([state_dim]).to_event(1))
    p0 = numpyro.sample("p0", dist.InverseGamma(2.0, 1.0).expand([state_dim]).to_event(1))
    structure = LinearStructure(
        dynamics=Regression(weight="A", noise="q", input_weight="B", diagonal_noise=True),
        emission=Regression(weight="C", noise="r", diagonal_noise=True),
        init_mean="m0",
        init_cov="p0",
        diagonal_init=True,
    )
    return ppl_dyn.markov(
        dist.Normal(m0, jnp.sqrt(p0)).to_event(1),
        lambda x, u_t: dist.Normal(x @ A.T + u_t @ B.T, jnp.sqrt(q)).to_event(1),
        lambda x, u_t: dist.Normal(x @ C.T, jnp.sqrt(r)).to_event(1),
        y=y,
        u=u,
        num_steps=num_steps,
        num_sequences=num_sequences,
        obs_dim=obs_dim,
        structure=structure,
    )


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------

MODELS = {
    "local_level_input": local_level_input,
    "dynamic_regression": dynamic_regression,
    "poisson_counts": poisson_counts,
    "bernoulli_series": bernoulli_series,
    "stochastic_volatility": stochastic_volatility,
    "pendulum": pendulum,
    "expand_broadcast": expand_broadcast,
    "time_varying_B": time_varying_B,
    "state_dependent_noise": state_dependent_noise,
    "structured_lds": structured_lds,
}

# input dimension of u (0: the model takes no inputs)
INPUT_DIM = {
    "local_level_input": 1,
    "dynamic_regression": 2,
    "poisson_counts": 0,
    "bernoulli_series": 0,
    "stochastic_volatility": 0,
    "pendulum": 0,
    "expand_broadcast": 0,
    "time_varying_B": 1,
    "state_dependent_noise": 0,
    "structured_lds": 1,
}

# exact dense oracle available (affine means, state-independent Gaussian noise)
LINEAR_GAUSSIAN = (
    "local_level_input",
    "dynamic_regression",
    "expand_broadcast",
    "time_varying_B",
    "structured_lds",
)
# Gaussian transition and emission (EKS / noncentred NUTS apply), nonlinear or not
GAUSSIAN_NOISE = LINEAR_GAUSSIAN + ("stochastic_volatility", "pendulum", "state_dependent_noise")


def _f(*v):
    return np.asarray(v, dtype=np.float64)


TRUE_PARAMS = {
    "local_level_input": {
        "m0": 0.5,
        "s0": 1.0,
        "phi": 0.7,
        "q_level": 0.1,
        "q_ar": 0.3,
        "B": _f([0.5], [-0.3]),
        "r": 0.2,
    },
    "dynamic_regression": {"m0": _f(1.0, -0.5), "q": _f(0.1, 0.05), "r": 0.3},
    "poisson_counts": {"mu": 1.0, "phi": 0.8, "sigma": 0.3},
    "bernoulli_series": {"mu": 0.0, "phi": 0.9, "sigma": 0.5},
    "stochastic_volatility": {"mu": -1.0, "phi": 0.9, "sigma": 0.3},
    "pendulum": {"g": 9.81, "q": _f(0.02, 0.05), "r": 0.1},
    "expand_broadcast": {
        "A": _f([0.8, 0.2], [-0.1, 0.7]),
        "c": _f(1.0, 0.5),
        "q": 0.3,
        "r": 0.2,
        "m0": _f(0.0, 0.5),
        "l0": _f(1.0, 0.5),
    },
    "time_varying_B": {"a": 0.6, "b": 0.3, "B": 0.5, "q": 0.3, "r": 0.2},
    "state_dependent_noise": {"phi": 0.8, "s0": 0.3, "s1": 0.5, "r": 0.3},
    "structured_lds": {
        "A": _f([0.9, 0.1], [-0.2, 0.7]),
        "B": _f([0.5], [0.0]),
        "C": np.array([[1.0, 0.5]]),
        "q": _f(0.05, 0.1),
        "r": _f(0.04),
        "m0": _f(0.0, 0.0),
        "p0": _f(1.0, 1.0),
    },
}


def make_inputs(name: str, num_steps: int, num_sequences=None, seed: int = 0):
    """Deterministic inputs ``u`` for a model (None for models without inputs)."""
    du = INPUT_DIM[name]
    if du == 0:
        return None
    rng = np.random.default_rng(seed)
    shape = (num_steps, du) if num_sequences is None else (num_sequences, num_steps, du)
    if name == "dynamic_regression":
        u = rng.normal(size=shape)
        u[..., 0] = 1.0  # intercept + one regressor
        return u
    return rng.uniform(-1.0, 1.0, size=shape)


def simulate_data(name: str, rng_key=None, num_steps: int = 40, num_sequences=None, seed: int = 0):
    """Simulate ``name`` at ``TRUE_PARAMS[name]``: ``{"y", "x", "u", "params"}``.

    ``u`` is None for models without inputs. Observations are float64 (counts and
    binary outcomes included).
    """
    if rng_key is None:
        rng_key = jax.random.key(seed)
    u = make_inputs(name, num_steps, num_sequences, seed)
    kw = {} if u is None else {"u": u}
    out = ppl_dyn.simulate(
        rng_key,
        MODELS[name],
        TRUE_PARAMS[name],
        num_steps=num_steps,
        num_sequences=num_sequences,
        **kw,
    )
    return {
        "y": np.asarray(out["y"], dtype=np.float64),
        "x": np.asarray(out["x"]),
        "u": u,
        "params": out["params"],
    }


# --------------------------------------------------------------------------------------
# dense oracle for the linear-Gaussian models
# --------------------------------------------------------------------------------------


def lgssm_matrices(name: str, params: dict, u, num_steps: int):
    """Time-varying linear-Gaussian form of one sequence, written independently of the
    library: ``x_1 ~ N(m0, P0)``; ``x_t = F_t x_{t-1} + c_t + w_t``, ``w_t ~ N(0, Q_t)``
    (t >= 2); ``y_t = H_t x_t + e_t + v_t``, ``v_t ~ N(0, R_t)``. Arrays have a leading
    time axis (index 0 of ``F``, ``c``, ``Q`` unused)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    T = num_steps
    u = None if u is None else np.asarray(u, dtype=np.float64)
    if name == "local_level_input":
        dx, dy = 2, 1
        m0 = np.full(dx, float(p["m0"]))
        P0 = float(p["s0"]) ** 2 * np.eye(dx)
        F = np.broadcast_to(np.diag([1.0, float(p["phi"])]), (T, dx, dx))
        c = u @ p["B"].T
        Q = np.broadcast_to(np.diag([float(p["q_level"]) ** 2, float(p["q_ar"]) ** 2]), (T, dx, dx))
        H = np.broadcast_to(np.array([[1.0, 1.0]]), (T, dy, dx))
        e = np.zeros((T, dy))
        R = np.broadcast_to(np.eye(dy) * float(p["r"]) ** 2, (T, dy, dy))
    elif name == "dynamic_regression":
        dx, dy = 2, 1
        m0, P0 = p["m0"], np.eye(dx)
        F = np.broadcast_to(np.eye(dx), (T, dx, dx))
        c = np.zeros((T, dx))
        Q = np.broadcast_to(np.diag(p["q"] ** 2), (T, dx, dx))
        H = u[:, None, :]  # (T, 1, 2)
        e = np.zeros((T, dy))
        R = np.broadcast_to(np.eye(dy) * float(p["r"]) ** 2, (T, dy, dy))
    elif name == "expand_broadcast":
        dx, dy = 2, 2
        m0, P0 = p["m0"], np.diag(p["l0"] ** 2)
        F = np.broadcast_to(p["A"], (T, dx, dx))
        c = np.zeros((T, dx))
        Q = np.broadcast_to(np.eye(dx) * float(p["q"]) ** 2, (T, dx, dx))
        H = np.broadcast_to(np.stack([p["c"], p["c"]]), (T, dy, dx))
        e = np.zeros((T, dy))
        R = np.broadcast_to(np.eye(dy) * float(p["r"]) ** 2, (T, dy, dy))
    elif name == "time_varying_B":
        dx, dy = 1, 1
        m0, P0 = np.zeros(1), np.eye(1)
        F = (float(p["a"]) + float(p["b"]) * u[:, 0])[:, None, None]
        c = float(p["B"]) * u
        Q = np.broadcast_to(np.eye(1) * float(p["q"]) ** 2, (T, 1, 1))
        H = np.broadcast_to(np.eye(1), (T, 1, 1))
        e = np.zeros((T, 1))
        R = np.broadcast_to(np.eye(1) * float(p["r"]) ** 2, (T, 1, 1))
    elif name == "structured_lds":
        dx, dy = p["A"].shape[0], p["C"].shape[0]
        m0, P0 = p["m0"], np.diag(p["p0"])
        F = np.broadcast_to(p["A"], (T, dx, dx))
        c = u @ p["B"].T
        Q = np.broadcast_to(np.diag(p["q"]), (T, dx, dx))
        H = np.broadcast_to(p["C"], (T, dy, dx))
        e = np.zeros((T, dy))
        R = np.broadcast_to(np.diag(p["r"]), (T, dy, dy))
    else:
        raise ValueError(f"{name} is not linear-Gaussian; no dense oracle")
    return m0, P0, F, c, Q, H, e, R


def dense_joint(name: str, params: dict, u, num_steps: int):
    """Means and covariances of the stacked states and observations of one sequence:
    ``(mu_x, S_xx, mu_y, S_yy, S_yx)`` with ``x`` ``(T dx,)`` and ``y`` ``(T dy,)``."""
    m0, P0, F, c, Q, H, e, R = lgssm_matrices(name, params, u, num_steps)
    T, dx, dy = num_steps, m0.shape[0], H.shape[1]
    mu = np.zeros((T, dx))
    mu[0] = m0
    for t in range(1, T):
        mu[t] = F[t] @ mu[t - 1] + c[t]
    # Cov(x_t, x_s) for s <= t: Cov(x_t, x_t) by the recursion, then F products
    S = np.zeros((T * dx, T * dx))
    blk = lambda t: slice(t * dx, (t + 1) * dx)  # noqa: E731
    S[blk(0), blk(0)] = P0
    for t in range(1, T):
        for s in range(t):
            S[blk(t), blk(s)] = F[t] @ S[blk(t - 1), blk(s)]
            S[blk(s), blk(t)] = S[blk(t), blk(s)].T
        S[blk(t), blk(t)] = F[t] @ S[blk(t - 1), blk(t - 1)] @ F[t].T + Q[t]
    Hb = np.zeros((T * dy, T * dx))
    Rb = np.zeros((T * dy, T * dy))
    for t in range(T):
        Hb[t * dy : (t + 1) * dy, blk(t)] = H[t]
        Rb[t * dy : (t + 1) * dy, t * dy : (t + 1) * dy] = R[t]
    mu_x = mu.reshape(-1)
    mu_y = Hb @ mu_x + e.reshape(-1)
    S_yx = Hb @ S
    S_yy = S_yx @ Hb.T + Rb
    return mu_x, S, mu_y, 0.5 * (S_yy + S_yy.T), S_yx


def _sequences(y, u):
    """Split data into per-sequence ``(y_s, u_s)`` pairs."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 2:
        return [(y, u)]
    out = []
    for s in range(y.shape[0]):
        u_s = None if u is None else (np.asarray(u)[s] if np.ndim(u) == 3 else u)
        out.append((y[s], u_s))
    return out


def dense_log_marginal(name: str, params: dict, y, u=None) -> float:
    """Exact ``log p(y_obs | params)`` (summed over sequences) from the dense joint
    Gaussian of all observations (``scipy.stats.multivariate_normal.logpdf``); NaN
    entries are missing (marginalised: their rows and columns are dropped)."""
    total = 0.0
    for y_s, u_s in _sequences(y, u):
        _, _, mu_y, S_yy, _ = dense_joint(name, params, u_s, y_s.shape[0])
        v = y_s.reshape(-1)
        o = ~np.isnan(v)
        total += float(scipy.stats.multivariate_normal.logpdf(v[o], mu_y[o], S_yy[np.ix_(o, o)]))
    return total


def dense_posterior(name: str, params: dict, y, u=None):
    """Exact ``E[x_t | y_obs]`` ``([S,] T, dx)`` and ``Cov[x_t | y_obs]`` ``([S,] T, dx,
    dx)`` from the dense joint Gaussian (NaN entries of ``y`` missing)."""
    means, covs = [], []
    for y_s, u_s in _sequences(y, u):
        T = y_s.shape[0]
        mu_x, S_xx, mu_y, S_yy, S_yx = dense_joint(name, params, u_s, T)
        v = y_s.reshape(-1)
        o = ~np.isnan(v)
        G = np.linalg.solve(S_yy[np.ix_(o, o)], S_yx[o]).T  # (T dx, n_obs)
        m = mu_x + G @ (v[o] - mu_y[o])
        P = S_xx - G @ S_yx[o]
        dx = m.shape[0] // T
        means.append(m.reshape(T, dx))
        covs.append(np.stack([P[t * dx : (t + 1) * dx, t * dx : (t + 1) * dx] for t in range(T)]))
    if np.asarray(y).ndim == 2:
        return means[0], covs[0]
    return np.stack(means), np.stack(covs)


def dense_posterior_means(name: str, params: dict, y, u=None) -> np.ndarray:
    """Exact ``E[x_t | y_obs]`` ``([S,] T, dx)`` (see :func:`dense_posterior`)."""
    return dense_posterior(name, params, y, u)[0]


def dense_forecast_mean(name: str, params: dict, y, u, num_steps: int, u_future=None):
    """Exact ``E[y_{T+k} | y_{1:T}]`` ``(num_steps, dy)`` of one sequence (the dense
    joint of the extended horizon, the future observations missing)."""
    return _extended_mean(name, params, y, u, u_future, num_steps)


def _extended_mean(name, params, y, u, u_future, k):
    y = np.asarray(y, dtype=np.float64)
    T, dy = y.shape
    if k is None:
        raise ValueError("pass u_future (or zeros of shape (k, 0))")
    u_all = None if u is None else np.concatenate([np.asarray(u), np.asarray(u_future)], 0)
    y_all = np.concatenate([y, np.full((k, dy), np.nan)], 0)
    mu_x, S_xx, mu_y, S_yy, S_yx = dense_joint(name, params, u_all, T + k)
    v = y_all.reshape(-1)
    o = ~np.isnan(v)
    mean = mu_y + S_yy[:, o] @ np.linalg.solve(S_yy[np.ix_(o, o)], v[o] - mu_y[o])
    return mean.reshape(T + k, dy)[T:]


# --------------------------------------------------------------------------------------
# log-densities of states and observations, written out with scipy (any model)
# --------------------------------------------------------------------------------------


def _norm(x, loc, scale):
    return scipy.stats.norm.logpdf(x, loc, scale)


def log_joint_terms(name: str, params: dict, x, y, u=None):
    """``(log p(x_1), log p(x_t | x_{t-1}) (T-1,), log p(y_t | x_t) (T,))`` of one
    sequence (``x`` ``(T, dx)``, ``y`` ``(T, dy)`` with NaN = missing entries dropped),
    from the model's equations written out in NumPy/SciPy, independently of the
    library."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    T = x.shape[0]
    u = None if u is None else np.asarray(u, dtype=np.float64)
    f = float
    if name in LINEAR_GAUSSIAN:
        m0, P0, F, c, Q, H, e, R = lgssm_matrices(name, params, u, T)
        init = scipy.stats.multivariate_normal.logpdf(x[0], m0, P0)
        trans = np.array(
            [
                scipy.stats.multivariate_normal.logpdf(x[t], F[t] @ x[t - 1] + c[t], Q[t])
                for t in range(1, T)
            ]
        )
        emis = []
        for t in range(T):
            o = ~np.isnan(y[t])
            mean, cov = H[t] @ x[t] + e[t], R[t]
            emis.append(
                scipy.stats.multivariate_normal.logpdf(y[t][o], mean[o], cov[np.ix_(o, o)])
                if o.any()
                else 0.0
            )
        return float(init), trans, np.array(emis)
    if name in ("poisson_counts", "bernoulli_series", "stochastic_volatility"):
        mu, phi, sigma = f(p["mu"]), f(p["phi"]), f(p["sigma"])
        s1 = sigma / np.sqrt(1 - phi**2)
        init = _norm(x[0, 0], mu, s1)
        trans = _norm(x[1:, 0], mu + phi * (x[:-1, 0] - mu), sigma)
        yy, xx = y[:, 0], x[:, 0]
        o = ~np.isnan(yy)
        yf = np.where(o, yy, 0.0)
        if name == "poisson_counts":
            lp = scipy.stats.poisson.logpmf(yf, np.exp(xx))
        elif name == "bernoulli_series":
            lp = scipy.stats.bernoulli.logpmf(yf, scipy.special.expit(xx))
        else:
            lp = _norm(yf, 0.0, np.exp(xx / 2))
        return float(init), trans, np.where(o, lp, 0.0)
    if name == "pendulum":
        dt, g = 0.05, f(p["g"])
        init = np.sum(_norm(x[0], np.array([1.0, 0.0]), np.array([0.3, 0.3])))
        ang, vel = x[:-1, 0], x[:-1, 1]
        mean = np.stack([ang + dt * vel, vel - g * np.sin(ang) * dt], -1)
        trans = np.sum(_norm(x[1:], mean, p["q"]), -1)
        yy = y[:, 0]
        o = ~np.isnan(yy)
        lp = _norm(np.where(o, yy, 0.0), np.sin(x[:, 0]), f(p["r"]))
        return float(init), trans, np.where(o, lp, 0.0)
    if name == "state_dependent_noise":
        phi, s0, s1, r = (f(p[k]) for k in ("phi", "s0", "s1", "r"))
        init = _norm(x[0, 0], 0.0, 1.0)
        xp = x[:-1, 0]
        trans = _norm(x[1:, 0], phi * xp, np.sqrt(s0**2 + s1**2 * xp**2))
        yy = y[:, 0]
        o = ~np.isnan(yy)
        return float(init), trans, np.where(o, _norm(np.where(o, yy, 0.0), x[:, 0], r), 0.0)
    raise ValueError(f"no written-out density for {name}")


# the kind of each model, by what it is (the plug-ins that must accept it)
KIND = {
    "local_level_input": "linear-gaussian",
    "dynamic_regression": "linear-gaussian",
    "expand_broadcast": "linear-gaussian",
    "time_varying_B": "linear-gaussian",
    "structured_lds": "linear-gaussian",
    "pendulum": "gaussian",  # nonlinear means
    "state_dependent_noise": "gaussian",  # transition noise depends on the state
    "stochastic_volatility": "general",  # observation noise depends on the state
    "poisson_counts": "general",
    "bernoulli_series": "general",
}


# --------------------------------------------------------------------------------------
# exact answers for the models with a scalar state, by quadrature on a fine grid
# --------------------------------------------------------------------------------------

SCALAR_STATE = (
    "poisson_counts",
    "bernoulli_series",
    "stochastic_volatility",
    "state_dependent_noise",
)


def _scalar_densities(name: str, params: dict):
    """``(grid, log p(x_1), log p(x' | x) (G, G), log p(y | x) (y, grid), E[y | x])``."""
    p = {k: float(np.asarray(v)) for k, v in params.items()}
    if name == "state_dependent_noise":
        grid = np.linspace(-8.0, 8.0, 1201)
        init = _norm(grid, 0.0, 1.0)
        scale = np.sqrt(p["s0"] ** 2 + p["s1"] ** 2 * grid**2)
        trans = _norm(grid[:, None], p["phi"] * grid[None, :], scale[None, :])

        def emis(y_t, g):
            return _norm(y_t, g, p["r"])

        return grid, init, trans, emis, lambda g: g
    mu, phi, sigma = p["mu"], p["phi"], p["sigma"]
    s1 = sigma / np.sqrt(1 - phi**2)
    grid = np.linspace(mu - 9 * s1, mu + 9 * s1, 801)
    init = _norm(grid, mu, s1)
    trans = _norm(grid[:, None], mu + phi * (grid[None, :] - mu), sigma)
    if name == "poisson_counts":
        return (
            grid,
            init,
            trans,
            (lambda y_t, g: scipy.stats.poisson.logpmf(y_t, np.exp(g))),
            np.exp,
        )
    if name == "bernoulli_series":
        return (
            grid,
            init,
            trans,
            (lambda y_t, g: scipy.stats.bernoulli.logpmf(y_t, scipy.special.expit(g))),
            scipy.special.expit,
        )
    if name == "stochastic_volatility":
        return grid, init, trans, (lambda y_t, g: _norm(y_t, 0.0, np.exp(g / 2))), np.zeros_like
    raise ValueError(f"{name} has no scalar-state grid oracle")


def grid_smoother(name: str, params: dict, y, forecast_steps: int = 0) -> dict:
    """Exact (to quadrature error, ~1e-8 here) filtering and smoothing of one sequence
    of a scalar-state model on a fine grid: ``log_marginal``, smoothed ``means`` ``(T,)``,
    the smoothed means of the observations ``E[y_t | y] = E[E[y_t | x_t] | y]`` and the
    forecast means ``E[y_{T+k} | y]`` ``(forecast_steps,)``."""
    from scipy.special import logsumexp

    grid, init, trans, emis, ymean = _scalar_densities(name, params)
    logw = np.log(grid[1] - grid[0])
    y = np.asarray(y, dtype=np.float64)[:, 0]
    T = y.shape[0]

    def lik(t):
        return np.zeros_like(grid) if np.isnan(y[t]) else emis(y[t], grid)

    la = init + logw + lik(0)  # unnormalised log filter at t = 1 (quadrature weights in)
    ll = logsumexp(la)
    filt = [la - ll]
    for t in range(1, T):
        pred = logsumexp(trans + filt[-1][None, :], axis=1) + logw  # log p(x_t | y_{<t})
        la = pred + lik(t)
        c = logsumexp(la)
        ll += c
        filt.append(la - c)
    # backward: smoothed log-weights
    smooth = [filt[-1]]
    for t in range(T - 2, -1, -1):
        pred = logsumexp(trans + filt[t][None, :], axis=1)  # (G,) at t+1, up to logw
        ratio = smooth[0] - pred  # log p_s(x_{t+1}) - log p_pred(x_{t+1})
        smooth.insert(0, filt[t] + logsumexp(trans + ratio[:, None], axis=0))
    w = np.exp(np.array(smooth))
    w /= w.sum(1, keepdims=True)
    out = {"log_marginal": float(ll), "means": w @ grid, "y_means": w @ ymean(grid)}
    f = filt[-1]
    fc = []
    for _ in range(forecast_steps):
        f = logsumexp(trans + f[None, :], axis=1)
        f = f - logsumexp(f)
        fc.append(np.exp(f) @ ymean(grid))
    out["forecast_means"] = np.array(fc)
    return out
