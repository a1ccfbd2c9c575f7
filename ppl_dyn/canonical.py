r"""Single-input single-output linear systems in controllable canonical form.

The setting of Hardt, Ma & Recht, *Gradient descent learns linear dynamical systems*
(seed 002). The system, started at rest (:math:`x_0 = 0`), is

.. math::

    x_{t+1} = A x_t + B u_t, \qquad y_t = C x_t + D u_t + \xi_t,
    \qquad \xi_t \sim \mathcal N(0, \sigma^2),

with :math:`A` the companion matrix of :math:`a = (a_1, \dots, a_n)` (ones on the
superdiagonal, last row :math:`(-a_n, \dots, -a_1)`), :math:`B = e_n`, :math:`C = c`
and :math:`D = d`, so that

.. math::

    \det(zI - A) = p_a(z) = z^n + a_1 z^{n-1} + \dots + a_n, \qquad
    G(z) = D + C (zI - A)^{-1} B = d + \frac{c_1 + c_2 z + \dots + c_n z^{n-1}}{p_a(z)}.

The **Pac-Man condition** asks that :math:`q_a(z) = p_a(z) / z^n = 1 + a_1 z^{-1} + \dots
+ a_n z^{-n}` lies in the 90-degree wedge :math:`\{w : \operatorname{Re} w > |\operatorname{Im}
w|\}` for every :math:`|z| = 1`. Since :math:`q_a(z)` is affine in :math:`a` and the wedge is a
convex cone, the admissible coefficient vectors form a convex set; the condition implies
that :math:`q_a` never leaves the right half-plane on the circle, so its winding number is
zero and, by the argument principle (the seed's Rouché argument), all :math:`n` roots of
:math:`p_a` lie in the open unit disk.

On a grid :math:`\theta_k = 2\pi k / M` the condition with margin :math:`\tau` and slope
:math:`s` (:math:`\operatorname{Re} q \ge s |\operatorname{Im} q| + \tau`) is the polytope
:math:`\{a : G a \ge h\}` with :math:`G_{kj} = \cos j\theta_k - s \sin j\theta_k` and
:math:`h_k = \tau - 1`: the two half-planes :math:`\operatorname{Re} q \pm s \operatorname{Im}
q \ge \tau` at :math:`\theta` are the same family evaluated at :math:`\pm\theta`, and a grid
symmetric about zero holds both. :func:`project_pacman` is the Euclidean projection onto it
(a small quadratic programme, solved by a primal-dual interior-point method).

Everything here is pure JAX; enable float64 (``jax.config.update("jax_enable_x64", True)``)
for the tight tolerances used in the tests.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array

__all__ = [
    "CanonicalParams",
    "PacManCheck",
    "CanonicalFit",
    "canonical_matrices",
    "markov_parameters",
    "impulse_response",
    "transfer_function",
    "simulate_outputs",
    "sample_data",
    "pacman_values",
    "check_pacman",
    "pacman_margin_bound",
    "pacman_polytope",
    "project_polytope",
    "project_pacman",
    "empirical_risk",
    "population_risk",
    "projected_gradient_descent",
    "fit_canonical",
    "fit_canonical_population",
]


class CanonicalParams(NamedTuple):
    """Parameters of a SISO system in controllable canonical form.

    Attributes:
        a: ``(n,)`` coefficients of :math:`p_a(z) = z^n + a_1 z^{n-1} + \\dots + a_n`.
        c: ``(n,)`` output row :math:`C`.
        d: ``()`` feed-through :math:`D`.
    """

    a: Array
    c: Array
    d: Array


class PacManCheck(NamedTuple):
    """Result of :func:`check_pacman`: ``satisfied`` (bool) and the grid ``margin``."""

    satisfied: Array
    margin: Array


class CanonicalFit(NamedTuple):
    """Result of projected gradient descent: the learned ``params`` and ``losses``.

    ``losses[i]`` is the loss at the i-th iterate (``losses[0]`` at the initial point,
    ``losses[-1]`` at the returned ``params``), so it has ``num_iters + 1`` entries.
    """

    params: CanonicalParams
    losses: Array


# --------------------------------------------------------------------------- validation


def _check_vector(x, name: str) -> Array:
    x = jnp.asarray(x)
    if x.ndim != 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array (n,); got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _check_params(params: CanonicalParams, name: Optional[str] = "params") -> CanonicalParams:
    def field(f: str) -> str:
        return f if name is None else f"{name}.{f}"

    if not isinstance(params, CanonicalParams):
        if isinstance(params, tuple) and len(params) == 3:
            params = CanonicalParams(*params)
        else:
            raise ValueError(f"{name} must be CanonicalParams(a, c, d); got {type(params)}")
    a = _check_vector(params.a, field("a"))
    c = _check_vector(params.c, field("c"))
    if c.shape != a.shape:
        raise ValueError(
            f"{field('c')} must have the shape of {field('a')} {a.shape}; got {c.shape}"
        )
    d = jnp.asarray(params.d, dtype=a.dtype)
    if d.shape != ():
        raise ValueError(f"{field('d')} must be a scalar; got shape {d.shape}")
    return CanonicalParams(a, c, d)


def _check_sequences(u, name: str) -> Array:
    u = jnp.asarray(u)
    if u.ndim not in (1, 2) or u.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (T,) or (N, T) with T >= 1; got shape {u.shape}")
    if not jnp.issubdtype(u.dtype, jnp.floating):
        u = u.astype(jnp.result_type(float))
    return u


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


# ----------------------------------------------------------------------- the system


def canonical_matrices(a, c, d) -> tuple[Array, Array, Array, Array]:
    """State-space matrices of the controllable canonical form.

    Args:
        a: ``(n,)`` characteristic-polynomial coefficients, :math:`\\det(zI - A) = z^n +
            a_1 z^{n-1} + \\dots + a_n`.
        c: ``(n,)`` output row.
        d: scalar feed-through.

    Returns:
        ``(A, B, C, D)`` of shapes ``(n, n)``, ``(n, 1)``, ``(1, n)``, ``(1, 1)``.

    Example:
        >>> A, B, C, D = canonical_matrices(jnp.array([0.5, -0.25]), jnp.ones(2), 0.0)
        >>> A.tolist()
        [[0.0, 1.0], [0.25, -0.5]]
    """
    p = _check_params(CanonicalParams(a, c, d), None)
    n = p.a.shape[0]
    A = jnp.eye(n, k=1, dtype=p.a.dtype).at[-1].set(-p.a[::-1])
    B = jnp.zeros((n, 1), p.a.dtype).at[-1, 0].set(1.0)
    return A, B, p.c[None, :], p.d.reshape(1, 1)


def markov_parameters(a, c, num_lags: int) -> Array:
    """Markov parameters :math:`g_k = C A^k B`, :math:`k = 0, \\dots,` ``num_lags - 1``.

    A ``lax.scan`` of the companion recursion :math:`v_{k+1} = A v_k`, :math:`v_0 = B`.
    """
    num_lags = _check_positive_int(num_lags, "num_lags")
    A, B, C, _ = canonical_matrices(a, c, 0.0)

    def step(v, _):
        return A @ v, C[0] @ v

    return jax.lax.scan(step, B[:, 0], None, length=num_lags)[1]


def impulse_response(params: CanonicalParams, num_lags: int) -> Array:
    """Response to a unit impulse at time 0 from rest: ``(D, CB, CAB, ..., CA^{K-2}B)``.

    Args:
        params: the system.
        num_lags: number of returned lags ``K`` (``h[0] = D``, ``h[k] = C A^{k-1} B``).
    """
    p = _check_params(params)
    num_lags = _check_positive_int(num_lags, "num_lags")
    if num_lags == 1:
        return p.d[None]
    return jnp.concatenate([p.d[None], markov_parameters(p.a, p.c, num_lags - 1)])


def transfer_function(params: CanonicalParams, z) -> Array:
    """:math:`G(z) = d + (c_1 + c_2 z + \\dots + c_n z^{n-1}) / p_a(z)` at complex ``z``."""
    p = _check_params(params)
    z = jnp.asarray(z)
    num = jnp.polyval(p.c[::-1], z)
    den = jnp.polyval(jnp.concatenate([jnp.ones(1, p.a.dtype), p.a]), z)
    return p.d + num / den


def simulate_outputs(params: CanonicalParams, u) -> Array:
    """Noise-free outputs ``y_t = C x_t + D u_t`` from ``x_0 = 0`` (a ``lax.scan``).

    Args:
        params: the system.
        u: inputs of shape ``(T,)`` or ``(N, T)``.

    Returns:
        outputs of the shape of ``u``.
    """
    p = _check_params(params)
    u = _check_sequences(u, "u")
    A, B, C, D = canonical_matrices(*p)
    batch = u if u.ndim == 2 else u[None]

    def step(x, u_t):  # x: (N, n), u_t: (N,)
        y_t = x @ C[0] + D[0, 0] * u_t
        return x @ A.T + u_t[:, None] * B[:, 0], y_t

    x0 = jnp.zeros((batch.shape[0], A.shape[0]), A.dtype)
    _, ys = jax.lax.scan(step, x0, batch.T)
    ys = ys.T
    return ys if u.ndim == 2 else ys[0]


def _predict_fft(p: CanonicalParams, u: Array) -> Array:
    """Same outputs as :func:`simulate_outputs`, by an FFT convolution (used in losses)."""
    T = u.shape[-1]
    if T == 1:
        return p.d * u
    g = markov_parameters(p.a, p.c, T - 1)  # lags 1..T-1 of the impulse response
    L = 1 << (2 * T - 1).bit_length()
    conv = jnp.fft.irfft(jnp.fft.rfft(g, L) * jnp.fft.rfft(u, L, axis=-1), L, axis=-1)
    lagged = jnp.concatenate([jnp.zeros(u.shape[:-1] + (1,), u.dtype), conv[..., : T - 1]], axis=-1)
    return p.d * u + lagged


def sample_data(
    rng_key: Array,
    params: CanonicalParams,
    *,
    num_sequences: int,
    num_steps: int,
    noise_std: float = 0.0,
) -> tuple[Array, Array]:
    """Draw i.i.d. standard normal inputs and noisy outputs (the seed's data model).

    Returns:
        ``(u, y)``, both of shape ``(num_sequences, num_steps)``.
    """
    if rng_key is None:
        raise ValueError("rng_key is required (e.g. jax.random.key(0)); there is no default")
    p = _check_params(params)
    N = _check_positive_int(num_sequences, "num_sequences")
    T = _check_positive_int(num_steps, "num_steps")
    k_u, k_e = jax.random.split(rng_key)
    u = jax.random.normal(k_u, (N, T), p.a.dtype)
    y = simulate_outputs(p, u) + noise_std * jax.random.normal(k_e, (N, T), p.a.dtype)
    return u, y


# ------------------------------------------------------------------ Pac-Man condition


def _default_check_points(n: int) -> int:
    return max(8192, 256 * n)


def pacman_values(a, num_points: Optional[int] = None) -> tuple[Array, Array]:
    """:math:`q_a(e^{i\\theta}) = 1 + \\sum_j a_j e^{-ij\\theta}` on a uniform grid.

    Returns:
        ``(theta, q)``: the ``num_points`` angles in ``[0, 2pi)`` and the complex values.
    """
    a = _check_vector(a, "a")
    M = _check_positive_int(num_points or _default_check_points(a.shape[0]), "num_points")
    theta = 2 * jnp.pi * jnp.arange(M, dtype=a.dtype) / M
    j = jnp.arange(1, a.shape[0] + 1, dtype=a.dtype)
    q = 1.0 + jnp.exp(-1j * theta[:, None] * j[None, :]) @ a.astype(jnp.result_type(a, 1j))
    return theta, q


def check_pacman(a, *, num_points: Optional[int] = None, slope: float = 1.0) -> PacManCheck:
    """Check the Pac-Man condition :math:`\\operatorname{Re} q_a(z) > s |\\operatorname{Im}
    q_a(z)|` on a fine grid of the unit circle.

    Args:
        a: ``(n,)`` characteristic-polynomial coefficients.
        num_points: grid size (default ``max(8192, 256 n)``).
        slope: ``s``; ``1`` is the seed's 90-degree wedge, ``1 + tau_0`` the paper's
            narrower one.

    Returns:
        :class:`PacManCheck` with ``margin = min_k (Re q - s |Im q|)`` over the grid and
        ``satisfied = margin > 0``. The grid minimum can over-estimate the true minimum by
        at most what :func:`pacman_margin_bound` subtracts.

    Example:
        >>> bool(check_pacman(jnp.zeros(3)).satisfied)
        True
    """
    _, q = pacman_values(a, num_points)
    margin = jnp.min(q.real - slope * jnp.abs(q.imag))
    return PacManCheck(margin > 0, margin)


def pacman_margin_bound(a, *, num_points: Optional[int] = None, slope: float = 1.0) -> Array:
    """A rigorous lower bound on the continuous margin :math:`\\min_\\theta (\\operatorname{Re}
    q - s|\\operatorname{Im} q|)`.

    The margin is the minimum of the trigonometric polynomial :math:`f(\\theta) = 1 +
    \\sum_j a_j (\\cos j\\theta - s \\sin j\\theta)` (the two sign choices are ``f`` at
    :math:`\\pm\\theta`). Bernstein's inequality gives :math:`|f'| \\le n \\|f - 1\\|_\\infty
    \\le n \\sqrt{1 + s^2} \\|a\\|_1`, and every angle is within :math:`\\pi / M` of a grid
    point, so ``grid margin - (pi / M) n sqrt(1 + s^2) ||a||_1`` bounds it from below.
    """
    a = _check_vector(a, "a")
    M = num_points or _default_check_points(a.shape[0])
    grid = check_pacman(a, num_points=M, slope=slope).margin
    n = a.shape[0]
    return grid - (math.pi / M) * n * math.sqrt(1.0 + slope**2) * jnp.sum(jnp.abs(a))


def _default_projection_points(n: int) -> int:
    return max(512, 64 * n)


def pacman_polytope(
    order: int, *, margin: float = 0.0, num_points: Optional[int] = None, slope: float = 1.0
) -> tuple[Array, Array]:
    """The grid version of the Pac-Man set with a margin as a polytope ``{a : G a >= h}``.

    Row ``k`` is :math:`\\operatorname{Re} q_a(e^{i\\theta_k}) + s \\operatorname{Im}
    q_a(e^{i\\theta_k}) \\ge \\tau`, i.e. :math:`G_{kj} = \\cos j\\theta_k - s \\sin
    j\\theta_k`, :math:`h_k = \\tau - 1`, over :math:`\\theta_k = 2\\pi k / M`. The grid
    holds :math:`-\\theta_k` too, where the same row is :math:`\\operatorname{Re} q - s
    \\operatorname{Im} q \\ge \\tau`, so both sides of the wedge are enforced.

    Returns:
        ``(G, h)`` of shapes ``(M, order)`` and ``(M,)`` (float64 when x64 is enabled).
    """
    n = _check_positive_int(order, "order")
    M = _check_positive_int(num_points or _default_projection_points(n), "num_points")
    if M <= 2 * n:
        raise ValueError(f"num_points must exceed 2 * order = {2 * n}; got {M}")
    G, h = _polytope_numpy(n, M, float(margin), float(slope))
    dtype = jnp.result_type(float)
    return jnp.asarray(G, dtype), jnp.asarray(h, dtype)


@functools.lru_cache(maxsize=64)
def _polytope_numpy(n: int, M: int, margin: float, slope: float):
    theta = 2 * np.pi * np.arange(M) / M
    j = np.arange(1, n + 1)
    G = np.cos(np.outer(theta, j)) - slope * np.sin(np.outer(theta, j))
    G.setflags(write=False)
    h = np.full(M, margin - 1.0)
    h.setflags(write=False)
    return G, h


def project_polytope(
    a0, G, h, *, max_iters: int = 100, tol: float = 1e-15, feasibility_tol: float = 1e-12
) -> Array:
    """Euclidean projection of ``a0`` onto ``{a : G a >= h}`` (assumed non-empty).

    Solves :math:`\\min_a \\tfrac12 \\|a - a_0\\|^2` s.t. :math:`G a - s = h`, :math:`s \\ge
    0` by Mehrotra's predictor-corrector interior-point method on the KKT system; each
    Newton step is one ``(n, n)`` solve with :math:`I + G^\\top \\operatorname{diag}(\\lambda
    / s) G`, and the iteration stops when the duality gap and residuals fall below ``tol``
    (relative) or a further step would lose positivity at machine precision. A point that
    already satisfies the constraints (up to ``feasibility_tol``, relative) is returned
    unchanged, so the projection is idempotent. Jittable.
    """
    a0 = _check_vector(a0, "a0")
    G = jnp.asarray(G, a0.dtype)
    h = jnp.asarray(h, a0.dtype)
    if G.ndim != 2 or G.shape[1] != a0.shape[0]:
        raise ValueError(f"G must have shape (M, {a0.shape[0]}); got {G.shape}")
    if h.shape != (G.shape[0],):
        raise ValueError(f"h must have shape ({G.shape[0]},); got {h.shape}")
    n, M = a0.shape[0], G.shape[0]
    scale = 1.0 + jnp.max(jnp.abs(h)) + jnp.max(jnp.abs(G @ a0))

    def newton(chol, s, lam, r_dual, r_primal, r_comp):
        w = lam / s
        rhs = -r_dual - G.T @ (w * r_primal) + G.T @ (r_comp / s)
        da = jax.scipy.linalg.cho_solve((chol, True), rhs)
        dlam = w * (-r_primal - G @ da) + r_comp / s
        ds = (r_comp - s * dlam) / lam
        return da, ds, dlam

    def max_step(x, dx):
        neg = dx < 0
        return jnp.minimum(1.0, jnp.min(jnp.where(neg, -x / jnp.where(neg, dx, -1.0), jnp.inf)))

    def cond(carry):
        i, a, s, lam = carry
        r_dual = (a - a0) - G.T @ lam
        r_primal = G @ a - s - h
        err = jnp.maximum(
            jnp.dot(s, lam), jnp.maximum(jnp.max(jnp.abs(r_primal)), jnp.max(jnp.abs(r_dual)))
        )
        return (i < max_iters) & (err > tol * scale)

    def body(carry):
        i, a, s, lam = carry
        r_dual = (a - a0) - G.T @ lam
        r_primal = G @ a - s - h
        mu = jnp.dot(s, lam) / M
        chol = jnp.linalg.cholesky(jnp.eye(n, dtype=a0.dtype) + (G.T * (lam / s)) @ G)
        # predictor (affine scaling), then Mehrotra's centred corrector
        da, ds, dl = newton(chol, s, lam, r_dual, r_primal, -s * lam)
        alpha = jnp.minimum(max_step(s, ds), max_step(lam, dl))
        sigma = (jnp.dot(s + alpha * ds, lam + alpha * dl) / M / mu) ** 3
        da, ds, dl = newton(chol, s, lam, r_dual, r_primal, -s * lam - ds * dl + sigma * mu)
        alpha = 0.99 * jnp.minimum(max_step(s, ds), max_step(lam, dl))
        a_new, s_new, lam_new = a + alpha * da, s + alpha * ds, lam + alpha * dl
        # a step that would break positivity or finiteness (only possible once converged to
        # machine precision) ends the iteration at the current point
        ok = (
            jnp.all(jnp.isfinite(a_new))
            & jnp.all(s_new > 0)
            & jnp.all(lam_new > 0)
            & jnp.all(jnp.isfinite(s_new))
            & jnp.all(jnp.isfinite(lam_new))
        )
        return (
            jnp.where(ok, i + 1, max_iters),
            jnp.where(ok, a_new, a),
            jnp.where(ok, s_new, s),
            jnp.where(ok, lam_new, lam),
        )

    def solve():
        s0 = jnp.maximum(G @ a0 - h, 1.0)
        lam0 = jnp.ones(M, a0.dtype)
        return jax.lax.while_loop(cond, body, (0, a0, s0, lam0))[1]

    inside = jnp.all(G @ a0 - h >= -feasibility_tol * (1.0 + jnp.max(jnp.abs(h))))
    return jax.lax.cond(inside, lambda: a0, solve)


def project_pacman(
    a,
    *,
    margin: float = 0.0,
    num_points: Optional[int] = None,
    slope: float = 1.0,
    max_iters: int = 100,
) -> Array:
    """Project ``a`` onto the grid Pac-Man polytope (:func:`pacman_polytope`).

    Args:
        a: ``(n,)`` coefficient vector.
        margin: :math:`\\tau` in :math:`\\operatorname{Re} q \\ge s|\\operatorname{Im} q| +
            \\tau`.
        num_points: grid size ``M`` (default ``max(512, 64 n)``).
        slope: ``s`` (``1`` is the seed's 90-degree wedge).
        max_iters: interior-point iterations (about 20 are typical).

    Returns:
        the closest point of the polytope to ``a`` (``a`` itself when it is inside).

    Example:
        >>> b = project_pacman(jnp.array([-1.5, 0.6]), margin=0.05)
        >>> bool(check_pacman(b).margin > 0.0)
        True
    """
    a = _check_vector(a, "a")
    G, h = pacman_polytope(a.shape[0], margin=margin, num_points=num_points, slope=slope)
    return _project_polytope_jit(a, G.astype(a.dtype), h.astype(a.dtype), max_iters=max_iters)


_project_polytope_jit = jax.jit(
    project_polytope, static_argnames=("max_iters", "tol", "feasibility_tol")
)


# --------------------------------------------------------------------------- risks


def _check_mask(mask, shape) -> Optional[Array]:
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask must have the shape of y {shape}; got {mask.shape}")
    return mask.astype(jnp.result_type(float))


def _weighted_mse(p: CanonicalParams, u: Array, y: Array, mask: Optional[Array]) -> Array:
    err = _predict_fft(p, u) - y
    if mask is None:
        return jnp.mean(err**2)
    err = jnp.where(mask > 0, err, 0.0)
    return jnp.sum(mask * err**2) / jnp.sum(mask)


def empirical_risk(params: CanonicalParams, u, y, *, mask=None) -> Array:
    """Mean squared prediction error of the model started at rest.

    Args:
        params: the model.
        u: inputs ``(T,)`` or ``(N, T)``.
        y: outputs, same shape as ``u``.
        mask: optional non-negative weights of the shape of ``y`` (``0`` drops an entry:
            a burn-in, missing outputs, or a shorter sequence, since the model is causal);
            the loss is the weighted mean.
    """
    p = _check_params(params)
    u = _check_sequences(u, "u")
    y = _check_sequences(y, "y")
    if y.shape != u.shape:
        raise ValueError(f"y must have the shape of u {u.shape}; got {y.shape}")
    return _weighted_mse(p, u, y, _check_mask(mask, y.shape))


def population_risk(
    params: CanonicalParams,
    true_params: CanonicalParams,
    num_steps: int,
    noise_std: float = 0.0,
) -> Array:
    r"""Expected :func:`empirical_risk` under i.i.d. standard normal inputs.

    With :math:`g_k = C A^k B` and :math:`\Delta g_k = \hat g_k - g_k`,

    .. math::
        \frac1T \sum_{t=0}^{T-1} \mathbb E (\hat y_t - y_t)^2 = \sigma^2 + (\hat d - d)^2
        + \sum_{k=0}^{T-2} \Bigl(1 - \frac{k+1}{T}\Bigr) \Delta g_k^2 ,

    which tends to the seed's idealised risk :math:`(\hat d - d)^2 + \sum_k \Delta g_k^2` as
    :math:`T \to \infty`. The two systems may have different orders.
    """
    p = _check_params(params)
    q = _check_params(true_params, "true_params")
    T = _check_positive_int(num_steps, "num_steps")
    if T == 1:
        return noise_std**2 + (p.d - q.d) ** 2
    g_true = markov_parameters(q.a, q.c, T - 1)
    return noise_std**2 + _population_loss(p, (g_true, _lag_weights(T, g_true.dtype), q.d))


def _lag_weights(T: int, dtype) -> Array:
    return 1.0 - jnp.arange(1, T, dtype=dtype) / T


def _population_loss(p: CanonicalParams, data) -> Array:
    g_true, w, d_true = data
    dg = markov_parameters(p.a, p.c, g_true.shape[0]) - g_true
    return (p.d - d_true) ** 2 + jnp.sum(w * dg**2)


def _empirical_loss(p: CanonicalParams, data) -> Array:
    u, y, mask = data
    return _weighted_mse(p, u, y, mask)


# ------------------------------------------------------------------ learning


def _pgd_loop(loss_fn, p0, data, project, optimizer, num_iters):
    value_and_grad = jax.value_and_grad(loss_fn)

    def step(carry, _):
        p, state = carry
        loss, grads = value_and_grad(p, data)
        updates, state = optimizer.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        p = p._replace(a=project(p.a))
        return (p, state), loss

    p0 = p0._replace(a=project(p0.a))
    (p, _), losses = jax.lax.scan(step, (p0, optimizer.init(p0)), None, length=num_iters)
    return p, jnp.concatenate([losses, loss_fn(p, data)[None]])


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "num_iters"))
def _pgd_polytope(p0, data, G, h, *, loss_fn, optimizer, num_iters):
    """Compiled once per (loss, optimiser, iteration count, shapes); data are arguments."""
    return _pgd_loop(loss_fn, p0, data, lambda a: project_polytope(a, G, h), optimizer, num_iters)


def projected_gradient_descent(
    loss_fn: Callable[[CanonicalParams], Array],
    init_params: CanonicalParams,
    *,
    num_iters: int,
    optimizer: optax.GradientTransformation,
    project: Callable[[Array], Array],
) -> CanonicalFit:
    """``num_iters`` optax steps on ``loss_fn``, each followed by ``a <- project(a)``.

    ``c`` and ``d`` are unconstrained, as in the seed. The whole loop is one jitted
    ``lax.scan``; :func:`fit_canonical` and :func:`fit_canonical_population` are this
    with the Pac-Man projection (and a compilation cache keyed on the data shapes).
    """
    p0 = _check_params(init_params, "init_params")
    num_iters = _check_positive_int(num_iters, "num_iters")
    run = jax.jit(
        lambda p: _pgd_loop(lambda q, _: loss_fn(q), p, None, project, optimizer, num_iters)
    )
    params, losses = run(p0)
    return CanonicalFit(params, losses)


def _init(order: int, dtype, init_params: Optional[CanonicalParams]) -> CanonicalParams:
    if init_params is not None:
        p = _check_params(init_params, "init_params")
        if p.a.shape[0] != order:
            raise ValueError(f"init_params.a must have shape ({order},); got {p.a.shape}")
        return CanonicalParams(p.a.astype(dtype), p.c.astype(dtype), p.d.astype(dtype))
    z = jnp.zeros(order, dtype)
    return CanonicalParams(z, z, jnp.zeros((), dtype))


@functools.lru_cache(maxsize=32)
def _sgd(learning_rate: float) -> optax.GradientTransformation:
    return optax.sgd(learning_rate)


def _fit(
    loss_fn,
    data,
    order,
    dtype,
    *,
    num_iters,
    learning_rate,
    optimizer,
    margin,
    num_points,
    slope,
    init_params,
) -> CanonicalFit:
    order = _check_positive_int(order, "order")
    num_iters = _check_positive_int(num_iters, "num_iters")
    opt = optimizer if optimizer is not None else _sgd(float(learning_rate))
    G, h = pacman_polytope(order, margin=margin, num_points=num_points, slope=slope)
    p0 = _init(order, dtype, init_params)
    params, losses = _pgd_polytope(
        p0,
        data,
        G.astype(dtype),
        h.astype(dtype),
        loss_fn=loss_fn,
        optimizer=opt,
        num_iters=num_iters,
    )
    return CanonicalFit(params, losses)


def fit_canonical(
    u,
    y,
    order: int,
    *,
    num_iters: int = 2000,
    learning_rate: float = 0.05,
    optimizer: Optional[optax.GradientTransformation] = None,
    margin: float = 0.0,
    num_points: Optional[int] = None,
    slope: float = 1.0,
    mask=None,
    init_params: Optional[CanonicalParams] = None,
) -> CanonicalFit:
    """Projected gradient descent on the empirical squared prediction risk.

    Each step is a full-batch gradient step on :func:`empirical_risk` followed by the
    projection of ``a`` onto the grid Pac-Man polytope (:func:`project_pacman`).

    Args:
        u: inputs ``(T,)`` or ``(N, T)``.
        y: outputs of the same shape.
        order: learned order ``n'`` (may exceed the true order: the over-parameterised
            variant).
        num_iters: gradient steps.
        learning_rate: step size of the default optimiser, plain ``optax.sgd``.
        optimizer: any optax transformation (overrides ``learning_rate``); reuse one
            object across calls to reuse the compiled loop.
        margin, num_points, slope: the Pac-Man polytope (see :func:`pacman_polytope`).
        mask: optional weights of the shape of ``y`` (see :func:`empirical_risk`).
        init_params: starting point; default ``a = c = 0, d = 0`` (``a = 0`` is the centre
            of the Pac-Man region, ``q_a = 1``).

    Returns:
        :class:`CanonicalFit` with the learned parameters and the loss history.

    Example:
        >>> true = CanonicalParams(jnp.array([0.0, 0.4]), jnp.array([1.0, 0.5]),
        ...                        jnp.asarray(0.2))
        >>> u, y = sample_data(jax.random.key(0), true, num_sequences=4, num_steps=100)
        >>> fit = fit_canonical(u, y, order=2, num_iters=500, learning_rate=0.1)
        >>> bool(fit.losses[-1] < 1e-3 * fit.losses[0])
        True
    """
    u = _check_sequences(u, "u")
    y = _check_sequences(y, "y")
    if y.shape != u.shape:
        raise ValueError(f"y must have the shape of u {u.shape}; got {y.shape}")
    mask = _check_mask(mask, y.shape)
    dtype = jnp.result_type(u, y)
    return _fit(
        _empirical_loss,
        (u.astype(dtype), y.astype(dtype), mask),
        order,
        dtype,
        num_iters=num_iters,
        learning_rate=learning_rate,
        optimizer=optimizer,
        margin=margin,
        num_points=num_points,
        slope=slope,
        init_params=init_params,
    )


def fit_canonical_population(
    true_params: CanonicalParams,
    order: int,
    num_steps: int,
    *,
    num_iters: int = 2000,
    learning_rate: float = 0.05,
    optimizer: Optional[optax.GradientTransformation] = None,
    margin: float = 0.0,
    num_points: Optional[int] = None,
    slope: float = 1.0,
    init_params: Optional[CanonicalParams] = None,
) -> CanonicalFit:
    """Projected gradient descent on :func:`population_risk` (noise-free: the noise only
    adds a constant). Arguments as in :func:`fit_canonical`; ``num_steps`` is ``T``."""
    q = _check_params(true_params, "true_params")
    T = _check_positive_int(num_steps, "num_steps")
    if T < 2:
        raise ValueError(f"num_steps must be at least 2; got {T}")
    g_true = markov_parameters(q.a, q.c, T - 1)
    data = (g_true, _lag_weights(T, g_true.dtype), q.d)
    return _fit(
        _population_loss,
        data,
        order,
        q.a.dtype,
        num_iters=num_iters,
        learning_rate=learning_rate,
        optimizer=optimizer,
        margin=margin,
        num_points=num_points,
        slope=slope,
        init_params=init_params,
    )
