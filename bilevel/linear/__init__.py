"""Linear solvers for ``A v = b`` with ``A`` given as a matrix-vector product."""

from ._base import AbstractLinearSolver
from .cg import CG
from .dense import Dense
from .neumann import Neumann

__all__ = ["AbstractLinearSolver", "CG", "Dense", "Neumann"]
