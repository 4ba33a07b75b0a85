"""Compiled execution: :class:`Compiled` runs any estimator's primitives through :func:`torch.compile`."""

from .compiled import Compiled

__all__ = ["Compiled"]
