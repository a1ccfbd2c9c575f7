"""What each plug-in needs from a model, checked when the model is bound.

A model is a NumPyro function; the plug-ins see it through the bridge as three
distributions (initial state, transition, emission). Each plug-in needs something of
them:

==========================  ============================================================
plug-in                     needs
==========================  ============================================================
``KalmanSmoother``          linear-Gaussian: Gaussian initial state, transition and
                            emission; means affine in the state; covariances that do
                            not depend on the state (they may change with the inputs,
                            and so may the matrices: ``H_t = u_t`` is exact)
``ExtendedKalmanSmoother``  Gaussian transition and emission (any spelling), means
                            differentiable in the state
``ParticleSmoother`` & co.  a transition that can be sampled and an emission with a
                            ``log_prob`` (any NumPyro distribution)
``LinearGaussianMStep``     a declared :class:`~ppl_dyn.LinearStructure`
``GradientMStep``           sampled paths (every E-step that can draw them)
==========================  ============================================================

The checks are *proofs*, not samples: :func:`affine_analysis` reads the program JAX
traces for a mean function (its jaxpr) and classifies every value as constant, affine or
nonlinear in the state, following each primitive's algebra (a product of two
state-dependent terms, ``sin`` of the state or a branch on the state make it
nonlinear). A Jacobian at one point would call ``sin`` linear near 0.

A model that does not qualify gets one :class:`UnsupportedModelError` (a
``ValueError``) naming the requirement it breaks and the plug-in that fits it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.extend.core import Literal
from numpyro.distributions.distribution import validation_enabled

__all__ = [
    "UnsupportedModelError",
    "gaussian_moments",
    "gaussian_form",
    "is_gaussian",
    "affine_analysis",
    "LinearGaussianForm",
    "linear_gaussian_form",
    "check_gaussian",
    "additive_gaussian",
    "verify_structure",
    "is_builtin_model",
    "model_kind",
]


class UnsupportedModelError(ValueError):
    """A plug-in was given a model it does not handle (the message says why and which
    plug-in fits)."""


# --------------------------------------------------------------------------------------
# Reading a Gaussian however it is spelled
# --------------------------------------------------------------------------------------

_MULTIVARIATE_GAUSSIANS = (dist.MultivariateNormal, dist.LowRankMultivariateNormal)


def _unwrap(d: dist.Distribution):
    """Base distribution under ``Independent``/``ExpandedDistribution`` wrappers."""
    base = d
    while isinstance(base, (dist.Independent, dist.ExpandedDistribution)):
        base = base.base_dist
    return base


def is_gaussian(d: dist.Distribution) -> bool:
    """Whether ``d`` is a Gaussian over its last event axis: ``MultivariateNormal`` (any
    parametrisation), ``LowRankMultivariateNormal`` or ``Normal`` with its last axis an
    event axis, under any ``Independent``/``expand`` wrappers."""
    if len(d.event_shape) != 1:
        return False
    base = _unwrap(d)
    if isinstance(base, _MULTIVARIATE_GAUSSIANS):
        return True
    return isinstance(base, dist.Normal)


def family_name(d: dist.Distribution) -> str:
    """The class name of ``d`` under its ``Independent``/``expand`` wrappers."""
    base = _unwrap(d)
    return type(base).__name__


def gaussian_moments(d: dist.Distribution, what: str) -> tuple[jax.Array, jax.Array]:
    """Mean ``(..., n)`` and covariance ``(..., n, n)`` of a Gaussian distribution.

    Reads every spelling :func:`is_gaussian` accepts; broadcast scales and expanded
    batch shapes are materialised. Raises :class:`UnsupportedModelError` otherwise.
    """
    if not is_gaussian(d):
        if len(d.event_shape) != 1:
            raise UnsupportedModelError(
                f"the {what} must have one event axis (a vector); got event shape "
                f"{tuple(d.event_shape)} from {type(d).__name__} (write "
                "dist.Normal(loc, scale).to_event(1) for independent entries)"
            )
        raise UnsupportedModelError(
            f"the {what} must be Gaussian (MultivariateNormal, LowRankMultivariateNormal "
            f"or Normal(...).to_event(1)); got {family_name(d)}"
        )
    shape = tuple(d.batch_shape) + tuple(d.event_shape)
    n = shape[-1]
    base = _unwrap(d)
    loc = jnp.broadcast_to(d.mean, shape)
    if isinstance(base, dist.Normal):
        var = jnp.broadcast_to(d.variance, shape)
        return loc, var[..., :, None] * jnp.eye(n, dtype=var.dtype)
    cov = base.covariance_matrix
    return loc, jnp.broadcast_to(cov, shape + (n,))


def gaussian_form(d: dist.Distribution, what: str):
    """``(loc, scale, diagonal)`` of a Gaussian: ``scale`` is the vector of standard
    deviations when ``diagonal`` (independent ``Normal`` entries), else a lower
    Cholesky factor of the covariance. Shapes broadcast to the distribution's."""
    if not is_gaussian(d):
        gaussian_moments(d, what)  # raises the named error
    shape = tuple(d.batch_shape) + tuple(d.event_shape)
    base = _unwrap(d)
    loc = jnp.broadcast_to(d.mean, shape)
    if isinstance(base, dist.Normal):
        return loc, jnp.broadcast_to(jnp.sqrt(d.variance), shape), True
    n = shape[-1]
    return loc, jnp.broadcast_to(base.scale_tril, shape + (n,)), False


