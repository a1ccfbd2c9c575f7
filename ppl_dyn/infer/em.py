"""The EM driver, shaped like NumPyro's ``SVI``: ``init`` / ``update`` / ``run``."""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from ppl_dyn._validation import check_params, check_rng_key, check_some_observed, device_array
from ppl_dyn.infer._compile import cached_program, compile_ahead, jit_model
from ppl_dyn.infer._loop import run_loop
from ppl_dyn.infer._mesh import MeshAxes, mesh_axes
from ppl_dyn.infer._pattern import data_pattern, with_data_pattern
from ppl_dyn.infer._run import (
    adapt_params,
    check_mask_support,
    inspect_checked,
    mask_arg,
    pad_to_multiple,
    ragged_data,
    split_static,
    static_items,
    statistics_with_mask,
    validate_data,
)
from ppl_dyn.infer.mstep import LinearGaussianMStep
from ppl_dyn.infer.protocols import (
    e_step_call,
    init_e_state,
    init_m_state,
    is_stateful,
    m_step_call,
)
from ppl_dyn.requirements import is_builtin_model
from ppl_dyn.state_space import bind, inspect_model


class EMState(NamedTuple):
    """What EM carries between iterations.

    ``rng_key`` is the run's key and stays fixed: iteration ``k`` draws its randomness
    from ``fold_in(fold_in(rng_key, LOOP_SALT), k)`` inside the jitted step (no eager
    key splitting, whose first call compiles a program: 0.1 s of a fresh process)."""

    params: dict  # values of the free parameter sites
    iteration: int
    rng_key: jax.Array
    e_state: Any = ()  # a stateful E-step's state (protocols.StatefulEStep); () otherwise
    m_state: Any = ()  # a stateful M-step's state (protocols.StatefulMStep); () otherwise


# Separates the iterations' keys from numpyro's prior draws with the same key (its seed
# handler uses split(rng_key), and fold_in(k, i) equals split(k)[i] for JAX's default
# partitionable threefry)
LOOP_SALT = 0x5EED_E3


class EMResult(NamedTuple):
    """Outcome of :meth:`EM.run`.

    Attributes:
        params: final values of every parameter site (free and frozen).
        state: the final :class:`EMState` (to continue with :meth:`EM.update`).
        log_marginals: ``log p(y | theta_k)`` for each iteration ``k`` (the E-step of
            iteration ``k`` evaluates the parameters *entering* it); non-decreasing for
            exact E-steps.
        floor_counts: per covariance site, how many iterations hit the eigenvalue floor.
        converged: whether the relative-tolerance criterion stopped the run.
        num_iters: iterations run.
        log_marginal_sd: with ``smoothing_window=w``, the standard deviation of the last
            ``w`` log-marginals (Monte Carlo spread of a stochastic E-step plus any
            remaining drift); None otherwise.
        log_priors: with a MAP M-step (``LinearGaussianMStep(map_estimate=True)``),
            ``log p(theta_k)`` per iteration; None for maximum likelihood.
        params_history: with ``run(..., keep_params_history=True)``, free site ->
            its values after each iteration ``(num_iters, ...)``; None otherwise.

    :attr:`objective` is what EM maximised: ``log_marginals + log_priors`` (the log
    posterior up to a constant) for MAP-EM, ``log_marginals`` otherwise.
    """

    params: dict
    state: EMState
    log_marginals: np.ndarray
    floor_counts: dict
    converged: bool
    num_iters: int
    log_marginal_sd: Optional[float] = None
    log_priors: Optional[np.ndarray] = None
    params_history: Optional[dict] = None

    @property
    def objective(self) -> np.ndarray:
        """The maximised objective per iteration (see the class docstring)."""
        if self.log_priors is None:
            return np.asarray(self.log_marginals)
        return np.asarray(self.log_marginals) + np.asarray(self.log_priors)


