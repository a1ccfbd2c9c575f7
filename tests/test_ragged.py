"""Sequences of different lengths: exact pooled statistics through a time mask.

Oracles: separate runs on each sequence cut at its length (statistics summed, then the
M-step), the dense joint Gaussian's log-marginal (tests/oracles.py), and, for particles,
FFBSm run again on the same filter particles cut at each length. Padding is shown not to
be the same as missing observations at the end.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import oracles as O
import pytest

import ppl_dyn
from ppl_dyn import bind
from ppl_dyn.infer import (
    EM,
    ExtendedKalmanSmoother,
    KalmanSmoother,
    LinearGaussianMStep,
    ParticleSmoother,
)
from ppl_dyn.infer._pattern import MIXED, RAGGED, data_pattern
from ppl_dyn.infer._run import ragged_data
from ppl_dyn.infer.em import _make_step
from ppl_dyn.infer.kalman import kalman_smooth_ragged, linear_gaussian_view
from ppl_dyn.infer.mstep import complete_data_log_lik
from ppl_dyn.infer.particle import (
    FilterOutput,
    ParticlePosterior,
    ffbsm,
    particle_linear_statistics,
)
from ppl_dyn.models import lds, tanh_rnn

LENGTHS = [9, 25, 1, 17]


def lds_data(seed, inner_missing, lengths=LENGTHS, dx=2, dy=3, du=1):
    """Per-sequence data of a random LDS, cut at ``lengths``, and the true parameters."""
    rng = np.random.default_rng(seed)
    params = O.random_lds_params(rng, dx, dy, 0.9, du=du)
    ys, us = [], []
    for n in lengths:
        u = rng.normal(size=(n, du))
        y = O.sample_lds(rng, params, n, u)[1]
        if inner_missing and n > 3:
            y[1, 0] = np.nan
            y[n // 2] = np.nan
        ys.append(y)
        us.append(u)
    return params, ys, us


def padded(ys, us, rng):
    """Padded arrays with junk (finite) after each end: lengths must make it irrelevant."""
    T = max(len(y) for y in ys)
    y_pad = rng.normal(size=(len(ys), T, ys[0].shape[1])) * 100.0
    u_pad = rng.normal(size=(len(us), T, us[0].shape[1]))
    for s, (y, u) in enumerate(zip(ys, us, strict=True)):
        y_pad[s, : len(y)] = y
        u_pad[s, : len(u)] = u
    return y_pad, u_pad, np.array([len(y) for y in ys])


def add_stats(a, b):
    return b if a is None else jax.tree_util.tree_map(jnp.add, a, b)


@functools.lru_cache(maxsize=None)
def separate_run(model, e_step, static_items):
    """Jitted statistics and log-marginal of one sequence run on its own (cached, so the
    tests share compilations per sequence length)."""
    mstep = LinearGaussianMStep()

    @jax.jit
    def one(p, data):
        ss, spec = bind(model, p, **data, **dict(static_items))
        post = e_step.posterior(jax.random.key(0), ss, spec.y, spec.u)
        return mstep.statistics(post, ss, spec.y, spec.u), jnp.sum(post.log_marginal)

    return one


def pooled_separate(model, e_step, params, ys, us, **static):
    """One M-step on the summed statistics of separate runs, one per cut sequence;
    returns the new parameters and the summed log-marginals."""
    one = separate_run(model, e_step, tuple(sorted(static.items())))
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    total, ll = None, 0.0
    for s, y in enumerate(ys):
        data = {"y": y[None]} if us is None else {"y": y[None], "u": us[s][None]}
        stats, lm = one(jp, data)
        total, ll = add_stats(total, stats), ll + float(lm)
    data = {"y": ys[0][None]} if us is None else {"y": ys[0][None], "u": us[0][None]}
    ss, _ = bind(model, jp, **data, **static)
    new, _ = LinearGaussianMStep().update(total, ss, frozenset(params))
    return {k: np.asarray(new.get(k, v)) for k, v in jp.items()}, ll


def em_one(model, e_step, params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # covariance floor
        return EM(model, e_step).run(
            jax.random.key(0), 1, init_params=params, progress_bar=False, **kw
        )


def assert_params_close(a, b, tol=1e-10):
    for k in b:
        np.testing.assert_allclose(
            np.asarray(a[k]), np.asarray(b[k]), rtol=tol, atol=tol, err_msg=k
        )


# the plain ragged case is slow-only: ragged+missing covers it and more (default-suite budget)
@pytest.mark.parametrize(
    "inner_missing",
    [pytest.param(False, marks=pytest.mark.slow), True],
    ids=["ragged", "ragged+missing"],
)
def test_ragged_kalman_em_equals_pooled_separate_runs(inner_missing):
    params, ys, us = lds_data(0, inner_missing)
    want, ll_sep = pooled_separate(lds, KalmanSmoother(), params, ys, us, state_dim=2)
    # lists of arrays
    res = em_one(lds, KalmanSmoother(), params, y=ys, u=us, state_dim=2)
    assert_params_close(res.params, want)
    # padded arrays (junk after the ends) with lengths=
    y_pad, u_pad, lengths = padded(ys, us, np.random.default_rng(1))
    res2 = em_one(lds, KalmanSmoother(), params, y=y_pad, u=u_pad, lengths=lengths, state_dim=2)
    assert_params_close(res2.params, want)
    # log-marginal of the ragged batch = sum of the dense joint Gaussian's, per sequence
    dense = sum(O.dense_log_marginal(params, y, u) for y, u in zip(ys, us, strict=True))
    assert abs(res.log_marginals[0] - dense) < 1e-9 * abs(dense)
    assert abs(res2.log_marginals[0] - dense) < 1e-9 * abs(dense)
    assert abs(ll_sep - dense) < 1e-9 * abs(dense)


@pytest.mark.slow  # default-suite budget
def test_ragged_pattern_hint_equals_unhinted_step():
    """The RAGGED hint (no imputation terms) and the run-time choice agree."""
    params, ys, us = lds_data(2, False)
    kwargs, mask = ragged_data({"y": ys, "u": us})
    assert data_pattern(kwargs["y"], mask) == RAGGED
    kwargs_m, mask_m = ragged_data({"y": lds_data(2, True)[1], "u": us})
    assert data_pattern(kwargs_m["y"], mask_m) == MIXED
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    args = (lds, KalmanSmoother(), LinearGaussianMStep(), (("state_dim", 2),))
    hinted = _make_step(*args, RAGGED)(jp, kwargs, jax.random.key(1), 0, mask)
    plain = _make_step(*args, None)(jp, kwargs, jax.random.key(1), 0, mask)
    np.testing.assert_allclose(hinted[1], plain[1], rtol=1e-12)
    assert_params_close(hinted[0], plain[0], 1e-11)


@pytest.mark.slow  # default-suite budget
def test_ragged_smooth_equals_separate_smooths():
    params, ys, us = lds_data(3, True)
    post = KalmanSmoother().smooth(params, lds, y=ys, u=us, state_dim=2)
    assert post.means.shape == (4, 25, 2)
    for s, (y, u) in enumerate(zip(ys, us, strict=True)):
        one = KalmanSmoother().smooth(params, lds, y=y, u=u, state_dim=2)
        n = len(y)
        np.testing.assert_allclose(post.means[s, :n], one.means, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(post.covs[s, :n], one.covs, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(
            post.cross_covs[s, : n - 1], one.cross_covs, rtol=1e-10, atol=1e-10
        )
        np.testing.assert_allclose(post.log_marginal[s], one.log_marginal, rtol=1e-12)
        assert np.all(np.asarray(post.predicted_log_probs[s, n:]) == 0.0)
    # the EKS (equal to the Kalman smoother on an LDS) through padded arrays + lengths
    y_pad, u_pad, lengths = padded(ys, us, np.random.default_rng(0))
    ek = ExtendedKalmanSmoother().smooth(
        params, lds, y=y_pad, u=u_pad, lengths=lengths, state_dim=2
    )
    for s, n in enumerate(lengths):
        np.testing.assert_allclose(ek.means[s, :n], post.means[s, :n], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(ek.covs[s, :n], post.covs[s, :n], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ek.log_marginal, post.log_marginal, rtol=1e-10)


@pytest.mark.slow  # default-suite budget
def test_ragged_eks_em_equals_pooled_separate_runs():
    kw = dict(state_dim=2, obs_dim=2)
    sim = ppl_dyn.simulate(jax.random.key(4), tanh_rnn, num_steps=20, num_sequences=3, **kw)
    y = np.array(sim["y"])
    ys = [y[0, :20], y[1, :6], y[2, :13]]
    ys[0][4, 1] = np.nan
    params = {k: np.asarray(v) for k, v in sim["params"].items()}
    eks = ExtendedKalmanSmoother(num_iterations=2)
    want, ll_sep = pooled_separate(tanh_rnn, eks, params, ys, None, state_dim=2)
    res = em_one(tanh_rnn, eks, params, y=ys, state_dim=2)
    assert_params_close(res.params, want)
    assert abs(res.log_marginals[0] - ll_sep) < 1e-10 * abs(ll_sep)


def test_ragged_particle_statistics_equal_ffbsm_on_the_cut_particle_system():
    """Same filter particles: FFBSm on each cut sequence, statistics summed, equals the
    masked statistics of the padded batch (the backward pass restarts at each end)."""
    lengths = [6, 15, 1, 11]
    params, ys, us = lds_data(5, True, lengths=lengths)
    kwargs, mask = ragged_data({"y": ys, "u": us})
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    ss, spec = bind(lds, jp, state_dim=2, **kwargs)
    feature = ss.structure.dynamics.features

    @functools.partial(jax.jit, static_argnums=0)
    def padded_run(mode, y, u, m):
        smoother = ParticleSmoother(num_particles=64, chunk_size=None, mode=mode)
        post = smoother.posterior(jax.random.key(7), ss, y, u, time_mask=m)
        return post, LinearGaussianMStep().statistics(post, ss, y, u, time_mask=m)

    @jax.jit
    def cut_run(X, LW, y, u):  # one sequence cut at its length, no mask
        log_v, pair = ffbsm(ss, FilterOutput(X, LW, None, None, None, None), u, feature)
        post = ParticlePosterior(X[None], LW[None], log_v[None], pair[None], None, 0.0, 0.0)
        return log_v, particle_linear_statistics(post, ss, y[None], u[None])

    for mode in ("ffbsm",):
        post, got = padded_run(mode, spec.y, spec.u, mask)
        total = None
        for s, n in enumerate(lengths):
            X, LW = post.particles[s, :n], post.filter_log_weights[s, :n]
            log_v, stats = cut_run(X, LW, spec.y[s, :n], spec.u[s, :n])
            np.testing.assert_allclose(post.smoothed_log_weights[s, :n], log_v, atol=1e-12)
            total = add_stats(total, stats)
        leaves = zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(total), strict=True)
        for a, b in leaves:
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
        assert float(got.init.n) == 4 and float(got.emission.n) == sum(lengths)


@pytest.mark.slow  # default-suite budget
def test_masked_complete_data_log_lik_equals_cut_sequences():
    lengths = [4, 9, 2]
    params, ys, us = lds_data(6, True, lengths=lengths)
    kwargs, mask = ragged_data({"y": ys, "u": us})
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    ss, spec = bind(lds, jp, state_dim=2, **kwargs)
    traj = jax.random.normal(jax.random.key(0), (3, 5, 9, 2), jnp.float64)
    traj = traj.at[0, :, 4:].set(jnp.inf)  # junk after an end is ignored
    f = jax.jit(lambda *a: complete_data_log_lik(ss, *a))
    got = f(traj, spec.y, spec.u, mask)
    want = sum(
        f(traj[s : s + 1, :, :n], spec.y[s : s + 1, :n], spec.u[s : s + 1, :n])
        for s, n in enumerate(lengths)
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_padding_is_not_missing():
    """NaN padding without lengths keeps the log-marginal but treats the padded steps as
    real steps with missing observations: more terms, different parameters."""
    params, ys, us = lds_data(8, False)
    y_pad, u_pad, lengths = padded(ys, us, np.random.default_rng(0))
    kwargs, mask = ragged_data({"y": y_pad, "u": u_pad}, lengths)
    y_nan = kwargs["y"]  # NaN after each end
    with_len = em_one(lds, KalmanSmoother(), params, y=y_nan, u=u_pad, lengths=lengths, state_dim=2)
    missing = em_one(lds, KalmanSmoother(), params, y=y_nan, u=u_pad, state_dim=2)
    np.testing.assert_allclose(with_len.log_marginals, missing.log_marginals, rtol=1e-12)
    diff = max(np.max(np.abs(with_len.params[k] - missing.params[k])) for k in ("A", "Q", "C"))
    assert diff > 1e-3, diff
    jp = {k: jnp.asarray(v) for k, v in params.items()}

    @jax.jit
    def counts(p, y, u, m):
        ss, spec = bind(lds, p, state_dim=2, y=y, u=u)
        post = KalmanSmoother().posterior(None, ss, spec.y, spec.u)
        masked = LinearGaussianMStep().statistics(post, ss, spec.y, spec.u, time_mask=m)
        plain = LinearGaussianMStep().statistics(post, ss, spec.y, spec.u)
        return masked, plain

    masked, plain = counts(jp, y_nan, u_pad, mask)
    assert float(masked.emission.n) == sum(LENGTHS)
    assert float(plain.emission.n) == len(LENGTHS) * max(LENGTHS)
    assert float(masked.dynamics.n) == sum(LENGTHS) - len(LENGTHS)


def test_new_lengths_do_not_recompile():
    params, ys, us = lds_data(9, False)
    y_pad, u_pad, lengths = padded(ys, us, np.random.default_rng(0))
    em = EM(lds, KalmanSmoother())
    kw = dict(y=y_pad, u=u_pad, state_dim=2)
    state = em.init(jax.random.key(0), init_params=params, lengths=lengths, **kw)
    # the compiled step is shared (cached) with other tests of this worker that use the
    # same model and options: count what this test adds
    kwargs, mask = ragged_data(kw, lengths)
    step, _ = em._compiled(kwargs, time_mask=mask)
    before = step._cache_size()
    lls = []
    for new in (lengths, [3, 25, 2, 20], [25, 25, 25, 1]):
        state, ll = em.update(state, lengths=np.array(new), **kw)
        lls.append(float(ll))
    assert step._cache_size() - before <= 1  # one shape, three sets of lengths
    assert np.all(np.isfinite(lls))


BAD = [
    (dict(lengths=[9, 25, 0, 17]), r"lengths\[2\] = 0 is outside \[1, 25\]"),
    (dict(lengths=[9, 26, 1, 17]), r"lengths\[1\] = 26 is outside"),
    (dict(lengths=[9, -1, 1, 17]), r"lengths\[1\] = -1"),
    (dict(lengths=[9.5, 25, 1, 17]), "lengths must be integers"),
    (dict(lengths=[True, True, True, True]), "lengths must be integers"),
    (dict(lengths=[9, 25, 1]), "lengths must have one entry per sequence"),
    (dict(lengths=[[9, 25, 1, 17]]), "lengths must have one entry per sequence"),
]


@pytest.mark.parametrize("kw, match", BAD)
def test_bad_lengths_raise(kw, match):
    params, ys, us = lds_data(10, False)
    y_pad, u_pad, _ = padded(ys, us, np.random.default_rng(0))
    with pytest.raises(ValueError, match=match):
        em_one(lds, KalmanSmoother(), params, y=y_pad, u=u_pad, state_dim=2, **kw)
    with pytest.raises(ValueError, match=match):
        KalmanSmoother().smooth(params, lds, y=y_pad, u=u_pad, state_dim=2, **kw)


def test_bad_ragged_inputs_raise():
    params, ys, us = lds_data(11, False)
    ks = KalmanSmoother()
    with pytest.raises(ValueError, match="the sequences in y disagree in dimension"):
        ks.smooth(params, lds, y=[ys[0], ys[1][:, :2]], state_dim=2)
    with pytest.raises(ValueError, match=r"u\[1\] has 24 time steps but y\[1\] has 25"):
        ks.smooth(params, lds, y=ys, u=[us[0], us[1][1:], us[2], us[3]], state_dim=2)
    with pytest.raises(ValueError, match="the sequences in u disagree in dimension"):
        ks.smooth(params, lds, y=ys, u=[us[0], np.ones((25, 2)), us[2], us[3]], state_dim=2)
    with pytest.raises(ValueError, match="y is an empty list"):
        ks.smooth(params, lds, y=[], state_dim=2)
    with pytest.raises(ValueError, match=r"y\[2\] has 0 time steps"):
        ks.smooth(params, lds, y=[ys[0], ys[1], ys[2][:0]], state_dim=2)
    with pytest.raises(ValueError, match=r"y\[1\] must have shape \(num_steps, dim\)"):
        ks.smooth(params, lds, y=[ys[0], ys[1][None]], state_dim=2)
    with pytest.raises(ValueError, match="lengths= needs y with a sequence axis"):
        ks.smooth(params, lds, y=ys[1], lengths=[5], state_dim=2)
    with pytest.raises(ValueError, match=r"lengths \[9, 25, 1, 16\] disagree"):
        ks.smooth(params, lds, y=ys, u=us, lengths=[9, 25, 1, 16], state_dim=2)
    with pytest.raises(ValueError, match="u is a list of per-sequence arrays but y is not"):
        ks.smooth(params, lds, y=ys[1], u=[us[1]], state_dim=2)
    with pytest.raises(ValueError, match=r"u must have shape \(4, 25, input_dim\)"):
        ks.smooth(params, lds, y=ys, u=np.zeros((4, 24, 1)), state_dim=2)


def test_pad_sequences_helper():
    y, u, lengths = ppl_dyn.pad_sequences(
        [np.ones((2, 3)), np.zeros((4, 3))], [np.ones((2, 1)), np.ones((4, 1))]
    )
    assert y.shape == (2, 4, 3) and u.shape == (2, 4, 1)
    assert lengths.tolist() == [2, 4]
    assert np.all(np.isnan(y[0, 2:])) and np.all(u[0, 2:] == 0)
    assert not np.any(np.isnan(y[1]))


@pytest.mark.slow  # 4096 sequences and 5 compilations: minutes on a busy 2-core CPU
def test_many_short_sequences_run_as_one_vmapped_em():
    """4096 sequences (T <= 20, dx = 2) in one jitted EM step; the pooled statistics
    equal those of separate complete batches, one per length (the shared-covariance
    Kalman path: a different code path)."""
    rng = np.random.default_rng(12)
    params = O.random_lds_params(rng, 2, 2, 0.8)
    S, T = 4096, 20
    choices = np.array([1, 5, 12, 20])
    lengths = choices[rng.integers(0, 4, size=S)]
    # the LDS recursion, vectorised over the sequences
    A, C, b, d = (np.asarray(params[k]) for k in ("A", "C", "b", "d"))
    LQ, LR = (np.linalg.cholesky(O.as_cov(params[k])) for k in ("Q", "R"))
    x = params["m0"] + rng.normal(size=(S, 2)) @ np.linalg.cholesky(O.as_cov(params["P0"])).T
    xs = [x]
    for _ in range(T - 1):
        xs.append(xs[-1] @ A.T + b + rng.normal(size=(S, 2)) @ LQ.T)
    y = np.stack(xs, 1) @ C.T + d + rng.normal(size=(S, T, 2)) @ LR.T
    res = em_one(lds, KalmanSmoother(), params, y=y, lengths=lengths, state_dim=2)
    ys = {n: y[lengths == n, :n] for n in choices}
    mstep = LinearGaussianMStep()
    jp = {k: jnp.asarray(v) for k, v in params.items()}

    @jax.jit
    def group(p, y_g):
        ss, spec = bind(lds, p, y=y_g, state_dim=2)
        post = KalmanSmoother().posterior(None, ss, spec.y, spec.u)
        return mstep.statistics(post, ss, spec.y, spec.u), jnp.sum(post.log_marginal)

    total, ll = None, 0.0
    for n in choices:
        stats, lm = group(jp, ys[n])
        total, ll = add_stats(total, stats), ll + float(lm)
    ss, _ = bind(lds, jp, y=y[:1], state_dim=2)
    new, _ = mstep.update(total, ss, frozenset(params))
    assert_params_close(res.params, {k: new.get(k, v) for k, v in jp.items()}, 1e-9)
    assert abs(res.log_marginals[0] - ll) < 1e-10 * abs(ll)


def test_per_length_covariance_path_equals_per_sequence_passes():
    """The "ragged" fast path (one covariance pass per possible length, shared by the
    sequences of that length) equals the vmapped per-sequence passes, including a
    length-0 padding sequence."""
    lengths = [9, 25, 1, 17, 9, 0]
    params, ys, us = lds_data(13, False, lengths=[n or 1 for n in lengths])
    y_pad, u_pad, _ = padded(ys, us, np.random.default_rng(0))
    mask = np.arange(25)[None, :] < np.array(lengths)[:, None]
    y_pad[~mask] = np.nan
    jp = {k: jnp.asarray(v) for k, v in params.items()}

    @jax.jit
    def both(p, y, u, m):
        ss, spec = bind(lds, p, state_dim=2, y=y, u=u)
        views = jax.vmap(lambda u_s: linear_gaussian_view(ss, u_s))(spec.u)
        view0 = jax.tree_util.tree_map(lambda a: a[0], views)
        fast = kalman_smooth_ragged(view0, views.c, views.e, spec.y, m)
        slow = KalmanSmoother().posterior(None, ss, spec.y, spec.u, time_mask=m)
        return fast, slow

    fast, slow = both(jp, y_pad, u_pad, mask)
    for s, n in enumerate(lengths):
        for name in ("means", "covs", "filtered_means", "filtered_covs"):
            a, b = getattr(fast, name)[s, :n], getattr(slow, name)[s, :n]
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)
        a, b = fast.cross_covs[s, : max(n - 1, 0)], slow.cross_covs[s, : max(n - 1, 0)]
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fast.log_marginal, slow.log_marginal, rtol=1e-12)
    assert float(fast.log_marginal[-1]) == 0.0