# --------------------------------------------------------------------------------------
# Affine analysis of a traced program
# --------------------------------------------------------------------------------------

CONST, AFFINE, NONLINEAR = 0, 1, 2


class _Dep(NamedTuple):
    """What one traced value is, as a function of the state ``x`` and the input ``u``.

    ``x``: CONST (does not depend on ``x``), AFFINE or NONLINEAR in ``x``; ``u``: the
    value depends on ``u``; ``cu``: its coefficient of ``x`` depends on ``u`` (the
    matrix changes with the inputs); ``why``: the first operation that made it
    nonlinear."""

    x: int = CONST
    u: bool = False
    cu: bool = False
    why: Optional[str] = None


_C = _Dep()

# primitives that are linear in all their (array) operands jointly
_LINEAR = {
    "add", "sub", "neg", "add_any", "reduce_sum", "broadcast_in_dim", "reshape",
    "squeeze", "expand_dims", "transpose", "slice", "concatenate", "pad", "rev", "copy",
    "copy_p", "cumsum", "real", "imag", "conj", "reduce_precision",
    "sharding_constraint", "stop_gradient", "device_put", "optimization_barrier",
    "mesh_cast", "reshard", "split",
}  # fmt: skip
_CALLS = {
    "pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
    "custom_vjp_call", "custom_vjp_call_jaxpr", "remat2", "custom_lin",
}  # fmt: skip


def _join(ins, why=None) -> _Dep:
    x = max((d.x for d in ins), default=CONST)
    reason = why or next((d.why for d in ins if d.x == NONLINEAR and d.why), None)
    return _Dep(x, any(d.u for d in ins), any(d.cu for d in ins), reason)


def _nonlinear(ins, why: str) -> _Dep:
    if all(d.x == CONST for d in ins):
        return _Dep(CONST, any(d.u for d in ins), False)
    inherited = next((d.why for d in ins if d.x == NONLINEAR and d.why), None)
    return _Dep(NONLINEAR, any(d.u for d in ins), True, inherited or why)


def _product(a: _Dep, b: _Dep, name: str) -> _Dep:
    if a.x and b.x:
        return _nonlinear((a, b), f"a product of two state-dependent terms (`{name}`)")
    if b.x:
        a, b = b, a
    if a.x == NONLINEAR:
        return _Dep(NONLINEAR, a.u or b.u, True, a.why)
    return _Dep(a.x, a.u or b.u, a.cu or (a.x == AFFINE and b.u), None)


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is not None:
            return j
    return None