class EM:
    """Expectation-maximisation for state-space models written as NumPyro functions.

    Args:
        model: a model function declaring its dynamics with :func:`ppl_dyn.markov`.
        e_step: an E-step plug-in (e.g. :class:`~ppl_dyn.infer.KalmanSmoother`).
        m_step: an M-step plug-in; defaults to :class:`LinearGaussianMStep`.

    Frozen parameters are sites conditioned with ``numpyro.handlers.condition``; they are
    never changed. The objective is the marginal likelihood (the priors are not used),
    or with ``LinearGaussianMStep(map_estimate=True)`` the log posterior (MAP-EM).

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import lds
        >>> from ppl_dyn.infer import EM, KalmanSmoother
        >>> y = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=100,
        ...                      state_dim=1, obs_dim=2)["y"]
        >>> res = EM(lds, KalmanSmoother()).run(jax.random.key(1), 20, y=y,
        ...                                     state_dim=1, progress_bar=False)
        >>> len(res.log_marginals)
        20
    """

    def __init__(self, model: Callable, e_step, m_step=None):
        if not callable(model):
            raise ValueError(f"model must be a model function; got {type(model).__name__}")
        if not callable(getattr(e_step, "posterior", None)):
            raise ValueError(
                "e_step must be an E-step (an object with a posterior(rng_key, state_space, "
                f"y, u) method), e.g. KalmanSmoother() or ParticleSmoother(); got {e_step!r}"
            )
        self.model = model
        self.e_step = e_step
        self.m_step = LinearGaussianMStep() if m_step is None else m_step
        self._method = "EM"  # the name in messages (PSAEM runs this driver too)

    # -- SVI-shaped API ----------------------------------------------------------------
    def init(
        self,
        rng_key,
        init_params: Union[dict, "EMResult", None] = None,
        *,
        lengths=None,
        num_iters: Optional[int] = None,
        **kwargs,
    ) -> EMState:
        """Initial state: ``init_params`` where given, prior draws (from ``rng_key``) for
        the remaining free sites, and the first states of a stateful E-step or M-step
        (:mod:`ppl_dyn.infer.protocols`). ``lengths`` and list-valued ``y``/``u`` as in
        :meth:`run`; ``num_iters``: the run's length, for an M-step whose state depends
        on it (a step-size schedule)."""
        kwargs, time_mask = ragged_data(kwargs, lengths)
        return self._init(rng_key, init_params, kwargs, time_mask, num_iters)

    def _init(self, rng_key, init_params, kwargs, time_mask, num_iters) -> EMState:
        params, run_key, kwargs = initial_params(
            self.model,
            rng_key,
            init_params,
            kwargs,
            check=lambda info: check_m_step(self.m_step, info, model=self.model),
            split_key=False,
        )
        e_state, m_state = self._initial_states(params, kwargs, time_mask, num_iters)
        return EMState(params, 0, run_key, e_state, m_state)

    def update(self, state: EMState, *, lengths=None, **kwargs):
        """One EM iteration: returns ``(new_state, log_marginal_of_old_params)``.

        ``lengths`` and list-valued ``y``/``u`` as in :meth:`run`; the time mask is a
        traced argument, so new lengths (same padded shape) do not recompile."""
        kwargs, time_mask = ragged_data(kwargs, lengths)
        step, dynamic = self._compiled(kwargs, time_mask=time_mask)
        it = np.int32(state.iteration)
        new_params, ll, _, _, _, e_state, m_state = step(
            state.params,
            dynamic,
            state.rng_key,
            it,
            *mask_arg(time_mask),
            e_state=state.e_state,
            m_state=state.m_state,
        )
        return EMState(new_params, state.iteration + 1, state.rng_key, e_state, m_state), ll

    def run(
        self,
        rng_key: jax.Array,
        num_iters: int,
        *,
        init_params: Union[dict, "EMResult", None] = None,
        init: Union[dict, "EMResult", None] = None,
        rtol: Optional[float] = None,
        smoothing_window: Optional[int] = None,
        e_step_schedule: Optional[Callable[[int], object]] = None,
        progress_bar: bool = True,
        keep_params_history: bool = False,
        callback: Optional[Callable] = None,
        lengths=None,
        mesh=None,
        sequence_axes=None,
        process_local: bool = False,
        **kwargs,
    ) -> EMResult:
        """Run up to ``num_iters`` iterations.

        Args:
            rng_key: PRNG key (initialisation draws and stochastic E-steps).
            num_iters: maximum number of iterations (>= 1).
            init_params: starting values (a dict of site values or a previous
                :class:`EMResult`, possibly of a simpler model of the family: an LDS fit
                initialises an RBF model with zero RBF weights); sites the model lacks
                are ignored, missing sites are drawn from their priors.
            init: alias of ``init_params``.
            rtol: stop when ``|l_k - l_{k-1}| <= rtol * |l_{k-1}|`` (``l`` the objective:
                the log-marginal, or the log posterior for MAP-EM); None runs all.
                (Iteration ``k + 1`` is queued before ``l_k`` is read; on a stop it
                is dropped, so a stop costs at most one iteration's work.)
            smoothing_window: for stochastic E-steps: compare the means of the last two
                windows of this many iterations instead of single values (and report
                ``log_marginal_sd``).
            e_step_schedule: ``iteration -> E-step`` (e.g. a growing particle count);
                overrides ``e_step`` per iteration (each distinct E-step compiles once).
            progress_bar: show a tqdm progress bar.
            keep_params_history: record the free sites' values after every iteration
                (``EMResult.params_history``).
            callback: ``callback(it, params, e_state, m_state)`` after each iteration
                ``it`` (0-based in this run) has been checked, with its new parameters
                and the plug-ins' states (device arrays), e.g. to keep the reference
                paths of a :class:`~ppl_dyn.infer.CPFAS` E-step.
            lengths: sequences of different lengths, as padded ``y`` ``(S, T, dy)`` (and
                ``u``) with ``lengths`` ``(S,)`` integers in ``[1, T]``. Alternatively
                pass ``y`` (and ``u``) as lists of arrays ``(L_s, dim)``. The steps past
                a sequence's end are dropped from the statistics exactly (a missing
                final observation, NaN without ``lengths``, is a real time step and is
                kept). See ``docs/scale.md``.
            mesh: a ``jax.sharding.Mesh``: shard the sequence axis over all its devices
                (sequences padded with length-0 ones to a multiple of the device
                count; they add nothing). Parameters are replicated; the pooled
                statistics become a cross-device sum. The mesh may span the devices of
                several processes (``jax.distributed``, :mod:`ppl_dyn.distributed`):
                every process then runs this same call and gets the same result.
            sequence_axes: the mesh axes the sequences are split over (a name or a tuple;
                None: all). With ``ParticleSmoother(particle_mesh=mesh,
                particle_axes=...)`` on the other axes, sequences and particles are split
                together (a two-axis mesh).
            process_local: with a mesh over several processes, ``y`` (and ``u``,
                ``lengths``) are this process's own sequences, not the whole batch: the
                processes agree on the padded shape, and the global arrays are built
                from the local pieces (``jax.make_array_from_process_local_data``), so
                no host holds all the data. Starting values must be the same in every
                process (drawn from the priors with the same key, or passed).
            **kwargs: the model's arguments (``y=...``, ``state_dim=...``, ...).

        Raises:
            FloatingPointError: when an iteration produces a non-finite log-marginal or
                parameter; the message names the iteration and the site.
        """
        if not isinstance(num_iters, (int, np.integer)) or num_iters < 1:
            raise ValueError(f"num_iters must be a positive int; got {num_iters!r}")
        if smoothing_window is not None and int(smoothing_window) < 1:
            raise ValueError(f"smoothing_window must be >= 1; got {smoothing_window!r}")
        if init is not None:
            if init_params is not None:
                raise ValueError("pass init_params or init, not both")
            init_params = init
        kwargs, time_mask = ragged_data(kwargs, lengths)
        kwargs = validate_data(kwargs)
        ahead = None
        if process_local and mesh is None:
            raise ValueError("process_local=True needs mesh= (a mesh over the processes)")
        stateful = is_stateful(self.e_step) or is_stateful(self.m_step)
        if mesh is not None and stateful:
            raise ValueError(
                f"mesh= is not supported with a stateful E-step or M-step "
                f"({type(self.e_step).__name__}, {type(self.m_step).__name__}): their "
                "states are not split over the devices yet; run without a mesh"
            )
        if mesh is None:  # (with a mesh, the data are padded after init)
            step, dynamic = self._compiled(kwargs, time_mask=time_mask)
            if init_params is not None and e_step_schedule is None and not stateful:
                ahead = compile_ahead(step, init_params, dynamic, rng_key, mask_arg(time_mask))
        try:
            # (the data padded already: the plug-ins' first states see the time mask)
            state = self._init(rng_key, init_params, kwargs, time_mask, int(num_iters))
        except BaseException:
            # a compilation still running in its thread when the interpreter exits
            # aborts the process (XLA: "terminate called ...", exit 134): let it finish
            if ahead is not None:
                ahead.join()
            raise
        pattern = None
        if mesh is not None:
            if not isinstance(mesh, jax.sharding.Mesh):
                raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
            seq_mesh = mesh_axes(mesh, sequence_axes)
            if process_local:  # this process's sequences; the shapes agreed by all
                kwargs, time_mask, pattern = pad_process_local(kwargs, time_mask, seq_mesh)
            else:
                kwargs, time_mask = pad_to_multiple(kwargs, time_mask, seq_mesh.size)
                if np.all(time_mask):
                    time_mask = None  # nothing padded and no lengths
            step, dynamic = self._compiled(kwargs, time_mask=time_mask, pattern=pattern)
        extra = mask_arg(time_mask)
        if ahead is not None:
            ahead.join()  # the first call below finds the compiled step in JAX's caches
        if mesh is not None:
            params, dynamic, extra = shard_sequences(
                seq_mesh, state.params, dynamic, extra, process_local=process_local
            )
        else:
            params = state.params
        lls: list[float] = []
        lps: list[float] = []
        history: list[dict] = []
        floor_counts: dict = {}
        method = self._method
        map_estimate = bool(getattr(self.m_step, "map_estimate", False))
        key = state.rng_key
        last = [(params, state.e_state, state.m_state)]  # the accepted iterate

        def launch(it, carry):
            """Dispatch iteration ``it`` (asynchronous: returns before it has run)."""
            params, e_state, m_state = carry
            fn = step
            if e_step_schedule is not None:
                fn, _ = self._compiled(kwargs, e_step_schedule(it), time_mask, pattern)
            it = np.int32(state.iteration + it)
            return fn(params, dynamic, key, it, *extra, e_state=e_state, m_state=m_state)

        def carry_of(pending):
            new_params, *_, e_state, m_state = pending
            return new_params, e_state, m_state

        def accept(it, pending):
            new_params, ll, floors, finite, lp, e_state, m_state = pending
            ll, floors, finite, lp = host_values((ll, floors, finite, lp))  # one transfer
            ll, lp = float(ll), float(lp)
            finite = {k: bool(v) for k, v in finite.items()}
            if not np.isfinite(ll):
                raise FloatingPointError(
                    f"{method} iteration {it}: the log-marginal is {ll} at the parameters "
                    "entering this iteration (the E-step diverged)"
                )
            bad = [k for k, ok in finite.items() if not ok]
            if bad:
                raise FloatingPointError(
                    f"{method} iteration {it}: the M-step produced non-finite values for {bad}"
                )
            for k, v in floors.items():
                floor_counts[k] = floor_counts.get(k, 0) + int(v)
            lls.append(ll)
            lps.append(lp)
            last[0] = (new_params, e_state, m_state)
            if keep_params_history:
                history.append(new_params)
            if callback is not None:
                callback(it, new_params, e_state, m_state)
            return (ll + lp if map_estimate else ll), ll

        _, converged = run_loop(
            launch,
            carry_of,
            accept,
            last[0],
            num_iters,
            desc=method,
            progress_bar=progress_bar,
            rtol=rtol,
            smoothing_window=smoothing_window,
        )
        params, e_state, m_state = last[0]
        warn_floors(method, floor_counts)
        params = host_values(params) if mesh is not None else params
        final = EMState(params, state.iteration + len(lls), key, e_state, m_state)
        all_params = self._all_params(params, kwargs)
        return EMResult(
            params=all_params,
            state=final,
            log_marginals=np.asarray(lls),
            floor_counts=floor_counts,
            converged=converged,
            num_iters=len(lls),
            log_marginal_sd=(
                float(np.std(lls[-smoothing_window:], ddof=1))
                if smoothing_window and len(lls) > 1
                else None
            ),
            log_priors=np.asarray(lps) if map_estimate else None,
            params_history=(
                {k: np.stack([np.asarray(h[k]) for h in history]) for k in params}
                if keep_params_history
                else None
            ),
        )

    # -- internals ---------------------------------------------------------------------
    def _compiled(self, kwargs, e_step=None, time_mask=None, pattern=None):
        e_step = self.e_step if e_step is None else e_step
        check_mask_support(self.m_step, time_mask)
        dynamic, static = split_static(kwargs)
        items = static_items(static)
        if pattern is None:  # (given when the processes agreed on it)
            pattern = data_pattern(dynamic.get("y"), time_mask)
        args = (self.model, e_step, self.m_step, items, pattern)
        return cached_program(("em_step",) + args, lambda: _make_step(*args)), dynamic

    def _initial_states(self, params, kwargs, time_mask=None, num_iters=None):
        """``(e_state, m_state)``: the stateful plug-ins' first states (``()`` for a
        stateless one). The M-step's ``init`` gets zeros shaped like its statistics
        (found by an abstract run of the E-step: nothing is computed)."""
        if not (is_stateful(self.e_step) or is_stateful(self.m_step)):
            return (), ()
        dynamic, static = split_static(kwargs)
        pattern = data_pattern(dynamic.get("y"), time_mask)
        args = (self.model, self.e_step, self.m_step, static_items(static), pattern)
        # cached: a second run (new data, same shapes) neither compiles the E-step's init
        # nor traces its step again for the statistics' shapes (0.7 s for online PaRIS)
        e_init, stats_of = cached_program(("em_init",) + args, lambda: _make_init(*args))
        e_state = e_init(params, dynamic)
        if not is_stateful(self.m_step):
            return e_state, ()
        shapes = jax.eval_shape(stats_of, params, e_state, dynamic, *mask_arg(time_mask))
        zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        return e_state, init_m_state(self.m_step, zeros, num_iters)

    def _all_params(self, params, kwargs):
        ss, _ = bind(self.model, params, **kwargs)
        return {k: v for k, v in ss.params.items()}


