r"""Gradient fitting of the marginal likelihood with Optax, shaped like :class:`EM`.

:class:`SGD` maximises the log-marginal likelihood of the data, with the latent states
integrated out by a Gaussian E-step,

.. math::
    \ell(\theta) = \sum_{s=1}^{S} \log p(y^{(s)}_{1:T} \mid \theta),

(plus :math:`\log p(\theta)` with ``map_estimate=True``) over the *unconstrained*
parameters :math:`z` that NumPyro defines for each free site,
:math:`\theta = \operatorname{biject\_to}(\text{support})(z)` (NumPyro's ``biject_to``
and ``numpyro.infer.util.transform_fn``: the same reparametrisation as NumPyro's NUTS;
e.g. a covariance is a Cholesky factor with log-diagonal, a variance its logarithm).
The model is wrapped in :class:`ppl_dyn.handlers.marginalize`, so the objective is the
factor site that handler adds: exact with :class:`~ppl_dyn.infer.KalmanSmoother` for
linear-Gaussian models (differentiated by Fisher's identity, :mod:`ppl_dyn.fisher`), the
linearised approximation with :class:`~ppl_dyn.infer.ExtendedKalmanSmoother`.

With ``batch_size=B`` each step draws ``B`` of the ``S`` sequences without replacement
and uses the unbiased estimate :math:`\frac{S}{B}\sum_{s \in \text{batch}}
\log p(y^{(s)} \mid \theta)` (the log prior, when used, is added once, unscaled).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import compute_log_probs, transform_fn

from ppl_dyn._validation import check_rng_key
from ppl_dyn.handlers import marginalize, marginalized_e_step
from ppl_dyn.infer._compile import cached_program, jit_model
from ppl_dyn.infer._loop import run_loop
from ppl_dyn.infer._run import inspect_checked, split_static, static_items, validate_data
from ppl_dyn.infer.em import EMResult, initial_params
from ppl_dyn.infer.kalman import KalmanSmoother
from ppl_dyn.infer.particle import ParticleSmoother
from ppl_dyn.state_space import bind, log_marginal_name

__all__ = ["SGD", "SGDState", "fit_sgd"]

_DEFAULT_OPTIMIZER = optax.adam(1e-2)  # one object, so default instances share compilations


class SGDState(NamedTuple):
    """What :class:`SGD` carries between steps (``params``, ``iteration`` and
    ``rng_key`` as in :class:`~ppl_dyn.infer.EMState`)."""

    params: dict  # constrained values of the free parameter sites
    iteration: int
    rng_key: jax.Array
    unconstrained: dict  # the same values in NumPyro's unconstrained space
    opt_state: Any  # the Optax optimiser state


class SGD:
    r"""Maximum likelihood (or MAP) by gradient ascent on the marginal likelihood.

    Args:
        model: a model function declaring its dynamics with :func:`ppl_dyn.markov`
            (built-in or a user's), possibly with sites frozen by
            ``numpyro.handlers.condition``.
        e_step: a deterministic, differentiable Gaussian E-step:
            :class:`~ppl_dyn.infer.KalmanSmoother` (default; exact log-marginal for
            linear-Gaussian models) or :class:`~ppl_dyn.infer.ExtendedKalmanSmoother`
            (linearised log-marginal for nonlinear ones). Particle E-steps are refused:
            their estimate is neither smooth nor differentiable.
        optimizer: an ``optax.GradientTransformation``; defaults to ``optax.adam(1e-2)``.
            It minimises the negative objective divided by the number of observed
            (non-NaN) entries of ``y`` (nats per observation, as dynamax does), so
            learning rates transfer between data sets; histories are reported in nats.
        batch_size: number of sequences per step (None: all of them, a deterministic
            full-batch gradient).
        map_estimate: add the log prior density of the free sites (in the model's own,
            constrained parametrisation, no Jacobian): the mode of ``p(theta | y)``.
            The default, False, is maximum likelihood, like :class:`EM`.

    Frozen parameters are sites conditioned with ``numpyro.handlers.condition``: they are
    observed sites, not optimised, and keep their values exactly.

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import lds
        >>> from ppl_dyn.infer import SGD
        >>> y = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=100,
        ...                      state_dim=1, obs_dim=2)["y"]
        >>> res = SGD(lds).run(jax.random.key(1), 50, y=y, state_dim=1,
        ...                    progress_bar=False)
        >>> len(res.log_marginals)
        50
    """

    def __init__(
        self,
        model: Callable,
        e_step=None,
        optimizer: Optional[optax.GradientTransformation] = None,
        *,
        batch_size: Optional[int] = None,
        map_estimate: bool = False,
    ):
        inner = marginalized_e_step(model)
        if e_step is None:
            e_step = KalmanSmoother() if inner is None else inner
        elif inner is not None and inner != e_step:
            raise ValueError(
                f"e_step {e_step!r} differs from the E-step {inner!r} of the marginalize "
                "handler around the model; pass one of them"
            )
        if not callable(getattr(e_step, "posterior", None)):
            raise ValueError(
                "e_step must have a posterior(rng_key, state_space, y, u) method "
                f"(e.g. KalmanSmoother()); got {type(e_step).__name__}"
            )
        if isinstance(e_step, ParticleSmoother):
            raise ValueError(
                "e_step must be deterministic and differentiable (KalmanSmoother or "
                "ExtendedKalmanSmoother); a ParticleSmoother's log-marginal estimate is not"
            )
        if optimizer is None:
            optimizer = _DEFAULT_OPTIMIZER
        if not (
            callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))
        ):
            raise ValueError(
                "optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-2)); "
                f"got {type(optimizer).__name__}"
            )
        if batch_size is not None and (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise ValueError(f"batch_size must be None or a positive int; got {batch_size!r}")
        if not isinstance(map_estimate, (bool, np.bool_)):
            raise ValueError(f"map_estimate must be a bool; got {map_estimate!r}")
        self.model = model
        self.e_step = e_step
        self.optimizer = optimizer
        self.batch_size = None if batch_size is None else int(batch_size)
        self.map_estimate = bool(map_estimate)
        self._marginal_model = marginalize(model, e_step)

    # -- SVI-shaped API ----------------------------------------------------------------
    def init(self, rng_key, init_params: Union[dict, EMResult, None] = None, **kwargs) -> SGDState:
        """Initial state: ``init_params`` where given, prior draws (from ``rng_key``) for
        the remaining free sites (the same draws as :meth:`EM.init` with that key)."""
        params, run_key, kwargs = initial_params(self.model, rng_key, init_params, kwargs)
        core = self._core(kwargs)
        z = transform_fn(core.transforms, params, invert=True)
        return SGDState(params, 0, run_key, z, self.optimizer.init(z))

    def update(self, state: SGDState, **kwargs) -> tuple[SGDState, jax.Array]:
        """One optimiser step: returns ``(new_state, objective_at_old_params)``."""
        kwargs = validate_data(kwargs)
        core = self._core(kwargs)
        key, sub = jax.random.split(state.rng_key)
        z, opt_state, obj, _ = core.step(
            state.unconstrained, state.opt_state, core.dynamic, sub, core.num_obs
        )
        params = transform_fn(core.transforms, z)
        return SGDState(params, state.iteration + 1, key, z, opt_state), obj

    def run(
        self,
        rng_key: jax.Array,
        num_steps: int,
        *,
        init_params: Union[dict, EMResult, None] = None,
        init: Union[dict, EMResult, None] = None,
        init_state: Optional[SGDState] = None,
        rtol: Optional[float] = None,
        smoothing_window: Optional[int] = None,
        progress_bar: bool = True,
        **kwargs,
    ) -> EMResult:
        """Run up to ``num_steps`` optimiser steps.

        Args:
            rng_key: PRNG key (initialisation draws and minibatch selection).
            num_steps: maximum number of steps (>= 1).
            init_params: starting values (a dict of site values or a previous
                :class:`~ppl_dyn.infer.EMResult`, e.g. an EM fit); missing sites are
                drawn from their priors.
            init: alias of ``init_params``.
            init_state: an :class:`SGDState` to continue from (parameters *and*
                optimiser state, e.g. a previous result's ``state``, or one from
                :meth:`init` with edited hyperparameters of an
                ``optax.inject_hyperparams`` optimiser); excludes ``init_params``, and
                its own ``rng_key`` is used.
            rtol: stop when ``|l_k - l_{k-1}| <= rtol * |l_{k-1}|`` (as :class:`EM`);
                None runs all steps.
            smoothing_window: with minibatches: compare the means of the last two
                windows of this many steps instead of single values (and report
                ``log_marginal_sd``).
            progress_bar: show a tqdm progress bar.
            **kwargs: the model's arguments (``y=...``, ``state_dim=...``, ...).

        Returns:
            An :class:`~ppl_dyn.infer.EMResult`: ``params`` (every site, frozen ones
            included) at the best iterate, the one with the highest objective in
            ``log_marginals`` (an optimiser can end below where it went, or below its
            start; with minibatches "best" is by the noisy estimates), ``state`` (an
            :class:`SGDState` where the optimiser stopped, to continue with :meth:`update`),
            ``log_marginals`` (the objective at the parameters *entering* each step: the
            exact log-marginal for full batches, its unbiased minibatch estimate
            otherwise, plus the log prior with ``map_estimate``), ``floor_counts`` (empty:
            the transforms keep covariances positive definite), ``converged``,
            ``num_iters`` (steps run) and ``log_marginal_sd``.

        Raises:
            FloatingPointError: when a step meets a non-finite objective or produces a
                non-finite parameter; the message names the step and the sites.
        """
        if (
            isinstance(num_steps, bool)
            or not isinstance(num_steps, (int, np.integer))
            or num_steps < 1
        ):
            raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
        if rtol is not None and not (np.isscalar(rtol) and float(rtol) >= 0):
            raise ValueError(f"rtol must be None or a non-negative number; got {rtol!r}")
        if smoothing_window is not None and (
            not isinstance(smoothing_window, (int, np.integer)) or smoothing_window < 1
        ):
            raise ValueError(f"smoothing_window must be a positive int; got {smoothing_window!r}")
        if init is not None:
            if init_params is not None:
                raise ValueError("pass init_params or init, not both")
            init_params = init
        kwargs = validate_data(kwargs)
        if init_state is not None:
            if not isinstance(init_state, SGDState):
                raise ValueError(f"init_state must be an SGDState; got {type(init_state).__name__}")
            if init_params is not None:
                raise ValueError("pass init_state or init_params, not both")
            check_rng_key(rng_key)
            state = init_state
        else:
            state = self.init(rng_key, init_params=init_params, **kwargs)
        core = self._core(kwargs)
        lls: list[float] = []
        best = {"z": state.unconstrained, "objective": -np.inf}  # the best iterate seen
        last = [(state.unconstrained, state.opt_state, state.rng_key)]  # the accepted step's

        def launch(it, carry):
            """Dispatch step ``it`` (asynchronous); keeps the parameters entering it."""
            z, opt_state, key = carry
            key, sub = jax.random.split(key)
            out = core.step(z, opt_state, core.dynamic, sub, core.num_obs)
            return z, key, out

        def carry_of(pending):
            _, key, (new_z, new_opt, _, _) = pending
            return new_z, new_opt, key

        def accept(it, pending):
            z, key, (new_z, new_opt, obj, finite) = pending
            obj = float(obj)
            if not np.isfinite(obj):
                raise FloatingPointError(
                    f"SGD step {it}: the objective is {obj} at the parameters entering this "
                    "step (lower the learning rate or check the data)"
                )
            finite = np.asarray(finite)
            if not finite.all():
                bad = [k for k, ok in zip(sorted(z), finite, strict=True) if not ok]
                raise FloatingPointError(
                    f"SGD step {it}: the optimizer produced non-finite values for {sorted(bad)}"
                )
            lls.append(obj)
            if obj > best["objective"]:  # obj: the objective at z, entering step it
                best.update(z=z, objective=obj)
            last[0] = (new_z, new_opt, key)
            return obj, obj

        _, converged = run_loop(
            launch,
            carry_of,
            accept,
            last[0],
            num_steps,
            desc="SGD",
            progress_bar=progress_bar,
            rtol=rtol,
            smoothing_window=smoothing_window,
        )
        z, opt_state, key = last[0]
        final = SGDState(
            transform_fn(core.transforms, z), state.iteration + len(lls), key, z, opt_state
        )
        params = transform_fn(core.transforms, best["z"])
        ss, _ = bind(self.model, params, **kwargs)
        return EMResult(
            params=dict(ss.params),
            state=final,
            log_marginals=np.asarray(lls),
            floor_counts={},
            converged=converged,
            num_iters=len(lls),
            log_marginal_sd=(
                float(np.std(lls[-smoothing_window:], ddof=1))
                if smoothing_window and len(lls) > 1
                else None
            ),
        )

    def objective_fn(self, **kwargs) -> Callable:
        r"""The objective as a pure function of the unconstrained parameters.

        Returns ``fn(unconstrained, batch=None)``: with ``batch`` None the full
        log-marginal :math:`\sum_s \log p(y^{(s)} \mid \theta)`; with an integer array
        of ``B`` sequence indices the rescaled estimate
        :math:`\frac{S}{B} \sum_{s \in \text{batch}} \log p(y^{(s)} \mid \theta)`;
        plus :math:`\log p(\theta)` when ``map_estimate``. ``unconstrained`` is a dict
        like :attr:`SGDState.unconstrained`. Differentiable and jittable.
        """
        kwargs = validate_data(kwargs)
        core = self._core(kwargs)
        dynamic = core.dynamic

        def fn(unconstrained: dict, batch=None):
            return core.objective(unconstrained, dynamic, batch)

        return fn

    # -- internals ---------------------------------------------------------------------
    def _core(self, kwargs):
        """The compiled step for these static arguments and data shapes (cached across
        instances with the same model, E-step, optimizer and options, like EM's step)."""
        dynamic, static = split_static(kwargs)
        shapes = tuple(sorted((k, np.shape(v), jnp.result_type(v).str) for k, v in dynamic.items()))
        key = (
            "sgd_step",
            self.model,
            self.e_step,
            self.optimizer,
            self.batch_size,
            self.map_estimate,
            static_items(static),
            shapes,
        )
        core = cached_program(key, lambda: _build_core(self, kwargs, dynamic, static))
        return core._replace(dynamic=dynamic, num_obs=_num_obs(kwargs))


class _Core(NamedTuple):
    transforms: dict
    objective: Callable  # (z, dynamic, batch) -> objective
    step: Callable  # jitted (z, opt_state, dynamic, rng_key, num_obs) -> (z, opt, obj, finite)
    dynamic: dict
    num_obs: int  # observed entries of y: the loss the optimiser sees is -objective / num_obs


def _build_core(sgd: SGD, kwargs, dynamic, static) -> _Core:
    info = inspect_checked(sgd.model, {}, False, **kwargs)
    spec = info.spec
    free = tuple(info.free)
    factor = log_marginal_name(spec)
    S = spec.num_sequences
    B = sgd.batch_size
    if B is not None and B > S:
        raise ValueError(f"batch_size must be at most the number of sequences ({S}); got {B}")
    if B is not None and B < S and not spec.batched:
        raise ValueError("batch_size needs batched observations y of shape (S, T, obs_dim)")
    minibatch = B is not None and B < S
    num_obs = _num_obs(kwargs)
    # per-sequence arrays are sliced by the minibatch; shared ones are kept
    per_sequence = {
        k for k, v in dynamic.items() if spec.batched and np.ndim(v) == 3 and np.shape(v)[0] == S
    }
    if "y" not in per_sequence and minibatch:
        raise ValueError("batch_size needs the observations passed as y=... (S, T, obs_dim)")
    # NumPyro's own choice for a latent site (as in numpyro.infer.util.get_transforms),
    # read off the sites' supports without running the E-step
    transforms = {k: biject_to(s["fn"].support) for k, s in info.free.items()}
    model_m = sgd._marginal_model
    map_estimate = sgd.map_estimate

    def objective(z, dyn, batch):
        params = transform_fn(transforms, z)
        scale = 1.0
        if batch is not None:
            batch = jnp.asarray(batch)
            dyn = {k: jnp.take(v, batch, 0) if k in per_sequence else v for k, v in dyn.items()}
            scale = S / batch.shape[0]
        log_probs, _ = compute_log_probs(model_m, (), {**static, **dyn}, params)
        total = scale * log_probs[factor]
        if map_estimate:
            total = total + sum(log_probs[k] for k in free)
        return total

    optimizer = sgd.optimizer

    def step(z, opt_state, dyn, rng_key, num_obs):
        batch = jax.random.permutation(rng_key, S)[:B] if minibatch else None
        obj, grad = jax.value_and_grad(lambda zz: objective(zz, dyn, batch))(z)
        loss_grad = jax.tree_util.tree_map(lambda g: -g / num_obs, grad)
        updates, opt_state = optimizer.update(loss_grad, opt_state, z)
        new_z = optax.apply_updates(z, updates)
        finite = jnp.stack([jnp.all(jnp.isfinite(new_z[k])) for k in sorted(new_z)])
        return new_z, opt_state, obj, finite

    return _Core(transforms, objective, jit_model(step), dynamic, num_obs)


def _num_obs(kwargs) -> int:
    y = kwargs.get("y")
    n = 0 if y is None else int(np.sum(~np.isnan(np.asarray(y, dtype=float))))
    if n == 0:
        raise ValueError("y must be given and contain observed (non-NaN) entries")
    return n


def fit_sgd(
    model: Callable,
    rng_key: jax.Array,
    num_steps: int,
    *,
    e_step=None,
    optimizer: Optional[optax.GradientTransformation] = None,
    batch_size: Optional[int] = None,
    map_estimate: bool = False,
    **kwargs,
) -> EMResult:
    """``SGD(model, e_step, optimizer, batch_size=..., map_estimate=...).run(rng_key,
    num_steps, **kwargs)``."""
    return SGD(model, e_step, optimizer, batch_size=batch_size, map_estimate=map_estimate).run(
        rng_key, num_steps, **kwargs
    )
