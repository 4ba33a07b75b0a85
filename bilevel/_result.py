"""The one result type: value, status and statistics with a fixed vocabulary.

Inside the estimators a status is an integer tensor (so that it can be formed
under :func:`torch.func.vmap` without ``.item()``); :func:`bilevel.hypergrad`
turns it into a :class:`RESULTS` member once per call and, with
``throw=True``, raises :class:`BilevelError` with a message that names the
call, the offending value and the fix.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._tree import Params

#: Keys of :attr:`Hypergrad.stats`; every estimator fills every key.
STATS_KEYS = ("inner_steps", "linear_steps", "residual", "num_grad", "num_hvp", "wall_time_s", "compile_s")


class RESULTS(enum.Enum):
    """Status of a hypergradient computation.

    ``RESULTS.successful`` is the only status that :func:`bilevel.hypergrad`
    returns with ``throw=True``; every other member carries a message template
    filled from the solve's statistics.
    """

    successful = (0, "the hypergradient was computed and every check passed.")
    inner_nonfinite = (1, "NaN/inf appeared in the inner loop at step {inner_bad_step} "
                          "(inner loss {inner_loss:.4g}). Fix: lower the inner step size "
                          "(lr={inner_lr}), check the inner objective for log(0)/division "
                          "by zero, or start from better params0.")
    inner_diverged = (2, "the inner loss grew from {inner_loss0:.6g} at the start to "
                         "{inner_loss:.6g} after {inner_steps} steps: the inner solver diverges. "
                         "Fix: lower the inner step size (lr={inner_lr}) or the momentum.")
    inner_max_steps = (3, "the inner solver stopped at steps={inner_max} with gradient norm "
                          "{inner_grad_norm:.3g} > tol={inner_tol:.3g}. Fix: raise steps, raise "
                          "lr if the loss decreases slowly, or loosen tol.")
    linear_max_steps = (4, "the linear solver {linear_solver} stopped at max_steps={linear_max} "
                           "with relative residual {residual:.3g} above its tolerance. Fix: raise "
                           "max_steps, loosen rtol/atol, or make the inner problem better conditioned "
                           "(e.g. more L2 regularisation).")
    linear_nonfinite = (5, "NaN/inf appeared in the linear solve {linear_solver}. Fix: check that "
                           "the inner Hessian is finite at the inner solution (the inner solve may "
                           "not have converged) and positive definite for CG.")
    neumann_diverged = (6, "the Neumann series of {linear_solver} grows: the residual went from "
                           "{residual0:.3g} to {residual:.3g}, so alpha is too large for the "
                           "Hessian (largest eigenvalue ~ {lambda_max:.3g}). Fix: use "
                           "alpha <= {alpha_fix:.3g} (alpha must be < 2/lambda_max), or use CG.")
    zero_hypergradient = (7, "the estimator can only return zeros here: the hyperparameters reach "
                             "the problem only through init(hparams), and {estimator} treats the "
                             "inner solution as independent of its start. Fix: use bl.ITD() or "
                             "bl.IMAML(lam=...), which differentiate through the learned start.")
    nonfinite_hypergradient = (8, "the hypergradient contains NaN/inf although the inner loop "
                                  "stayed finite. Fix: check the outer objective at the inner "
                                  "solution and the inner Hessian (the linear system may be "
                                  "singular).")
    esj_nonfinite = (9, "the perturbed inner solve along ESJ direction {esj_bad_direction} "
                        "produced NaN/inf. Fix: lower smoothing (mu={esj_smoothing}) or the inner "
                        "step size, so that nearby hyperparameters also have a stable inner solve.")

    def __init__(self, code: int, template: str) -> None:
        self.code = code
        self.template = template

    @classmethod
    def from_code(cls, code: int | Tensor) -> "RESULTS":
        """The member with integer ``code`` (a Python int or a 0-dim tensor)."""
        code = int(code)
        for member in cls:
            if member.code == code:
                return member
        raise ValueError(f"RESULTS.from_code({code}): no such status code; valid codes are 0..{len(cls) - 1}.")

    def message(self, info: dict[str, Any]) -> str:
        """The template filled with ``info``; unknown fields print as '?'."""
        return self.template.format_map(_Missing(info))


class _Missing(dict):
    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__({k: _plain(v) for k, v in info.items()})

    def __missing__(self, key: str) -> Any:
        return _Unknown()


class _Unknown:
    def __format__(self, spec: str) -> str:
        return "?"


def _plain(v: Any) -> Any:
    if isinstance(v, Tensor) and v.numel() == 1:
        return v.item()
    return v


class BilevelError(RuntimeError):
    """Raised by :func:`bilevel.hypergrad` with ``throw=True`` on any status but success.

    Attributes:
        result: the :class:`RESULTS` member.
        hypergrad: the :class:`Hypergrad` that was formed, for inspection.
    """

    def __init__(self, message: str, result: RESULTS, hypergrad: "Hypergrad | None" = None) -> None:
        super().__init__(message)
        self.result = result
        self.hypergrad = hypergrad


def combine(code: Tensor, failed: Tensor, status: RESULTS) -> Tensor:
    """Record ``status`` where ``failed`` holds, keeping the first failure already recorded."""
    return torch.where((code == 0) & failed, torch.full_like(code, status.code), code)


def first_failure(first: Tensor, second: Tensor) -> Tensor:
    """The earlier of two status codes that is a failure (codes are 0 on success)."""
    return torch.where(first != 0, first, second)


@dataclass(frozen=True)
class InnerSolution:
    """What an inner solve produced.

    Attributes:
        params: the last iterate ``y_N``.
        steps: number of steps actually applied (fewer than the budget if ``tol`` stopped it).
        grad_norm: ``||∇_y g||`` at the last iterate where the gradient was evaluated.
        loss0, loss: inner loss at the start and at the last evaluated iterate.
        bad_step: first step whose loss or gradient was NaN/inf, or -1.
        code: integer status (:class:`RESULTS` code).
        num_grad: gradient evaluations performed (a Python int: the loop length is fixed).
    """

    params: Params
    steps: Tensor
    grad_norm: Tensor
    loss0: Tensor
    loss: Tensor
    bad_step: Tensor
    code: Tensor
    num_grad: int


@dataclass(frozen=True)
class LinearSolution:
    """What a linear solve produced.

    Attributes:
        value: the approximate solution ``v`` of ``A v = b``.
        steps: iterations actually applied (CG stops updating once converged).
        residual: ``||b - A v|| / ||b||`` (relative; absolute when ``b = 0``).
        code: integer status (:class:`RESULTS` code).
        num_hvp: operator applications performed (a Python int).
        info: extra values for status messages (e.g. the estimated largest eigenvalue).
    """

    value: Params
    steps: Tensor
    residual: Tensor
    code: Tensor
    num_hvp: int
    info: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Hypergrad:
    """The result of :func:`bilevel.hypergrad`.

    Attributes:
        value: the hypergradient, a dict shaped like ``hparams``.
        params: the inner solution the estimate was formed at (pass it back as
            ``params0`` to warm-start the next inner solve); ``None`` from a call with
            ``return_params=False``.
        result: a :class:`RESULTS` member (a tensor of codes when formed inside ``vmap``).
        stats: ``inner_steps, linear_steps, residual, num_grad, num_hvp, wall_time_s, compile_s``
            (``compile_s``: seconds this call spent in :func:`torch.compile`, 0.0 when eager).
        outer_value: ``f(hparams, params, outer_batch)`` at the inner solution.
        adjoint: the linear-system solution ``v`` for AID/IMAML (``None`` otherwise);
            pass it back as ``adjoint0`` to warm-start the next linear solve.
        task_results: for :func:`bilevel.vmap_hypergrad`, every task's status.
    """

    value: Params
    params: Params | None
    result: RESULTS | Tensor
    stats: dict[str, Any]
    outer_value: Tensor | None = None
    adjoint: Params | None = None
    task_results: list[RESULTS] | None = None
