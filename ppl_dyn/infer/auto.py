"""The smoother that fits a model, chosen from what the model is.

:class:`AutoSmoother` is the default E-step of the results functions
(:func:`ppl_dyn.to_inference_data`, :func:`ppl_dyn.posterior_predictive`,
:func:`ppl_dyn.forecast`, :func:`ppl_dyn.mcmc.smoothed_states`) when none is given. The
choice is made when the model is bound, from the proofs of
:mod:`ppl_dyn.requirements` (trace time, no values):

* linear-Gaussian (Gaussian laws, means affine in the state, covariances independent
  of it): :class:`~ppl_dyn.infer.KalmanSmoother`, exact;
* Gaussian noise with nonlinear means: :class:`~ppl_dyn.infer.ExtendedKalmanSmoother`
  (the linearised approximation);
* anything else (counts, binary data, state-dependent observation noise):
  :class:`~ppl_dyn.infer.ParticleSmoother` with backward-simulated paths.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from ppl_dyn.infer._run import posterior_with_mask
from ppl_dyn.infer.eks import ExtendedKalmanSmoother
from ppl_dyn.infer.kalman import KalmanSmoother
from ppl_dyn.infer.particle import ParticleSmoother
from ppl_dyn.requirements import model_kind

__all__ = ["AutoSmoother", "default_e_step"]


def default_e_step(ss, num_particles: int = 1000, num_trajectories: int = 100):
    """The E-step that fits the state space ``ss`` (see the module docstring)."""
    kind = model_kind(ss)
    if kind == "linear-gaussian":
        return KalmanSmoother()
    if kind == "gaussian":
        return ExtendedKalmanSmoother()
    return ParticleSmoother(
        num_particles=num_particles, mode="ffbsi", num_trajectories=num_trajectories
    )


class AutoSmoother(NamedTuple):
    """An E-step that runs :func:`default_e_step` of the model it is given.

    Args:
        num_particles, num_trajectories: the particle smoother's settings, for models
            that need one.
    """

    num_particles: int = 1000
    num_trajectories: int = 100

    def choose(self, ss):
        """The E-step this smoother runs for the state space ``ss``."""
        return default_e_step(ss, self.num_particles, self.num_trajectories)

    def posterior(self, rng_key, ss, y, u, time_mask: Optional[object] = None):
        """The chosen E-step's posterior (``time_mask`` passed where it is taken)."""
        return posterior_with_mask(self.choose(ss), rng_key, ss, y, u, time_mask)
