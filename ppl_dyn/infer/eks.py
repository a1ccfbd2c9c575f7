"""Extended Kalman smoother (the Ghahramani-Roweis E-step) for any Gaussian-noise model.

Conventions as in :mod:`ppl_dyn.infer.kalman` and ``docs/math.md`` section 5. The
transition and emission *means* are linearised with ``jax.jacfwd``:

* predict: ``F_t = d f / d x`` at the filtered mean ``m_{t-1|t-1}``;
  ``m_{t|t-1} = f(m_{t-1|t-1}, u_t)`` (not ``F m``), ``P_{t|t-1} = F P F^T + Q``;
* update: ``G_t = d g / d x`` at the predicted mean, residual ``y_t - g(m_{t|t-1}, u_t)``,
  Joseph-form update (missing entries drop out exactly as in the Kalman filter);
* RTS on the linearisation, with ``Cov[x_{t+1}, x_t | y] = P_{t+1} J_t^T``.

Noise covariances are read from the model's distributions at the linearisation point,
so state-dependent noise is handled to first order. The log-marginal is the usual EKF
approximation ``sum_t log N(r_t; 0, S_t)``; EM on it is not guaranteed monotone.

``num_iterations > 1`` gives the iterated EKS: each further pass relinearises *both*
the forward and backward passes about the previous smoothed means (Gauss-Newton on the
MAP trajectory; Bell 1994, Sarkka 2023 ch. 13).

On a model whose means are affine in the state the EKS is the Kalman smoother.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ppl_dyn.infer import _linalg as la
from ppl_dyn.infer.kalman import GaussianPosterior, covariance_update, masked_rts_step, rts_step
from ppl_dyn.requirements import check_gaussian, gaussian_moments
from ppl_dyn.state_space import StateSpace


def _linearise(fn, x):
    """Mean, Jacobian and covariance of the Gaussian ``fn(x)`` at ``x``."""
    mean, cov = gaussian_moments(fn(x), "transition/emission")
    jac = jax.jacfwd(lambda z: fn(z).mean)(x)
    return mean, jac, cov


def eks_one(
    ss: StateSpace,
    y: jax.Array,
    u: jax.Array,
    lin: Optional[jax.Array] = None,
    time_mask: Optional[jax.Array] = None,
):
    """Extended Kalman smoother for one sequence ``y`` ``(T, dy)``, ``u`` ``(T, du)``.

    ``lin`` ``(T, dx)``: linearisation points (iterated EKS); None uses the filter's
    own points (predicted means for the update, filtered means for the prediction).
    ``time_mask`` ``(T,)``: False past the sequence's end (ragged lengths): those steps
    add 0 to the log-marginal and the backward pass restarts at the last step inside.
    """
    dtype = jnp.result_type(y.dtype, jnp.float32)
    mask = ~jnp.isnan(y)
    yf = jnp.where(mask, y, 0.0)
    m0, P0 = (jnp.asarray(a, dtype) for a in ss.init_moments())
    u_next = jnp.concatenate([u[1:], u[-1:]], 0)  # input of the step after t (last unused)
    use_lin = lin is not None
    if lin is None:
        lin = jnp.zeros(y.shape[:1] + (ss.state_dim,), dtype)  # unused placeholder

    def step(carry, inp):
        m_pred, P_pred = carry
        y_t, mask_t, u_t, u_n, lin_t = inp
        # update: linearise g about the predicted mean (IEKS: about lin_t)
        x_g = lin_t if use_lin else m_pred
        g, G, R = _linearise(lambda x: ss.emission(x, u_t), x_g)
        e_t = g - la.mv(G, x_g)  # y_t ~ G x_t + e_t
        m_f, P_f, ll = covariance_update(m_pred, P_pred, G, e_t, R.astype(dtype), y_t, mask_t)
        # predict x_{t+1}: linearise f about the filtered mean (IEKS: about lin_t)
        x_f = lin_t if use_lin else m_f
        f, F, Q = _linearise(lambda x: ss.transition(x, u_n), x_f)
        m_next = f + la.mv(F, m_f - x_f) if use_lin else f
        P_next = la.sym(la.mm(la.mm(F, P_f), F.T) + Q)
        return (m_next, P_next), (m_pred, P_pred, m_f, P_f, ll, F, Q)

    _, (m_p, P_p, m_f, P_f, ll, F, Q) = jax.lax.scan(step, (m0, P0), (yf, mask, u, u_next, lin))

    if time_mask is None:
        valid_next = jnp.ones(y.shape[:1], bool)[1:]
    else:
        ll = jnp.where(time_mask, ll, 0.0)
        valid_next = time_mask[1:]

    def back(carry, inp):
        F_t, Q_t, *rest, v = inp
        if time_mask is None:
            return rts_step(F_t, Q_t, carry, tuple(rest))
        return masked_rts_step(F_t, Q_t, carry, tuple(rest), v)

    _, (m_s, P_s, cross) = jax.lax.scan(
        back,
        (m_f[-1], P_f[-1]),
        (F[:-1], Q[:-1], m_f[:-1], P_f[:-1], m_p[1:], P_p[1:], valid_next),
        reverse=True,
    )
    means = jnp.concatenate([m_s, m_f[-1:]], 0)
    covs = jnp.concatenate([P_s, P_f[-1:]], 0)
    return GaussianPosterior(means, covs, cross, m_f, P_f, ll, jnp.sum(ll))


def ieks_one(ss: StateSpace, y, u, num_iterations: int, time_mask=None):
    """``num_iterations`` passes, each linearised about the previous smoothed means."""
    post = eks_one(ss, y, u, time_mask=time_mask)
    if num_iterations == 1:
        return post
    means = jax.lax.fori_loop(
        0,
        num_iterations - 2,
        lambda _, m: eks_one(ss, y, u, lin=m, time_mask=time_mask).means,
        post.means,
    )
    return eks_one(ss, y, u, lin=means, time_mask=time_mask)


class ExtendedKalmanSmoother(NamedTuple):
    """Approximate Gaussian E-step for nonlinear models: EKF + RTS on the linearisation.

    Args:
        num_iterations: 1 for the EKS; more gives the iterated EKS, which relinearises
            both passes about the previous smoothed means.

    Works on any model whose transition and emission are Gaussian (``MultivariateNormal``
    or independent ``Normal``); exact (equal to :class:`KalmanSmoother`) when their means
    are affine in the state. Pairs with :class:`LinearGaussianMStep` for models declaring
    a :class:`~ppl_dyn.LinearStructure` (linear, tanh and RBF features: the M-step takes
    Gaussian expectations of the features in closed form or by quadrature), or with
    :class:`GradientMStep`.

    Example:
        >>> import jax, ppl_dyn
        >>> from ppl_dyn.models import tanh_rnn
        >>> from ppl_dyn.infer import ExtendedKalmanSmoother
        >>> sim = ppl_dyn.simulate(jax.random.key(0), tanh_rnn, num_steps=20,
        ...                        state_dim=2, obs_dim=1)
        >>> post = ExtendedKalmanSmoother().smooth(sim["params"], tanh_rnn,
        ...                                        y=sim["y"], state_dim=2)
        >>> post.means.shape
        (20, 2)
    """

    num_iterations: int = 1

    # its programs are small-matrix work: the drivers' compile configuration picks the
    # XLA options for that (``ppl_dyn.infer._compile.compiler_options``)
    small_matrix_programs = True

    def posterior(
        self,
        rng_key,
        ss: StateSpace,
        y: jax.Array,
        u: jax.Array,
        time_mask: Optional[jax.Array] = None,
    ):
        """Pure E-step on normalised data ``y`` ``(S, T, dy)``, ``u`` ``(S, T, du)``;
        ``time_mask`` ``(S, T)`` is False past each sequence's end (ragged lengths)."""
        del rng_key  # deterministic
        check_gaussian(ss, "ExtendedKalmanSmoother")  # trace time: names what fits if not
        n = int(self.num_iterations)
        if n < 1:
            raise ValueError(f"num_iterations must be >= 1; got {self.num_iterations}")
        if time_mask is None:
            return jax.vmap(lambda y_s, u_s: ieks_one(ss, y_s, u_s, n))(y, u)
        return jax.vmap(lambda y_s, u_s, w_s: ieks_one(ss, y_s, u_s, n, w_s))(y, u, time_mask)

    def smooth(
        self,
        params: dict,
        model,
        *args,
        rng_key: Optional[jax.Array] = None,
        lengths=None,
        **kwargs,
    ) -> GaussianPosterior:
        """Smoothed (approximate) posterior of the states of ``model`` at ``params``.

        Validates eagerly, then runs jitted (compiled once per model and static
        arguments). A leading sequence axis is kept when ``y`` has one. Ragged
        sequences: lists of arrays or ``lengths=``, as in
        :meth:`KalmanSmoother.smooth`.
        """
        from ppl_dyn.infer._run import smooth_eager

        return smooth_eager(self, params, model, args, kwargs, rng_key, lengths)
