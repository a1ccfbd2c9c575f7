"""EM.run queues iteration k+1 before it reads iteration k's results (the device does
not wait for the host's checks). What it returns must not depend on that: a run that
stops by rtol returns the parameters of the iteration it stopped at, exactly those of
a run of that many iterations, and the speculative next iteration is dropped."""

import jax
import numpy as np

from ppl_dyn.infer import EM, KalmanSmoother
from ppl_dyn.models import lds


def _data_and_init():
    rng = np.random.default_rng(11)
    y = rng.standard_normal((80, 2))
    init = dict(
        A=0.3 * np.eye(2),
        C=rng.standard_normal((2, 2)),
        Q=0.5 * np.eye(2),
        R=0.5 * np.eye(2),
        m0=np.zeros(2),
        P0=np.eye(2),
        b=np.zeros(2),
        d=np.zeros(2),
    )
    return y, init


def test_rtol_stop_returns_the_stopping_iteration_not_the_queued_one():
    y, init = _data_and_init()
    em = EM(lds, KalmanSmoother())
    kw = dict(y=y, state_dim=2, init_params=init, progress_bar=False)
    stopped = em.run(jax.random.key(0), 200, rtol=1e-4, **kw)
    k = stopped.num_iters
    assert stopped.converged and 2 <= k < 200  # it stopped early, with one queued
    exact = em.run(jax.random.key(0), k, **kw)  # no iteration queued past the last
    assert stopped.state.iteration == exact.state.iteration == k
    np.testing.assert_array_equal(stopped.log_marginals, exact.log_marginals)
    for name in exact.params:
        np.testing.assert_array_equal(
            np.asarray(stopped.params[name]), np.asarray(exact.params[name]), err_msg=name
        )


def test_continuing_from_a_stopped_run_matches_one_longer_run():
    """The state after an rtol stop carries on as if the run had not stopped."""
    y, init = _data_and_init()
    em = EM(lds, KalmanSmoother())
    kw = dict(y=y, state_dim=2, progress_bar=False)
    first = em.run(jax.random.key(0), 200, rtol=1e-4, init_params=init, **kw)
    k = first.num_iters
    more = em.run(jax.random.key(0), 3, init_params=first, **kw)
    whole = em.run(jax.random.key(0), k + 3, init_params=init, **kw)
    np.testing.assert_allclose(more.log_marginals, whole.log_marginals[k:], rtol=1e-12)
