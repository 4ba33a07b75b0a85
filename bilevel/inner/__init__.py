"""Inner solvers: ``init / step / terminate`` objects driven by one fixed-length loop."""

from ._base import AbstractInnerSolver, solve
from .gradient_descent import GradientDescent
from .momentum import Momentum

__all__ = ["AbstractInnerSolver", "GradientDescent", "Momentum", "solve"]
