"""Gradient fitting (ppl_dyn.infer.SGD / fit_sgd) on the marginal likelihood.

Oracles: the dense joint Gaussian (log-marginal values), central finite differences
(gradients), EM's fixed point (the maximum), exhaustive enumeration of minibatches
(unbiasedness), priors evaluated by hand (MAP), bit-for-bit equality (frozen sites).

Compilations are the cost here, so the tests share one data shape and one optimizer
object: the compiled step is cached per (model, E-step, optimizer, options, shapes).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import oracles as O
import pytest

import ppl_dyn
from ppl_dyn.infer import (
    EM,
    SGD,
    EMResult,
    ExtendedKalmanSmoother,
    KalmanSmoother,
    ParticleSmoother,
    fit_sgd,
)
from ppl_dyn.models import lds, tanh_rnn

DX, DY, T, S = 1, 2, 50, 4
TRUE = {
    "A": jnp.array([[0.9]]),
    "C": jnp.array([[1.0], [0.5]]),
    "Q": jnp.array([[0.2]]),
    "R": 0.1 * jnp.eye(2),
    "b": jnp.zeros(1),
    "d": jnp.zeros(2),
    "m0": jnp.zeros(1),
    "P0": jnp.eye(1),
}
ADAM = optax.adam(0.1)  # one object: SGD instances built with it share the compiled step


EVERY = np.arange(S)  # the batch of all sequences: the full objective (scale S / S = 1)


@pytest.fixture(scope="module")
def y():
    rng = np.random.default_rng(0)
    return np.stack([O.sample_lds(rng, TRUE, T)[1] for _ in range(S)])


@pytest.fixture(scope="module")
def sgd():
    return SGD(lds, optimizer=ADAM)


@pytest.fixture(scope="module")
def value_and_grad(sgd, y):
    """``(z, batch) -> (objective, gradient)``, compiled once: batches are always arrays."""
    return jax.jit(jax.value_and_grad(sgd.objective_fn(y=y, state_dim=DX)))


@pytest.fixture(scope="module")
def em_fit(y):
    return EM(lds, KalmanSmoother()).run(
        jax.random.key(1), 2000, rtol=1e-12, y=y, state_dim=DX, progress_bar=False
    )


@pytest.fixture(scope="module")
def sgd_fit(sgd, y):
    return sgd.run(jax.random.key(1), 1500, y=y, state_dim=DX, progress_bar=False)


def dense_total(params, y):
    p = {k: np.asarray(v) for k, v in params.items()}
    return sum(O.dense_log_marginal(p, ys) for ys in y)


def flat(tree):
    return np.concatenate([np.ravel(tree[k]) for k in sorted(tree)])


def unflat(vec, like):
    out, i = {}, 0
    for k in sorted(like):
        n = np.size(like[k])
        out[k] = jnp.asarray(vec[i : i + n]).reshape(np.shape(like[k]))
        i += n
    return out


def assert_gradient_matches_central_differences(fn, grad, z, h=1e-5, rtol=1e-6):
    """Every coordinate of ``grad`` against ``(fn(z + h e_i) - fn(z - h e_i)) / 2h``."""
    z0, g = flat(z), flat(grad)
    fd = np.empty_like(z0)
    for i in range(z0.size):
        e = np.zeros_like(z0)
        e[i] = h
        fd[i] = (float(fn(unflat(z0 + e, z))) - float(fn(unflat(z0 - e, z)))) / (2 * h)
    # central differences err by O(h^2 f''') + O(eps |f| / h): relative to the largest
    # component (the gradient of a log-likelihood of 200 observations is O(1e2..1e4))
    np.testing.assert_allclose(g, fd, rtol=rtol, atol=rtol * np.max(np.abs(g)))


# --------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------


def test_objective_is_dense_log_marginal_and_gradient_matches_finite_differences(
    sgd, y, value_and_grad
):
    state = sgd.init(jax.random.key(2), y=y, state_dim=DX)
    value, grad = value_and_grad(state.unconstrained, EVERY)
    # the value: the exact log-marginal of the dense joint Gaussian, summed over sequences
    ref = dense_total(state.params, y)
    assert abs(float(value) - ref) <= 1e-9 * abs(ref)
    # the gradient (Fisher's identity through the unconstraining transforms)
    assert sorted(grad) == sorted(state.params)
    assert_gradient_matches_central_differences(
        lambda z: value_and_grad(z, EVERY)[0], grad, state.unconstrained
    )


@pytest.mark.slow  # one more large compilation (reverse mode through the EKS)
def test_eks_objective_gradient_matches_finite_differences():
    kw = dict(num_steps=15, num_sequences=2, state_dim=2, obs_dim=2)
    sim = ppl_dyn.simulate(jax.random.key(3), tanh_rnn, **kw)
    data = dict(y=np.asarray(sim["y"]), state_dim=2)
    sgd = SGD(tanh_rnn, ExtendedKalmanSmoother(), ADAM)
    state = sgd.init(jax.random.key(4), **data)
    fn = jax.jit(jax.value_and_grad(sgd.objective_fn(**data)))
    value, grad = fn(state.unconstrained)
    assert np.isfinite(float(value))
    assert_gradient_matches_central_differences(lambda z: fn(z)[0], grad, state.unconstrained)


def test_minibatch_objective_averages_to_full_objective_and_prior_enters_once(sgd, y):
    # the MAP objective (S/B) sum_batch log p(y_s | theta) + log p(theta) covers both: its
    # average over all C(4, 2) = 6 equally likely batches must be the full log-marginal
    # (dense oracle) plus the log prior counted once (a prior scaled by S/B would miss by
    # |log p(theta)|, checked below to be far above the tolerance)
    kw = dict(y=y, state_dim=DX)
    state = sgd.init(jax.random.key(5), **kw)
    mp = jax.jit(SGD(lds, optimizer=ADAM, map_estimate=True).objective_fn(**kw))
    subsets = [np.array(c) for c in itertools.combinations(range(S), 2)]
    values = np.array([float(mp(state.unconstrained, b)) for b in subsets])
    assert np.ptp(values) > 1.0  # the batches do differ
    p = state.params  # priors from docs/models.md, evaluated by hand
    log_prior = float(
        dist.Normal(0.0, 0.5).log_prob(p["A"]).sum()
        + dist.Normal(0.0, 1.0).log_prob(p["C"]).sum()
        + dist.Normal(0.0, 1.0).log_prob(p["b"]).sum()
        + dist.Normal(0.0, 1.0).log_prob(p["d"]).sum()
        + dist.Normal(0.0, 1.0).log_prob(p["m0"]).sum()
        + dist.InverseWishart(DX + 2.0, 0.1 * jnp.eye(DX)).log_prob(p["Q"])
        + dist.InverseWishart(DY + 2.0, 0.1 * jnp.eye(DY)).log_prob(p["R"])
        + dist.InverseWishart(DX + 2.0, jnp.eye(DX)).log_prob(p["P0"])
    )
    full = dense_total(p, y) + log_prior
    assert abs(values.mean() - full) <= 1e-9 * abs(full)
    assert abs(log_prior) > 1e3 * 1e-9 * abs(full)


# --------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------


def test_sgd_reaches_the_em_maximum(sgd_fit, em_fit, sgd, y, value_and_grad):
    lls = sgd_fit.log_marginals
    assert isinstance(sgd_fit, EMResult) and len(lls) == sgd_fit.num_iters == 1500
    # Adam climbs: tens of thousands of nats from the prior draw, then flat at the top
    assert lls[-1] > lls[0] + 1000
    start = sgd.init(jax.random.key(1), y=y, state_dim=DX)  # run() starts here
    assert abs(lls[0] - dense_total(start.params, y)) <= 1e-9 * abs(lls[0])
    assert np.all(np.diff(lls[-100:]) > -1e-6)
    # EM was stopped at |l_k - l_{k-1}| <= 1e-12 |l| (~5e-10 nats per iteration); its
    # linear rate leaves it within ~1e-6 nats of its fixed point. 1e-3 nats is far below
    # what matters statistically (1.92 nats: a 5% likelihood-ratio test on one parameter)
    # and far above float64 round-off of a ~500-nat sum (~1e-12).
    assert em_fit.converged
    final = dense_total(sgd_fit.params, y)
    assert abs(final - em_fit.log_marginals[-1]) <= 1e-3
    # and EM's answer is a stationary point of SGD's objective: the gradient there is a
    # millionth (or less) of the gradient at the starting draw
    at_em = sgd.init(jax.random.key(0), init_params=em_fit, y=y, state_dim=DX)
    _, g_em = value_and_grad(at_em.unconstrained, EVERY)
    _, g_0 = value_and_grad(start.unconstrained, EVERY)
    assert np.max(np.abs(flat(g_em))) <= 1e-6 * np.max(np.abs(flat(g_0)))


def test_fit_sgd_is_sgd_run_and_update_continues_it(sgd, y):
    kw = dict(y=y, state_dim=DX, progress_bar=False)
    a = sgd.run(jax.random.key(6), 5, **kw)
    b = fit_sgd(lds, jax.random.key(6), 5, optimizer=ADAM, **kw)
    np.testing.assert_array_equal(a.log_marginals, b.log_marginals)
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]))
    # update() from the final state is the 6th step of a longer run
    state, obj = sgd.update(a.state, y=y, state_dim=DX)
    c = sgd.run(jax.random.key(6), 6, **kw)
    np.testing.assert_allclose(float(obj), c.log_marginals[-1], rtol=1e-12)
    for k in state.params:
        np.testing.assert_allclose(
            np.asarray(state.params[k]), np.asarray(c.state.params[k]), rtol=1e-12, atol=1e-14
        )
    # init_state= continues with the optimiser state (Adam's moments) too
    e = sgd.run(jax.random.key(0), 1, init_state=a.state, **kw)
    np.testing.assert_allclose(e.log_marginals[0], c.log_marginals[-1], rtol=1e-12)
    for k in e.state.params:
        np.testing.assert_allclose(
            np.asarray(e.state.params[k]), np.asarray(c.state.params[k]), rtol=1e-12, atol=1e-14
        )
    # continue from a result: init= takes its parameters
    d = sgd.run(jax.random.key(7), 1, init=c, **kw)
    np.testing.assert_allclose(d.log_marginals[0], dense_total(c.params, y), rtol=1e-9)


def test_frozen_sites_stay_fixed_minibatches_climb_and_step_compiles_once(y):
    frozen = {"A": jnp.array([[0.5]]), "Q": jnp.array([[0.3]])}
    traces = []

    def counted(*args, **kwargs):
        if isinstance(kwargs.get("y"), jax.core.Tracer):  # inside the jitted step
            traces.append(1)
        return numpyro.handlers.condition(lds, data=frozen)(*args, **kwargs)

    sgd = SGD(counted, optimizer=ADAM, batch_size=2)
    kw = dict(state_dim=DX, progress_bar=False)
    res = sgd.run(jax.random.key(8), 300, y=y, **kw)
    for k, v in frozen.items():
        np.testing.assert_array_equal(np.asarray(res.params[k]), np.asarray(v))
        assert k not in res.state.params
    assert {"C", "R", "d"} <= set(res.state.params)
    # noisy minibatch estimates (spread ~30 nats), but the trend is a climb (~90 nats)
    lls = res.log_marginals
    assert lls[-50:].mean() > lls[:50].mean() + 50
    # one trace of the step, whatever the number of steps, the data values or update()
    res2 = sgd.run(jax.random.key(9), 3, y=y[::-1].copy(), **kw)
    sgd.update(res2.state, y=y, state_dim=DX)
    assert len(traces) == 1


def test_non_finite_objective_stops_with_the_step_named(sgd, y):
    # data just below the data check's limit (|y| < 1.3e150) and a small observation
    # variance: the first step overflows (the objective's gradient, or the objective)
    big = y * (1e150 / np.max(np.abs(y)))
    start = {**TRUE, "R": 1e-8 * jnp.eye(DY)}
    with pytest.raises(FloatingPointError, match="SGD step 0: the (objective|optimizer)"):
        sgd.run(jax.random.key(1), 3, y=big, state_dim=DX, init_params=start,
                progress_bar=False)  # fmt: skip
    with pytest.raises(ValueError, match="too large to square"):  # refused before fitting
        sgd.run(jax.random.key(1), 3, y=y * 1e200, state_dim=DX, progress_bar=False)


def test_non_finite_parameters_stop_with_the_sites_named(y):
    poison = optax.stateless(lambda g, p: jax.tree_util.tree_map(lambda x: x * jnp.nan, g))
    with pytest.raises(FloatingPointError, match=r"SGD step 0: .*non-finite values for \['A'"):
        SGD(lds, optimizer=poison).run(jax.random.key(1), 3, y=y, state_dim=DX, progress_bar=False)


def test_to_inference_data_accepts_an_sgd_result(sgd_fit, y):
    idata = ppl_dyn.to_inference_data(sgd_fit, model=lds, y=y, state_dim=DX)
    assert idata.posterior["A"].shape == (1, 1, DX, DX)
    np.testing.assert_array_equal(
        idata.sample_stats["log_marginal"].values[0, 0], sgd_fit.log_marginals
    )
    # the one-step-ahead terms sum to the log-marginal at the fitted parameters; a point
    # estimate keeps them in sample_stats (no log_likelihood group: az.loo refuses it)
    assert "log_likelihood" not in idata.groups()
    total = float(idata.sample_stats["y_one_step_log_prob"].values.sum())
    assert abs(total - dense_total(sgd_fit.params, y)) <= 1e-8 * abs(total)


# --------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SGD(lds, e_step=ParticleSmoother()), "e_step"),
        (lambda: SGD(lds, e_step="kalman"), "e_step"),
        (lambda: SGD(lds, optimizer=0.01), "optimizer"),
        (lambda: SGD(lds, batch_size=0), "batch_size"),
        (lambda: SGD(lds, batch_size=1.5), "batch_size"),
        (lambda: SGD(lds, map_estimate="yes"), "map_estimate"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, y: s.run(jax.random.key(0), 0, y=y, state_dim=DX), "num_steps"),
        (lambda s, y: s.run(jax.random.key(0), 2.0, y=y, state_dim=DX), "num_steps"),
        (lambda s, y: s.run(None, 2, y=y, state_dim=DX), "rng_key"),
        (lambda s, y: s.run(jax.random.key(0), 2, rtol=-1.0, y=y, state_dim=DX), "rtol"),
        (
            lambda s, y: s.run(jax.random.key(0), 2, smoothing_window=0, y=y, state_dim=DX),
            "smoothing_window",
        ),
        (
            lambda s, y: s.run(jax.random.key(0), 2, init={}, init_params={}, y=y, state_dim=DX),
            "init",
        ),
        (
            lambda s, y: s.run(jax.random.key(0), 2, init_params=[1.0], y=y, state_dim=DX),
            "init_params",
        ),
        (lambda s, y: s.run(jax.random.key(0), 2, init_state={}, y=y, state_dim=DX), "init_state"),
        (
            lambda s, y: s.run(
                jax.random.key(0), 2, init_params={"A": jnp.ones((2, 2))}, y=y, state_dim=DX
            ),
            "A",
        ),
        (
            lambda s, y: SGD(lds, optimizer=ADAM, batch_size=S + 1).run(
                jax.random.key(0), 2, y=y, state_dim=DX
            ),
            "batch_size",
        ),
        (
            lambda s, y: SGD(lds, optimizer=ADAM, batch_size=2).run(
                jax.random.key(0), 2, y=y[0], state_dim=DX
            ),
            "batch_size",
        ),
        (lambda s, y: s.run(jax.random.key(0), 2, y=np.full_like(y, np.nan), state_dim=DX), "y"),
    ],
)
def test_bad_run_arguments_raise_value_error(sgd, y, call, match):
    with pytest.raises(ValueError, match=match):
        call(sgd, y)


def test_conflicting_e_steps_raise_value_error():
    wrapped = ppl_dyn.handlers.marginalize(lds, ExtendedKalmanSmoother())
    with pytest.raises(ValueError, match="e_step"):
        SGD(wrapped, KalmanSmoother())
    assert SGD(wrapped).e_step == ExtendedKalmanSmoother()
