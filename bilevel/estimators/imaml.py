"""Implicit MAML: AID on the proximally regularised inner problem."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._batch import batch_at, is_stochastic
from .._problem import BilevelProblem
from .._result import first_failure
from .._tree import Batch, Params, tree_dot, tree_sub
from ..inner._base import AbstractInnerSolver, solve
from ..linear import CG
from ..linear._base import AbstractLinearSolver
from ._base import (AbstractEstimator, Counts, Estimate, HVPMode, featurized, inner_counts, inner_fields,
                    inner_grad_fn, outer_grads)
from .aid import _implicit, check_linear_options, with_hvp_fallback


@dataclass(frozen=True)
class IMAML(AbstractEstimator):
    r"""Implicit MAML (iMAML): implicit differentiation of the proximally
    regularised inner problem

    .. math::

        g_\lambda(x, y) = g(x, y) + \tfrac{\lambda}{2}\,\|y - \operatorname{init}(x)\|^2 .

    The inner solver minimises :math:`g_\lambda` (no tape: memory does not grow
    with the number of inner steps) and the estimate is AID applied to
    :math:`g_\lambda` at the inner solution :math:`y_N`:

    .. math::

        \widehat{\nabla}\Phi(x) = \nabla_x f - \nabla^2_{xy} g_\lambda\, v, \qquad
        (\nabla^2_{yy} g + \lambda I)\, v = \nabla_y f,

    with :math:`\nabla^2_{xy} g_\lambda v = \nabla^2_{xy} g\, v - \lambda J_{\text{init}}^\top v`.
    When the hyperparameters enter only through ``init`` (MAML-style meta-learning)
    the cross term of :math:`g` vanishes and this is the iMAML meta-gradient

    .. math::

        \widehat{\nabla}\Phi(x) = \nabla_x f + J_{\text{init}}^\top \left(I + \tfrac{1}{\lambda}
        \nabla^2_{yy} g\right)^{-1} \nabla_y f ;

    when :math:`x` also enters :math:`g` the extra term keeps the estimate exact.

    The problem must have ``init``: it is the proximal centre. A ``params0``
    passed to :func:`~bilevel.hypergrad` only warm-starts the inner solve; the
    centre stays ``init(hparams)``. The linear system is solved by the same
    solver objects as :class:`~bilevel.AID` (CG, Neumann, Dense); the damped
    operator is better conditioned than :math:`\nabla^2_{yy} g`, so few CG steps
    suffice (Neumann needs ``alpha < 2 / (L + lam)``).

    Args:
        lam: proximal strength :math:`\lambda > 0` (default 1.0); larger keeps the
            adapted parameters closer to ``init(x)``.
        linear_solver: solver for the damped system, default ``CG()``.
        hvp: Hessian-vector products as in :class:`~bilevel.AID`: ``"auto"`` (default:
            reverse-over-reverse on CPU, forward-over-reverse elsewhere; see
            :func:`~bilevel.estimators._base.resolve_hvp`), ``"forward"`` or ``"reverse"``.

    Reference: A. Rajeswaran, C. Finn, S. Kakade, S. Levine, "Meta-learning with
    implicit gradients", NeurIPS 2019, eq. (5) and Algorithm 2.

    Example:
        >>> import bilevel as bl
        >>> bl.IMAML(lam=2.0, linear_solver=bl.CG(max_steps=5))
        IMAML(lam=2.0, linear_solver=CG(max_steps=5, rtol=1e-10, atol=0.0), hvp='auto')
    """

    lam: float = 1.0
    linear_solver: AbstractLinearSolver = field(default_factory=CG)
    hvp: HVPMode = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not (self.lam > 0):
            raise ValueError(f"IMAML(lam={self.lam!r}): the proximal strength must be a positive number "
                             "(e.g. lam=1.0); lam -> 0 removes the regularisation that iMAML differentiates.")
        if self.lam == float("inf"):
            raise ValueError(f"IMAML(lam={self.lam!r}): lam must be finite; an infinite lam pins the "
                             "inner solution to init(x) (use bl.FirstOrder() with zero inner steps for that).")
        check_linear_options(self)

    def run(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
            inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
            adjoint0: Params | None) -> tuple[Estimate, Counts]:
        if problem.init is None:
            raise ValueError(f"hypergrad(estimator={self!r}): the problem has no init, and iMAML's proximal "
                             "centre is init(hparams). Fix: BilevelProblem(..., init=lambda x: {...}) "
                             "(MAML: init returns the meta-parameters), or use bl.AID(...) for a problem "
                             "without a learned start.")
        prox = proximal_problem(problem, self.lam)
        start = problem.start(hparams) if params0 is None else params0
        featured = featurized(prox, hparams, inner_batch)  # features (if any) once, for the solve and H
        sol = solve(inner, start, inner_grad_fn(featured[0], hparams, featured[1]),
                    check_growth=not is_stochastic(inner_batch))
        gx, gy, outer_value = outer_grads(prox, hparams, sol.params, outer_batch)
        batch = batch_at(inner_batch, inner.steps)  # a Sampler: one fresh draw for the linear system, as in AID
        fixed = featured if not is_stochastic(inner_batch) else None
        lin, value = with_hvp_fallback(self, lambda mode: _implicit(prox, hparams, sol.params, batch,
                                                                    gx, gy, self.linear_solver, adjoint0, mode,
                                                                    featured=fixed),
                                       like=next(iter(gy.values())))
        estimate = Estimate(value=value, params=sol.params, code=first_failure(sol.code, lin.code),
                            outer_value=outer_value, adjoint=lin.value, info=lin.info, linear_steps=lin.steps,
                            residual=lin.residual, **inner_fields(sol))
        return estimate, Counts(num_grad=inner_counts(inner) + 1, num_hvp=lin.num_hvp + 1)


def proximal_problem(problem: BilevelProblem, lam: float) -> BilevelProblem:
    r"""The problem with inner objective :math:`g + \frac{\lambda}{2}\|y - \operatorname{init}(x)\|^2`.

    ``init(x)`` is evaluated inside the objective, so derivatives with respect
    to ``x`` (the cross term of AID) see the proximal centre's dependence on ``x``.
    The problem's ``features`` are kept: the proximal objective takes preprocessed batches.
    """
    core = problem.featured()

    def inner(hparams: Params, params: Params, batch: Batch):
        gap = tree_sub(params, problem.start(hparams))
        return core.inner_value(hparams, params, batch) + 0.5 * lam * tree_dot(gap, gap)

    inner.__qualname__ = f"proximal({getattr(problem.inner, '__qualname__', 'inner')}, lam={lam})"
    return BilevelProblem(inner=inner, outer=problem.outer, init=problem.init, features=problem.features)
