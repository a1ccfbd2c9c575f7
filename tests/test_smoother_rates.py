"""Every particle smoother's EM statistics converge to the exact ones at the Monte Carlo
rate (issue 8: "each new smoother against RTS on an LDS at the Monte Carlo rate").

Oracle: the exact expected sufficient statistics of the closed-form M-step from the
Kalman/RTS smoother on the same LDS and data. For each smoother, the mean squared error
of the dynamics statistics over ``R`` independent reruns is measured at three particle
counts; at the Monte Carlo rate ``MSE ~ c / N`` the log-log slope is -1. The slope's
standard error is computed from the reruns (delta method on the log of each MSE), and
the check is a z-test against -1 plus a test that the slope is clearly negative. The
negative control runs FFBSm with N = 100 at every nominal N (an estimator whose error
does not fall): the same check rejects it, so it has power. (FFBSi with a fixed number of
trajectories M = 8 was tried as a control and fell at slope -1.16 over N = 100..1600:
its statistics' error is dominated by the filter there, not by the 8 paths.)
"""

import jax
import numpy as np
import oracles as O
import pytest

from ppl_dyn.infer import KalmanSmoother, LinearGaussianMStep, ParticleSmoother
from ppl_dyn.infer.paris import PARISSmoother, paris_linear_statistics
from ppl_dyn.models import lds
from ppl_dyn.state_space import bind

NS = (100, 400, 1600)
R = 24
T = 40


def _system():
    params = dict(
        A=np.array([[0.9]]), C=np.array([[1.0]]), Q=np.array([[0.5]]), R=np.array([[0.5]]),
        m0=np.array([0.3]), P0=np.array([[1.0]]), b=np.array([0.1]), d=np.array([-0.2]),
    )  # fmt: skip
    _, y = O.sample_lds(np.random.default_rng(3), params, T)
    ss, spec = bind(lds, params, y=y, state_dim=1)
    return ss, spec


def _vector(stats):
    d = stats.dynamics
    return np.concatenate([np.ravel(d.S_zr), np.ravel(d.S_rr), np.ravel(d.S_zz)]) / (T - 1)


def _runner(name, ss, spec, n):
    ms = LinearGaussianMStep()
    if name == "paris":
        e = PARISSmoother(n, num_backward=2, kernel="mcmc")

        def run(key):
            return paris_linear_statistics(e.posterior(key, ss, spec.y, spec.u))

    else:
        mode, m = {
            "ffbsm": ("ffbsm", n),
            "ffbsi-mcmc": ("ffbsi-mcmc", n),
            "ffbsi-hybrid": ("ffbsi-hybrid", n),
            "ffbsm, N = 100 (control)": ("ffbsm", n),
        }[name]
        if "control" in name:
            n = NS[0]  # the particle count does not grow: the error cannot fall
        e = ParticleSmoother(n, mode=mode, num_trajectories=m)

        def run(key):
            return ms.statistics(e.posterior(key, ss, spec.y, spec.u), ss, spec.y, spec.u)

    return jax.jit(jax.vmap(run))


def _slope(name):
    """Log-log slope of MSE against N and its standard error."""
    ss, spec = _system()
    kal = KalmanSmoother().posterior(None, ss, spec.y, spec.u)
    exact = _vector(LinearGaussianMStep().statistics(kal, ss, spec.y, spec.u))
    logs, variances = [], []
    for i, n in enumerate(NS):
        keys = jax.random.split(jax.random.key(100 + i), R)
        stats = _runner(name, ss, spec, n)(keys)
        err = np.stack([_vector(jax.tree_util.tree_map(lambda a, r=r: a[r], stats))
                        for r in range(R)]) - exact  # fmt: skip
        sq = np.sum(err**2, -1)  # (R,)
        mse = sq.mean()
        logs.append(np.log(mse))
        variances.append(sq.var(ddof=1) / R / mse**2)  # var of log(MSE), delta method
    x = np.log(NS)
    xc = x - x.mean()
    w = xc / np.sum(xc**2)
    slope = float(np.sum(w * np.array(logs)))
    se = float(np.sqrt(np.sum(w**2 * np.array(variances))))
    return slope, se


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ffbsm", "ffbsi-mcmc", "ffbsi-hybrid", "paris"])
def test_em_statistics_converge_at_the_monte_carlo_rate(name):
    slope, se = _slope(name)
    assert abs(slope + 1.0) < 4.0 * se + 0.15, (slope, se)
    assert slope < -0.6, (slope, se)


@pytest.mark.slow
def test_rate_check_rejects_an_estimator_whose_error_does_not_fall():
    slope, se = _slope("ffbsm, N = 100 (control)")
    assert not (abs(slope + 1.0) < 4.0 * se + 0.15 and slope < -0.6), (slope, se)
