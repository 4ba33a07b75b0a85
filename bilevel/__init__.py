"""bilevel: hypergradients for bilevel optimization and meta-learning, on torch.func."""

from ._batch import Sampler
from ._hypergrad import hypergrad, vmap_hypergrad
from ._problem import BilevelProblem
from ._solver import BilevelSolver, SolverResult
from ._result import RESULTS, STATS_KEYS, BilevelError, Hypergrad, InnerSolution, LinearSolution
from .estimators import AID, ESJ, IMAML, ITD, AbstractEstimator, FirstOrder, Reptile
from .compile import Compiled
from .inner import AbstractInnerSolver, GradientDescent, Momentum
from .linear import CG, AbstractLinearSolver, Dense, Neumann
from . import meta

__version__ = "0.1.0"

__all__ = [
    "AID", "AbstractEstimator", "AbstractInnerSolver", "AbstractLinearSolver", "BilevelError",
    "BilevelProblem", "BilevelSolver", "CG", "Compiled", "Dense", "ESJ", "FirstOrder", "GradientDescent", "Hypergrad", "IMAML", "ITD", "InnerSolution",
    "LinearSolution", "Momentum", "Neumann", "RESULTS", "Reptile", "STATS_KEYS", "Sampler", "SolverResult", "hypergrad", "meta", "vmap_hypergrad",
]
