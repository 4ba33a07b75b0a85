"""The linear-solver protocol shared by AID and IMAML."""

from __future__ import annotations

from collections.abc import Callable

from .._result import LinearSolution
from .._tree import Params

#: ``matvec(v) -> A v`` for a symmetric operator ``A`` on parameter trees.
MatVec = Callable[[Params], Params]


class AbstractLinearSolver:
    """Solve ``A v = b`` for a symmetric operator given as a matrix-vector product.

    ``solve(matvec, b, x0=None)`` returns a :class:`~bilevel.LinearSolution`
    (value, status code, steps, residual, operator applications). ``x0`` is an
    initial guess (a warm start); ``None`` starts from zero.
    """

    def solve(self, matvec: MatVec, b: Params, x0: Params | None = None) -> LinearSolution:
        raise NotImplementedError
