"""bilevel: hypergradients for bilevel optimization and meta-learning, on torch.func."""

from ._batch import Sampler
from ._hypergrad import hypergrad, vmap_hypergrad
from ._problem import BilevelProblem
from ._solver import BilevelSolver, SolverResult
from ._result import RESULTS, STATS_KEYS, BilevelError, Hypergrad, InnerSolution, LinearSolution
from .estimators import AID, AbstractEstimator, FirstOrder, ITD
from .inner import AbstractInnerSolver, GradientDescent, Momentum
from .linear import CG, AbstractLinearSolver, Dense, Neumann

__version__ = "0.1.0"

__all__ = [
    "AID", "AbstractEstimator", "AbstractInnerSolver", "AbstractLinearSolver", "BilevelError",
    "BilevelProblem", "BilevelSolver", "CG", "Dense", "FirstOrder", "GradientDescent", "Hypergrad", "ITD", "InnerSolution",
    "LinearSolution", "Momentum", "Neumann", "RESULTS", "STATS_KEYS", "Sampler", "SolverResult", "hypergrad", "vmap_hypergrad",
]
