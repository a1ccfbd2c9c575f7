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


def test_invalid_start_raises_cleanly_while_the_step_compiles_ahead():
    """EM.run compiles its step in a thread while init validates the starting values;
    when init refuses them, the process must end with the Python error, not abort in
    XLA at exit (exit status 134, "terminate called ...")."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import jax, numpy as np
        jax.config.update("jax_enable_x64", True)
        from ppl_dyn.infer import EM, KalmanSmoother
        from ppl_dyn.models import lds
        y = np.random.default_rng(0).normal(size=(50, 1))
        bad = {"A": 0.5 * np.eye(2), "C": np.ones((1, 2)), "Q": -np.eye(2),
               "R": np.eye(1), "b": np.zeros(2), "d": np.zeros(1), "m0": np.zeros(2),
               "P0": np.eye(2)}
        EM(lds, KalmanSmoother()).run(jax.random.key(0), 3, y=y, state_dim=2,
                                      init_params=bad, progress_bar=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "ValueError" in proc.stderr and "terminate called" not in proc.stderr
