"""The plug-in contract (``ppl_dyn.infer.protocols``): stateful E-steps and M-steps run by
the one EM driver; PSAEM and PGAS are such pairs.

Oracles: the driver's own ``run`` against step-by-step ``update`` calls (the same
computation through the public SVI-shaped API), the stochastic-approximation recursion
recomputed by hand from the E-step's statistics, and refusals by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl_dyn
from ppl_dyn.infer import (
    CPFAS,
    EM,
    PSAEM,
    BackwardKernel,
    EStep,
    GibbsMStep,
    KalmanSmoother,
    LinearGaussianMStep,
    MStep,
    OnlineEM,
    PARISSmoother,
    ParticleSmoother,
    StatefulEStep,
    StatefulMStep,
    StochasticApproximation,
)
from ppl_dyn.infer._run import statistics_with_mask
from ppl_dyn.infer.em import iteration_keys
from ppl_dyn.models import lds

Y = np.asarray(ppl_dyn.simulate(jax.random.key(0), lds, num_steps=40, state_dim=1, obs_dim=2)["y"])
KW = dict(y=Y, state_dim=1)
PARAMS = EM(lds, KalmanSmoother()).run(jax.random.key(9), 3, progress_bar=False, **KW).params


def test_plugins_satisfy_their_protocols():
    assert isinstance(KalmanSmoother(), EStep) and not isinstance(KalmanSmoother(), StatefulEStep)
    assert isinstance(ParticleSmoother(50), EStep)
    assert isinstance(CPFAS(8), StatefulEStep)
    assert isinstance(LinearGaussianMStep(), MStep)
    assert not isinstance(LinearGaussianMStep(), StatefulMStep)
    assert isinstance(StochasticApproximation(), StatefulMStep)
    assert isinstance(GibbsMStep(), MStep)


def test_update_carries_the_states_and_equals_run():
    """Three ``update`` calls from ``init`` give the iterates of ``run`` with the same
    key (PSAEM's pair); the states advance (references drawn, average counted)."""
    em = EM(lds, CPFAS(8), StochasticApproximation(LinearGaussianMStep(), 0.5))
    state = em.init(jax.random.key(1), num_iters=3, **KW)
    assert not bool(state.e_state.conditional)
    assert int(state.m_state.count) == 0
    lls = []
    for _ in range(3):
        state, ll = em.update(state, **KW)
        lls.append(float(ll))
    assert bool(state.e_state.conditional) and int(state.m_state.count) == 3
    assert state.e_state.references.shape == (1, 40, 1)
    res = em.run(jax.random.key(1), 3, progress_bar=False, **KW)
    np.testing.assert_allclose(res.log_marginals, lls, rtol=1e-12)
    for k, v in state.params.items():
        np.testing.assert_allclose(res.state.params[k], v, rtol=1e-12)


def test_stochastic_approximation_averages_the_statistics():
    """One iteration with gamma = (1, 0.25): the M-step state after the second iteration
    is 0.75 S_1 + 0.25 S_2, with S_k the E-step's statistics recomputed from the same
    keys and parameters."""
    sa = StochasticApproximation(LinearGaussianMStep(), [1.0, 0.25])
    em = EM(lds, KalmanSmoother(), sa)
    s0 = em.init(jax.random.key(2), num_iters=2, **KW)
    s1, _ = em.update(s0, **KW)
    s2, _ = em.update(s1, **KW)

    @jax.jit
    def stats_at(params, it):
        ss, spec = ppl_dyn.bind(lds, params, **KW)
        k_e, _ = iteration_keys(s0.rng_key, it)
        post = KalmanSmoother().posterior(k_e, ss, spec.y, spec.u)
        return statistics_with_mask(LinearGaussianMStep(), post, ss, spec.y, spec.u)

    want = jax.tree_util.tree_map(
        lambda a, b: 0.75 * a + 0.25 * b, stats_at(s0.params, 0), stats_at(s1.params, 1)
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(s2.m_state.average), jax.tree_util.tree_leaves(want), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s2.m_state.step_sizes, [1.0, 0.25])


@pytest.mark.filterwarnings("ignore:.*eigenvalue floor:RuntimeWarning")
def test_psaem_is_the_driver_with_its_pair():
    """``PSAEM.run`` and ``EM(model, CPFAS, StochasticApproximation).run`` with the same
    key give the same iterates (one compilation: equal plug-ins hash alike)."""
    kw = dict(progress_bar=False, **KW)
    a = PSAEM(lds, 6, step_size=0.7).run(jax.random.key(3), 4, **kw)
    em = EM(lds, CPFAS(6), StochasticApproximation(step_size=0.7))
    b = em.run(jax.random.key(3), 4, keep_params_history=True, **kw)
    for k in a.params_history:
        np.testing.assert_allclose(a.params_history[k], b.params_history[k], rtol=1e-12)
    assert StochasticApproximation(step_size=0.7) == StochasticApproximation(step_size=0.2)


def test_callback_sees_every_iteration():
    seen = []
    EM(lds, KalmanSmoother()).run(
        jax.random.key(4), 3, callback=lambda it, p, e, m: seen.append((it, e, m)),
        progress_bar=False, **KW,
    )  # fmt: skip
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[1:] == ((), ()) for s in seen)


