"""Approximate implicit differentiation (AID)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from .._batch import draws, is_stochastic
from .._problem import BilevelProblem
from .._result import RESULTS, combine, first_failure
from .._tree import Batch, Params, tree_allzero, tree_sub
from ..inner._base import AbstractInnerSolver, solve
from ..linear import CG
from ..linear._base import AbstractLinearSolver, SampledOperator
from ._base import (HVP_MODES, AbstractEstimator, Counts, Estimate, HVPMode, cross_vjp, featurized, hvp_yy,
                    inner_counts, inner_fields, inner_grad_fn, outer_grads, resolve_hvp, start_of)


@dataclass(frozen=True)
class AID(AbstractEstimator):
    r"""Approximate implicit differentiation at the inner solution :math:`y_N`:

    .. math::

        \widehat{\nabla}\Phi(x) = \nabla_x f - \nabla^2_{xy} g \, v, \qquad
        \nabla^2_{yy} g \, v = \nabla_y f,

    everything evaluated at :math:`(x, y_N)`. The linear system is solved by
    ``linear_solver`` (:class:`~bilevel.CG`, :class:`~bilevel.Neumann` or
    :class:`~bilevel.Dense`) from the warm start ``adjoint0`` when given; the
    solution is returned as ``Hypergrad.adjoint`` so an outer loop can pass it
    back (AID-BiO). The inner loop runs without a tape: memory does not grow
    with the inner step count.

    AID assumes :math:`y_N` is the inner minimiser, which does not depend on
    where the inner solve started: a learned start ``init(x)`` contributes
    nothing. When the hyperparameters enter *only* through ``init``, the
    estimate is identically zero and the call reports
    ``RESULTS.zero_hypergradient`` (use :class:`~bilevel.ITD` or
    :class:`~bilevel.IMAML`).

    Stochastic AID (stocBiO): with a :class:`~bilevel.Sampler` as ``inner_batch``
    the inner steps use draws ``0..N-1``; the linear solve continues from draw
    ``N``, one draw per Hessian-vector product for :class:`~bilevel.Neumann`
    (the stochastic Neumann series of stocBiO, Algorithm 3) and one draw for the
    whole solve for CG or Dense (which need a fixed operator); the cross term
    takes the next draw. ``outer_batch`` (fixed, or a sampler drawn once) gives
    :math:`\nabla f`. A sampler that always returns the full batch gives
    exactly the full-batch estimate.

    Args:
        linear_solver: solver for the adjoint system, default ``CG()``.
        hvp: Hessian-vector products: ``"auto"`` (default) chooses by device from
            measurement — reverse-over-reverse on CPU, where it measured 1.3-1.7x faster
            per hypergradient than forward-over-reverse (docs/performance.md), and
            forward-over-reverse elsewhere; ``"forward"`` (``jvp`` of ``grad``) or
            ``"reverse"`` (``vjp`` of ``grad``, also for operators without forward-mode
            rules) force one. Forward mode falls back to reverse with a warning when an
            operator has no forward-mode rule.

    References: F. Pedregosa, "Hyperparameter optimization with approximate
    gradient", ICML 2016; K. Ji, J. Yang, Y. Liang, "Bilevel optimization:
    convergence analysis and enhanced design", ICML 2021 (AID-BiO, stocBiO);
    R. Grazzi et al., "On the iteration complexity of hypergradient
    computation", ICML 2020.

    Example:
        >>> import bilevel as bl
        >>> bl.AID(linear_solver=bl.CG(max_steps=20, rtol=1e-10))
        AID(linear_solver=CG(max_steps=20, rtol=1e-10, atol=0.0), hvp='auto')
    """

    linear_solver: AbstractLinearSolver = field(default_factory=CG)
    hvp: HVPMode = "auto"

    def __post_init__(self) -> None:
        check_linear_options(self)

    def run(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
            inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
            adjoint0: Params | None) -> tuple[Estimate, Counts]:
        featured = featurized(problem, hparams, inner_batch)  # features (if any) once, for the solve and H
        sol = solve(inner, start_of(problem, hparams, params0), inner_grad_fn(featured[0], hparams, featured[1]),
                    check_growth=not is_stochastic(inner_batch))
        gx, gy, outer_value = outer_grads(problem, hparams, sol.params, outer_batch)
        lin, value = with_hvp_fallback(self, lambda mode: _implicit(problem, hparams, sol.params, inner_batch,
                                                                    gx, gy, self.linear_solver, adjoint0, mode,
                                                                    first=inner.steps, featured=featured),
                                       like=next(iter(gy.values())))
        code = first_failure(sol.code, lin.code)
        if problem.init is not None and params0 is None:
            code = combine(code, tree_allzero(value), RESULTS.zero_hypergradient)
        estimate = Estimate(value=value, params=sol.params, code=code, outer_value=outer_value,
                            adjoint=lin.value, info=lin.info, linear_steps=lin.steps, residual=lin.residual,
                            **inner_fields(sol))
        return estimate, Counts(num_grad=inner_counts(inner) + 1, num_hvp=lin.num_hvp + 1)


def _implicit(problem, hparams, params, batch, gx, gy, linear_solver, adjoint0, mode, first=0, featured=None):
    """``(linear solution, ∇ₓf − ∇²_xy g v)``. A :class:`~bilevel.Sampler` ``batch`` is drawn from
    step ``first`` on: once per operator application if the solver resamples its operator
    (stocBiO's Neumann series), else once for the solve; then once for the cross term.

    With ``problem.features`` the Hessian (in ``y`` only) is taken on the preprocessed batch —
    ``featured = featurized(problem, hparams, batch)`` when the caller already has it for a fixed
    batch — and the cross term on the folded objective, with the raw batch (:func:`cross_vjp`)."""
    draw = draws(batch, first)
    if is_stochastic(batch) and linear_solver.resamples_operator:
        matvec = SampledOperator(lambda: hvp_yy(problem, hparams, params, draw(), mode))
    elif featured is not None and not is_stochastic(batch):
        matvec = hvp_yy(featured[0], hparams, params, featured[1], mode)
    else:
        matvec = hvp_yy(problem, hparams, params, draw(), mode)
    lin = linear_solver.solve(matvec, gy, adjoint0)
    return lin, tree_sub(gx, cross_vjp(problem, hparams, params, draw(), lin.value, mode))


def check_linear_options(estimator) -> None:
    name = type(estimator).__name__
    if not isinstance(estimator.linear_solver, AbstractLinearSolver):
        raise TypeError(f"{name}(linear_solver={estimator.linear_solver!r}): expected a linear solver such as "
                        "bl.CG(max_steps=20), bl.Neumann(steps=20, alpha=0.1) or bl.Dense().")
    if estimator.hvp not in HVP_MODES:
        raise ValueError(f"{name}(hvp={estimator.hvp!r}): hvp must be 'forward' (forward-over-reverse), "
                         "'reverse' (reverse-over-reverse) or 'auto' (reverse on CPU, forward elsewhere).")


_warned: set[str] = set()


def with_hvp_fallback(estimator, compute, like=None):
    """Run ``compute(mode)`` with ``estimator.hvp`` resolved on ``like``'s device (:func:`resolve_hvp`);
    if forward mode is unsupported by an operator, warn once and use reverse."""
    if resolve_hvp(estimator.hvp, like) == "reverse":
        return compute("reverse")
    try:
        return compute("forward")
    except (RuntimeError, NotImplementedError) as err:
        text = str(err).lower()
        if "forward" not in text and "jvp" not in text:
            raise
        key = type(estimator).__name__
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"{key}(hvp={estimator.hvp!r}): an operator in the objectives has no forward-mode rule "
                          f"({str(err).splitlines()[0]}); falling back to reverse-over-reverse HVPs. Pass "
                          f"{key}(hvp='reverse') to choose it explicitly and silence this warning.",
                          RuntimeWarning, stacklevel=4)
        return compute("reverse")