def _analyse(jaxpr, in_deps):
    """Propagate :class:`_Dep` through ``jaxpr`` (a ``core.Jaxpr``)."""
    env = {}

    def read(v):
        if isinstance(v, Literal):
            return _C
        return env.get(v, _C)

    for v, d in zip(jaxpr.invars, in_deps, strict=True):
        env[v] = d
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = _rule(eqn, ins)
        for v, d in zip(eqn.outvars, outs, strict=True):
            env[v] = d
    return [read(v) for v in jaxpr.outvars]


def _rule(eqn, ins) -> list:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if all(d.x == CONST for d in ins) and name not in _CALLS:
        return [_Dep(CONST, any(d.u for d in ins), False)] * n_out
    if name in _CALLS:
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            inner = getattr(sub, "jaxpr", sub)
            if len(inner.invars) == len(ins):
                return _analyse(inner, ins)
        return [_nonlinear(ins, f"`{name}`")] * n_out
    if name in _LINEAR:
        return [_join(ins)] * n_out
    if name == "convert_element_type":
        if jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
            return [_join(ins)]
        return [_nonlinear(ins, "a conversion to an integer or boolean type")]
    if name in ("mul", "dot_general"):
        return [_product(ins[0], ins[1], name)]
    if name == "div":
        if ins[1].x:
            return [_nonlinear(ins, "a division by a state-dependent term")]
        return [_product(ins[0], ins[1], name)]
    if name == "integer_pow" and eqn.params.get("y") == 1:
        return [ins[0]]
    if name == "triangular_solve":  # solve a x = b: linear in b for a constant a
        if ins[0].x:
            return [_nonlinear(ins, "a solve with a state-dependent matrix")]
        return [_product(ins[1], ins[0], name)]
    if name == "custom_linear_solve":  # consts of the four functions, then b
        num_consts = sum(eqn.params["const_lengths"])
        consts, b = ins[:num_consts], ins[num_consts:]
        if any(d.x for d in consts):
            return [_nonlinear(ins, "a solve with a state-dependent matrix")] * n_out
        return [_product(_join(b), _join(consts), name)] * n_out
    if name == "select_n":
        pred, cases = ins[0], ins[1:]
        if pred.x:
            return [_nonlinear(ins, "a branch on the state (where/select)")]
        out = _join(cases)
        return [out._replace(cu=out.cu or (pred.u and out.x == AFFINE))]
    if name in ("dynamic_slice", "gather"):
        op, idx = ins[0], ins[1:]
        if any(d.x for d in idx):
            return [_nonlinear(ins, "an index that depends on the state")]
        varies = any(d.u for d in idx) and op.x == AFFINE
        return [op._replace(u=op.u or any(d.u for d in idx), cu=op.cu or varies)]
    if name in ("dynamic_update_slice", "scatter-add", "scatter_add", "scatter"):
        if name == "dynamic_update_slice":
            data, idx = [ins[0], ins[1]], ins[2:]
        else:
            data, idx = [ins[0], ins[2]], [ins[1]]
        if any(d.x for d in idx):
            return [_nonlinear(ins, "an index that depends on the state")]
        out = _join(data)
        varies = any(d.u for d in idx) and out.x == AFFINE
        return [out._replace(u=out.u or any(d.u for d in idx), cu=out.cu or varies)]
    return [_nonlinear(ins, f"`{name}`")] * n_out


def affine_analysis(fn: Callable, x, u) -> list:
    """Classify each output of ``fn(x, u)`` (a pytree of arrays) against ``x`` and ``u``.

    ``x`` and ``u`` may be arrays or ``jax.ShapeDtypeStruct``; values closed over by
    ``fn`` (parameters, even tracers of an enclosing ``jit``) are constants. Returns a
    list (one per output leaf) of records with fields ``x`` (``CONST``/``AFFINE``/
    ``NONLINEAR`` in ``x``), ``u`` (depends on ``u``), ``cu`` (the coefficient of ``x``
    depends on ``u``) and ``why`` (the operation that made it nonlinear).
    """
    with validation_enabled(False):  # argument checks would run eagerly, op by op
        closed = jax.make_jaxpr(fn)(x, u)
    jaxpr = closed.jaxpr
    leaves_x = len(jax.tree_util.tree_leaves(x))
    leaves_u = len(jax.tree_util.tree_leaves(u))
    deps = [_Dep(AFFINE)] * leaves_x + [_Dep(CONST, True)] * leaves_u
    if len(jaxpr.invars) != len(deps):  # pragma: no cover - defensive
        raise RuntimeError("unexpected jaxpr signature")
    return _analyse(jaxpr, deps)


