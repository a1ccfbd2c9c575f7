"""Effect handlers for ppl_dyn models (NumPyro ``Messenger`` subclasses).

:class:`marginalize` turns a state-space model into a model over its parameters only:
the latent states declared with :func:`ppl_dyn.markov` are integrated out by an E-step
and the log-marginal likelihood enters the joint density as a ``numpyro.factor``. NUTS
then runs over the parameters only.
"""

from __future__ import annotations

from typing import Callable, Optional

from numpyro.primitives import Messenger

from ppl_dyn.state_space import _MSG_TYPE

__all__ = ["marginalize", "noncentered"]


class marginalize(Messenger):
    r"""Integrate the latent states of a model out with an E-step.

    Inside this handler, :func:`ppl_dyn.markov` (with observations ``y``) does not
    sample ``x_1, ..., x_T``; it adds

    * a factor site ``y_log_marginal`` with :math:`\log p(y_{1:T} \mid \theta)` summed
      over sequences, computed by ``e_step.posterior(rng_key, state_space, y, u)``;
    * a deterministic site ``y_one_step_log_prob`` with the one-step-ahead predictive
      log-densities :math:`\log p(y_t \mid y_{1:t-1}, \theta)` per step (shape ``(T,)``
      or ``(S, T)``), which sum to the log-marginal (ArviZ's ``log_likelihood``);

    and returns the E-step's posterior. With :class:`~ppl_dyn.infer.KalmanSmoother`
    (the default) the marginal is exact for linear-Gaussian models; with an extended
    Kalman smoother it is the usual linearised approximation. Any E-step with a
    ``posterior(rng_key, state_space, y, u)`` method returning ``log_marginal`` and
    ``predicted_log_probs`` works; it must be deterministic and differentiable for NUTS
    (a particle filter's estimate is neither). Without ``y`` (simulation, forecasting)
    the states are sampled as usual. Under :func:`ppl_dyn.bind` (EM) the handler has no
    effect. Smoothed states per posterior draw: :func:`ppl_dyn.mcmc.smoothed_states`.

    Args:
        fn: the model (a function declaring its dynamics with :func:`ppl_dyn.markov`).
        e_step: the E-step; defaults to ``KalmanSmoother()``.
        fisher_gradient: with the Kalman smoother, differentiate the log-marginal by
            Fisher's identity (:mod:`ppl_dyn.fisher`: the same values, gradients about
            4x cheaper than reverse-mode through the filter); ``False`` differentiates
            through the filter.

    Example:
        >>> import jax, ppl_dyn
        >>> from numpyro.infer import MCMC, NUTS
        >>> from ppl_dyn.models import lds
        >>> y = ppl_dyn.simulate(jax.random.key(0), lds, num_steps=50, state_dim=1,
        ...                      obs_dim=1)["y"]
        >>> mcmc = MCMC(NUTS(ppl_dyn.handlers.marginalize(lds)), num_warmup=20,
        ...             num_samples=20, progress_bar=False)
        >>> mcmc.run(jax.random.key(1), y=y, state_dim=1)
        >>> mcmc.get_samples()["y_one_step_log_prob"].shape
        (20, 50)
    """

    def __init__(self, fn: Optional[Callable] = None, e_step=None, fisher_gradient: bool = True):
        from ppl_dyn.infer.kalman import KalmanSmoother

        if e_step is None:
            e_step = KalmanSmoother()
        if not callable(getattr(e_step, "posterior", None)):
            raise ValueError(
                "e_step must have a posterior(rng_key, state_space, y, u) method "
                f"(e.g. KalmanSmoother()); got {type(e_step).__name__}"
            )
        if not getattr(e_step, "deterministic", True):
            raise ValueError(
                f"marginalize needs a deterministic, differentiable log-marginal for NUTS; "
                f"{type(e_step).__name__} gives a random estimate. Use KalmanSmoother() "
                "(linear-Gaussian models) or ExtendedKalmanSmoother() (Gaussian noise), or "
                "sample the states with NUTS instead (MCMC(NUTS(model)), any emission)"
            )
        self.e_step = e_step
        self._factor_e_step = e_step
        if fisher_gradient and type(e_step) is KalmanSmoother:
            from ppl_dyn.fisher import FisherKalmanSmoother

            self._factor_e_step = FisherKalmanSmoother()  # same values, cheaper gradient
        super().__init__(fn)

    def process_message(self, msg):
        # the innermost marginalize wins; bind()'s capture (below it) still captures
        if msg["type"] == _MSG_TYPE and msg.get("e_step") is None:
            msg["e_step"] = self._factor_e_step


class noncentered(Messenger):
    r"""Sample the latent states of a model in non-centred form.

    Inside this handler, :func:`ppl_dyn.markov` draws standard-normal innovations
    ``x_innovations`` (shape ``(T, state_dim)``, or ``(S, T, state_dim)``) and sets

    .. math::
        x_1 = m_0 + L_0 z_1,\qquad x_t = \mathbb E[x_t \mid x_{t-1}] + L_Q z_t,

    with ``L`` the Cholesky factors of the initial and transition covariances; ``x_1``
    and ``x`` become ``numpyro.deterministic`` sites with their usual shapes. The joint
    law of states and observations is unchanged; NUTS sees independent standard normals
    a priori instead of the funnel between the states and ``Q``, which helps when the
    observations inform the states weakly (for strongly informative data the centred
    form, or :class:`marginalize`, mixes better). Needs Gaussian initial and transition
    distributions. Has no effect under :func:`ppl_dyn.bind` or :class:`marginalize`.

    Example:
        >>> from numpyro.infer import NUTS
        >>> from ppl_dyn.models import lds
        >>> kernel = NUTS(ppl_dyn.handlers.noncentered(lds))  # doctest: +SKIP
    """

    def process_message(self, msg):
        if msg["type"] == _MSG_TYPE and "noncentered" not in msg:
            msg["noncentered"] = True


def marginalized_e_step(model) -> Optional[object]:
    """The E-step a model wrapped in :class:`marginalize` uses (the innermost one), or
    None when the model is not marginalised."""
    fn, found = model, None
    while isinstance(fn, Messenger):
        if isinstance(fn, marginalize):
            found = fn.e_step
        fn = fn.fn
    return found