def test_refusals_name_the_plugin():
    sa = StochasticApproximation(LinearGaussianMStep(), lambda k: 1.0 / k)
    with pytest.raises(ValueError, match="num_iters"):
        EM(lds, KalmanSmoother(), sa).init(jax.random.key(0), **KW)
    # a Gibbs M-step needs a drawn path; the Kalman posterior here has none
    with pytest.raises(ValueError, match="GibbsMStep needs one drawn path"):
        EM(lds, KalmanSmoother(), GibbsMStep()).run(jax.random.key(0), 2, progress_bar=False, **KW)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("s",))
    with pytest.raises(ValueError, match="stateful"):
        EM(lds, CPFAS(4), sa).run(jax.random.key(0), 2, mesh=mesh, progress_bar=False, **KW)


def test_cpfas_path_feeds_the_gradient_m_step():
    """CPF-AS's posterior carries one drawn path, so the gradient M-step (which needs
    paths) runs on it: a finite, moved iterate."""
    from ppl_dyn.infer import GradientMStep

    res = EM(lds, CPFAS(8), GradientMStep(num_steps=5)).run(
        jax.random.key(5), 2, progress_bar=False, **KW
    )
    assert np.all(np.isfinite(res.log_marginals))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in res.params.values())
    assert jnp.asarray(res.params["A"]).shape == (1, 1)


# --------------------------------------------------------------------------------------
# one BackwardKernel value for FFBSi, PaRIS and online EM
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel, spelled",
    [
        (BackwardKernel("mcmc", num_mcmc_steps=3), dict(mode="ffbsi-mcmc", num_mcmc_steps=3)),
        (BackwardKernel("hybrid", max_trials=4), dict(mode="ffbsi-hybrid", max_trials=4)),
    ],
)
def test_one_kernel_value_spells_the_backward_modes(kernel, spelled):
    """A kernel value resolves to the spelled settings: the ones the posteriors read
    (``ParticleSmoother.backward_settings``, ``PARISSmoother.backward_kernel``)."""
    a = ParticleSmoother(32, mode="ffbsi", kernel=kernel, num_trajectories=8)
    b = ParticleSmoother(32, num_trajectories=8, **spelled)
    assert a.backward_settings() == b.backward_settings()
    assert a.backward_settings()[0] == spelled["mode"]
    p = PARISSmoother(32, kernel=kernel._replace(num_backward=3))
    q = PARISSmoother(32, num_backward=3, kernel=kernel.name, **{
        k: v for k, v in spelled.items() if k != "mode"})  # fmt: skip
    assert p.backward_kernel() == q.backward_kernel()


def test_kernel_value_refusals():
    ss, spec = ppl_dyn.bind(lds, PARAMS, **KW)
    with pytest.raises(ValueError, match="use mode='ffbsi'"):
        ParticleSmoother(16, mode="ffbsm", kernel=BackwardKernel()).posterior(
            jax.random.key(0), ss, spec.y, spec.u
        )
    with pytest.raises(ValueError, match="kernel must be one of"):
        PARISSmoother(16, kernel=BackwardKernel("exact")).posterior(
            jax.random.key(0), ss, spec.y, spec.u
        )
    with pytest.raises(ValueError, match="num_mcmc_steps"):
        OnlineEM(lds, kernel=BackwardKernel("mcmc", num_mcmc_steps=0))
