"""What every estimator shares: the estimate it returns and the derivative helpers.

HVPs are forward-over-reverse (``jvp`` of ``grad``) or reverse-over-reverse
(``vjp`` of ``grad``); both only ever form products, never matrices. ``"auto"``
(AID's default) picks by device from measurement (:func:`resolve_hvp`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
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
    """The tensors an estimator returns (a pytree, so it can leave ``vmap``).

    ``packed``: an estimator may return its scalars stacked into one tensor (:func:`pack_scalars`:
    ``inner_grad_norm, inner_loss0, inner_loss, code, inner_steps, inner_bad_step, outer_value``
    along the last dimension, the integers as exact floats), with the first six of these fields
    and ``linear_steps``, ``residual`` set to ``None`` (no linear solve: zeros); ``outer_value``
    may be ``None`` too. Every tensor and every container leaving a ``grad(has_aux=True)`` or a
    ``vmap`` is handled one by one, in Python, by both transforms (tens of thousands of
    instructions each under callgrind), a large share of ITD's overhead over a hand-written
    ``vmap(grad)`` at the MAML sinusoid size (docs/results.md, "Performance: MAML meta-step").
    :meth:`unpacked` restores the fields (views of the stack) once the transforms are left;
    :func:`bilevel.hypergrad` calls it before anything reads them.
    """

    value: Params
    params: Params
    code: Tensor | None
    outer_value: Tensor | None
    inner_steps: Tensor | None
    inner_grad_norm: Tensor | None
    inner_loss0: Tensor | None
    inner_loss: Tensor | None
    inner_bad_step: Tensor | None
    linear_steps: Tensor | None
    residual: Tensor | None
    adjoint: Params | None
    info: dict[str, Tensor]
    packed: Tensor | None = None

    def unpacked(self) -> "Estimate":
        """The estimate with the fields of ``packed`` filled in (itself when nothing is packed)."""
        if self.packed is None:
            return self
        grad_norm, loss0, loss, *ints, outer_value = self.packed.unbind(-1)
        code, steps, bad_step = torch.stack(ints).long().unbind()
        outer_value = outer_value if self.outer_value is None else self.outer_value
        return self._replace(code=code, inner_steps=steps, inner_grad_norm=grad_norm, inner_loss0=loss0,
                             inner_loss=loss, inner_bad_step=bad_step, linear_steps=torch.zeros_like(code),
                             outer_value=outer_value, residual=torch.zeros_like(outer_value), packed=None)


#: Integers up to this size are exact in float32 (the smallest dtype :func:`pack_scalars` packs into).
_EXACT_INT = 2 ** 24


#: ``False`` while a caller that does not want the inner solution runs an estimator
#: (``hypergrad(..., return_params=False)``, a meta-learner's ``meta_gradient``).
_KEEP_PARAMS: ContextVar[bool] = ContextVar("bilevel_keep_params", default=True)


def keep_params() -> bool:
    """Whether the caller wants :attr:`Estimate.params` (the inner solution). An estimator may
    leave it empty (``{}``) when not: for ITD the adapted parameters are extra outputs of its
    ``grad`` transform, each unwrapped in Python (about 2% of a sinusoid MAML meta-step). Always
    ``True`` while dynamo traces (a compiled estimator keeps one output structure; the caller
    drops the params)."""
    return True if torch.compiler.is_compiling() else _KEEP_PARAMS.get()


def pack_scalars(sol: InnerSolution, outer_value: Tensor, max_steps: int) -> Tensor | None:
    """An inner solution's scalar diagnostics and the outer value stacked for :attr:`Estimate.packed`,
    or ``None`` where the stack would not hold them exactly: floats of different dtypes (stacking
    promotes), a dtype other than float32/float64, or more than 2**24 steps (step counts must be
    exact floats)."""
    dtype = sol.grad_norm.dtype
    if dtype not in (torch.float32, torch.float64) or max_steps >= _EXACT_INT \
            or any(t.dtype != dtype for t in (sol.loss0, sol.loss, outer_value)):
        return None
    # the integers promote to dtype, exactly
    return torch.stack([sol.grad_norm, sol.loss0, sol.loss, sol.code, sol.steps, sol.bad_step, outer_value])


def packed_fields() -> dict[str, None]:
    """The :class:`Estimate` fields that :func:`pack_scalars` replaces (``None`` with ``packed`` set)."""
    return dict(code=None, inner_steps=None, inner_grad_norm=None, inner_loss0=None, inner_loss=None,
                inner_bad_step=None, linear_steps=None, residual=None)


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


def featurized(problem: BilevelProblem, hparams: Params, batch: Batch) -> tuple[BilevelProblem, Batch]:
    """``(problem.featured(), problem.featurize(hparams, batch))``: the problem whose ``g`` takes
    preprocessed batches and the preprocessed batch (the two unchanged without ``features``)."""
    if problem.features is None:
        return problem, batch
    return problem.featured(), problem.featurize(hparams, batch)


def inner_grad_fn(problem: BilevelProblem, hparams: Params, inner_batch: Batch) -> GradFn:
    """``(y, k) -> (∇_y g(x, y, batch_k), g)``; ``batch_k`` is ``inner_batch`` or, for a
    :class:`~bilevel.Sampler`, its draw for step ``k``. With ``problem.features`` the batch is
    preprocessed here, once (per draw for a sampler), with these ``hparams``: called inside a
    function of ``x`` (ITD's), the features' dependence on ``x`` is differentiated."""
    problem, inner_batch = featurized(problem, hparams, inner_batch)
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
    r"""``v -> ∇²_yy g(x, y) v`` at fixed ``(x, y)`` (with ``features``, preprocessed once here)."""
    mode = resolve_hvp(mode, next(iter(params.values()), None))
    problem, batch = featurized(problem, hparams, batch)
    if (runner := _runner.current()) is not None:  # bl.Compiled: each product is a compiled unit
        return runner.hvp_yy(problem, hparams, params, batch, mode)
    grad_y = grad(lambda y: problem.inner_value(hparams, y, batch))
    if mode == "forward":
        return lambda v: jvp(grad_y, (params,), (v,))[1]
    if _runner.scanning():  # a pullback made outside a compiled loop cannot be used inside it: one per product
        return lambda v: vjp(grad_y, params)[1](v)[0]
    _, pullback = vjp(grad_y, params)
    return lambda v: pullback(v)[0]


@_runner.compilable
def cross_vjp(problem: BilevelProblem, hparams: Params, params: Params, batch: Batch,
              v: Params, mode: HVPMode) -> Params:
    r"""``∇²_xy g(x, y) v`` (an ``x``-shaped tree): the mixed second derivative applied to ``v``.
    With ``features`` it is that of the folded objective ``g(x, y, features(x, batch))``, so the
    dependence through the features is kept (they are recomputed inside the derivative)."""
    mode = resolve_hvp(mode, next(iter(params.values()), None))
    problem = problem.folded()
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
