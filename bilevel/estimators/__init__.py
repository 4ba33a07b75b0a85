"""Hypergradient estimators: each decides how the inner loop runs and how it is differentiated."""

from ._base import AbstractEstimator
from .aid import AID
from .first_order import FirstOrder
from .itd import ITD

__all__ = ["AID", "AbstractEstimator", "FirstOrder", "ITD"]
