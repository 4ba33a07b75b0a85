"""Iterative differentiation: reverse mode through the unrolled inner loop."""

from __future__ import annotations

from dataclasses import dataclass

from torch.func import grad_and_value

from .._batch import is_stochastic
from .._problem import BilevelProblem
from .._tree import Batch, Params, tree_detach
from ..inner._base import AbstractInnerSolver, LoopState, loop_finish, loop_run, loop_start
from ._base import (AbstractEstimator, Counts, Estimate, inner_counts, inner_fields, inner_grad_fn,
                    no_linear, start_of)


@dataclass(frozen=True)
class ITD(AbstractEstimator):
    r"""Iterative differentiation (ITD): the exact gradient of
    :math:`x \mapsto f(x, y_N(x))`, back-propagated through the :math:`N` unrolled
    inner steps, including the dependence of the start ``init(x)``.

    With ``truncate=K`` only the last :math:`K` steps are on the tape (truncated
    back-propagation): the first :math:`N-K` steps run without it and their
    output, and so the start, is treated as a constant.

    Memory grows linearly with the number of taped steps. Cost: :math:`N`
    gradients forward and about :math:`K` Hessian-vector products backward
    (reported as ``num_hvp``).

    Args:
        truncate: number of final steps to differentiate through; ``None`` for all.

    References: D. Maclaurin, D. Duvenaud, R. Adams, "Gradient-based
    hyperparameter optimization through reversible learning", ICML 2015;
    L. Franceschi et al., "Forward and reverse gradient-based hyperparameter
    optimization", ICML 2017; A. Shaban et al., "Truncated back-propagation for
    bilevel optimization", AISTATS 2019.

    Example:
        >>> import bilevel as bl
        >>> bl.ITD(truncate=5)
        ITD(truncate=5)
    """

    truncate: int | None = None

    def __post_init__(self) -> None:
        if self.truncate is not None and (isinstance(self.truncate, bool) or not isinstance(self.truncate, int)
                                          or self.truncate < 1):
            raise ValueError(f"ITD(truncate={self.truncate!r}): truncate must be a positive integer "
                             "(the number of final inner steps to differentiate through) or None.")

    def run(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
            inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
            adjoint0: Params | None) -> tuple[Estimate, Counts]:
        n = inner.steps
        k = n if self.truncate is None else self.truncate
        if k > n:
            raise ValueError(f"hypergrad(estimator={self!r}): truncate={k} exceeds the inner solver's "
                             f"steps={n}. Fix: use truncate <= {n}, or ITD() for the full unroll.")

        def phi(x: Params):
            loop = loop_start(inner, start_of(problem, x, params0))
            if k < n:
                loop = loop_run(inner, loop, inner_grad_fn(problem, tree_detach(x), inner_batch), 0, n - k)
                loop = _detach(loop)
            grad_fn = inner_grad_fn(problem, x, inner_batch)
            loop = loop_run(inner, loop, grad_fn, n - k, n)
            sol = loop_finish(inner, loop, grad_fn, check_growth=not is_stochastic(inner_batch))
            value = problem.outer_value(x, sol.params, outer_batch)
            return value, (sol.params, inner_fields(sol), sol.code)

        value, (outer_value, (params, fields, code)) = grad_and_value(phi, has_aux=True)(hparams)
        estimate = Estimate(value=value, params=params, code=code, outer_value=outer_value,
                            adjoint=None, info={}, **fields, **no_linear(outer_value))
        return estimate, Counts(num_grad=inner_counts(inner) + 1, num_hvp=k)


def _detach(loop: LoopState) -> LoopState:
    solver = tuple(tree_detach(s) for s in loop.solver)
    return LoopState(solver, *(t.detach() for t in loop[1:]))
