"""Closed-form M-steps: one linear-in-parameters Gaussian regression per map.

For ``z = W r + e``, ``e ~ N(0, Sigma)`` with expected statistics ``S_zr, S_rr, S_zz, n``
(``docs/math.md`` section 1) the maximiser over the free column blocks of ``W`` is

.. math::
    W_f = (S_{zr}[:, f] - W_x S_{rr}[x, f])\\, S_{rr}[f, f]^{-1}

(``x`` the frozen blocks), independent of ``Sigma``; then

.. math::
    \\Sigma = \\tfrac1n (S_{zz} - W S_{zr}^T - S_{zr} W^T + W S_{rr} W^T)

in the full form, valid whether or not blocks are frozen. Diagonal noise takes its
diagonal. Every covariance leaving the M-step is exactly symmetric with eigenvalues at
least ``covariance_floor * trace / dim``; each use of the floor is counted and reported.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from ppl_dyn.infer import _linalg as la
from ppl_dyn.infer._run import accepts_keyword
from ppl_dyn.infer.stats import InitStats, LinearStats, RegressionStats, sample_smoothed_paths
from ppl_dyn.requirements import UnsupportedModelError, verify_structure
from ppl_dyn.state_space import LinearStructure, Regression, emission_log_lik, inspect_model


def floor_covariance(P, rel_floor):
    """Symmetrise ``P`` and lift eigenvalues below ``rel_floor * tr(P) / d``.

    Returns ``(P_floored, applied)`` where ``applied`` is 1 when the floor changed P.
    """
    P = la.sym(P)
    d = P.shape[-1]
    tiny = jnp.sqrt(jnp.finfo(P.dtype).tiny)
    floor = jnp.maximum(rel_floor * jnp.trace(P) / d, tiny)
    lam, V = jnp.linalg.eigh(P)
    applied = jnp.any(lam < floor)
    lifted = la.sym((V * jnp.maximum(lam, floor)[None, :]) @ V.T)
    return jnp.where(applied, lifted, P), applied.astype(jnp.int32)


def floor_variances(v, rel_floor):
    tiny = jnp.sqrt(jnp.finfo(v.dtype).tiny)
    floor = jnp.maximum(rel_floor * jnp.mean(v), tiny)
    applied = jnp.any(v < floor)
    return jnp.maximum(v, floor), applied.astype(jnp.int32)


def _pinv_psd(S):
    """Pseudo-inverse of a symmetric PSD matrix (no NaN on rank deficiency)."""
    lam, V = jnp.linalg.eigh(la.sym(S))
    cut = jnp.finfo(S.dtype).eps * S.shape[-1] * jnp.max(jnp.abs(lam))
    inv = jnp.where(lam > cut, 1.0 / jnp.where(lam > cut, lam, 1.0), 0.0)
    return (V * inv[None, :]) @ V.T


class SitePrior(NamedTuple):
    """A parameter site's prior as the MAP M-step uses it (:func:`site_prior`).

    ``kind``: ``"normal"`` (independent entries: ``a`` the means, ``b`` the precisions,
    both of the site's shape), ``"inverse_wishart"`` (``a`` the degrees of freedom
    ``nu``, ``b`` the scale matrix ``Psi``; density ``|S|^{-(nu+d+1)/2}
    exp(-tr(Psi S^{-1})/2)``), ``"inverse_gamma"`` (variances: ``a`` the shapes
    ``alpha``, ``b`` the rates ``beta``; density ``v^{-alpha-1} exp(-beta/v)``) or
    ``"flat"`` (no prior term)."""

    kind: str
    a: object = None
    b: object = None


def _unwrap(d):
    while isinstance(d, (dist.Independent, dist.ExpandedDistribution)):
        d = d.base_dist
    return d


def site_prior(name: str, fn, shape) -> SitePrior:
    """The conjugate form of site ``name``'s prior ``fn`` (a value of shape ``shape``):
    Normal entries on a weight, bias or mean; inverse-Wishart on a full covariance;
    inverse-gamma on variances; improper flat. Any other prior raises
    :class:`~ppl_dyn.requirements.UnsupportedModelError` naming the site and what fits."""
    d = _unwrap(fn)
    if isinstance(d, dist.Normal):
        return SitePrior(
            "normal", jnp.broadcast_to(d.loc, shape), jnp.broadcast_to(d.scale**-2.0, shape)
        )
    if isinstance(d, dist.InverseWishart) and len(shape) == 2:
        return SitePrior("inverse_wishart", d.concentration, d.scale_matrix)
    if isinstance(d, dist.InverseGamma):
        return SitePrior(
            "inverse_gamma",
            jnp.broadcast_to(d.concentration, shape),
            jnp.broadcast_to(d.rate, shape),
        )
    if isinstance(d, (dist.ImproperUniform, dist.Unit)):
        return SitePrior("flat")
    raise UnsupportedModelError(
        f"LinearGaussianMStep(map_estimate=True) needs conjugate priors (Normal weights, "
        f"biases and means; InverseWishart covariances; InverseGamma variances); site "
        f"{name!r} has a {type(d).__name__} prior. Write it in a conjugate form, use "
        "maximum likelihood (map_estimate=False), or fit the MAP by SGD(map_estimate=True)"
    )


def model_priors(model, params: dict, model_kwargs: dict) -> dict:
    """``{site: SitePrior}`` of every free parameter site, read from the model's own
    prior distributions at ``params`` (works under ``jax.jit``)."""
    info = inspect_model(model, values=params, **model_kwargs)
    return {
        n: site_prior(n, site["fn"], jnp.shape(params[n]))
        for n, site in info.free.items()
        if n in params
    }


def log_prior(model, params: dict, model_kwargs: dict):
    """``log p(theta)``: the model's prior log-density of the free sites at ``params``
    (in the sites' own parametrisation, no Jacobian: the MAP objective's prior term)."""
    info = inspect_model(model, values=params, **model_kwargs)
    return sum(jnp.sum(site["fn"].log_prob(params[n])) for n, site in info.free.items())


def _as_cov(value, diagonal: bool):
    return jnp.diag(value) if diagonal else value


def _map_covariance(E, n, prior: SitePrior, diagonal: bool):
    """The mode of ``-(n/2) log|S| - tr(S^{-1} E)/2 + log p(S)``: ``E / n`` with a flat
    prior (maximum likelihood); diagonal variances from ``diag(E)``."""
    if diagonal:
        e = jnp.diagonal(E)
        if prior.kind == "inverse_gamma":
            return (e + 2.0 * prior.b) / (n + 2.0 * prior.a + 2.0)
        return e / n
    if prior.kind == "inverse_wishart":
        d = E.shape[-1]
        return (E + prior.b) / (n + prior.a + d + 1.0)
    return E / n


def _index(idx: np.ndarray):
    """A static index array as a slice when it is a contiguous range."""
    if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        return slice(int(idx[0]), int(idx[0]) + idx.size)
    return idx


def _sub(M, rows: np.ndarray, cols: np.ndarray):
    """``M[rows][:, cols]`` for static index arrays (slices where contiguous)."""
    r, c = _index(rows), _index(cols)
    if isinstance(r, slice) and isinstance(c, slice):
        return M[r, c]
    return M[np.ix_(rows, cols)]


def regression_blocks(reg: Regression, k: int, du: int):
    """Column slices of the regressor ``[phi (k); u (du); 1]`` and their site names."""
    blocks = [(reg.weight, slice(0, k))]
    if reg.input_weight is not None:
        blocks.append((reg.input_weight, slice(k, k + du)))
    if reg.bias is not None:
        blocks.append((reg.bias, slice(k + du, k + du + 1)))
    return blocks


def solve_regression(
    stats: RegressionStats,
    reg: Regression,
    params: dict,
    free: frozenset,
    k: int,
    du: int,
    rel_floor: float,
    ridge: float = 0.0,
    priors: dict | None = None,
    max_radius: float | None = None,
    dx: int | None = None,
):
    """Maximise the expected log-likelihood of one regression; returns (updates, floors).

    With ``priors`` (``{site: SitePrior}``) it maximises the expected log-likelihood plus
    the log prior instead, one conditional maximisation after the other (ECM: the
    weights given the current noise covariance, then the noise given the new weights),
    each in closed form, so EM increases the log posterior at every iteration.

    ``max_radius`` bounds the spectral radius of the weight's linear columns (all of them
    for linear features, the last ``dx`` for RBF features ``[rho(x); x]``: the
    :class:`~ppl_dyn.Features` value's ``state_columns``): a larger block is scaled back
    onto the bound before the noise is estimated.

    ``ridge > 0`` adds ``ridge * I`` to ``S_rr`` on the columns of the nonlinear
    features (RBF weights ``h``; all weight columns for tanh features), the MAP estimate
    under a zero-mean Gaussian prior on those weights (``docs/math.md`` section 1).
    ``dx``: the state dimension (None: ``dz``, right for the dynamics).
    """
    blocks = regression_blocks(reg, k, du)
    cols = np.concatenate([np.arange(s.start, s.stop) for _, s in blocks])
    S_zr = stats.S_zr[:, _index(cols)]
    S_rr = _sub(stats.S_rr, cols, cols)
    dz = S_zr.shape[0]

    def as_matrix(name, value):
        if name == reg.bias:
            return jnp.reshape(value, (dz, 1))
        return value

    # positions of blocks within the active columns
    pos, start = [], 0
    for name, s in blocks:
        width = s.stop - s.start
        pos.append((name, start, start + width))
        start += width
    # static index sets (NumPy; slices where contiguous: no gathers or scatters to
    # trace and compile)
    free_idx = [np.arange(a, b) for n, a, b in pos if n in free]
    fixed_idx = [np.arange(a, b) for n, a, b in pos if n not in free]
    W = jnp.zeros((dz, start), S_zr.dtype)
    for n, a, b in pos:
        if n not in free:
            W = W.at[:, a:b].set(as_matrix(n, params[n]).astype(S_zr.dtype))
    out = {}
    if free_idx:
        f = np.concatenate(free_idx)
        rhs = S_zr[:, _index(f)]
        if fixed_idx:
            x = np.concatenate(fixed_idx)
            rhs = rhs - W[:, _index(x)] @ _sub(S_rr, x, f)
        S_ff = _sub(S_rr, f, f)
        fmap = reg.feature_map
        n_state = (dz if dx is None else dx) if fmap.state_columns == "last" else 0
        if ridge and not fmap.is_identity and reg.weight in free:
            n_ridge = k - n_state  # the nonlinear columns, in front of [g(x); x]
            a = dict((n, a) for n, a, _ in pos)[reg.weight]
            on = (f >= a) & (f < a + n_ridge)
            S_ff = S_ff + ridge * jnp.diag(jnp.asarray(on, S_ff.dtype))
        weight_priors = [
            priors[n] if priors is not None and n in priors else SitePrior("flat")
            for n, _, _ in pos
            if n in free
        ]
        if any(p.kind == "normal" for p in weight_priors):
            W_f = _map_weights(rhs, S_ff, pos, free, weight_priors, as_matrix, params, reg, dz)
        else:
            W_f = rhs @ _pinv_psd(S_ff)
        W = W_f if not fixed_idx else W.at[:, _index(f)].set(W_f)  # f: every column
        if max_radius is not None and reg.weight in free and fmap.state_columns is not None:
            a, b = next((a, b) for n, a, b in pos if n == reg.weight)
            lin = slice(a, b) if fmap.is_identity else slice(b - n_state, b)
            W = W.at[:, lin].set(limit_spectral_radius(W[:, lin], max_radius))
        for n, a, b in pos:
            if n in free:
                blk = W[:, a:b]
                out[n] = blk[:, 0] if n == reg.bias else blk
    floors = {}
    if reg.noise in free:
        n = jnp.maximum(stats.n, 1.0)
        WS = W @ S_zr.T
        E = stats.S_zz - WS - WS.T + W @ S_rr @ W.T
        prior = (priors or {}).get(reg.noise, SitePrior("flat"))
        Sigma = _map_covariance(E, n, prior, reg.diagonal_noise)
        if reg.diagonal_noise:
            out[reg.noise], floors[reg.noise] = floor_variances(Sigma, rel_floor)
        else:
            out[reg.noise], floors[reg.noise] = floor_covariance(Sigma, rel_floor)
    # no terms (e.g. T = 1 gives no transitions): keep the old values
    has_data = stats.n > 0
    out = {n: jnp.where(has_data, v, params[n]) for n, v in out.items()}
    return out, floors


def spectral_radius_bound(A, squarings: int = 10):
    """An upper bound of the spectral radius of ``A``: ``||A^k||_F^(1/k) >= rho(A)`` for
    every ``k`` (Gelfand), here ``k = 2^squarings`` by repeated squaring with the scale
    kept in logs (no overflow), and tight as ``k`` grows (within ``cond(V)^(1/k)`` of
    ``rho``, ``V`` the eigenvectors). Matrix products only: no eigensolver (JAX has no
    non-symmetric one on GPU)."""
    tiny = jnp.finfo(A.dtype).tiny
    B, log_c = A, jnp.zeros((), A.dtype)
    for _ in range(squarings):
        n = jnp.maximum(jnp.linalg.norm(B), tiny)
        B, log_c = (B / n) @ (B / n), 2.0 * (log_c + jnp.log(n))
    return jnp.exp((log_c + jnp.log(jnp.maximum(jnp.linalg.norm(B), tiny))) / 2**squarings)


def limit_spectral_radius(A, max_radius: float):
    """``A`` scaled so that its spectral radius is at most ``max_radius`` (by the bound
    :func:`spectral_radius_bound`); unchanged when it is already."""
    return A * jnp.minimum(1.0, max_radius / spectral_radius_bound(A))


def _map_weights(rhs, S_ff, pos, free, weight_priors, as_matrix, params, reg, dz):
    """The free weight columns maximising ``tr(Sigma^{-1} (W rhs^T - W S W^T / 2))``
    minus ``sum lambda (W - M)^2 / 2`` (independent Normal priors) at the current noise
    covariance ``Sigma``: ``vec W = (S kron Sigma^{-1} + diag lambda)^{-1}
    vec(Sigma^{-1} rhs + lambda M)`` (column-major ``vec``)."""
    means, precisions = [], []
    for (n, a, b), p in zip([q for q in pos if q[0] in free], weight_priors, strict=True):
        shape = (dz, b - a)
        if p.kind == "normal":
            means.append(jnp.reshape(as_matrix(n, p.a), shape))
            precisions.append(jnp.reshape(as_matrix(n, p.b), shape))
        else:
            means.append(jnp.zeros(shape, rhs.dtype))
            precisions.append(jnp.zeros(shape, rhs.dtype))
    M = jnp.concatenate(means, 1).astype(rhs.dtype)
    L = jnp.concatenate(precisions, 1).astype(rhs.dtype)
    Sigma = _as_cov(params[reg.noise], reg.diagonal_noise).astype(rhs.dtype)
    Sinv = jnp.linalg.inv(la.sym(Sigma))
    K = jnp.kron(S_ff, Sinv) + jnp.diag(L.T.reshape(-1))
    v = (Sinv @ rhs + L * M).T.reshape(-1)
    w = jnp.linalg.solve(la.sym(K), v)
    return w.reshape(rhs.shape[1], dz).T


def solve_init(stats: InitStats, st: LinearStructure, params, free, rel_floor, priors=None):
    """Maximise the initial-state term (plus the log prior of ``m0`` and ``P0`` given
    ``priors``: ``m0`` at the current ``P0``, then ``P0``)."""
    out, floors = {}, {}
    n = jnp.maximum(stats.n, 1.0)
    priors = priors or {}
    m_prior = priors.get(st.init_mean, SitePrior("flat"))
    if st.init_mean not in free:
        mu = params[st.init_mean]
    elif m_prior.kind == "normal":
        P0 = _as_cov(params[st.init_cov], st.diagonal_init)
        Pinv = jnp.linalg.inv(la.sym(P0))
        lam = m_prior.b.astype(P0.dtype)
        mu = jnp.linalg.solve(stats.n * Pinv + jnp.diag(lam), Pinv @ stats.sum_m + lam * m_prior.a)
    else:
        mu = stats.sum_m / n
    if st.init_mean in free:
        out[st.init_mean] = mu
    if st.init_cov in free:
        # sum over sequences of E[(x1 - mu)(x1 - mu)^T] (mu may be frozen)
        E = (
            stats.sum_mm
            - jnp.outer(stats.sum_m, mu)
            - jnp.outer(mu, stats.sum_m)
            + stats.n * jnp.outer(mu, mu)
        )
        prior = priors.get(st.init_cov, SitePrior("flat"))
        P = _map_covariance(E, n, prior, st.diagonal_init)
        if st.diagonal_init:
            out[st.init_cov], floors[st.init_cov] = floor_variances(P, rel_floor)
        else:
            out[st.init_cov], floors[st.init_cov] = floor_covariance(P, rel_floor)
    return out, floors


def structure_sites(st: LinearStructure) -> set:
    names = {st.init_mean, st.init_cov}
    for reg in (st.dynamics, st.emission):
        names |= {reg.weight, reg.noise}
        names |= {n for n in (reg.input_weight, reg.bias) if n is not None}
    return names


class LinearGaussianMStep(NamedTuple):
    """Closed-form M-step for models declaring a :class:`LinearStructure`.

    Args:
        covariance_floor: relative eigenvalue floor for covariance outputs.
        ridge: ridge penalty on the weights of nonlinear features (RBF weights ``h``,
            tanh weights); 0 gives maximum likelihood. It is added to the summed
            statistic ``S_phiphi`` (a prior precision), so it does not grow with ``T``.
        map_estimate: maximise the log posterior ``log p(y | theta) + log p(theta)``
            with the model's own priors instead of the likelihood (MAP-EM): Normal
            priors on weights, biases and ``m0`` shrink them, inverse-Wishart and
            inverse-gamma priors keep covariances and variances away from zero (a
            short series cannot drive ``R`` or ``P0`` to 0). Each update is closed form
            (conditional maximisation: weights given the current noise, then the
            noise); ``EMResult.objective`` is the log posterior, non-decreasing with an
            exact E-step. A prior of another family is refused by name.
        data_pattern: the missing-data pattern of the data (``ppl_dyn.infer._pattern``),
            set by the drivers through :meth:`with_data_pattern`; leave it None. A
            posterior whose ``linear_statistics`` takes ``data_pattern=`` is given it.
        max_spectral_radius: a bound on the spectral radius of the linear part of the
            dynamics (``A`` of an LDS; the weights of ``x`` in RBF dynamics
            ``A [rho(x); x]``); None: unconstrained. An update beyond it is scaled back
            onto it (then the noise is estimated), so the noise-free dynamics decay
            outside the RBF centres and forecasts stay bounded. The update is then not
            the exact maximiser: the objective may dip where the bound binds
            (``docs/eks.md``). tanh features are bounded already and are not constrained.
    """

    covariance_floor: float = 1e-6
    ridge: float = 0.0
    map_estimate: bool = False
    max_spectral_radius: Optional[float] = None
    data_pattern: Optional[str] = None

    def with_data_pattern(self, pattern: Optional[str]) -> "LinearGaussianMStep":
        """This M-step told the missing-data pattern of the data it will see."""
        return self._replace(data_pattern=pattern)

    def check(self, structure, free_names, method: str = "EM") -> None:
        """Raise if the model has free sites this M-step cannot estimate. ``method``
        names the caller, whose alternatives the message lists."""
        other = (
            "EM(model, e_step, GradientMStep()) with a KalmanSmoother, "
            "ExtendedKalmanSmoother or ParticleSmoother(mode='ffbsi') E-step"
        )
        if method != "EM":
            other = f"{method} needs it; for this model use {other}"
        else:
            other = f"use {other}"
        if structure is None:
            raise ValueError(
                "LinearGaussianMStep needs a model declaring a LinearStructure (which "
                f"site is which weight, bias and noise); this model declares none: {other}"
            )
        unknown = set(free_names) - structure_sites(structure)
        if unknown:
            raise ValueError(
                f"the closed-form M-step cannot estimate the sites {sorted(unknown)}; "
                f"condition them (numpyro.handlers.condition), or {other.removeprefix('use ')}"
            )

    def verify_model(self, info) -> None:
        """Check the declared :class:`~ppl_dyn.LinearStructure` against the model's own
        distributions (:func:`verify_structure`), and with ``map_estimate`` that every
        free site's prior is conjugate (:func:`site_prior`); ``info`` from
        :func:`ppl_dyn.state_space.inspect_model` at the starting values."""
        verify_structure(info)
        if self.map_estimate:
            for n, site in info.free.items():
                site_prior(n, site["fn"], jnp.shape(site["value"]))

    def log_prior(self, params, model, model_kwargs):
        """The term the M-step adds to the objective: ``log p(theta)`` with
        ``map_estimate``, else 0."""
        if not self.map_estimate:
            return jnp.zeros(())
        return log_prior(model, params, model_kwargs)

    def statistics(self, posterior, ss, y, u, time_mask=None) -> LinearStats:
        """Expected sufficient statistics, computed by the posterior itself.

        Every E-step's posterior computes the expectations this M-step needs its own way
        (Gaussian moments, FFBSm weights, drawn paths, PaRIS's running sums) in a method
        ``linear_statistics(ss, y, u, time_mask=None) -> LinearStats``; this M-step
        imports no E-step. ``time_mask`` ``(S, T)``: False past each sequence's end
        (ragged lengths); those steps contribute nothing."""
        get = getattr(posterior, "linear_statistics", None)
        if not callable(get):
            raise TypeError(
                f"LinearGaussianMStep cannot use a {type(posterior).__name__}: a posterior "
                "feeds it through a linear_statistics(ss, y, u, time_mask=None) method "
                "returning LinearStats (GaussianPosterior, ParticlePosterior and "
                "PARISPosterior have one; docs/plugins.md)"
            )
        if self.data_pattern is not None and accepts_keyword(get, "data_pattern"):
            return get(ss, y, u, time_mask, data_pattern=self.data_pattern)
        return get(ss, y, u, time_mask)

    def update(self, stats: LinearStats, ss, free, *, model=None, model_kwargs=None, **unused):
        """New values of the free sites, and per-site floor indicators. With
        ``map_estimate`` the priors are read from ``model`` run with ``model_kwargs``."""
        structure, params = ss.structure, ss.params
        free = frozenset(free)
        priors = None
        if self.map_estimate:
            if model is None:
                raise ValueError(
                    "LinearGaussianMStep(map_estimate=True) reads the priors from the model: "
                    "pass model= and model_kwargs= to update (EM and PSAEM do)"
                )
            values = {n: params[n] for n in free if n in params}
            priors = model_priors(model, values, model_kwargs or {})
        k_dyn = stats.dynamics.S_rr.shape[-1]
        k_emi = stats.emission.S_rr.shape[-1]
        du = _input_dim(structure, params)
        new, floors = {}, {}
        for reg, s, p in (
            (structure.dynamics, stats.dynamics, k_dyn),
            (structure.emission, stats.emission, k_emi),
        ):
            k = p - du - 1
            bound = self.max_spectral_radius if reg is structure.dynamics else None
            o, f = solve_regression(
                s, reg, params, free, k, du, self.covariance_floor, self.ridge, priors, bound,
                dx=ss.state_dim,
            )  # fmt: skip
            new.update(o)
            floors.update(f)
        o, f = solve_init(stats.init, structure, params, free, self.covariance_floor, priors)
        new.update(o)
        floors.update(f)
        new = {n: v.astype(jnp.result_type(params[n])) for n, v in new.items()}
        return new, floors


def _input_dim(st: LinearStructure, params) -> int:
    if st.dynamics.input_weight is not None:
        return int(jnp.shape(params[st.dynamics.input_weight])[-1])
    if st.emission.input_weight is not None:
        return int(jnp.shape(params[st.emission.input_weight])[-1])
    return 0


class GaussianPaths(NamedTuple):
    """A Gaussian smoothed posterior (a Gauss-Markov chain: means, covariances and
    lag-one cross-covariances, leading ``S``) that :class:`GradientMStep` draws its
    paths from inside the M-step, with the M-step's key."""

    means: jax.Array
    covs: jax.Array
    cross_covs: jax.Array


class GradientMStep(NamedTuple):
    """A few Adam steps on the Monte Carlo Q-function, for models with no closed form.

    ``Q(theta) = mean_m log p(x^m, y | theta)`` over paths ``x^m`` drawn from the
    E-step's posterior, evaluated through the bridge (the model's own NumPyro
    distributions) in the unconstrained space NumPyro defines for each site
    (``biject_to(site.support)``). Conditioned sites stay fixed. Priors are not used
    (maximum likelihood, like the closed-form M-step).

    The paths come from any E-step that can draw them: backward-simulated trajectories
    (``ParticleSmoother(mode="ffbsi")`` and the linear-cost modes), or ``num_paths``
    joint draws from a Gaussian smoothed posterior (``KalmanSmoother``: exact FFBS;
    ``ExtendedKalmanSmoother``: its Gauss-Markov approximation).

    Args:
        num_steps: Adam steps per EM iteration.
        learning_rate: Adam step size (the objective is scaled per time step).
        num_paths: paths drawn per sequence from a Gaussian posterior.
    """

    num_steps: int = 25
    learning_rate: float = 0.02
    num_paths: int = 16

    def check(self, structure, free_names, method: str = "EM") -> None:
        del structure, free_names, method  # any model written by the convention

    def statistics(self, posterior, ss, y, u, time_mask=None):
        del ss
        trajectories = getattr(posterior, "trajectories", None)
        if trajectories is not None:
            source = trajectories  # (S, M, T, dx)
        elif all(hasattr(posterior, f) for f in ("means", "covs", "cross_covs")):
            source = GaussianPaths(posterior.means, posterior.covs, posterior.cross_covs)
        else:
            raise ValueError(
                f"GradientMStep needs paths of the states, which a {type(posterior).__name__} "
                "cannot give: use ParticleSmoother(mode='ffbsi', num_trajectories=M) (or "
                "'ffbsi-mcmc'), KalmanSmoother() or ExtendedKalmanSmoother()"
            )
        if time_mask is None:  # (S, T, dy), (S, T, du)
            return (source, y, u)
        return (source, y, u, time_mask)  # ragged lengths: (S, T) mask

    def update(self, stats, ss, free, *, rng_key=None, model=None, model_kwargs=None):
        import optax
        from numpyro.distributions.transforms import biject_to

        from ppl_dyn.state_space import bind, inspect_model

        if model is None:
            raise ValueError("GradientMStep needs the model (EM passes it)")
        source, y, u, *mask = stats
        time_mask = mask[0] if mask else None
        if isinstance(source, GaussianPaths):
            if rng_key is None:
                raise ValueError("GradientMStep needs an rng_key to draw paths (EM passes one)")
            draws = sample_smoothed_paths(rng_key, source, int(self.num_paths))
            traj = jnp.swapaxes(draws, 0, 1)  # (S, M, T, dx)
        else:
            traj = source
        info = inspect_model(model, **model_kwargs)
        bijections = {k: biject_to(info.free[k]["fn"].support) for k in free}
        params = ss.params
        z0 = {k: bijections[k].inv(params[k]) for k in free}
        scale = 1.0 / (traj.shape[0] * traj.shape[1] * traj.shape[2])

        def neg_q(z):
            theta = {k: bijections[k](v) for k, v in z.items()}
            ss_t, _ = bind(model, theta, **model_kwargs)
            return -scale * complete_data_log_lik(ss_t, traj, y, u, time_mask)

        opt = optax.adam(self.learning_rate)

        def body(carry, _):
            z, st = carry
            g = jax.grad(neg_q)(z)
            upd, st = opt.update(g, st, z)
            return (optax.apply_updates(z, upd), st), None

        (z, _), _ = jax.lax.scan(body, (z0, opt.init(z0)), None, length=self.num_steps)
        return {k: bijections[k](v) for k, v in z.items()}, {}


def complete_data_log_lik(ss, traj, y, u, time_mask=None):
    """``sum_{s,m} log p(x^{s,m}, y^s)`` for trajectories ``(S, M, T, dx)``; with a
    ``time_mask`` ``(S, T)`` (ragged lengths) only the steps inside each sequence."""
    if time_mask is None:
        time_mask = jnp.ones(y.shape[:2], bool)

    def one_seq(X, y_s, u_s, valid):  # X: (M, T, dx)
        mask = ~jnp.isnan(y_s)
        lp0 = jnp.where(valid[0], jnp.sum(ss.init.log_prob(X[:, 0])), 0.0)
        trans = jax.vmap(lambda xp, xn, ut: ss.transition(xp, ut).log_prob(xn), (1, 1, 0))(
            X[:, :-1], X[:, 1:], u_s[1:]
        )
        emis = jax.vmap(lambda x, ut, yt, mt: emission_log_lik(ss, x, ut, yt, mt), (1, 0, 0, 0))(
            X, u_s, y_s, mask
        )
        trans = jnp.where(valid[1:, None], trans, 0.0)
        emis = jnp.where(valid[:, None], emis, 0.0)
        return lp0 + jnp.sum(trans) + jnp.sum(emis)

    return jnp.sum(jax.vmap(one_seq)(traj, y, u, time_mask))
