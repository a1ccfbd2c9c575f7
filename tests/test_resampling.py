"""The linear-time resampling schemes (ppl_dyn.infer.resampling) against BlackJAX's
search-based ones (same key, same ancestors) and against their defining property:
unbiased offspring counts, E[#{j : a_j = i}] = n w_i, integrated exactly over the
uniform offset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.smc import resampling as bj

from ppl_dyn.infer import resampling as R


def _weights(key, N, concentration):
    return jax.random.dirichlet(key, jnp.full((N,), concentration))


@pytest.mark.parametrize("name", ["systematic", "stratified"])
def test_same_ancestors_as_blackjax(name):
    # jitted (n static): one program per shape instead of op-by-op dispatch
    ours = jax.jit(getattr(R, name), static_argnums=2)
    theirs = jax.jit(getattr(bj, name), static_argnums=2)
    for s in range(60):
        k1, k2 = jax.random.split(jax.random.key(s))
        N = (1, 2, 7, 100, 1000)[s % 5]
        w = _weights(k1, N, (0.05, 1.0, 5.0)[s % 3])
        for n in (N, max(1, N // 3), 2 * N):
            a = np.asarray(ours(k2, w, n))
            b = np.asarray(theirs(k2, w, n))
            np.testing.assert_array_equal(a, b)
            assert a.dtype == np.int32 and a.shape == (n,)


def test_systematic_counts_are_unbiased_over_the_offset():
    # the offspring counts are piecewise constant in the offset u with at most N jumps:
    # a midpoint rule with K nodes integrates them to within N / K of the exact mean
    w = _weights(jax.random.key(3), 50, 0.3)
    n, K = 80, 20_000
    us = (jnp.arange(K) + 0.5) / K
    idx = jax.vmap(lambda u: R.systematic_from_uniform(u, w, n))(us)
    counts = jax.vmap(lambda a: jnp.zeros(50).at[a].add(1.0))(idx)
    np.testing.assert_allclose(np.asarray(counts.mean(0)), n * np.asarray(w), atol=50 / K)
    # and every count is floor or ceil of n w_i (the defining low-variance property)
    lo, hi = np.floor(n * np.asarray(w)), np.ceil(n * np.asarray(w))
    c = np.asarray(counts)
    assert np.all((c >= lo - 1e-9) & (c <= hi + 1e-9))


def test_stratified_counts_are_unbiased():
    # Monte Carlo over the n independent offsets: the count of i is a sum of independent
    # Bernoullis (one per stratum), so its variance is at most n / 4 per draw
    w = _weights(jax.random.key(4), 30, 0.5)
    n, R_ = 40, 20_000
    keys = jax.random.split(jax.random.key(5), R_)
    idx = jax.vmap(lambda k: R.stratified(k, w, n))(keys)
    counts = np.asarray(jax.vmap(lambda a: jnp.zeros(30).at[a].add(1.0))(idx))
    se = counts.std(0, ddof=1) / np.sqrt(R_)
    z = (counts.mean(0) - n * np.asarray(w)) / np.maximum(se, 1e-12)
    assert np.max(np.abs(z)) < 4.5, z  # 30 comparisons: a Bonferroni bound at ~2e-4


def test_degenerate_and_rounded_weights_stay_in_range():
    # one weight carries everything; a total that rounds below 1 must not index past N
    w = jnp.zeros(10).at[7].set(1.0)
    for f in (R.systematic, R.stratified, R.multinomial):
        a = np.asarray(f(jax.random.key(0), w, 10))
        np.testing.assert_array_equal(a, 7)
    w = jnp.full((10,), 0.1 * (1 - 1e-12))
    for f in (R.systematic, R.stratified):
        a = np.asarray(f(jax.random.key(1), w, 10))
        assert a.min() >= 0 and a.max() <= 9