def warn_floors(method: str, floor_counts: dict, stacklevel: int = 3) -> None:
    """One RuntimeWarning naming the covariance sites whose M-step hit the eigenvalue
    floor, with the number of iterations per site (nothing when none did)."""
    hits = {k: v for k, v in floor_counts.items() if v}
    if hits:
        warnings.warn(
            f"{method} applied the covariance eigenvalue floor (iterations per site): {hits}",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def check_m_step(m_step, info, method: str = "EM", model=None) -> None:
    """The M-step's requirements of the model (``check``) and, where it has one, its
    check of the model's distributions at the starting values (``verify_model``). The
    built-in models' declarations are verified by the tests for every option
    (tests/test_user_models.py), so ``model`` being one of them skips the run-time
    check (a compilation: 0.1 s of a fresh process)."""
    if method == "EM":
        m_step.check(info.spec.structure, info.free)
    else:
        m_step.check(info.spec.structure, info.free, method)
    verify = getattr(m_step, "verify_model", None)
    if verify is not None and not is_builtin_model(model):
        verify(info)


def initial_params(model, rng_key, init_params, kwargs, check=None, split_key=True):
    """Validated starting values of the free sites (shared by :class:`EM` and ``SGD``):
    ``init_params`` where given (adapted across the model family), prior draws from
    ``rng_key`` for the rest. Returns ``(params, run_key, kwargs)`` with the data
    validated; ``check(info)`` may veto the model (e.g. an M-step's requirements).

    ``split_key=False`` (EM): no eager split; the prior draws use ``rng_key`` and the
    caller derives its loop keys so that they differ from those (``LOOP_SALT``)."""
    check_rng_key(rng_key)
    kwargs = validate_data(kwargs)
    check_some_observed(kwargs.get("y"))
    if split_key:
        init_key, run_key = jax.random.split(rng_key)
    else:
        init_key = run_key = rng_key
    given = dict(_params_of(init_params))
    typed = sorted(given) if isinstance(init_params, dict) else []
    info = _inspect_as_given(model, given, init_key, kwargs) if given else None
    if info is not None:
        given = {k: np.asarray(v) for k, v in given.items() if k in info.free}
    else:
        if given:
            given = adapt_params(model, given, kwargs)
        info = inspect_checked(model, given, False, rng_key=init_key, **kwargs)
    check_known_sites(typed, info)
    if not info.free:
        raise ValueError("the model has no free parameter sites: nothing to estimate")
    if check is not None:
        check(info)
    # strongly typed, in the dtype of the site, so a jitted step compiles once
    params = {
        k: device_array(given.get(k, s["value"]), dtype=jnp.result_type(s["value"]))
        for k, s in info.free.items()
    }
    check_params(params, info.free)
    return params, run_key, kwargs


def check_known_sites(names, info) -> None:
    """``ValueError`` naming the keys of ``init_params`` (a dict typed by a user) that
    are no site of the model: a misspelled name would otherwise be ignored silently.
    (Values carried from another model of the family come as an ``EMResult``.)"""
    unknown = sorted(set(names) - set(info.free) - set(info.frozen))
    if unknown:
        raise ValueError(
            f"init_params has keys that are no site of the model: {unknown}; its free "
            f"sites are {sorted(info.free)}"
        )


def _inspect_as_given(model, given: dict, rng_key, kwargs):
    """The model's inspection with ``given`` substituted, when the values fit it as they
    are (every value of a free site has the shape of the site's distribution) and pass
    :func:`check_params`; ``None`` otherwise, and the values then go through
    :func:`adapt_params` (an abstract run of the model, 0.15 s in a fresh process, that
    this common case skips)."""
    try:
        info = inspect_model(model, rng_key=rng_key, values=given, **kwargs)
    except Exception:
        return None  # the slow path reports what is wrong, by name
    for name, value in given.items():
        site = info.free.get(name)
        if site is None:
            continue  # not a free site of this model: dropped, as adapt_params does
        fn = site["fn"]
        if tuple(np.shape(value)) != tuple(fn.batch_shape) + tuple(fn.event_shape):
            return None
    check_params(given, info.free, require_all=False)
    return info


def _params_of(init):
    if init is None:
        return {}
    if isinstance(init, EMResult):
        return init.params
    if isinstance(init, dict):
        return init
    raise ValueError(f"init_params must be a dict or an EMResult; got {type(init).__name__}")


def iteration_keys(rng_key, iteration):
    """``(k_e, k_m)``, the E-step's and M-step's keys of EM iteration ``iteration`` in a
    run with key ``rng_key`` (see :class:`EMState`)."""
    if jnp.ndim(iteration) != 0:
        raise TypeError(f"iteration must be a scalar integer; got shape {jnp.shape(iteration)}")
    sub = jax.random.fold_in(jax.random.fold_in(rng_key, LOOP_SALT), iteration)
    return jax.random.split(sub)


def _make_step(model, e_step, m_step, static_items, pattern=None):
    static = dict(static_items)
    # the plug-ins told the data's NaN pattern: only the code path for it is traced
    e_step, m_step = with_data_pattern(e_step, pattern), with_data_pattern(m_step, pattern)

    def step(params, dynamic, rng_key, iteration, time_mask=None, e_state=(), m_state=()):
        # time_mask (S, T), ragged lengths: a traced argument (new lengths, same shapes:
        # no recompilation); None compiles the step without it. rng_key: the run's key,
        # iteration: traced int32 (see EMState). e_state / m_state: the plug-ins' states
        # (() for stateless ones: no leaves, nothing traced)
        kwargs = {**static, **dynamic}
        ss, spec = bind(model, params, **kwargs)
        k_e, k_m = iteration_keys(rng_key, iteration)
        post, e_state = e_step_call(e_step, k_e, ss, spec.y, spec.u, e_state, time_mask)
        ll = jnp.sum(post.log_marginal)
        stats = statistics_with_mask(m_step, post, ss, spec.y, spec.u, time_mask)
        new, floors, m_state = m_step_call(
            m_step, stats, m_state, ss, frozenset(params), rng_key=k_m, model=model,
            model_kwargs=kwargs,
        )  # fmt: skip
        new_params = {k: new.get(k, v) for k, v in params.items()}
        finite = {k: jnp.all(jnp.isfinite(v)) for k, v in new_params.items()}
        # MAP-EM's prior term of the objective at the parameters entering this iteration
        lp = _log_prior(m_step, params, model, kwargs)
        return new_params, ll, floors, finite, lp, e_state, m_state

    return jit_model(step, e_step)


def _make_init(model, e_step, m_step, static_items, pattern=None):
    """``(e_init, stats_of)``: the E-step's first state ``(params, dynamic) -> state``
    (compiled) and ``(params, e_state, dynamic[, time_mask]) -> stats`` (jitted, only
    for the shapes of the M-step's statistics by ``jax.eval_shape``: JAX caches the
    trace per argument shapes)."""
    static = dict(static_items)
    e_step, m_step = with_data_pattern(e_step, pattern), with_data_pattern(m_step, pattern)

    def e_init(params, dynamic):
        ss, spec = bind(model, params, **static, **dynamic)
        return init_e_state(e_step, ss, spec.y, spec.u)

    def stats_of(params, e_state, dynamic, time_mask=None):
        kwargs = {**static, **dynamic}
        ss, spec = bind(model, params, **kwargs)
        key = jax.random.key(0)
        post, _ = e_step_call(e_step, key, ss, spec.y, spec.u, e_state, time_mask)
        return statistics_with_mask(m_step, post, ss, spec.y, spec.u, time_mask)

    return jit_model(e_init), jit_model(stats_of)


def _log_prior(m_step, params, model, kwargs):
    fn = getattr(m_step, "log_prior", None)
    if fn is None or not getattr(m_step, "map_estimate", False):
        return jnp.zeros(())
    return fn(params, model, kwargs)


def shard_sequences(mesh, params: dict, dynamic: dict, mask_arg: tuple, process_local=False):
    """Place the data on ``mesh``: ``y``, a per-sequence ``u`` and the time mask split
    along their leading sequence axis over all the mesh's devices; parameters and any
    other array replicated. The caller pads the sequence count to a multiple of
    ``mesh.devices.size`` (``process_local``: each process's count to a multiple of its
    own devices in the mesh, the same in every process; the arrays passed are then this
    process's part of the sequence axis).

    The arrays are built shard by shard from host data present in every process
    (``jax.make_array_from_callback``; ``jax.device_put`` would also check that the
    processes agree, which NaN padding defeats), or from each process's own part
    (``jax.make_array_from_process_local_data``)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if isinstance(mesh, Mesh):
        mesh = mesh_axes(mesh)  # the sequence axis spans every mesh axis
    if not isinstance(mesh, MeshAxes):
        raise ValueError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    mesh, axes = mesh.mesh, mesh.axes
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(a, sharding):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    def split(a):
        sharding = NamedSharding(mesh, PartitionSpec(axes, *([None] * (np.ndim(a) - 1))))
        if process_local:
            return jax.make_array_from_process_local_data(sharding, np.asarray(a))
        return place(a, sharding)

    dynamic = {
        k: split(v) if k in ("y", "u") and np.ndim(v) == 3 else place(v, replicated)
        for k, v in dynamic.items()
    }
    params = {k: place(v, replicated) for k, v in params.items()}
    return params, dynamic, tuple(split(m) for m in mask_arg)


def host_values(tree):
    """``jax.device_get`` of replicated results, also when they live on the devices of
    several processes (each process reads its own copy)."""

    def local(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            if not a.is_fully_replicated:  # pragma: no cover - the EM outputs are replicated
                raise ValueError("a result split over several processes cannot be fetched")
            return a.addressable_data(0)
        return a

    return jax.device_get(jax.tree_util.tree_map(local, tree))


def _local_extent(mesh: "MeshAxes") -> int:
    """How many positions along the (flattened) sequence axes of ``mesh`` hold a device
    of this process."""
    devices = np.asarray(mesh.mesh.devices)
    names = list(mesh.mesh.axis_names)
    keep = [names.index(a) for a in mesh.axes]
    other = [i for i in range(devices.ndim) if i not in keep]
    mine = np.vectorize(lambda d: d.process_index == jax.process_index())(devices)
    # a position along the sequence axes is this process's when any device there is
    return int(np.any(np.transpose(mine, keep + other).reshape(
        int(np.prod([devices.shape[i] for i in keep])), -1), axis=1).sum())  # fmt: skip


def pad_process_local(kwargs: dict, time_mask, mesh):
    """This process's sequences padded to the shape every process agrees on: the longest
    sequence of all, and the largest local count rounded up to a multiple of the local
    devices of ``mesh`` (length-0 sequences: all-NaN ``y``, zero ``u``, False mask).
    Returns ``(kwargs, time_mask, pattern)`` with the missing-data pattern agreed by all
    processes (every process compiles the same program)."""
    from jax.experimental import multihost_utils

    from ppl_dyn.infer._pattern import COMPLETE, MIXED, RAGGED, SHARED

    kwargs = dict(kwargs)
    y = np.asarray(kwargs["y"])
    if y.ndim == 2:
        y = y[None]
    S, T, dy = y.shape
    # this process's share of the sequence axis: its devices along the sequence axes
    # (its part of the mesh, projected on those axes)
    local_devices = _local_extent(mesh)
    if local_devices == 0:
        raise ValueError("process_local=True: the mesh has no device of this process")
    codes = {COMPLETE: 0, SHARED: 1, RAGGED: 2, MIXED: 3, None: 3}
    local_pattern = data_pattern(y, time_mask)
    mine = np.array([S, T, dy, codes[local_pattern]], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 4)
    if len(set(every[:, 2].tolist())) != 1:
        raise ValueError(f"the processes disagree on obs_dim: {sorted(set(every[:, 2]))}")
    S_all = int(every[:, 0].max())
    S_pad = -(-S_all // local_devices) * local_devices
    T_pad = int(every[:, 1].max())
    if time_mask is None:
        time_mask = np.ones((S, T), bool)
    mask = np.zeros((S_pad, T_pad), bool)
    mask[:S, :T] = time_mask
    y_pad = np.full((S_pad, T_pad, dy), np.nan, y.dtype)
    y_pad[:S, :T] = y
    y_pad[~mask] = np.nan
    kwargs["y"] = y_pad
    u = kwargs.get("u")
    if u is not None and np.ndim(u) == 3:
        u = np.asarray(u)
        u_pad = np.zeros((S_pad, T_pad, u.shape[-1]), u.dtype)
        u_pad[:S, :T] = u
        kwargs["u"] = u_pad
    elif u is not None and np.shape(u)[0] != T_pad:
        raise ValueError(
            "process_local=True with an input u shared by the sequences needs every "
            f"process's sequences to have the longest length ({T_pad}); pass u per sequence"
        )
    worst = int(every[:, 3].max())
    padded = bool(np.any(every[:, 0] != S_pad) or np.any(every[:, 1] != T_pad)) or not mask.all()
    everyone_padded = bool(np.asarray(multihost_utils.process_allgather(np.array([padded]))).any())
    if worst == 0 and not everyone_padded:
        return kwargs, None, COMPLETE
    pattern = MIXED if worst in (1, 3) else RAGGED
    return kwargs, mask, pattern


def fit_em(model: Callable, e_step, rng_key, num_iters: int, *, m_step=None, **kwargs) -> EMResult:
    """``EM(model, e_step, m_step).run(rng_key, num_iters, **kwargs)``."""
    return EM(model, e_step, m_step).run(rng_key, num_iters, **kwargs)
