"""The linear-solver protocol shared by AID and IMAML."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from .. import _runner
from .._result import LinearSolution
from .._tree import Params

#: ``matvec(v) -> A v`` for a symmetric operator ``A`` on parameter trees.
MatVec = Callable[[Params], Params]


class SampledOperator:
    """A matvec that applies a freshly sampled operator at each call: ``sample()`` returns
    the matvec of one draw ``A_j`` (a mini-batch Hessian), so ``E[A_j] = A`` only on average.

    AID passes one to solvers with ``resamples_operator`` (stocBiO's Neumann series); such a
    solver may tell it from a fixed operator, e.g. to keep sampling noise in the residual from
    reading as divergence.
    """

    def __init__(self, sample: Callable[[], MatVec]) -> None:
        self.sample = sample

    def __call__(self, v: Params) -> Params:
        return self.sample()(v)


class AbstractLinearSolver:
    """Solve ``A v = b`` for a symmetric operator given as a matrix-vector product.

    ``solve(matvec, b, x0=None)`` returns a :class:`~bilevel.LinearSolution`
    (value, status code, steps, residual, operator applications). ``x0`` is an
    initial guess (a warm start); ``None`` starts from zero.

    ``resamples_operator`` says whether the solver is meant to see a fresh
    random sample of the operator at every application (a stochastic Neumann
    series, as in stocBiO): AID then draws a new batch per ``matvec`` call from
    a :class:`~bilevel.Sampler`. Solvers that need one fixed operator (CG,
    Dense) leave it ``False`` and get a single draw per solve.
    """

    resamples_operator: ClassVar[bool] = False

    def solve(self, matvec: MatVec, b: Params, x0: Params | None = None) -> LinearSolution:
        raise NotImplementedError


class IterativeLinearSolver(AbstractLinearSolver):
    """A linear solver that runs a fixed number of identical iterations: :meth:`solve` is
    :meth:`start`, :attr:`iterations` times :meth:`iterate`, then :meth:`finish`.

    The split lets :class:`bilevel.Compiled` run the iterations as one compiled loop (torch's
    ``scan`` over one iteration) instead of a compiled unit per operator application. ``carry``
    is a tuple of tensors and trees that each iteration replaces; ``context`` holds what
    :meth:`start` computed once for every iteration and for :meth:`finish` (tensors and Python
    values, never modified).
    """

    @property
    def iterations(self) -> int:
        """How many times :meth:`solve` calls :meth:`iterate`."""
        raise NotImplementedError

    def start(self, matvec: MatVec, b: Params, x0: Params | None) -> tuple[tuple, Any]:
        """``(carry, context)`` before the first iteration."""
        raise NotImplementedError

    def iterate(self, matvec: MatVec, carry: tuple, context: Any) -> tuple:
        """One iteration: the next ``carry``, of the same structure, dtypes and shapes."""
        raise NotImplementedError

    def finish(self, matvec: MatVec, b: Params, carry: tuple, context: Any) -> LinearSolution:
        """The solution, its status and counts, from the last ``carry``."""
        raise NotImplementedError

    def solve(self, matvec: MatVec, b: Params, x0: Params | None = None) -> LinearSolution:
        carry, context = self.start(matvec, b, x0)
        if self.iterations > 1 and _runner.scanning():  # traced inside a bl.Compiled unit that loops
            from ..compile._primitives import scanned
            carry = scanned(lambda c: self.iterate(matvec, c, context), carry, self.iterations)
        else:
            for _ in range(self.iterations):
                carry = self.iterate(matvec, carry, context)
        return self.finish(matvec, b, carry, context)
