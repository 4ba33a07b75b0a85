"""First-order estimator: the inner steps are treated as the identity."""

from __future__ import annotations

from dataclasses import dataclass

from torch.func import grad_and_value, vjp

from .._batch import is_stochastic
from .._problem import BilevelProblem
from .._tree import Batch, Params, tree_add, tree_detach
from ..inner._base import AbstractInnerSolver, solve
from ._base import AbstractEstimator, Counts, Estimate, inner_counts, inner_fields, inner_grad_fn, no_linear, outer_grads


@dataclass(frozen=True)
class FirstOrder(AbstractEstimator):
    r"""First-order estimator (FO-MAML): drop every second-order term,

    .. math::

        \widehat{\nabla}\Phi(x) = \nabla_x f(x, y_N) + J_{\text{init}}(x)^\top \nabla_y f(x, y_N),

    i.e. :math:`\partial y_N / \partial y_0` is taken to be the identity and
    :math:`\partial y_N / \partial x` through the inner objective is dropped.
    The second term appears only when the start is learned (``problem.init`` and
    no ``params0``). Costs the inner solve plus one outer gradient; no HVPs.

    Reference: C. Finn, P. Abbeel, S. Levine, "Model-agnostic meta-learning for
    fast adaptation of deep networks", ICML 2017, section 5.2.

    Example:
        >>> import bilevel as bl
        >>> bl.FirstOrder()
        FirstOrder()
    """

    def run(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
            inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
            adjoint0: Params | None) -> tuple[Estimate, Counts]:
        if params0 is None:
            start, pullback = vjp(problem.start, hparams)
            start = tree_detach(start)
        else:
            start, pullback = params0, None
        sol = solve(inner, start, inner_grad_fn(problem, hparams, inner_batch), check_growth=not is_stochastic(inner_batch))
        if pullback is None:  # a constant start: ∇_y f is not needed
            value, outer_value = grad_and_value(problem.outer_value)(hparams, sol.params, outer_batch)
        else:
            gx, gy, outer_value = outer_grads(problem, hparams, sol.params, outer_batch)
            value = tree_add(gx, pullback(gy)[0])
        estimate = Estimate(value=value, params=sol.params, code=sol.code, outer_value=outer_value,
                            adjoint=None, info={}, **inner_fields(sol), **no_linear(outer_value))
        return estimate, Counts(num_grad=inner_counts(inner) + 1, num_hvp=0)
