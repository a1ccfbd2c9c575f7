"""Inference plug-ins: E-steps, M-steps and the EM driver."""

from ppl_dyn.infer.backward import BackwardKernel
from ppl_dyn.infer.cpf import CPFAS, CPFState
from ppl_dyn.infer.eks import ExtendedKalmanSmoother
from ppl_dyn.infer.em import EM, EMResult, EMState, fit_em
from ppl_dyn.infer.kalman import GaussianPosterior, KalmanSmoother
from ppl_dyn.infer.mstep import GradientMStep, LinearGaussianMStep
from ppl_dyn.infer.nested import NestedFit, factor_analysis_init, fit_nested
from ppl_dyn.infer.online import (
    OnlineEM,
    OnlineEMMonitor,
    OnlineEMResult,
    OnlineMStep,
    StreamingPARIS,
)
from ppl_dyn.infer.paris import PARISPosterior, PARISSmoother
from ppl_dyn.infer.particle import ParticlePosterior, ParticleSmoother
from ppl_dyn.infer.pgas import PGAS, GibbsMStep, MNIWPrior, PathDraws, PGASResult
from ppl_dyn.infer.protocols import EStep, MStep, StatefulEStep, StatefulMStep
from ppl_dyn.infer.psaem import (
    PSAEM,
    PSAEMResult,
    PSAEMState,
    SAState,
    StochasticApproximation,
    step_size_schedule,
)
from ppl_dyn.infer.sgd import SGD, SGDState, fit_sgd
from ppl_dyn.infer.stats import InitStats, LinearStats, RegressionStats

__all__ = [
    "EM",
    "EMResult",
    "EMState",
    "fit_em",
    "SGD",
    "SGDState",
    "fit_sgd",
    "fit_nested",
    "factor_analysis_init",
    "NestedFit",
    "KalmanSmoother",
    "ExtendedKalmanSmoother",
    "GaussianPosterior",
    "LinearGaussianMStep",
    "GradientMStep",
    "ParticleSmoother",
    "BackwardKernel",
    "ParticlePosterior",
    "PARISSmoother",
    "PARISPosterior",
    "OnlineEM",
    "OnlineEMResult",
    "OnlineEMMonitor",
    "OnlineMStep",
    "StreamingPARIS",
    "PSAEM",
    "PSAEMResult",
    "PSAEMState",
    "step_size_schedule",
    "CPFAS",
    "CPFState",
    "StochasticApproximation",
    "SAState",
    "EStep",
    "MStep",
    "StatefulEStep",
    "StatefulMStep",
    "PGAS",
    "PGASResult",
    "MNIWPrior",
    "GibbsMStep",
    "PathDraws",
    "LinearStats",
    "RegressionStats",
    "InitStats",
]
