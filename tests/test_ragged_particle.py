"""Ragged lengths in the particle E-steps that accumulate along the forward pass: PaRIS,
CPF-AS (PSAEM) and PGAS.

Oracles: the same algorithm run on each sequence cut at its length, with the same
per-sequence keys (``jax.random.split`` of a partitionable key is prefix-stable: the
keys of step ``t`` do not depend on ``T``, checked below), statistics summed: equal to
rounding; the exact-EM fixed point of the ragged batch (Kalman smoother with the time
mask) for PSAEM; a grid posterior with the dense joint-Gaussian likelihood of the cut
sequences for PGAS. Padded arrays with junk after each end and lists of arrays give the
same draws.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import oracles as O
import pytest
from psaem_checks import (
    FREE,
    assert_sa_reaches_fixed_point,
    em_fixed_point,
    run_noisy_and_sa,
)
from scipy.special import logsumexp

from ppl_dyn import bind
from ppl_dyn.infer import (
    CPFAS,
    EM,
    PGAS,
    PSAEM,
    CPFState,
    LinearGaussianMStep,
    MNIWPrior,
    PARISSmoother,
    StochasticApproximation,
)
from ppl_dyn.infer._run import ragged_data
from ppl_dyn.infer.cpf import conditional_particle_filter, path_posterior
from ppl_dyn.infer.em import _make_step, iteration_keys
from ppl_dyn.infer.paris import paris_filter
from ppl_dyn.infer.pgas import _path_stats
from ppl_dyn.models import lds

LENGTHS = [6, 1, 6]  # two distinct lengths: two compilations of each cut run


def lds_data(seed, lengths=LENGTHS, dx=2, dy=2, du=1):
    """Per-sequence data of a random LDS cut at ``lengths`` (missing entries inside),
    the true parameters, and the padded arrays with finite junk after each end."""
    rng = np.random.default_rng(seed)
    params = O.random_lds_params(rng, dx, dy, 0.9, du=du)
    ys, us = [], []
    for n in lengths:
        u = rng.normal(size=(n, du))
        y = np.array(O.sample_lds(rng, params, n, u)[1])
        if n > 3:
            y[1, 0] = np.nan
            y[n // 2] = np.nan
        ys.append(y)
        us.append(u)
    T = max(lengths)
    y_pad = rng.normal(size=(len(ys), T, dy)) * 100.0
    u_pad = rng.normal(size=(len(us), T, du))
    for s, n in enumerate(lengths):
        y_pad[s, :n], u_pad[s, :n] = ys[s], us[s]
    return params, ys, us, y_pad, u_pad


def add_stats(a, b):
    return b if a is None else jax.tree_util.tree_map(jnp.add, a, b)


def assert_trees_close(a, b, tol=1e-10):
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    for x, y in leaves:
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_split_keys_are_prefix_stable():
    """What the exact oracles rely on: the first ``L`` keys of ``split(key, T)`` are
    ``split(key, L)`` (partitionable threefry), for the shapes the filters use."""
    key = jax.random.key(3)
    for shape, cut in (((20,), (7,)), ((20, 3), (7, 3)), ((20, 2), (1, 2))):
        a = jax.random.key_data(jax.random.split(key, shape))[: cut[0]]
        b = jax.random.key_data(jax.random.split(key, cut))
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------
# PaRIS
# --------------------------------------------------------------------------------------

N_PARIS = 32


@jax.jit
def _paris_cut_run(params, key, y, u):
    """PaRIS on one sequence cut at its length, no mask."""
    ss, spec = bind(lds, params, y=y, u=u, state_dim=2)
    return paris_filter(key, ss, spec.y[0], spec.u[0], N_PARIS)


def test_ragged_paris_equals_separate_runs_on_cut_sequences():
    """``PARISSmoother.smooth`` on a list of sequences (per-sequence keys ``split(key,
    S)``) equals PaRIS run on each sequence alone with its key: statistics and
    log-marginals to 1e-10; padded arrays with junk after each end plus ``lengths=``
    give the same numbers."""
    params, ys, us, y_pad, u_pad = lds_data(0)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    sm = PARISSmoother(N_PARIS)
    key = jax.random.key(11)
    post = sm.smooth(params, lds, y=ys, u=us, state_dim=2, rng_key=key)
    keys = jax.random.split(key, len(LENGTHS))
    for s, n in enumerate(LENGTHS):
        out = _paris_cut_run(jp, keys[s], ys[s][None], us[s][None])
        assert_trees_close(jax.tree_util.tree_map(lambda a, s=s: a[s], post.stats), out.stats)
        np.testing.assert_allclose(post.log_marginal[s], out.log_marginal, rtol=1e-12)
        np.testing.assert_allclose(post.ess[s, :n], out.ess, rtol=1e-10)
    assert int(post.info.num_proposals[1]) == 0  # length 1: no backward draw counted
    junk = sm.smooth(params, lds, y=y_pad, u=u_pad, lengths=LENGTHS, state_dim=2, rng_key=key)
    assert_trees_close(junk.stats, post.stats, 1e-12)
    np.testing.assert_allclose(junk.log_marginal, post.log_marginal, rtol=1e-12)


@pytest.mark.slow  # one more PaRIS compilation (the EM step)
def test_ragged_paris_em_step_equals_m_step_of_separate_runs():
    """One jitted EM step with PaRIS on the ragged batch plus a length-0 sequence (as a
    mesh pads with): new parameters = the M-step of the summed statistics of PaRIS on
    the cut sequences (E-step key ``split(key)[0]``), log-marginal = their sum, to
    1e-10; the length-0 sequence adds nothing, not even its initial state."""
    params, ys, us, y_pad, u_pad = lds_data(0)
    lengths = np.array(LENGTHS + [0])
    y_pad = np.concatenate([y_pad, np.zeros_like(y_pad[:1])], 0)
    u_pad = np.concatenate([u_pad, np.zeros_like(u_pad[:1])], 0)
    mask = np.arange(y_pad.shape[1])[None, :] < lengths[:, None]
    y_pad[~mask] = np.nan
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    mstep = LinearGaussianMStep()
    step = _make_step(lds, PARISSmoother(N_PARIS), mstep, (("state_dim", 2),), None)
    key = jax.random.key(12)
    new, ll, *_ = step(jp, {"y": y_pad, "u": u_pad}, key, 0, mask)
    keys = jax.random.split(iteration_keys(key, 0)[0], len(lengths))
    total, ll_sep = None, 0.0
    for s in range(len(LENGTHS)):
        out = _paris_cut_run(jp, keys[s], ys[s][None], us[s][None])
        total, ll_sep = add_stats(total, out.stats), ll_sep + float(out.log_marginal)
    S = len(LENGTHS)
    counts = [float(total.init.n), float(total.emission.n), float(total.dynamics.n)]
    np.testing.assert_allclose(counts, [S, sum(LENGTHS), sum(LENGTHS) - S], rtol=1e-12)
    ss, _ = bind(lds, jp, y=ys[0][None], u=us[0][None], state_dim=2)
    want, _ = mstep.update(total, ss, frozenset(jp))
    assert_trees_close({k: new[k] for k in want}, want)
    np.testing.assert_allclose(ll, ll_sep, rtol=1e-12)


# --------------------------------------------------------------------------------------
# CPF-AS and PSAEM
# --------------------------------------------------------------------------------------

N_CPF = 8


@jax.jit
def _cpf_cut_sweep(p, y, u, ref, key):
    """A CPF-AS sweep on one sequence cut at its length (no mask) and the PSAEM
    statistics of its weighted paths."""
    ss, spec = bind(lds, p, y=y, u=u, state_dim=2)
    out = conditional_particle_filter(key, ss, spec.y[0], spec.u[0], ref, N_CPF)
    post = path_posterior(out, ss.structure.dynamics.features)
    post = jax.tree_util.tree_map(lambda a: a[None], post)
    return out, LinearGaussianMStep().statistics(post, ss, spec.y, spec.u)


def test_ragged_psaem_step_equals_m_step_of_cut_sweeps():
    """One jitted PSAEM iteration (gamma = 1, conditional on references that are NaN
    after each end) on the ragged batch: its statistics are the sum of those of CPF-AS
    sweeps on the cut sequences with the same keys, its new references theirs (then
    repeating their last state), its new parameters the M-step of the sum; to 1e-10."""
    params, ys, us, _, _ = lds_data(3)
    kwargs, mask = ragged_data({"y": ys, "u": us})
    S, T = mask.shape
    refs = np.array(jax.random.normal(jax.random.key(6), (S, T, 2), jnp.float64))
    refs[~mask] = np.nan  # junk after the end is never used
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    mstep = LinearGaussianMStep()
    # the PSAEM pair, as PSAEM builds it, through the EM driver's compiled step
    e_step, sa = CPFAS(N_CPF), StochasticApproximation(mstep, 1.0)
    step = _make_step(lds, e_step, sa, (("state_dim", 2),))
    em = EM(lds, e_step, sa)
    e_state0, m_state0 = em._initial_states(jp, {**kwargs, "state_dim": 2}, mask, 1)
    e_state = CPFState(jnp.asarray(refs), jnp.asarray(True))
    key = jax.random.key(4)
    new, ll, _, finite, _, e_state, m_state = step(
        jp, kwargs, key, np.int32(0), mask, e_state=e_state, m_state=m_state0
    )
    assert e_state0.references.shape == refs.shape and not bool(e_state0.conditional)
    new_refs, stats = e_state.references, m_state.average
    assert all(bool(v) for v in finite.values())
    keys = jax.random.split(iteration_keys(key, 0)[0], S)
    total, ll_sep = None, 0.0
    for s, n in enumerate(LENGTHS):
        out, st = _cpf_cut_sweep(jp, ys[s][None], us[s][None], refs[s, :n], keys[s])
        total, ll_sep = add_stats(total, st), ll_sep + float(out.log_marginal)
        np.testing.assert_allclose(new_refs[s, :n], out.reference, rtol=1e-12)
        np.testing.assert_array_equal(
            new_refs[s, n:], np.broadcast_to(new_refs[s, n - 1], (T - n, 2))
        )
    assert_trees_close(stats, total)
    np.testing.assert_allclose(ll, ll_sep, rtol=1e-12)
    counts = [float(stats.init.n), float(stats.emission.n), float(stats.dynamics.n)]
    np.testing.assert_allclose(counts, [S, sum(LENGTHS), sum(LENGTHS) - S], rtol=1e-12)
    ss, _ = bind(lds, jp, y=ys[0][None], u=us[0][None], state_dim=2)
    want, _ = mstep.update(total, ss, frozenset(jp))
    assert_trees_close({k: new[k] for k in want}, want)


@pytest.mark.slow  # the PSAEM step test above covers the masking
def test_ragged_psaem_lists_equal_padded_arrays_with_lengths():
    """Lists of sequences and padded arrays with junk after each end plus ``lengths=``
    give the same PSAEM iterates."""
    params, ys, us, y_pad, u_pad = lds_data(4, lengths=[7, 3, 10])
    lengths = [7, 3, 10]
    kw = dict(init_params=params, state_dim=2, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # covariance floor
        alg = PSAEM(lds, N_CPF, step_size=0.5)
        a = alg.run(jax.random.key(1), 4, y=ys, u=us, **kw)
        b = alg.run(jax.random.key(1), 4, y=y_pad, u=u_pad, lengths=lengths, **kw)
    for k in a.params_history:
        np.testing.assert_allclose(a.params_history[k], b.params_history[k], rtol=1e-10)
    np.testing.assert_allclose(a.log_marginals, b.log_marginals, rtol=1e-12)


@pytest.mark.slow  # one PGAS compilation (~20 s on the shared 2-core machine)
def test_ragged_pgas_lists_equal_padded_arrays_with_lengths():
    """Lists of sequences and padded arrays with junk after each end plus ``lengths=``
    give the same PGAS draws; the kept states repeat their last state after each end."""
    params, ys, us, y_pad, u_pad = lds_data(4, lengths=[7, 3, 10])
    lengths = [7, 3, 10]
    free = ("A", "C", "Q")
    model = numpyro.handlers.condition(lds, {k: v for k, v in params.items() if k not in free})
    pg = PGAS(model, num_particles=N_CPF)
    kw = dict(num_chains=2, init_params=params, state_dim=2, progress_bar=False)
    c = pg.run(jax.random.key(2), 3, y=ys, u=us, keep_states=True, **kw)
    d = pg.run(jax.random.key(2), 3, y=y_pad, u=u_pad, lengths=lengths, keep_states=True, **kw)
    for k in free:
        np.testing.assert_allclose(c.samples[k], d.samples[k], rtol=1e-10)
        assert np.all(np.isfinite(c.samples[k]))
    np.testing.assert_allclose(c.states, d.states, rtol=1e-10)
    assert c.states.shape == (2, 3, 3, 10, 2)
    np.testing.assert_array_equal(c.states[:, :, 1, 3:], c.states[:, :, 1, 2:3].repeat(7, 2))


def test_ragged_pgas_path_statistics_equal_cut_paths():
    """The complete-data statistics of a path with the time mask (inf and NaN junk after
    the end) equal those of the path cut at the end; a length-0 sequence adds nothing."""
    params, ys, us, _, _ = lds_data(5, lengths=[6])
    ss, _ = bind(lds, {k: jnp.asarray(v) for k, v in params.items()}, y=ys[0][None], state_dim=2)
    rng = np.random.default_rng(0)
    n, T = 6, 10
    X = rng.normal(size=(T, 2))
    X[n:] = np.inf
    y = np.where(np.isnan(ys[0]), 0.5, ys[0])
    y = np.concatenate([y, np.full((T - n, 2), np.nan)])
    u = np.concatenate([us[0], np.full((T - n, 1), np.inf)])
    valid = np.arange(T) < n
    got = jax.jit(lambda *a: _path_stats(ss, *a))(X, y, u, valid)
    want = jax.jit(lambda *a: _path_stats(ss, *a))(X[:n], y[:n], u[:n])
    assert_trees_close(got, want, 1e-12)
    empty = _path_stats(ss, X, y, u, np.zeros(T, bool))
    for leaf in jax.tree_util.tree_leaves(empty):
        assert np.all(np.asarray(leaf) == 0.0)


# --------------------------------------------------------------------------------------
# convergence on a ragged batch
# --------------------------------------------------------------------------------------

TRUE = O.scalar_lds_params()
MODEL = numpyro.handlers.condition(lds, {k: v for k, v in TRUE.items() if k not in FREE})
RAGGED = [60, 25, 40, 5]


def scalar_ragged_data(seed=3):
    rng = np.random.default_rng(seed)
    return [np.array(O.sample_lds(rng, TRUE, n)[1]) for n in RAGGED]


@pytest.mark.slow  # two 300-iteration PSAEM runs and an EM run to convergence (~15 s)
def test_ragged_psaem_converges_to_the_ragged_exact_em_fixed_point():
    """The PSAEM check of tests/test_psaem.py on a ragged batch (lengths 60, 25, 40, 5):
    the exact-EM fixed point (Kalman smoother with the time mask, to rtol 1e-13) is the
    target. gamma = 1 iterates scatter around it with an s.d. sigma_1; with the decaying
    schedule the last iterate is within 0.75 sigma_1 (a ~3.4 s.d. bound, see there).

    The NaN-padded batch without lengths has the same likelihood, hence the same fixed
    point: this checks convergence on ragged data end to end; the exact tests above
    check that the padded steps are left out of the statistics."""
    ys = scalar_ragged_data()
    noisy, sa = run_noisy_and_sa(MODEL, ys)
    assert_sa_reaches_fixed_point(noisy, sa, em_fixed_point(MODEL, ys))


def _grid_posterior_A(ys, prior_sd):
    """p(A | ragged ys) on a grid: the dense-Gaussian likelihood of each cut sequence,
    summed, times the N(0, prior_sd^2) prior."""
    grid = np.linspace(0.3, 1.2, 181)  # A = 1.4: T = 60 gives a non-PD dense covariance
    lp = np.array(
        [sum(O.dense_log_marginal({**TRUE, "A": np.array([[a]])}, y) for y in ys) for a in grid]
    )
    lp = lp - 0.5 * grid**2 / prior_sd**2
    w = np.exp(lp - logsumexp(lp))
    mean = w @ grid
    return mean, np.sqrt(w @ (grid - mean) ** 2)


@pytest.mark.slow  # 8 chains x 300 draws (~20 s)
def test_ragged_pgas_matches_grid_posterior_of_the_cut_sequences():
    """A free, the MNIW prior A | Q ~ N(0, Q / 2) = N(0, 0.5^2) with Q = 0.5 frozen (as
    in tests/test_psaem.py): the posterior mean and s.d. of A on the ragged batch against
    the grid posterior of the cut sequences, within 4 Monte Carlo standard errors."""
    ys = scalar_ragged_data(seed=8)
    model = numpyro.handlers.condition(lds, {k: v for k, v in TRUE.items() if k != "A"})
    pgas = PGAS(model, num_particles=10, priors={"dynamics": MNIWPrior(col_precision=2.0)})
    res = pgas.run(
        jax.random.key(0),
        300,
        num_warmup=50,
        num_chains=8,
        y=ys,
        state_dim=1,
        progress_bar=False,
    )
    mean, sd = _grid_posterior_A(ys, 0.5)
    A = res.samples["A"][..., 0, 0]
    se = A.mean(1).std(ddof=1) / np.sqrt(A.shape[0])
    assert abs(A.mean() - mean) < 4 * se, (A.mean(), mean, se)
    assert se < 0.1 * sd
    assert abs(A.std() / sd - 1) < 0.1, (A.std(), sd)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def test_bad_lengths_raise_naming_lengths():
    params, ys, us, y_pad, u_pad = lds_data(6, lengths=[4, 6])
    kw = dict(y=y_pad, u=u_pad, state_dim=2, progress_bar=False)
    match = "lengths must have one entry per sequence"
    with pytest.raises(ValueError, match=match):
        PSAEM(lds, 4).run(jax.random.key(0), 2, lengths=[4, 6, 1], **kw)
    with pytest.raises(ValueError, match=match):
        PGAS(lds, 4).run(jax.random.key(0), 2, lengths=[[4, 6]], **kw)
    with pytest.raises(ValueError, match=r"lengths\[1\] = 7 is outside"):
        PSAEM(lds, 4).run(jax.random.key(0), 2, lengths=[4, 7], **kw)
    with pytest.raises(ValueError, match=match):
        PARISSmoother(8).smooth(
            params, lds, y=y_pad, u=u_pad, lengths=[4], state_dim=2, rng_key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match=r"lengths \[4, 5\] disagree"):
        PSAEM(lds, 4).run(jax.random.key(0), 2, y=ys, u=us, lengths=[4, 5], state_dim=2)