# --------------------------------------------------------------------------------------
# The requirements of the Gaussian plug-ins
# --------------------------------------------------------------------------------------

_WHICH_FITS = {
    "nonlinear": "ExtendedKalmanSmoother() (Gaussian noise, nonlinear means) or "
    "ParticleSmoother() (any model)",
    "non-gaussian": "ParticleSmoother() (any emission with a log_prob; EM with "
    "GradientMStep) or latent-state NUTS (MCMC(NUTS(model)))",
}


class LinearGaussianForm(NamedTuple):
    """What :func:`linear_gaussian_form` proved about a model (static, trace time).

    The ``*_varies`` flags say that a matrix or covariance changes with the inputs
    ``u_t`` (so the Kalman smoother carries one per step)."""

    F_varies: bool
    Q_varies: bool
    H_varies: bool
    R_varies: bool

    @property
    def time_varying(self) -> bool:
        return self.F_varies or self.Q_varies or self.H_varies or self.R_varies


def _abstract(ss, dtype):
    x = jax.ShapeDtypeStruct((ss.state_dim,), dtype)
    u = jax.ShapeDtypeStruct((ss.input_dim,), dtype)
    return x, u


def _check_family(ss, plugin: str, dtype) -> None:
    """Every law Gaussian (raises naming the first that is not)."""
    x, u = _abstract(ss, dtype)
    laws = (
        ("initial state distribution", lambda: ss.init),
        ("transition", lambda: abstract_distribution(ss.transition, x, u)),
        ("emission", lambda: abstract_distribution(ss.emission, x, u)),
    )
    for what, get in laws:
        d = get()
        if not is_gaussian(d):
            kind = "non-gaussian"
            if len(d.event_shape) != 1:
                detail = f"has event shape {tuple(d.event_shape)} (need one vector axis)"
            else:
                detail = f"is {family_name(d)}"
            raise UnsupportedModelError(
                f"{plugin} needs Gaussian initial, transition and emission distributions "
                f"(MultivariateNormal, LowRankMultivariateNormal or Normal(...).to_event(1)); "
                f"this model's {what} {detail}. Use {_WHICH_FITS[kind]}."
            )


def abstract_distribution(fn, x, u) -> dist.Distribution:
    """The distribution ``fn(x, u)`` built from abstract ``x``, ``u`` (its class and
    shapes only are read; nothing is computed)."""
    out = {}

    def run(xv, uv):
        out["d"] = fn(xv, uv)
        return 0.0

    with validation_enabled(False):  # argument checks would run eagerly, op by op
        jax.make_jaxpr(run)(x, u)
    return out["d"]


def check_gaussian(ss, plugin: str = "ExtendedKalmanSmoother") -> None:
    """Raise :class:`UnsupportedModelError` unless the model is what the extended
    Kalman smoother needs: Gaussian initial, transition and emission distributions and
    an emission covariance that does not depend on the state.

    The EKS linearises the means; what a state-dependent observation noise says about
    the state (stochastic volatility: ``y_t ~ N(0, exp(x_t))``) it cannot see, so such a
    model is refused rather than smoothed as if the data carried no information. A
    state-dependent transition covariance is read at the linearisation point (first
    order)."""
    dtype = _dtype(ss)
    _check_family(ss, plugin, dtype)
    x, u = _abstract(ss, dtype)
    cov = affine_analysis(lambda xv, uv: gaussian_moments(ss.emission(xv, uv), "emission")[1], x, u)
    if cov[0].x != CONST:
        raise UnsupportedModelError(
            f"{plugin} linearises the means and cannot use an observation noise that "
            "depends on the state (this model's emission covariance does). Use "
            f"{_WHICH_FITS['non-gaussian']}."
        )


def _dtype(ss):
    m = ss.init.mean
    dt = jnp.result_type(m)
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.result_type(float)


