"""The linear-solver protocol shared by AID and IMAML."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

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
