"""An estimator for inner problems with a differentiable closed-form solution."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad_and_value

from .._problem import BilevelProblem, check_tree
from .._tree import Batch, Params
from ..estimators._base import AbstractEstimator, Counts, Estimate, no_linear
from ..inner._base import AbstractInnerSolver

Solution = Callable[[Params, Batch], Params]


@dataclass(frozen=True)
class ClosedForm(AbstractEstimator):
    r"""Differentiate through a closed-form inner solution :math:`y^*(x) = \text{solution}(x, S)`:

    .. math::

        \nabla\Phi(x) = \frac{d}{dx} f\big(x, y^*(x)\big),

    by reverse mode through ``solution`` (e.g. a ridge head's linear solve, as in R2D2). The
    inner solver passed to :func:`bilevel.hypergrad` is not used (``inner_steps`` is 0) and
    ``params0`` is ignored; the problem's inner objective is not evaluated, so ``solution``
    must minimise it — the tests compare it with an iterative solve and AID.

    Args:
        solution: ``solution(hparams, inner_batch) -> params``, differentiable in ``hparams``.

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.meta import ClosedForm
        >>> g = lambda x, y, b: 0.5 * ((y["w"] - x["c"]) ** 2).sum() + 0.5 * (y["w"] ** 2).sum()
        >>> f = lambda x, y, b: 0.5 * ((y["w"] - 1.0) ** 2).sum()
        >>> est = ClosedForm(solution=lambda x, b: {"w": x["c"] / 2})
        >>> hg = bl.hypergrad(bl.BilevelProblem(inner=g, outer=f), {"c": torch.zeros(2)},
        ...                   {"w": torch.zeros(2)}, inner=bl.GradientDescent(lr=0.5, steps=1), estimator=est)
        >>> hg.value["c"]
        tensor([-0.5000, -0.5000])

    Reference: L. Bertinetto, J. F. Henriques, P. H. S. Torr, A. Vedaldi, "Meta-learning with
    differentiable closed-form solvers", ICLR 2019.
    """

    solution: Solution

    def __post_init__(self) -> None:
        if not callable(self.solution):
            raise TypeError(f"ClosedForm(solution={self.solution!r}): expected a callable "
                            "solution(hparams, inner_batch) -> params.")

    def run(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
            inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
            adjoint0: Params | None) -> tuple[Estimate, Counts]:
        def phi(x: Params):
            y = self.solution(x, inner_batch)
            check_tree(y, "ClosedForm solution(hparams, inner_batch)", "hypergrad(...)")
            value = problem.outer_value(x, y, outer_batch)
            return value, y

        value, (outer_value, params) = grad_and_value(phi, has_aux=True)(hparams)
        zero = torch.zeros((), dtype=outer_value.dtype, device=outer_value.device)
        code = torch.zeros((), dtype=torch.int64, device=outer_value.device)
        estimate = Estimate(value=value, params=params, code=code, outer_value=outer_value, adjoint=None, info={},
                            inner_steps=code, inner_grad_norm=zero, inner_loss0=zero, inner_loss=zero,
                            inner_bad_step=code - 1, **no_linear(outer_value))
        return estimate, Counts(num_grad=1, num_hvp=0)
