r"""Particle Gibbs with ancestor sampling (PGAS) for models linear in their parameters.

One Gibbs sweep (``docs/psaem.md``):

1. states: ``x_{1:T} ~ CPF-AS(theta, x'_{1:T})`` (:mod:`ppl_dyn.infer.cpf`), a kernel that
   leaves ``p(x_{1:T} | y, theta)`` invariant for any ``N >= 2``: the
   :class:`~ppl_dyn.infer.CPFAS` E-step;
2. parameters (:class:`GibbsMStep`): missing observation entries are drawn from
   ``p(y_mis | y_obs, x, theta)`` (data augmentation), then each regression
   ``z = W r + e``, ``e ~ N(0, Sigma)`` of the model's
   :class:`~ppl_dyn.LinearStructure` (dynamics ``x_t`` on ``[phi(x_{t-1}); u_t; 1]``,
   emission ``y_t`` on ``[psi(x_t); u_t; 1]``, initial state ``x_1`` on ``[1]``) is drawn
   from its conjugate matrix-normal-inverse-Wishart conditional given the states.

The conjugate prior (:class:`MNIWPrior`) is *not* the prior written in the NumPyro model
(the built-in models put independent Normal priors on the weights): PGAS samples the
posterior under the MNIW prior passed here. The model's own priors are only used for
starting values.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from ppl_dyn._validation import check_rng_key
from ppl_dyn.infer import _linalg as la
from ppl_dyn.infer._run import ragged_data, validate_data
from ppl_dyn.infer.cpf import CPFAS
from ppl_dyn.infer.em import EM, EMResult
from ppl_dyn.infer.mstep import regression_blocks, structure_sites
from ppl_dyn.infer.stats import keep
from ppl_dyn.state_space import mask_covariance

__all__ = ["GibbsMStep", "MNIWPrior", "PGAS", "PGASResult", "PathDraws"]

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


def _check_structure(st, free) -> None:
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


class PathDraws(NamedTuple):
    """What :class:`GibbsMStep` asks of the posterior: one drawn path per sequence.

    Attributes:
        paths: ``(S, T, dx)``.
        y: the observations ``(S, T, dy)`` (NaN = missing).
        u: the inputs ``(S, T, du)``.
        valid: ``(S, T)``, False past each sequence's end (ragged lengths).
    """

    paths: jax.Array
    y: jax.Array
    u: jax.Array
    valid: jax.Array


class GibbsMStep:
    """A Gibbs M-step: new parameters drawn from their conjugate matrix-normal-
    inverse-Wishart conditionals given one path per sequence (the posterior's
    ``trajectories``, e.g. :class:`~ppl_dyn.infer.CPFAS`'s new reference), after the
    missing observations are drawn given the path.

    ``EM(model, CPFAS(N), GibbsMStep(priors)).run(..., keep_params_history=True)`` is one
    PGAS chain; :class:`PGAS` runs that for several chains and keeps the draws.

    Args:
        priors: ``{"dynamics": MNIWPrior(...), "emission": ..., "init": ...}``; missing
            roles use ``MNIWPrior()``.
    """

    def __init__(self, priors: Optional[dict] = None):
        if priors is not None and not isinstance(priors, dict):
            raise ValueError(f"priors must be a dict of MNIWPrior; got {type(priors).__name__}")
        priors = dict(priors or {})
        bad = set(priors) - set(_ROLES)
        if bad:
            raise ValueError(f"priors: unknown roles {sorted(bad)}; expected some of {_ROLES}")
        for role, p in priors.items():
            if not isinstance(p, MNIWPrior):
                raise ValueError(f"priors[{role!r}] must be an MNIWPrior; got {type(p).__name__}")
        self.priors = tuple((role, priors.get(role, MNIWPrior())) for role in _ROLES)

    # equal by value where the priors are hashable (one compilation for equal priors),
    # by identity otherwise (array-valued priors)
    def __eq__(self, other):
        if type(other) is not type(self):
            return False
        try:
            return hash(self.priors) == hash(other.priors) and self.priors == other.priors
        except (TypeError, ValueError):
            return other is self

    def __hash__(self):
        try:
            return hash((type(self), self.priors))
        except TypeError:
            return id(self)

    def __repr__(self):
        return f"GibbsMStep(priors={dict(self.priors)!r})"

    def check(self, structure, free_names, method: str = "PGAS") -> None:
        _check_structure(structure, free_names)  # (the priors were checked in __init__)

    def statistics(self, posterior, ss, y, u, time_mask=None) -> PathDraws:
        traj = getattr(posterior, "trajectories", None)
        if traj is None:
            raise ValueError(
                "GibbsMStep needs one drawn path per sequence (the posterior's "
                f"trajectories); {type(posterior).__name__} has none: use the CPFAS E-step"
            )
        valid = jnp.ones(y.shape[:2], bool) if time_mask is None else time_mask
        return PathDraws(traj[:, 0], y, u, valid)

    def update(self, stats: PathDraws, ss, free, *, rng_key=None, **unused):
        if rng_key is None:
            raise ValueError("GibbsMStep.update draws the parameters: it needs rng_key")
        k_y, k_th = jax.random.split(rng_key)
        S = stats.paths.shape[0]
        Y = jax.vmap(lambda k, x, y_s, u_s: _impute(k, ss, x, y_s, u_s))(
            jax.random.split(k_y, S), stats.paths, stats.y, stats.u
        )
        per_seq = jax.vmap(lambda x, y_s, u_s, m: _path_stats(ss, x, y_s, u_s, m))(
            stats.paths, Y, stats.u, stats.valid
        )
        summed = jax.tree_util.tree_map(lambda a: jnp.sum(a, 0), per_seq)
        return _draw_params(k_th, ss, summed, frozenset(free), dict(self.priors)), {}


def _draw_params(key, ss, stats, free, priors) -> dict:
    """The free sites of every regression role drawn from their MNIW conditionals."""
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
            fixed = [jnp.reshape(ss.params[name], (dz, -1)) for name, _, _ in fixed_b]
            Wx = jnp.concatenate(fixed, 1).astype(S_zz.dtype)
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
    return {k: v.astype(jnp.result_type(ss.params[k])) for k, v in new.items()}


class PGAS:
    """Particle Gibbs with ancestor sampling under conjugate MNIW priors.

    A thin entry point over the one EM driver: each chain is
    ``EM(model, CPFAS(num_particles), GibbsMStep(priors))`` run for ``num_warmup +
    num_samples * thinning`` sweeps with its parameter history kept.

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
        self.model = model
        self.num_particles = int(num_particles)
        self.m_step = GibbsMStep(priors)
        self.priors = dict(self.m_step.priors)

    def em(self) -> EM:
        """The :class:`EM` driver one chain runs."""
        em = EM(self.model, CPFAS(self.num_particles), self.m_step)
        em._method = "PGAS"
        return em

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
        """Run ``num_chains`` chains of ``num_warmup + num_samples * thinning`` Gibbs
        sweeps and keep every ``thinning``-th draw after the warm-up.

        Args:
            rng_key: PRNG key.
            num_samples: draws kept per chain.
            num_warmup: sweeps discarded first.
            num_chains: independent chains (each starts from its own prior draw of the
                sites missing from ``init_params``; one after the other, sharing one
                compilation).
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
        data = validate_data(ragged_data(dict(kwargs), lengths)[0])
        total = int(num_warmup) + int(num_samples) * int(thinning)
        kept = int(num_warmup) + int(thinning) * np.arange(1, int(num_samples) + 1) - 1
        em = self.em()
        samples, states, lls = [], [], []
        for key in jax.random.split(rng_key, int(num_chains)):
            refs: list = []

            def record(it, params, e_state, m_state, refs=refs):
                done = it + 1 - int(num_warmup)
                if keep_states and done > 0 and done % int(thinning) == 0:
                    refs.append(e_state.references)

            res = em.run(
                key,
                total,
                init_params=init_params,
                progress_bar=progress_bar,
                keep_params_history=True,
                callback=record,
                lengths=lengths,
                **kwargs,
            )
            samples.append({k: v[kept] for k, v in res.params_history.items()})
            lls.append(res.log_marginals[kept])
            if keep_states:
                states.append(np.stack([np.asarray(r) for r in refs]))
        out_states = None
        if keep_states:
            out_states = np.stack(states)  # (chains, draws, S, T, dx)
            if np.ndim(data.get("y")) != 3:
                out_states = out_states[:, :, 0]
        return PGASResult(
            samples={k: np.stack([s[k] for s in samples]) for k in samples[0]},
            states=out_states,
            log_marginals=np.stack(lls),
            model=self.model,
            model_kwargs=data,
            priors=dict(self.m_step.priors),
        )


def _resolve(prior: MNIWPrior, role: str, dz: int, dtype) -> _Resolved:
    df = float(dz + 2) if prior.df is None else float(prior.df)
    if not df > dz - 1:
        raise ValueError(f"priors[{role!r}].df must exceed dz - 1 = {dz - 1}; got {df}")
    default = 1.0 if role == "init" else 0.1
    scale = _as_matrix(default if prior.scale is None else prior.scale, dz, dtype)
    return _Resolved(prior.mean, prior.col_precision, df, scale)
