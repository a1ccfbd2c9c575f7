"""The bridge between NumPyro model functions and ppl_dyn's inference plug-ins.

This is the only module that touches NumPyro internals (the effect-handler stack).
A model declares its Markov structure with :func:`markov`; :func:`bind` runs the model
with given parameter values under a capturing handler and returns a :class:`StateSpace`,
a bundle of pure functions (initial law, transition, emission) that every E-step consumes.

Convention for a model written by a user (see ``docs/models.md``):

* parameters are ``numpyro.sample`` sites with priors, drawn *before* calling
  :func:`markov`;
* ``transition(x_prev, u_t)`` and ``emission(x_t, u_t)`` return NumPyro distributions and
  broadcast over leading batch dimensions of their arguments (``x @ A.T``, not ``A @ x``);
* ``u_t`` is an array of shape ``(..., input_dim)`` (``input_dim`` may be 0);
* NaN entries of ``y`` are missing observations.

When the model runs outside :func:`bind` (under NUTS, ``Predictive`` or
:func:`ppl_dyn.simulate`), :func:`markov` samples the latent states with
``numpyro.contrib.control_flow.scan``: sites ``x_1``/``y_1`` for the first step and
``x``/``y`` (leading time axis) for steps ``2..T``.
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.control_flow import scan as numpyro_scan
from numpyro.distributions.batch_util import promote_batch_shape
from numpyro.distributions.distribution import validation_enabled
from numpyro.primitives import Messenger, apply_stack

from ppl_dyn._prior_draw import generator_from_key, numpy_draw
from ppl_dyn._validation import check_observations, device_array, is_concrete
from ppl_dyn.features import Features, features_named
from ppl_dyn.requirements import (
    abstract_distribution,
    additive_gaussian,
    gaussian_form,
    gaussian_moments,
    is_gaussian,
)

__all__ = [
    "Regression",
    "LinearStructure",
    "MarkovSpec",
    "StateSpace",
    "markov",
    "bind",
    "inspect_model",
    "ModelInfo",
    "gaussian_moments",
]

_MSG_TYPE = "ppl_dyn_markov"
_LATENT = {"ppl_dyn_role": "markov"}  # marks the state/observation sites markov() samples


def is_markov_site(site: dict) -> bool:
    """Whether a trace site is a state or observation site sampled by :func:`markov`."""
    return site.get("infer", {}).get("ppl_dyn_role") == "markov"


class Regression(NamedTuple):
    """Roles of the sites in one linear-in-parameters Gaussian map.

    ``z ~ N(W phi(x) + V u + c, Sigma)`` where the names below are the *site names*
    of ``W`` (``weight``), ``V`` (``input_weight``), ``c`` (``bias``) and ``Sigma``
    (``noise``). ``feature`` is ``phi``: a :class:`~ppl_dyn.Features` value (a user's own
    map) or a built-in's name, ``"linear"`` (identity), ``"tanh"`` or ``"rbf"`` (with
    ``feature_args=(centres, widths)``). ``diagonal_noise`` says that the noise site holds
    a vector of variances.
    """

    weight: str
    noise: str
    feature: Union[str, Features] = "linear"
    input_weight: Optional[str] = None
    bias: Optional[str] = None
    diagonal_noise: bool = False
    feature_args: tuple = ()  # e.g. (centres, widths) for "rbf"

    @property
    def feature_map(self) -> Features:
        """``phi`` as a :class:`~ppl_dyn.Features` value."""
        return features_named(self.feature, self.feature_args)

    def features(self, x: jax.Array) -> jax.Array:
        """The regressor features ``phi(x)`` for states ``x`` ``(..., dx)``."""
        return self.feature_map(x)


class LinearStructure(NamedTuple):
    """Declares that a model is linear in its parameters (closed-form M-steps apply)."""

    dynamics: Regression
    emission: Regression
    init_mean: str
    init_cov: str
    diagonal_init: bool = False


class MarkovSpec(NamedTuple):
    """What a model declares through :func:`markov` (data already normalised)."""

    init: dist.Distribution
    transition: Callable[[jax.Array, jax.Array], dist.Distribution]
    emission: Callable[[jax.Array, jax.Array], dist.Distribution]
    y: Optional[jax.Array]  # (S, T, obs_dim), NaN = missing; None when simulating
    u: jax.Array  # (S, T, input_dim), input_dim may be 0
    num_steps: int
    num_sequences: int
    batched: bool  # whether the user passed a leading sequence axis
    state_dim: int
    obs_dim: int
    structure: Optional[LinearStructure]
    state_name: str
    obs_name: str


class StateSpace(NamedTuple):
    """Pure functions of one parameter set, shared by all sequences.

    Attributes:
        init: distribution of ``x_1`` (event shape ``(state_dim,)``).
        transition: ``(x_prev, u_t) -> distribution of x_t`` (broadcasting).
        emission: ``(x_t, u_t) -> distribution of y_t`` (broadcasting).
        params: values of every parameter site (free and frozen).
        structure: the model's :class:`LinearStructure`, or ``None``.
    """

    init: dist.Distribution
    transition: Callable[[jax.Array, jax.Array], dist.Distribution]
    emission: Callable[[jax.Array, jax.Array], dist.Distribution]
    params: dict
    structure: Optional[LinearStructure]
    state_dim: int
    obs_dim: int
    input_dim: int

    # Gaussian moment views (used by Kalman / extended Kalman smoothers) -------------
    def transition_mean(self, x: jax.Array, u: jax.Array) -> jax.Array:
        return self.transition(x, u).mean

    def emission_mean(self, x: jax.Array, u: jax.Array) -> jax.Array:
        return self.emission(x, u).mean

    def init_moments(self) -> tuple[jax.Array, jax.Array]:
        return gaussian_moments(self.init, "initial state distribution")

    def transition_cov(self, u: jax.Array) -> jax.Array:
        x0 = jnp.zeros((self.state_dim,), dtype=u.dtype)
        return gaussian_moments(self.transition(x0, u), "transition")[1]

    def emission_cov(self, u: jax.Array) -> jax.Array:
        x0 = jnp.zeros((self.state_dim,), dtype=u.dtype)
        return gaussian_moments(self.emission(x0, u), "emission")[1]


# --------------------------------------------------------------------------------------
# The primitive a model calls
# --------------------------------------------------------------------------------------


def markov(
    init: dist.Distribution,
    transition: Callable,
    emission: Callable,
    *,
    y: Optional[jax.Array] = None,
    u: Optional[jax.Array] = None,
    num_steps: Optional[int] = None,
    num_sequences: Optional[int] = None,
    obs_dim: Optional[int] = None,
    structure: Optional[LinearStructure] = None,
    state_name: str = "x",
    obs_name: str = "y",
    noncentered: bool = False,
):
    """Declare a Markov state-space model inside a NumPyro model function.

    .. math::
        x_1 \\sim p(x_1),\\quad x_t \\mid x_{t-1} \\sim p(x_t\\mid x_{t-1}, u_t),
        \\quad y_t \\mid x_t \\sim p(y_t \\mid x_t, u_t)

    Args:
        init: distribution of ``x_1`` with event shape ``(state_dim,)``.
        transition: ``(x_prev, u_t) -> Distribution`` broadcasting over batch dims.
        emission: ``(x_t, u_t) -> Distribution`` broadcasting over batch dims.
        y: observations ``(T, obs_dim)`` or ``(S, T, obs_dim)``; NaN = missing.
        u: inputs ``(T, input_dim)`` (shared by all sequences) or ``(S, T, input_dim)``.
        num_steps, num_sequences, obs_dim: needed only when ``y`` is None.
        structure: roles of the parameter sites, for closed-form M-steps.
        noncentered: when the states are sampled (NUTS, ``Predictive``, simulation),
            sample standard-normal innovations ``x_innovations`` (shape of the
            returned ``x``) and build ``x_t = E[x_t | x_{t-1}] + L_t z_t`` with ``L_t``
            the Cholesky factor of the transition covariance; ``x_1`` and ``x`` are then
            ``numpyro.deterministic`` sites with the centred shapes. Needs Gaussian
            initial and transition distributions. Same joint law, easier geometry for
            NUTS when the data inform the states weakly. The handler
            :class:`ppl_dyn.handlers.noncentered` sets it from outside the model.

    Returns:
        ``None`` under :func:`bind`; under :func:`ppl_dyn.handlers.marginalize` (with
        ``y`` given) the E-step's posterior (states integrated out, the log-marginal
        added as a factor); otherwise a dict with the sampled ``x`` and ``y`` of shape
        ``(S, T, dim)`` (or ``(T, dim)`` for one unbatched sequence).
    """
    state_dim = _state_dim(init)
    y, u, T, S, batched, dy = normalise_data(y, u, num_steps, num_sequences, obs_dim)
    spec = MarkovSpec(
        init=init,
        transition=transition,
        emission=emission,
        y=y,
        u=u,
        num_steps=T,
        num_sequences=S,
        batched=batched,
        state_dim=state_dim,
        obs_dim=dy,
        structure=structure,
        state_name=state_name,
        obs_name=obs_name,
    )
    check_contract(spec)
    check_missing_pattern(spec)
    msg = {
        "type": _MSG_TYPE,
        "fn": lambda: None,
        "args": (),
        "kwargs": {},
        "value": None,
        "spec": spec,
        "captured": False,
    }
    apply_stack(msg)
    if msg["captured"]:
        return None
    e_step = msg.get("e_step")  # set by ppl_dyn.handlers.marginalize
    if e_step is not None and spec.y is not None:
        return _marginal_factor(spec, e_step)
    noncentered = msg.get("noncentered", noncentered)  # ppl_dyn.handlers.noncentered
    # The state distributions' arguments are computed from earlier states: an explosive
    # initial guess (NumPyro's uniform(-2, 2) init with T = 1000) gives inf means, which
    # NumPyro's eager validation turns into an exception instead of the non-finite
    # potential that makes it retry another initial point. Parameter values are checked
    # against their supports at their own sites.
    with validation_enabled(False):
        return _sample_latent(spec, noncentered=bool(noncentered))


def _state_dim(init: dist.Distribution) -> int:
    if not isinstance(init, dist.Distribution):
        raise ValueError(
            f"the initial state distribution (markov's first argument) must be a NumPyro "
            f"distribution; got {type(init).__name__}"
        )
    if len(init.event_shape) != 1 or tuple(init.batch_shape) != ():
        raise ValueError(
            "the initial state distribution must have event shape (state_dim,) and no "
            f"batch shape (the state is a vector); got {type(init).__name__} with batch "
            f"shape {tuple(init.batch_shape)} and event shape {tuple(init.event_shape)}. "
            "Write e.g. dist.Normal(m, s).expand([state_dim]).to_event(1) or "
            "dist.MultivariateNormal(m, P)"
        )
    return int(init.event_shape[-1])


def _abstract_xu(spec: "MarkovSpec"):
    dtype = spec.y.dtype if spec.y is not None else spec.u.dtype
    x = jax.ShapeDtypeStruct((spec.state_dim,), dtype)
    u = jax.ShapeDtypeStruct((spec.u.shape[-1],), dtype)
    return x, u


def check_contract(spec: "MarkovSpec") -> None:
    """The shapes of the model contract, checked when :func:`markov` is called (from
    abstract values: nothing is computed). ``transition(x, u)`` and ``emission(x, u)``
    must return distributions with event shapes ``(state_dim,)`` and ``(obs_dim,)`` and
    no batch shape for one state ``x`` ``(state_dim,)`` and one input ``u``
    ``(input_dim,)``; ``ValueError`` naming the function otherwise."""
    x, u = _abstract_xu(spec)
    du = spec.u.shape[-1]
    for what, fn, dim in (
        ("transition", spec.transition, spec.state_dim),
        ("emission", spec.emission, spec.obs_dim),
    ):
        if not callable(fn):
            raise ValueError(
                f"the {what} must be a function (x, u) -> distribution; got {type(fn).__name__}"
            )
        try:
            d = abstract_distribution(fn, x, u)
        except Exception as err:  # the user's function: say where it failed
            raise ValueError(
                f"the model's {what}(x, u) failed for a state of shape ({spec.state_dim},) "
                f"and an input of shape ({du},): {type(err).__name__}: {err}"
            ) from err
        if not isinstance(d, dist.Distribution):
            raise ValueError(
                f"the model's {what}(x, u) must return a NumPyro distribution; got "
                f"{type(d).__name__}"
            )
        if tuple(d.event_shape) != (dim,) or tuple(d.batch_shape) != ():
            hint = ""
            if tuple(d.event_shape) == () and tuple(d.batch_shape) == (dim,):
                hint = " (add .to_event(1))"
            raise ValueError(
                f"the model's {what}(x, u) must return a distribution with event shape "
                f"({dim},) and no batch shape for one state of shape ({spec.state_dim},); "
                f"got {type(d).__name__} with batch shape {tuple(d.batch_shape)} and event "
                f"shape {tuple(d.event_shape)}{hint}"
            )


def normalise_data(y, u, num_steps, num_sequences, obs_dim):
    """Validate shapes of ``y`` and ``u`` and bring them to ``(S, T, dim)``. Concrete
    data (eager, or closed over by NumPyro's MCMC) are checked for values (+-inf, or too
    large to square) here, before a sampler spends time on them."""
    check_observations(y)
    batched = False
    if y is not None:
        if isinstance(y, np.ma.MaskedArray):
            y = np.ma.filled(y.astype(float), np.nan)
        # NumPy data are shaped on the host and copied once (device_array): eager jnp
        # operations on them would each compile a small XLA program
        xp = np if isinstance(y, np.ndarray) else jnp
        y = xp.asarray(y)
        if not jnp.issubdtype(y.dtype, jnp.floating):
            y = y.astype(jnp.result_type(float))  # integer counts etc. become floats
        if y.ndim not in (2, 3):
            raise ValueError(
                "y must have shape (num_steps, obs_dim) or (num_sequences, num_steps, "
                f"obs_dim); got shape {tuple(y.shape)}"
            )
        batched = y.ndim == 3
        if not batched:
            y = y[None]
        S, T, dy = y.shape
        if T == 0:
            raise ValueError("y has num_steps = 0; state-space models need T >= 1")
        if S == 0:
            raise ValueError("y has num_sequences = 0; need at least one sequence")
        for name, given, actual in (
            ("num_steps", num_steps, T),
            ("obs_dim", obs_dim, dy),
        ):
            if given is not None and int(given) != actual:
                raise ValueError(f"{name}={given} disagrees with y of shape {tuple(y.shape)}")
        if num_sequences is not None and batched and int(num_sequences) != S:
            raise ValueError(
                f"num_sequences={num_sequences} disagrees with y of shape {tuple(y.shape)}"
            )
    else:
        if num_steps is None or obs_dim is None:
            raise ValueError("without y, pass num_steps and obs_dim")
        T, dy = int(num_steps), int(obs_dim)
        if T < 1:
            raise ValueError(f"num_steps must be >= 1 (T >= 1); got {num_steps}")
        batched = num_sequences is not None
        S = int(num_sequences) if batched else 1
        if S < 1:
            raise ValueError(f"num_sequences must be >= 1; got {num_sequences}")
    if y is not None:
        y = device_array(y)
    dtype = y.dtype if y is not None else jnp.result_type(float)
    host = u is None or isinstance(u, np.ndarray)
    xp = np if host else jnp
    if u is None:
        u = np.zeros((S, T, 0), dtype=dtype)
    else:
        u = xp.asarray(u, dtype=dtype)
        if u.ndim == 2:
            if u.shape[0] != T:
                raise ValueError(
                    f"u must have shape ({T}, input_dim) or ({S}, {T}, input_dim) to match "
                    f"y; got shape {tuple(u.shape)}"
                )
            u = xp.broadcast_to(u[None], (S,) + u.shape)
        elif u.ndim == 3:
            if y is not None and not batched:
                raise ValueError(
                    f"u has a sequence axis (shape {tuple(u.shape)}) but y has none "
                    f"(shape {(T, dy)}); pass u of shape ({T}, input_dim)"
                )
            if u.shape[:2] != (S, T) and not (y is None and u.shape[1] == T):
                raise ValueError(
                    f"u must have shape ({T}, input_dim) or ({S}, {T}, input_dim) to match "
                    f"y; got shape {tuple(u.shape)}"
                )
            if not batched and y is None and u.shape[0] != 1:
                S, batched = u.shape[0], True
        else:
            raise ValueError(
                f"u must have shape (num_steps, input_dim) or (num_sequences, num_steps, "
                f"input_dim); got shape {tuple(u.shape)}"
            )
    return y, device_array(u) if host else u, T, S, batched, dy


class _MaskedObservation(dist.Distribution):
    """Emission distribution whose log-density ignores missing (NaN) entries
    (:func:`masked_log_prob`): any emission NumPyro can score."""

    # a pytree (numpyro's scan flattens site distributions across its loop boundary)
    pytree_data_fields = ("base", "mask")

    def __init__(self, base: dist.Distribution, mask: jax.Array):
        self.base = base
        self.mask = mask
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def sample(self, key, sample_shape=()):
        return self.base.sample(key, sample_shape)

    def log_prob(self, value):
        return masked_log_prob(self.base, value, self.mask)


@promote_batch_shape.register
def _promote_masked_observation(d: _MaskedObservation):
    # numpyro's scan stacks the site's fields over time and then asks for the batch
    # shape to be promoted to the stacked arrays' (the shapes come from the arrays)
    new = copy.copy(d)
    new.base = promote_batch_shape(d.base)
    new._batch_shape = new.base.batch_shape
    return new


def _factorised(d: dist.Distribution):
    """The univariate base of an emission whose entries are independent given the
    state (``Independent``/``expand`` over a scalar family), else None."""
    base = d
    while isinstance(base, (dist.Independent, dist.ExpandedDistribution)):
        base = base.base_dist
    if base.event_shape == () and len(d.event_shape) == 1:
        return base
    return None


def emission_factorisation(d: dist.Distribution) -> str:
    """How missing entries of an observation vector drop out of ``d``'s log-density:
    ``"gaussian"`` (marginalised exactly), ``"independent"`` (entries independent given
    the state: missing terms dropped) or ``"joint"`` (a joint family: only whole rows
    can be missing)."""
    if is_gaussian(d):
        return "gaussian"
    if _factorised(d) is not None:
        return "independent"
    return "joint"


def masked_log_prob(d: dist.Distribution, value: jax.Array, mask: jax.Array) -> jax.Array:
    """``log p(y_obs)``: the log-density of the observed entries (``mask`` True) of
    ``value`` under the emission ``d`` (event shape ``(obs_dim,)``), missing entries
    marginalised out.

    Gaussian emissions (any spelling): the marginal over the observed block. Emissions
    whose entries are independent given the state (``Poisson(rate).to_event(1)``,
    ``Bernoulli``, ``StudentT``, ...): the observed terms. Joint non-Gaussian families
    (``MultivariateStudentT``, ``Multinomial``, ...): a fully observed row is scored, a
    fully missing row adds 0, and a partly observed row is NaN (such data are refused
    by name before they reach here, see :func:`check_missing_pattern`). Missing entries
    are replaced by a point of the support before scoring, so gradients stay finite.
    """
    kind = emission_factorisation(d)
    if kind == "gaussian":
        mean, cov = gaussian_moments(d, "emission")
        return masked_gaussian_logpdf(value, mean, cov, mask)
    if kind == "independent":
        base = _factorised(d)
        fill = base.support.feasible_like(value)
        lp = base.log_prob(jnp.where(mask, value, fill))
        lp = jnp.broadcast_to(lp, jnp.broadcast_shapes(lp.shape, mask.shape))
        return jnp.sum(jnp.where(mask, lp, 0.0), -1)
    fill = d.support.feasible_like(value)
    lp = d.log_prob(jnp.where(mask, value, fill))
    full, none = jnp.all(mask, -1), ~jnp.any(mask, -1)
    return jnp.where(full, lp, jnp.where(none, 0.0, jnp.nan))


def check_missing_pattern(spec: "MarkovSpec") -> None:
    """``ValueError`` when a joint non-Gaussian emission meets partly missing rows (NaN
    in some entries of an observation vector only): its log-density has no marginal to
    take. Runs when ``y`` is concrete (eagerly, or closed over by NumPyro's MCMC)."""
    if spec.y is None or not is_concrete(spec.y):
        return
    y = np.asarray(spec.y)
    missing = np.isnan(y)
    partial = missing.any(-1) & ~missing.all(-1)
    if not partial.any():
        return
    x, u = _abstract_xu(spec)
    d = abstract_distribution(spec.emission, x, u)
    if emission_factorisation(d) == "joint":
        s, t = np.argwhere(partial)[0]
        raise ValueError(
            f"y[{s}, {t}] is partly missing (NaN in some entries only), but the emission "
            f"({type(d).__name__}) is a joint distribution over the observation vector "
            "with no marginal for a subset of entries; mark whole rows missing, or write "
            "the emission with independent entries (e.g. dist.X(...).to_event(1))"
        )


def mask_covariance(R, mask):
    """``R`` with the rows/columns of missing entries (``mask`` False) replaced by the
    identity: Gaussian densities and Kalman updates with it use only observed entries."""
    maskf = mask.astype(R.dtype)
    eye = jnp.eye(R.shape[-1], dtype=R.dtype)
    return R * (maskf[..., :, None] * maskf[..., None, :]) + eye * (1.0 - maskf)[..., None, :]


def masked_gaussian_logpdf(y, mean, cov, mask):
    """log N(y_o; mean_o, cov_oo) over the observed entries (``mask`` True)."""
    r = jnp.where(mask, y - mean, 0.0)
    from ppl_dyn.infer import _linalg as la

    L = la.cholesky(mask_covariance(cov, mask))
    z = la.solve_lower(L, r[..., None])[..., 0]  # r may carry more batch dims than L
    logdet = la.log_det_from_cholesky(L)
    n_obs = jnp.sum(mask.astype(cov.dtype), -1)
    return -0.5 * (jnp.sum(z**2, -1) + logdet + n_obs * jnp.log(2 * jnp.pi))


def emission_log_lik(ss: "StateSpace", x, u_t, y_t, mask_t):
    """``log p(y_t | x)`` for particles ``x`` ``(N, dx)``, observed entries only (the
    particle E-steps and the gradient M-step evaluate it).

    A Gaussian emission whose covariance does not depend on the state (proved from the
    traced model, :func:`~ppl_dyn.requirements.additive_gaussian`): one factorisation
    per step serves all particles, and missing entries are marginalised exactly. Other
    models use their own distributions (which may depend on ``x``).
    """
    d = ss.emission(x, u_t)
    yf = jnp.where(mask_t, y_t, 0.0)
    if additive_gaussian(ss, "emission"):
        cov = ss.emission_cov(u_t)
        ll = masked_gaussian_logpdf(yf, d.mean, cov, mask_t)
        return jnp.broadcast_to(ll, x.shape[:1])
    return masked_log_prob(d, yf, mask_t)  # any family; missing entries drop out


def _sample_latent(spec: MarkovSpec, noncentered: bool = False):
    """Generative NumPyro semantics of :func:`markov` (NUTS, Predictive, simulate)."""
    S, T = spec.num_sequences, spec.num_steps
    u_tm = jnp.swapaxes(spec.u, 0, 1)  # (T, S, du)
    if spec.y is not None:
        y_tm = jnp.swapaxes(spec.y, 0, 1)
        mask_tm = ~jnp.isnan(y_tm)
        yfill_tm = jnp.where(mask_tm, y_tm, 0.0)
    else:
        yfill_tm = mask_tm = None

    def emit(name, x, u_t, y_t, m_t):
        d = spec.emission(x, u_t)
        if y_t is None:
            return numpyro.sample(name, d.to_event(1), infer=_LATENT)
        d = _MaskedObservation(d, m_t)
        return numpyro.sample(name, d.to_event(1), obs=y_t, infer=_LATENT)

    def data_at(a, sl):
        return None if a is None else a[sl]

    if noncentered:
        xs = _noncentered_states(spec, u_tm)  # (T, S, dx)
        x1 = numpyro.deterministic(f"{spec.state_name}_1", xs[0])
        y1 = emit(f"{spec.obs_name}_1", x1, u_tm[0], data_at(yfill_tm, 0), data_at(mask_tm, 0))
        ys = y1[None]
        if T > 1:
            x_rest = numpyro.deterministic(spec.state_name, xs[1:])
            # one vectorised observation site for steps 2..T (same shape as the scan's)
            y_rest = emit(
                spec.obs_name,
                x_rest,
                u_tm[1:],
                data_at(yfill_tm, slice(1, None)),
                data_at(mask_tm, slice(1, None)),
            )
            ys = jnp.concatenate([ys, y_rest], 0)
    else:
        x1 = numpyro.sample(
            f"{spec.state_name}_1", spec.init.expand((S,)).to_event(1), infer=_LATENT
        )
        y1 = emit(f"{spec.obs_name}_1", x1, u_tm[0], data_at(yfill_tm, 0), data_at(mask_tm, 0))
        xs, ys = x1[None], y1[None]
        if T > 1:

            def body(x_prev, inputs):
                u_t, y_t, m_t = inputs
                x = numpyro.sample(
                    spec.state_name, spec.transition(x_prev, u_t).to_event(1), infer=_LATENT
                )
                y_out = emit(spec.obs_name, x, u_t, y_t, m_t)
                return x, (x, y_out)

            rest = (u_tm[1:], data_at(yfill_tm, slice(1, None)), data_at(mask_tm, slice(1, None)))
            _, (x_rest, y_rest) = numpyro_scan(body, x1, rest, length=T - 1)
            xs = jnp.concatenate([xs, x_rest], 0)
            ys = jnp.concatenate([ys, y_rest], 0)
    xs, ys = jnp.swapaxes(xs, 0, 1), jnp.swapaxes(ys, 0, 1)
    if spec.y is not None:
        ys = spec.y
    if not spec.batched:
        xs, ys = xs[0], ys[0]
    return {spec.state_name: xs, spec.obs_name: ys}


def innovations_name(spec: MarkovSpec) -> str:
    """Name of the standard-normal site of the non-centred parametrisation."""
    return f"{spec.state_name}_innovations"


def one_step_log_prob_name(spec: MarkovSpec) -> str:
    """Name of the deterministic site holding ``log p(y_t | y_{1:t-1})`` per step
    under :func:`ppl_dyn.handlers.marginalize`."""
    return f"{spec.obs_name}_one_step_log_prob"


def log_marginal_name(spec: MarkovSpec) -> str:
    """Name of the factor site carrying ``log p(y_{1:T})`` under marginalisation."""
    return f"{spec.obs_name}_log_marginal"


def _loc_and_scale(d: dist.Distribution, what: str):
    """``(loc, scale_tril, diagonal)`` of a Gaussian (any spelling
    :func:`~ppl_dyn.requirements.is_gaussian` accepts); for ``diagonal=True`` the second
    value is the vector of standard deviations."""
    try:
        return gaussian_form(d, what)
    except ValueError as err:
        raise TypeError(f"noncentered=True needs a Gaussian {what}: {err}") from None


def _affine_noise(loc, scale, diagonal, z):
    if diagonal:
        return loc + scale * z
    return loc + jnp.sum(scale * z[..., None, :], -1)  # scale_tril @ z, broadcasting


def _noncentered_states(spec: MarkovSpec, u_tm: jax.Array) -> jax.Array:
    """Sample innovations ``z`` and return the states ``(T, S, dx)`` they determine."""
    S, T, dx = spec.num_sequences, spec.num_steps, spec.state_dim
    shape = (S, T, dx) if spec.batched else (T, dx)
    z = numpyro.sample(
        innovations_name(spec),
        dist.Normal(jnp.zeros((), u_tm.dtype), 1.0).expand(shape).to_event(len(shape)),
        infer=_LATENT,
    )
    z_tm = jnp.swapaxes(z, 0, 1) if spec.batched else z[:, None, :]  # (T, S, dx)
    loc0, scale0, diag0 = _loc_and_scale(spec.init, "initial state distribution")
    x1 = _affine_noise(loc0, scale0, diag0, z_tm[0])  # (S, dx)

    def step(x_prev, inp):
        u_t, z_t = inp
        loc, scale, diag = _loc_and_scale(spec.transition(x_prev, u_t), "transition")
        x = _affine_noise(loc, scale, diag, z_t)
        return x, x

    _, x_rest = jax.lax.scan(step, x1, (u_tm[1:], z_tm[1:]))
    return jnp.concatenate([x1[None], x_rest], 0)


def innovations_from_states(spec: MarkovSpec, xs: jax.Array) -> jax.Array:
    """The innovations ``z`` (site :func:`innovations_name`) that give states ``xs``.

    ``xs`` has the shape :func:`markov` returns (``(S, T, dx)`` or ``(T, dx)``); the
    inverse of the non-centred map, used to start NUTS at given states.
    """
    xs_tm = jnp.swapaxes(xs, 0, 1) if spec.batched else xs[:, None, :]  # (T, S, dx)
    u_tm = jnp.swapaxes(spec.u, 0, 1)

    def whiten(d, x, what):
        loc, scale, diag = _loc_and_scale(d, what)
        r = x - loc
        if diag:
            return r / scale
        from ppl_dyn.infer import _linalg as la

        L = jnp.broadcast_to(scale, r.shape[:-1] + scale.shape[-2:])
        return la.solve_lower(L, r[..., None])[..., 0]

    z1 = whiten(spec.init, xs_tm[0], "initial state distribution")
    z_rest = whiten(spec.transition(xs_tm[:-1], u_tm[1:]), xs_tm[1:], "transition")
    z_tm = jnp.concatenate([z1[None], z_rest], 0)
    return jnp.swapaxes(z_tm, 0, 1) if spec.batched else z_tm[:, 0, :]


def state_space_of(spec: MarkovSpec, params: Optional[dict] = None) -> StateSpace:
    """The :class:`StateSpace` of a declaration (``params`` only for reporting)."""
    return StateSpace(
        init=spec.init,
        transition=spec.transition,
        emission=spec.emission,
        params={} if params is None else params,
        structure=spec.structure,
        state_dim=spec.state_dim,
        obs_dim=spec.obs_dim,
        input_dim=spec.u.shape[-1],
    )


def _marginal_factor(spec: MarkovSpec, e_step):
    """States integrated out by ``e_step``: a factor with ``log p(y_{1:T})`` plus a
    deterministic site with the one-step-ahead predictive log-densities per step."""
    rng_key = numpyro.prng_key()  # None without a seed handler (e.g. under NUTS)
    if rng_key is None:
        rng_key = jax.random.key(0)  # deterministic E-steps (Kalman, EKS) ignore it
    post = e_step.posterior(rng_key, state_space_of(spec), spec.y, spec.u)
    numpyro.factor(log_marginal_name(spec), jnp.sum(post.log_marginal))
    step_lp = post.predicted_log_probs  # (S, T)
    numpyro.deterministic(one_step_log_prob_name(spec), step_lp if spec.batched else step_lp[0])
    if not spec.batched:
        post = jax.tree_util.tree_map(lambda a: a[0], post)
    return post


# --------------------------------------------------------------------------------------
# Capturing the declaration
# --------------------------------------------------------------------------------------


class _Capture(Messenger):
    def __init__(self, fn=None):
        super().__init__(fn)
        self.spec: Optional[MarkovSpec] = None

    def process_message(self, msg):
        if msg["type"] == _MSG_TYPE:
            if self.spec is not None:
                raise ValueError("a model may call ppl_dyn.markov only once")
            self.spec = msg["spec"]
            msg["captured"] = True
            msg["stop"] = True


class ModelInfo(NamedTuple):
    """What :func:`inspect_model` learns from one run of a model."""

    spec: MarkovSpec
    free: dict  # site name -> trace site (latent parameters EM estimates)
    frozen: dict  # site name -> value (conditioned parameters)


def _run_captured(model, args, kwargs, substitute_fn=None, rng_key=None):
    fn = model
    if substitute_fn is not None:
        fn = handlers.substitute(fn, substitute_fn=substitute_fn)
    fn = handlers.seed(fn, rng_seed=rng_key if rng_key is not None else 0)
    capture = _Capture()
    # NumPyro's eager argument validation compiles a check per distribution and shape
    # (seconds in a fresh process); parameter values are validated by check_params.
    with capture, validation_enabled(False):
        tr = handlers.trace(fn).get_trace(*args, **kwargs)
    if capture.spec is None:
        raise ValueError(
            f"model {getattr(model, '__name__', model)!r} does not declare its dynamics "
            "with ppl_dyn.markov(...); see docs/models.md"
        )
    return capture.spec, tr


def inspect_model(
    model: Callable, *args, rng_key=None, values: Optional[dict] = None, **kwargs
) -> ModelInfo:
    """Run ``model`` once and report its parameter sites.

    Free sites named in ``values`` take those values (no prior draw: eager prior
    sampling costs one small compilation per operation); the others are drawn from their
    priors with ``rng_key``. Expected shapes come from the site distributions.
    """
    if rng_key is None:
        rng_key = jax.random.key(0)  # only used to draw throw-away prior values
    given = values or {}
    rng = None if isinstance(rng_key, jax.core.Tracer) else generator_from_key(rng_key)

    def value_of(msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return None
        if msg["name"] in given:
            return given[msg["name"]]
        if rng is None:
            return None
        # exact prior draws in NumPy where the family allows (no XLA compilation of
        # samplers); anything else is drawn by NumPyro
        value = numpy_draw(msg["fn"], rng, tuple(msg["kwargs"].get("sample_shape", ())))
        return None if value is None else device_array(value)

    spec, tr = _run_captured(model, args, kwargs, substitute_fn=value_of, rng_key=rng_key)
    free, frozen = {}, {}
    for name, site in tr.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            frozen[name] = site["value"]
        else:
            free[name] = site
    return ModelInfo(spec=spec, free=free, frozen=frozen)


def bind(model: Callable, params: dict, *args, **kwargs) -> tuple[StateSpace, MarkovSpec]:
    """Run ``model`` with parameter values ``params`` and return its state space.

    Works under ``jax.jit`` (``params`` may be tracers). Every free parameter site must
    be in ``params``; conditioned (frozen) sites keep their conditioned values.
    """
    missing: list[str] = []

    def value_of(msg):  # conditioned (frozen) sites keep their conditioned value
        if msg["type"] != "sample" or msg["is_observed"]:
            return None
        if msg["name"] not in params:
            missing.append(msg["name"])
            return None
        return params[msg["name"]]

    spec, tr = _run_captured(model, args, kwargs, substitute_fn=value_of)
    if missing:
        raise ValueError(
            f"params lacks values for the parameter sites {missing}; pass them or "
            "condition them with numpyro.handlers.condition"
        )
    values = {k: s["value"] for k, s in tr.items() if s["type"] == "sample"}
    ss = StateSpace(
        init=spec.init,
        transition=spec.transition,
        emission=spec.emission,
        params=values,
        structure=spec.structure,
        state_dim=spec.state_dim,
        obs_dim=spec.obs_dim,
        input_dim=spec.u.shape[-1],
    )
    return ss, spec
