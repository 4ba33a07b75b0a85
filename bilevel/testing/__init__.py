"""Bilevel problems with exact answers, for tests, benchmarks and users checking estimators."""

from .quadratic import QuadraticBilevel, quadratic_problem
from .ridge import RidgeBilevel, ridge_inner, ridge_outer, ridge_problem

__all__ = ["QuadraticBilevel", "RidgeBilevel", "quadratic_problem", "ridge_inner", "ridge_outer", "ridge_problem"]
