r"""Particle Gibbs with ancestor sampling (PGAS) for models linear in their parameters.

One Gibbs sweep (``docs/psaem.md``):

1. states: ``x_{1:T} ~ CPF-AS(theta, x'_{1:T})`` (:mod:`ppl_dyn.infer.cpf`), a kernel that
   leaves ``p(x_{1:T} | y, theta)`` invariant for any ``N >= 2``; missing observation
   entries are then drawn from ``p(y_mis | y_obs, x, theta)`` (data augmentation);
2. parameters: each regression ``z = W r + e``, ``e ~ N(0, Sigma)`` of the model's
   :class:`~ppl_dyn.LinearStructure` (dynamics ``x_t`` on ``[phi(x_{t-1}); u_t; 1]``,
   emission ``y_t`` on ``[psi(x_t); u_t; 1]``, initial state ``x_1`` on ``[1]``) is drawn
   from its conjugate matrix-normal-inverse-Wishart conditional given the states.

The conjugate prior (:class:`MNIWPrior`) is *not* the prior written in the NumPyro model
(the built-in models put independent Normal priors on the weights): PGAS samples the
posterior under the MNIW prior passed here. The model's own priors are only used for
starting values.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from tqdm.auto import tqdm

from ppl_dyn._validation import check_rng_key
from ppl_dyn.infer import _linalg as la
from ppl_dyn.infer._run import hashable_items, jit_model, mask_arg, ragged_data, split_static
from ppl_dyn.infer.cpf import conditional_particle_filter
from ppl_dyn.infer.em import EMResult, initial_params
from ppl_dyn.infer.mstep import regression_blocks, structure_sites
from ppl_dyn.infer.stats import keep
from ppl_dyn.state_space import bind, mask_covariance

__all__ = ["MNIWPrior", "PGAS", "PGASResult"]

_ROLES = ("dynamics", "emission", "init")


class MNIWPrior(NamedTuple):
    r"""Matrix-normal-inverse-Wishart prior of one regression ``z = W r + e``:

    .. math::
        \Sigma \sim \mathcal{IW}(\nu_0, \Psi_0),\qquad
        W_f \mid \Sigma \sim \mathcal{MN}(M_0, \Sigma, \Lambda_0^{-1}),

    i.e. ``vec(W_f) ~ N(vec(M_0), Lambda_0^{-1} kron Sigma)``, with ``W_f`` the free
    columns of ``[weight | input_weight | bias]`` (frozen blocks are constants). The
    inverse-Wishart density is ``|Sigma|^{-(nu+d+1)/2} exp(-tr(Psi Sigma^{-1})/2)``
    (mean ``Psi / (nu - d - 1)``), NumPyro's ``InverseWishart(nu, Psi)``.

    Args:
        mean: ``M_0`` ``(dz, p_free)``; None: zeros.
        col_precision: ``Lambda_0``: a scalar (times the identity) or ``(p_free, p_free)``.
        df: ``nu_0 > dz - 1``; None: ``dz + 2``.
        scale: ``Psi_0``: a scalar (times the identity) or ``(dz, dz)``; None: ``0.1 I``
            for the dynamics and emission noise (the built-in models' prior mean of
            ``Q`` and ``R``), ``I`` for the initial covariance.
    """

    mean: Optional[object] = None
    col_precision: object = 0.01
    df: Optional[float] = None
    scale: Optional[object] = None


class PGASResult(NamedTuple):
    """Draws of :meth:`PGAS.run`; arrays have leading axes ``(chain, draw)``.

    Attributes:
        samples: every free parameter site ``(chains, draws, ...)``.
        states: the state paths ``(chains, draws, [S,] T, dx)`` when ``keep_states``.
        log_marginals: the CPF's ``sum_t log mean_i g(y_t | x_t^i)`` per draw (a
            progress trace: conditional on the reference it is not an unbiased estimate
            of the likelihood).
        model: the model function.
        model_kwargs: its keyword arguments (the data).
        priors: the :class:`MNIWPrior` used per regression role.

    ``ppl_dyn.to_inference_data(result)`` converts it to ``arviz.InferenceData``.
    """

    samples: dict
    states: Optional[np.ndarray]
    log_marginals: np.ndarray
    model: Callable
    model_kwargs: dict
    priors: dict

    @property
    def num_chains(self) -> int:
        return int(self.log_marginals.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.log_marginals.shape[1])


# --------------------------------------------------------------------------------------
# the conjugate regression update
# --------------------------------------------------------------------------------------


def _as_matrix(v, dim, dtype):
    v = jnp.asarray(v, dtype)
    return v * jnp.eye(dim, dtype=dtype) if v.ndim == 0 else v


def draw_regression(key, S_zr, S_rr, S_zz, n, W_fixed, free_cols, fixed_cols, Sigma, prior):
    """One draw of ``(W_f, Sigma)`` from the MNIW conditional given complete-data
    statistics ``S_zr = sum z r^T``, ``S_rr = sum r r^T``, ``S_zz = sum z z^T``, ``n``.

    ``W_fixed`` ``(dz, len(fixed_cols))`` are the frozen columns; ``Sigma=None`` draws
    the noise covariance too, otherwise it is held at the given value. Returns
    ``(W_f, Sigma)`` (``W_f`` None when no column is free).
    """
    dtype = S_zz.dtype
    dz = S_zz.shape[0]
    f = np.asarray(free_cols, int)
    x = np.asarray(fixed_cols, int)
    Szz = S_zz
    rhs = S_zr[:, f]
    if x.size:  # regress z - W_x r_x on r_f
        Wx = W_fixed
        Szx = S_zr[:, x]
        Szz = Szz - Wx @ Szx.T - Szx @ Wx.T + Wx @ S_rr[np.ix_(x, x)] @ Wx.T
        rhs = rhs - Wx @ S_rr[np.ix_(x, f)]
    k_sig, k_w = jax.random.split(key)
    Mn = L = None
    if f.size:
        p = f.size
        Lam0 = _as_matrix(prior.col_precision, p, dtype)
        M0 = jnp.zeros((dz, p), dtype) if prior.mean is None else jnp.asarray(prior.mean, dtype)
        Lam = la.sym(Lam0 + S_rr[np.ix_(f, f)])
        L = la.cholesky(Lam)
        Mn = la.cho_solve(L, (rhs + M0 @ Lam0).T).T
    if Sigma is None:
        Psi = prior.scale_matrix + Szz
        if f.size:
            Psi = Psi + M0 @ Lam0 @ M0.T - Mn @ Lam @ Mn.T
        nu = prior.df + n
        Sigma = dist.InverseWishart(nu, scale_matrix=la.sym(Psi)).sample(k_sig)
        Sigma = la.sym(Sigma)
    if not f.size:
        return None, Sigma
    Z = jax.random.normal(k_w, Mn.shape, dtype)
    # W = Mn + L_Sigma Z L^{-1}: vec(W) ~ N(vec(Mn), Lam^{-1} kron Sigma)
    Y = la.cholesky(Sigma) @ Z
    W = Mn + jax.scipy.linalg.solve_triangular(L.T, Y.T, lower=False).T
    return W, Sigma


class _Resolved(NamedTuple):
    """A prior with its defaults filled in (hashable leaves for the jit cache)."""

    mean: Optional[object]
    col_precision: object
    df: float
    scale_matrix: jax.Array


# --------------------------------------------------------------------------------------
# complete-data statistics of one sampled path
# --------------------------------------------------------------------------------------


def _impute(key, ss, X, y, u):
    """Draw the missing entries of ``y`` ``(T, dy)`` from ``p(y_mis | y_obs, x)``."""
    mask = ~jnp.isnan(y)
    yf = jnp.where(mask, y, 0.0)
    mu = ss.emission_mean(X, u)  # (T, dy)
    R = jax.vmap(ss.emission_cov)(u)  # (T, dy, dy)
    z = jax.random.normal(key, y.shape, y.dtype)

    def one(m_t, y_t, mu_t, R_t, z_t):
        o = m_t.astype(R_t.dtype)
        miss = 1.0 - o
        K = la.cho_solve(la.cholesky(mask_covariance(R_t, m_t)), (R_t * o[None, :]).T).T
        K = K * o[None, :]
        mean = o * y_t + miss * (mu_t + K @ (o * (y_t - mu_t)))
        Rc = miss[:, None] * (R_t - K @ R_t) * miss[None, :]
        # (Rc + diag(o)) has the missing block of Rc: masking L z keeps exactly that
        Lc = la.cholesky(la.sym(Rc) + jnp.diag(o))
        return mean + miss * (Lc @ z_t)

    return jax.vmap(one)(mask, yf, mu, R, z)


def _path_stats(ss, X, y, u, valid=None):
    """Complete-data regression statistics of one path ``X`` ``(T, dx)`` with complete
    ``y`` ``(T, dy)``: dynamics, emission and initial-state ``(S_zr, S_rr, S_zz, n)``.

    ``valid`` ``(T,)`` (ragged lengths): steps where it is False lie past the
    sequence's end; their emission terms and the transitions into them count 0, and
    the initial-state term counts only for a non-empty sequence."""
    st = ss.structure
    T = X.shape[0]
    valid = jnp.ones((T,), bool) if valid is None else valid
    X, y, u = (keep(valid, a) for a in (X, y, u))  # a select: padded steps may be junk
    ones = valid.astype(X.dtype)[:, None]
    r_dyn = jnp.concatenate([st.dynamics.features(X[:-1]), u[1:], ones[1:]], -1)
    r_dyn = r_dyn * ones[1:]
    z_dyn = X[1:] * ones[1:]
    dyn = (z_dyn.T @ r_dyn, r_dyn.T @ r_dyn, z_dyn.T @ z_dyn, jnp.sum(ones[1:]))
    r_emi = jnp.concatenate([st.emission.features(X), u, ones], -1) * ones
    emi = (y.T @ r_emi, r_emi.T @ r_emi, y.T @ y, jnp.sum(ones))
    x1 = X[0][:, None]
    n1 = ones[0, 0]
    init = (x1, n1 * jnp.ones((1, 1), X.dtype), x1 @ x1.T, n1)
    return {"dynamics": dyn, "emission": emi, "init": init}


# --------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------


def _role_layout(st, role, k, du):
    """``(blocks, noise_name, dz_key)`` with blocks ``[(site, slice, is_vector)]``."""
    if role == "init":
        return [(st.init_mean, slice(0, 1), True)], st.init_cov
    reg = st.dynamics if role == "dynamics" else st.emission
    blocks = [(n, s, n == reg.bias) for n, s in regression_blocks(reg, k, du)]
    return blocks, reg.noise


def _check_structure(st, free, priors) -> None:
    if st is None:
        raise ValueError(
            "model: PGAS draws the parameters from their conjugate conditionals, which "
            "needs a LinearStructure (built-in lds, tanh_rnn, rbf)"
        )
    unknown = set(free) - structure_sites(st)
    if unknown:
        raise ValueError(
            f"PGAS has no conjugate update for the sites {sorted(unknown)}; condition them "
            "(numpyro.handlers.condition)"
        )
    diag = []
    if st.dynamics.diagonal_noise and st.dynamics.noise in free:
        diag.append(st.dynamics.noise)
    if st.emission.diagonal_noise and st.emission.noise in free:
        diag.append(st.emission.noise)
    if st.diagonal_init and st.init_cov in free:
        diag.append(st.init_cov)
    if diag:
        raise ValueError(
            f"PGAS's inverse-Wishart update needs full covariance sites; {diag} hold "
            "variance vectors (use dynamics_noise='full' etc., or condition them)"
        )
    bad = set(priors) - set(_ROLES)
    if bad:
        raise ValueError(f"priors: unknown roles {sorted(bad)}; expected some of {_ROLES}")
    for role, p in priors.items():
        if not isinstance(p, MNIWPrior):
            raise ValueError(f"priors[{role!r}] must be an MNIWPrior; got {type(p).__name__}")


class PGAS:
    """Particle Gibbs with ancestor sampling under conjugate MNIW priors.

    Args:
        model: a model with a :class:`~ppl_dyn.LinearStructure` and full covariance
            sites (e.g. ``lds``); every free site must belong to the structure.
        num_particles: ``N >= 2`` for the CPF-AS state update (10-50 is typical).
        priors: ``{"dynamics": MNIWPrior(...), "emission": ..., "init": ...}``; missing
            roles use ``MNIWPrior()`` (weak: ``Lambda_0 = 0.01 I``, ``nu_0 = dz + 2``).

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import lds
        >>> from ppl_dyn.infer import PGAS
        >>> y = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=50,
        ...                      state_dim=1, obs_dim=1)["y"]
        >>> res = PGAS(lds, num_particles=10).run(jax.random.key(1), 20, num_chains=2,
        ...                                      y=y, state_dim=1, progress_bar=False)
        >>> res.samples["A"].shape
        (2, 20, 1, 1)
    """

    def __init__(self, model: Callable, num_particles: int = 20, priors: Optional[dict] = None):
        if (
            not isinstance(num_particles, (int, np.integer))
            or isinstance(num_particles, bool)
            or num_particles < 2
        ):
            raise ValueError(f"num_particles must be an int >= 2; got {num_particles!r}")
        if priors is not None and not isinstance(priors, dict):
            raise ValueError(f"priors must be a dict of MNIWPrior; got {type(priors).__name__}")
        self.model = model
        self.num_particles = int(num_particles)
        self.priors = dict(priors or {})

    def run(
        self,
        rng_key: jax.Array,
        num_samples: int,
        *,
        num_warmup: int = 0,
        num_chains: int = 1,
        thinning: int = 1,
        init_params: Union[dict, EMResult, None] = None,
        keep_states: bool = False,
        progress_bar: bool = True,
        lengths=None,
        **kwargs,
    ) -> PGASResult:
        """Run ``num_chains`` chains (vectorised) of ``num_warmup + num_samples *
        thinning`` Gibbs sweeps and keep every ``thinning``-th draw after the warm-up.

        Args:
            rng_key: PRNG key.
            num_samples: draws kept per chain.
            num_warmup: sweeps discarded first.
            num_chains: independent chains (each starts from its own prior draw of the
                sites missing from ``init_params``).
            thinning: keep every ``thinning``-th sweep.
            init_params: starting values (dict or ``EMResult``).
            keep_states: also return the sampled state paths.
            progress_bar: show a tqdm progress bar.
            lengths: sequences of different lengths, as in :meth:`EM.run`: padded ``y``
                ``(S, T, dy)`` (and ``u``) with ``lengths`` ``(S,)``, or ``y`` (and
                ``u``) as lists of arrays ``(L_s, dim)``. The conjugate updates use the
                statistics of each path up to its sequence's end; past it the kept
                states repeat the last state inside.
            **kwargs: the model's arguments (``y=...``, ``state_dim=...``).

        Raises:
            FloatingPointError: when a draw is not finite (names the site).
        """
        check_rng_key(rng_key)
        for name, v, lo in (
            ("num_samples", num_samples, 1),
            ("num_warmup", num_warmup, 0),
            ("num_chains", num_chains, 1),
            ("thinning", thinning, 1),
        ):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
        kwargs, time_mask = ragged_data(kwargs, lengths)
        extra = mask_arg(time_mask)
        k_init, k_run = jax.random.split(rng_key)
        starts = []
        structure = {}

        def check(info):
            structure["st"] = info.spec.structure
            _check_structure(info.spec.structure, info.free, self.priors)

        for key in jax.random.split(k_init, int(num_chains)):
            params, _, data = initial_params(self.model, key, init_params, kwargs, check=check)
            starts.append(params)
        params = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *starts)
        priors = tuple((role, self.priors.get(role, MNIWPrior())) for role in _ROLES)
        sweep, dynamic = self._compiled(data, priors)
        refs = None
        total = int(num_warmup) + int(num_samples) * int(thinning)
        keep_p, keep_x, keep_ll = [], [], []
        keys = jax.random.split(k_run, total)
        bar = tqdm(range(total), disable=not progress_bar, desc="PGAS", leave=False)
        for it in bar:
            first = refs is None
            if first:
                refs = sweep.reference_shape(params, dynamic)
            params, refs, ll, finite = sweep.step(
                params,
                refs,
                jnp.asarray(first),
                dynamic,
                jax.random.split(keys[it], num_chains),
                *extra,
            )
            bad = [k for k, ok in finite.items() if not bool(jnp.all(ok))]
            if bad:
                raise FloatingPointError(f"PGAS sweep {it}: non-finite draws of {bad}")
            done = it + 1 - int(num_warmup)
            if done > 0 and done % int(thinning) == 0:
                keep_p.append(jax.tree_util.tree_map(np.asarray, params))
                keep_ll.append(np.asarray(ll))
                if keep_states:
                    keep_x.append(np.asarray(refs))
        bar.close()
        samples = {k: np.stack([p[k] for p in keep_p], 1) for k in keep_p[0]}
        states = None
        if keep_states:
            states = np.stack(keep_x, 1)  # (chains, draws, S, T, dx)
            if not _batched(self.model, data):
                states = states[:, :, 0]
        return PGASResult(
            samples=samples,
            states=states,
            log_marginals=np.stack(keep_ll, 1),
            model=self.model,
            model_kwargs=data,
            priors=dict(priors),
        )

    def _compiled(self, kwargs, priors):
        dynamic, static = split_static(kwargs)
        items = hashable_items(static)
        args = (self.model, self.num_particles)
        if items is None:
            return _make_sweep(*args, tuple(static.items()), priors), dynamic
        try:
            hash(priors)
        except TypeError:  # array-valued priors: no cache
            return _make_sweep(*args, items, priors), dynamic
        return _cached_sweep(*args, items, priors), dynamic


def _batched(model, data) -> bool:
    del model
    y = data.get("y")
    return y is not None and np.ndim(y) == 3


def _resolve(prior: MNIWPrior, role: str, dz: int, dtype) -> _Resolved:
    df = float(dz + 2) if prior.df is None else float(prior.df)
    if not df > dz - 1:
        raise ValueError(f"priors[{role!r}].df must exceed dz - 1 = {dz - 1}; got {df}")
    default = 1.0 if role == "init" else 0.1
    scale = _as_matrix(default if prior.scale is None else prior.scale, dz, dtype)
    return _Resolved(prior.mean, prior.col_precision, df, scale)


class _Sweep(NamedTuple):
    step: Callable
    reference_shape: Callable


def _make_sweep(model, num_particles, static_items, priors):
    static = dict(static_items)
    priors = dict(priors)

    def update_params(key, ss, params, stats, free):
        st = ss.structure
        new = {}
        keys = jax.random.split(key, len(_ROLES))
        for kr, role in zip(keys, _ROLES, strict=True):
            S_zr, S_rr, S_zz, n = stats[role]
            dz, p = S_zr.shape
            du = ss.input_dim
            blocks, noise = _role_layout(st, role, p - du - 1, du)
            cols = [(name, np.arange(s.start, s.stop), vec) for name, s, vec in blocks]
            free_b = [c for c in cols if c[0] in free]
            fixed_b = [c for c in cols if c[0] not in free]
            noise_free = noise in free
            if not free_b and not noise_free:
                continue
            f = np.concatenate([c[1] for c in free_b]) if free_b else np.zeros(0, int)
            x = np.concatenate([c[1] for c in fixed_b]) if fixed_b else np.zeros(0, int)
            Wx = None
            if fixed_b:
                Wx = jnp.concatenate(
                    [
                        jnp.reshape(ss.params[name], (dz, -1)).astype(S_zz.dtype)
                        for name, _, _ in fixed_b
                    ],
                    1,
                )
            prior = _resolve(priors[role], role, dz, S_zz.dtype)
            Sigma = None if noise_free else jnp.asarray(ss.params[noise], S_zz.dtype)
            W, Sigma = draw_regression(kr, S_zr, S_rr, S_zz, n, Wx, f, x, Sigma, prior)
            if noise_free:
                new[noise] = Sigma
            start = 0
            for name, c, vec in free_b:
                blk = W[:, start : start + c.size]
                start += c.size
                new[name] = blk[:, 0] if vec else blk
        return {k: new.get(k, v).astype(jnp.result_type(v)) for k, v in params.items()}

    def one_chain(params, refs, first, dynamic, key, time_mask=None):
        kwargs = {**static, **dynamic}
        ss, spec = bind(model, params, **kwargs)
        S = spec.y.shape[0]
        k_x, k_y, k_th = jax.random.split(key, 3)
        masks = jnp.ones(spec.y.shape[:2], bool) if time_mask is None else time_mask

        def states(k, y_s, u_s, ref, mask_s):
            out = conditional_particle_filter(
                k, ss, y_s, u_s, ref, num_particles, conditional=~first, time_mask=mask_s
            )
            return out.reference, out.log_marginal

        X, ll = jax.vmap(states)(jax.random.split(k_x, S), spec.y, spec.u, refs, masks)
        Y = jax.vmap(lambda k, x, y_s, u_s: _impute(k, ss, x, y_s, u_s))(
            jax.random.split(k_y, S), X, spec.y, spec.u
        )
        per_seq = jax.vmap(lambda x, y_s, u_s, m: _path_stats(ss, x, y_s, u_s, m))(
            X, Y, spec.u, masks
        )
        stats = jax.tree_util.tree_map(lambda a: jnp.sum(a, 0), per_seq)
        new = update_params(k_th, ss, params, stats, frozenset(params))
        finite = {k: jnp.all(jnp.isfinite(v)) for k, v in new.items()}
        return new, X, jnp.sum(ll), finite

    @jit_model
    def step(params, refs, first, dynamic, keys, time_mask=None):
        # time_mask (S, T), ragged lengths: shared by the chains
        return jax.vmap(one_chain, in_axes=(0, 0, None, None, 0, None))(
            params, refs, first, dynamic, keys, time_mask
        )

    def reference_shape(params, dynamic):
        def f(p):
            _, spec = bind(model, p, **static, **dynamic)
            return spec.y

        one = jax.tree_util.tree_map(lambda a: a[0], params)
        y = jax.eval_shape(f, one)
        C = next(iter(params.values())).shape[0]
        dx = _state_dim(model, one, static, dynamic)
        return jnp.zeros((C,) + tuple(y.shape[:2]) + (dx,), y.dtype)

    return _Sweep(step, reference_shape)


def _state_dim(model, params, static, dynamic) -> int:
    box = {}

    def f(p):
        ss, _ = bind(model, p, **static, **dynamic)
        box["dx"] = ss.state_dim
        return 0

    jax.eval_shape(f, params)
    return int(box["dx"])


@functools.lru_cache(maxsize=32)
def _cached_sweep(model, num_particles, static_items, priors):
    return _make_sweep(model, num_particles, static_items, priors)