def linear_gaussian_form(ss, plugin: str = "KalmanSmoother", dtype=None) -> LinearGaussianForm:
    """Prove that ``ss`` is linear-Gaussian, or raise :class:`UnsupportedModelError`.

    Linear-Gaussian: Gaussian laws (any spelling), transition and emission means affine
    in the state, covariances independent of the state. Matrices and covariances may
    change with the inputs; the returned :class:`LinearGaussianForm` says which do.
    """
    dtype = _dtype(ss) if dtype is None else dtype
    _check_family(ss, plugin, dtype)
    x, u = _abstract(ss, dtype)
    flags = {}
    for what, fn, mat, cov in (
        ("transition", ss.transition, "F", "Q"),
        ("emission", ss.emission, "H", "R"),
    ):
        mean_dep, cov_dep = affine_analysis(
            lambda xv, uv, fn=fn, what=what: gaussian_moments(fn(xv, uv), what), x, u
        )
        if mean_dep.x == NONLINEAR:
            raise UnsupportedModelError(
                f"{plugin} needs means affine in the state; this model's {what} mean is "
                f"not ({mean_dep.why} of the state). Use {_WHICH_FITS['nonlinear']}."
            )
        if cov_dep.x != CONST:
            raise UnsupportedModelError(
                f"{plugin} needs noise covariances that do not depend on the state; this "
                f"model's {what} covariance does. Use {_WHICH_FITS['nonlinear']}."
            )
        flags[mat] = bool(mean_dep.cu)
        flags[cov] = bool(cov_dep.u)
    return LinearGaussianForm(flags["F"], flags["Q"], flags["H"], flags["R"])


def additive_gaussian(ss, which: str) -> bool:
    """Whether the ``which`` (``"transition"`` or ``"emission"``) law of ``ss`` is
    Gaussian with a covariance that does not depend on the state (its mean may be any
    function): then one factor of the covariance per step serves every particle.
    Decided from the traced program (trace time, no values)."""
    fn = ss.transition if which == "transition" else ss.emission
    x, u = _abstract(ss, _dtype(ss))
    if not is_gaussian(abstract_distribution(fn, x, u)):
        return False
    cov_dep = affine_analysis(lambda xv, uv: gaussian_moments(fn(xv, uv), which)[1], x, u)[0]
    return cov_dep.x == CONST


def model_kind(ss) -> str:
    """``"linear-gaussian"``, ``"gaussian"`` (nonlinear means or state-dependent noise)
    or ``"general"``: which family of plug-ins fits the model."""
    try:
        linear_gaussian_form(ss)
        return "linear-gaussian"
    except UnsupportedModelError:
        pass
    try:
        check_gaussian(ss)
        return "gaussian"
    except UnsupportedModelError:
        return "general"


# --------------------------------------------------------------------------------------
# A declared LinearStructure, checked against the distributions
# --------------------------------------------------------------------------------------


class _SpecView(NamedTuple):
    """The parts of a declaration the checks above read (duck-typed state space)."""

    spec: object

    @property
    def init(self):
        return self.spec.init

    @property
    def transition(self):
        return self.spec.transition

    @property
    def emission(self):
        return self.spec.emission

    @property
    def state_dim(self):
        return self.spec.state_dim

    @property
    def input_dim(self):
        return self.spec.u.shape[-1]


def is_builtin_model(model) -> bool:
    """Whether ``model`` (under any NumPyro handlers) is one of ``ppl_dyn.models``'
    linear-family models (marked ``_ppl_dyn_verified_structure``), whose
    LinearStructure is correct by construction and verified by the tests for every
    option."""
    fn = model
    while fn is not None and hasattr(fn, "fn") and not hasattr(fn, "__code__"):
        fn = fn.fn  # numpyro handlers (condition, substitute, ...) wrap the function
    return bool(getattr(fn, "_ppl_dyn_verified_structure", False))


