"""What every estimator shares: the estimate it returns and the derivative helpers.

HVPs are forward-over-reverse (``jvp`` of ``grad``) or reverse-over-reverse
(``vjp`` of ``grad``); both only ever form products, never matrices. ``"auto"``
(AID's default) picks by device from measurement (:func:`resolve_hvp`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp

from .. import _runner
from .._batch import batch_at
from .._problem import BilevelProblem
from .._result import InnerSolution
from .._tree import Batch, Params
from ..inner._base import AbstractInnerSolver, GradFn

HVPMode = Literal["auto", "forward", "reverse"]
HVP_MODES = ("auto", "forward", "reverse")


def resolve_hvp(mode: HVPMode, like: Tensor | None = None) -> Literal["forward", "reverse"]:
    """The HVP mode ``mode`` stands for on ``like``'s device (the default device when ``None``).

    ``"auto"`` is reverse-over-reverse on CPU, where it measured 1.3-1.7x faster than
    forward-over-reverse per AID-CG hypergradient (ridge d = 200 and 2000, a small MLP;
    docs/performance.md, "Hessian-vector products"), and forward-over-reverse, the
    design's default, on other devices (not measured). ``"forward"`` / ``"reverse"``
    are returned as they are.
    """
    if mode != "auto":
        return mode
    device = like.device if like is not None else torch.get_default_device()
    return "reverse" if device.type == "cpu" else "forward"


class Estimate(NamedTuple):
    """The tensors an estimator returns (a pytree, so it can leave ``vmap``)."""

    value: Params
    params: Params
    code: Tensor
    outer_value: Tensor
    inner_steps: Tensor
    inner_grad_norm: Tensor
    inner_loss0: Tensor
    inner_loss: Tensor
    inner_bad_step: Tensor
    linear_steps: Tensor
    residual: Tensor
    adjoint: Params | None
    info: dict[str, Tensor]


class Counts(NamedTuple):
    """Static cost counters (Python ints: every loop has a fixed length)."""

    num_grad: int
    num_hvp: int


class AbstractEstimator:
    """Base of hypergradient estimators.

    ``run(problem, hparams, params0, inner, inner_batch, outer_batch, adjoint0)``
    returns ``(Estimate, Counts)``. ``params0`` is ``None`` when the start is
    ``problem.init(hparams)``. The estimator decides how the inner loop runs
    (on the tape or not) and differentiates itself.
    """

    def run(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
            inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
            adjoint0: Params | None) -> tuple[Estimate, Counts]:
        raise NotImplementedError


def inner_grad_fn(problem: BilevelProblem, hparams: Params, inner_batch: Batch) -> GradFn:
    """``(y, k) -> (∇_y g(x, y, batch_k), g)``; ``batch_k`` is ``inner_batch`` or, for a
    :class:`~bilevel.Sampler`, its draw for step ``k``."""
    gv = grad_and_value(lambda y, b: problem.inner_value(hparams, y, b))
    fn = lambda y, k: gv(y, batch_at(inner_batch, k))  # noqa: E731
    fn.parts = (problem, hparams, inner_batch)  # what a compiled runner (bl.Compiled) rebuilds the steps from
    return fn


def start_of(problem: BilevelProblem, hparams: Params, params0: Params | None) -> Params:
    return problem.start(hparams) if params0 is None else params0


@_runner.compilable
def outer_grads(problem: BilevelProblem, hparams: Params, params: Params,
                batch: Batch) -> tuple[Params, Params, Tensor]:
    """``(∇_x f, ∇_y f, f)`` at ``(hparams, params)``."""
    (gx, gy), value = grad_and_value(problem.outer_value, argnums=(0, 1))(hparams, params, batch)
    return gx, gy, value


def hvp_yy(problem: BilevelProblem, hparams: Params, params: Params, batch: Batch,
           mode: HVPMode) -> Callable[[Params], Params]:
    r"""``v -> ∇²_yy g(x, y) v`` at fixed ``(x, y)``."""
    mode = resolve_hvp(mode, next(iter(params.values()), None))
    if (runner := _runner.current()) is not None:  # bl.Compiled: each product is a compiled unit
        return runner.hvp_yy(problem, hparams, params, batch, mode)
    grad_y = grad(lambda y: problem.inner_value(hparams, y, batch))
    if mode == "forward":
        return lambda v: jvp(grad_y, (params,), (v,))[1]
    _, pullback = vjp(grad_y, params)
    return lambda v: pullback(v)[0]


@_runner.compilable
def cross_vjp(problem: BilevelProblem, hparams: Params, params: Params, batch: Batch,
              v: Params, mode: HVPMode) -> Params:
    r"""``∇²_xy g(x, y) v`` (an ``x``-shaped tree): the mixed second derivative applied to ``v``."""
    mode = resolve_hvp(mode, next(iter(params.values()), None))
    if mode == "forward":
        gx = grad(problem.inner_value, argnums=0)
        return jvp(lambda y: gx(hparams, y, batch), (params,), (v,))[1]
    grad_y = grad(problem.inner_value, argnums=1)
    _, pullback = vjp(lambda x: grad_y(x, params, batch), hparams)
    return pullback(v)[0]


def inner_fields(sol: InnerSolution) -> dict[str, Tensor]:
    return dict(inner_steps=sol.steps, inner_grad_norm=sol.grad_norm, inner_loss0=sol.loss0,
                inner_loss=sol.loss, inner_bad_step=sol.bad_step)


def no_linear(like: Tensor) -> dict[str, Tensor]:
    """Linear-solve fields for estimators that solve no linear system."""
    zero = torch.zeros((), dtype=torch.int64, device=like.device)
    return dict(linear_steps=zero, residual=torch.zeros((), dtype=like.dtype, device=like.device))


def inner_counts(inner: AbstractInnerSolver) -> int:
    return inner.steps + (1 if inner.tol is not None else 0)
