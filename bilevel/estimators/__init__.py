"""Hypergradient estimators: each decides how the inner loop runs and how it is differentiated."""

from ._base import AbstractEstimator
from .aid import AID
from .esj import ESJ
from .first_order import FirstOrder
from .imaml import IMAML
from .itd import ITD
from .reptile import Reptile

__all__ = ["AID", "AbstractEstimator", "ESJ", "FirstOrder", "IMAML", "ITD", "Reptile"]
