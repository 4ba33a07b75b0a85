"""Reptile: move the learned start towards the adapted parameters."""

from __future__ import annotations

from dataclasses import dataclass

from torch.func import vjp

from .._batch import is_stochastic
from .._problem import BilevelProblem
from .._tree import Batch, Params, tree_detach, tree_sub
from ..inner._base import AbstractInnerSolver, solve
from ._base import AbstractEstimator, Counts, Estimate, inner_counts, inner_fields, inner_grad_fn, no_linear


@dataclass(frozen=True)
class Reptile(AbstractEstimator):
    r"""Reptile's meta-update direction

    .. math::

        \Delta(x) = J_{\text{init}}(x)^\top \left(\operatorname{init}(x) - y_N\right),

    where :math:`y_N` is the result of the inner solver on :math:`g`. With
    ``init`` the identity (MAML-style meta-parameters) this is
    :math:`x - y_N`, and a step :math:`x \leftarrow x - \beta \Delta` moves the
    initialisation towards the adapted parameters.

    **This is a direction, not a gradient of** :math:`\Phi`: the outer objective
    :math:`f` is not differentiated (``hg.outer_value`` still reports
    :math:`f(x, y_N)`), hyperparameters that enter :math:`g` directly get no
    update, and the direction is not zero at a stationary point of :math:`\Phi`.
    For one gradient-descent step of size :math:`\eta` it equals
    :math:`\eta\, J_{\text{init}}^\top \nabla_y g(x, \operatorname{init}(x))`; with more
    steps its expectation over tasks also contains the gradient-alignment term
    that makes Reptile a first-order meta-learner (Nichol et al., section 5).

    Requires ``problem.init``. A ``params0`` passed to :func:`~bilevel.hypergrad`
    only warm-starts the inner solve; the direction still points from
    ``init(x)``. Costs the inner solve; no HVPs, no linear solve.

    Reference: A. Nichol, J. Achiam, J. Schulman, "On first-order meta-learning
    algorithms", arXiv:1803.02999, 2018 (Algorithm 1 and section 5).

    Example:
        >>> import torch, bilevel as bl
        >>> g = lambda x, y, b: 0.5 * ((y["w"] - b) ** 2).sum()
        >>> f = lambda x, y, b: 0.5 * ((y["w"] - b) ** 2).sum()
        >>> problem = bl.BilevelProblem(inner=g, outer=f, init=lambda x: {"w": x["w"]})
        >>> hg = bl.hypergrad(problem, {"w": torch.zeros(2)}, inner=bl.GradientDescent(lr=0.5, steps=1),
        ...                   estimator=bl.Reptile(), inner_batch=torch.ones(2), outer_batch=torch.ones(2))
        >>> hg.value["w"]  # init - y_1 = 0 - 0.5
        tensor([-0.5000, -0.5000])
    """

    def run(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
            inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
            adjoint0: Params | None) -> tuple[Estimate, Counts]:
        if problem.init is None:
            raise ValueError(f"hypergrad(estimator={self!r}): Reptile moves init(hparams) towards the adapted "
                             "parameters, but the problem has no init. Fix: BilevelProblem(..., init=lambda x: "
                             "{...}) (MAML-style: init returns the meta-parameters).")
        centre, pullback = vjp(problem.start, hparams)
        centre = tree_detach(centre)
        start = centre if params0 is None else params0
        sol = solve(inner, start, inner_grad_fn(problem, hparams, inner_batch),
                    check_growth=not is_stochastic(inner_batch))
        value = pullback(tree_sub(centre, sol.params))[0]
        outer_value = problem.outer_value(hparams, sol.params, outer_batch)
        estimate = Estimate(value=value, params=sol.params, code=sol.code, outer_value=outer_value,
                            adjoint=None, info={}, **inner_fields(sol), **no_linear(outer_value))
        return estimate, Counts(num_grad=inner_counts(inner), num_hvp=0)
