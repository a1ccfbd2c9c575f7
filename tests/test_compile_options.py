"""XLA compiler options of the Kalman E-step programs (``ppl_dyn.infer._compile``: the
E-steps declare ``small_matrix_programs``, the compile configuration picks the options).

The EM step and ``smooth`` compile with the E-step's options when they are called at top
level, and without them inside a user's ``jit`` / ``grad`` (XLA takes options from the
top-level program only). Oracle: the same program compiled with XLA's defaults.
"""

import jax
import jax.numpy as jnp
import numpy as np

import ppl_dyn
from ppl_dyn.infer import EM, ExtendedKalmanSmoother, KalmanSmoother, ParticleSmoother
from ppl_dyn.infer._compile import (
    SMALL_MATRIX_CPU_OPTIONS,
    clear_programs,
    compiler_options,
    jit_model,
    small_matrix_compiler_options,
)
from ppl_dyn.models import lds


def _data():
    sim = ppl_dyn.simulate(jax.random.key(3), lds, num_steps=60, state_dim=2, obs_dim=2)
    y = np.array(sim["y"])
    y[5, 0] = np.nan  # missing entry
    return sim["params"], jnp.asarray(y)


def _xla_knows(options) -> bool:
    try:
        jax.jit(lambda x: 2 * x, compiler_options=options).lower(1.0).compile()
    except Exception as e:
        assert "No such compile option" in str(e), e
        return False
    return True


def test_kalman_options_apply_on_cpu_only():
    # newer XLA (jaxlib >= 0.11) dropped the loop emitter's switch: then no options
    want = SMALL_MATRIX_CPU_OPTIONS if _xla_knows(SMALL_MATRIX_CPU_OPTIONS) else None
    assert small_matrix_compiler_options("cpu") == want
    assert small_matrix_compiler_options("gpu") is None
    assert jax.default_backend() == "cpu"  # (this suite runs on the CPU)
    assert compiler_options(KalmanSmoother()) == want
    assert compiler_options(ExtendedKalmanSmoother()) == want
    # E-steps that do not declare small-matrix programs: XLA's defaults
    assert compiler_options(ParticleSmoother(10)) is None
    assert compiler_options(object()) is None


def test_tuned_em_step_equals_default_compilation_and_runs_inside_jit():
    clear_programs()  # counted below: none compiled by earlier tests
    params, y = _data()
    em = EM(lds, KalmanSmoother())
    state = em.init(jax.random.key(0), y=y, state_dim=2)
    new, ll = em.update(state, y=y, state_dim=2)  # top level: the tuned program

    # oracle: the same step function compiled with XLA's defaults
    from ppl_dyn.infer._run import validate_data

    step, dynamic = em._compiled(validate_data(dict(y=y, state_dim=2)))
    plain = jax.jit(step.__wrapped__)
    ref_params, ref_ll, *_ = plain(state.params, dynamic, state.rng_key, np.int32(0))
    np.testing.assert_allclose(ll, ref_ll, rtol=1e-12)
    for k in ref_params:
        np.testing.assert_allclose(new.params[k], ref_params[k], rtol=1e-9, atol=1e-12)

    # inside a user's jit the step runs without options (no error), same numbers
    @jax.jit
    def inside(p):
        s = state._replace(params=p)
        return em.update(s, y=y, state_dim=2)[1]

    np.testing.assert_allclose(inside(state.params), ll, rtol=1e-12)
    # the tuned program and the plain one (inside jit); one plain jit where XLA has no
    # such options
    assert step._cache_size() == (2 if _xla_knows(SMALL_MATRIX_CPU_OPTIONS) else 1)


def test_smooth_under_grad_matches_top_level():
    params, y = _data()
    ks = KalmanSmoother()
    top = ks.smooth(params, lds, y=y, state_dim=2).log_marginal

    def f(scale):
        p = {**params, "R": params["R"] * scale}
        return ks.smooth(p, lds, y=y, state_dim=2).log_marginal

    val, grad = jax.value_and_grad(f)(1.0)
    np.testing.assert_allclose(val, top, rtol=1e-12)
    eps = 1e-6
    fd = (f(1.0 + eps) - f(1.0 - eps)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


def test_jit_model_without_options_is_plain_jit():
    f = jit_model(lambda x: x + 1.0)
    assert hasattr(f, "lower") and float(f(jnp.float64(1.0))) == 2.0