def _declared_moments(reg, values: dict, x, u):
    """Mean ``W phi(x) + V u + c`` and covariance of a declared regression."""
    W = jnp.asarray(values[reg.weight])
    mean = reg.features(x) @ W.T
    if reg.input_weight is not None:
        mean = mean + u @ jnp.asarray(values[reg.input_weight]).T
    if reg.bias is not None:
        mean = mean + jnp.asarray(values[reg.bias])
    noise = jnp.asarray(values[reg.noise])
    cov = jnp.diag(noise) if reg.diagonal_noise else noise
    return mean, cov


def verify_structure(info, num_points: int = 4) -> None:
    """``ValueError`` unless the model's distributions are the ones its declared
    :class:`~ppl_dyn.LinearStructure` names: Gaussian transition and emission with
    means ``W phi(x) + V u + c`` and covariances ``Sigma`` (the named sites), and an
    initial law ``N(m0, P0)``. Compared at the starting values, at ``num_points`` random
    states and inputs (relative tolerance 1e-6; a term the declaration does not name, a
    feature other than the declared one or a wrong noise site shows up at once). The
    closed-form M-step solves the regressions the declaration names: without this
    check a mismatch would give a confident wrong fit."""
    spec, st = info.spec, info.spec.structure
    if st is None:
        return
    values = {**{k: s["value"] for k, s in info.free.items()}, **info.frozen}
    ss = _SpecView(spec)
    dtype = jnp.result_type(float)
    rng = np.random.default_rng(0)
    dx, du = spec.state_dim, spec.u.shape[-1]
    for reg in (st.dynamics, st.emission):  # the feature maps' own declarations
        reg.feature_map.check(dx, dtype)
    x = rng.normal(size=(num_points, dx)).astype(dtype)
    u = rng.normal(size=(num_points, du)).astype(dtype)
    xa = jax.ShapeDtypeStruct((dx,), dtype)
    ua = jax.ShapeDtypeStruct((du,), dtype)
    for which, fn in (("transition", spec.transition), ("emission", spec.emission)):
        if not additive_gaussian(ss, which):
            family = family_name(abstract_distribution(fn, xa, ua))
            raise ValueError(
                f"the model declares a LinearStructure, but its {which} ({family}) is not "
                "Gaussian with a covariance independent of the state; remove the "
                "declaration (and use GradientMStep) or fix the distribution"
            )

    def moments(x, u):
        out = []
        for which, reg, fn in (
            ("transition", st.dynamics, spec.transition),
            ("emission", st.emission, spec.emission),
        ):
            mean, cov = gaussian_moments(fn(x, u), which)
            d_mean, d_cov = _declared_moments(reg, values, x, u)
            out.append((mean, cov, d_mean, jnp.broadcast_to(d_cov, cov.shape)))
        m0, P0 = gaussian_moments(spec.init, "initial state distribution")
        m0d = jnp.asarray(values[st.init_mean])
        P0d = jnp.asarray(values[st.init_cov])
        out.append((m0, P0, m0d, jnp.diag(P0d) if st.diagonal_init else P0d))
        return out

    with validation_enabled(False):  # (argument checks would run eagerly, op by op)
        found = jax.jit(moments)(x, u)
    names = (
        (st.dynamics, "transition"),
        (st.emission, "emission"),
        (None, "initial state distribution"),
    )
    for (mean, cov, d_mean, d_cov), (reg, what) in zip(found, names, strict=True):
        for label, a, b in (("mean", mean, d_mean), ("covariance", cov, d_cov)):
            a, b = np.asarray(a), np.asarray(b)
            scale = max(1.0, float(np.max(np.abs(b))))
            gap = float(np.max(np.abs(a - b)))
            if not gap <= 1e-6 * scale:
                if reg is None:
                    declared = f"N({st.init_mean}, {st.init_cov})"
                else:
                    parts = [f"{reg.weight} {reg.feature_map.name}(x)"]
                    parts += [f"{reg.input_weight} u"] if reg.input_weight else []
                    parts += [reg.bias] if reg.bias else []
                    declared = " + ".join(parts) + f", noise {reg.noise}"
                raise ValueError(
                    f"the model's {what} {label} differs from its declared LinearStructure "
                    f"({declared}) by {gap:.3g} at the starting values: the closed-form "
                    "M-step would fit another model. Fix the declaration, or remove it "
                    "and use GradientMStep"
                )
