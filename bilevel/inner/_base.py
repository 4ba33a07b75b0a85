"""The inner-solver protocol and the one loop that drives every inner solver.

An inner solver is a frozen dataclass with ``init / step / terminate``; the loop
here runs a *fixed* number of steps (so it traces the same under ``vmap`` and
``torch.func.grad``), masks the update once ``terminate`` holds, and records
what happened as tensors: steps applied, gradient norm, loss at the start and
at the end, and the first step with a NaN/inf. ITD runs this loop on the tape;
AID, IMAML and ESJ run it without one. Both count steps the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _runner
from .._result import RESULTS, InnerSolution, combine
from .._tree import Params, tree_dot, tree_norm, tree_where

#: ``grad_fn(params, k) -> (∇_y g, g)`` at inner step ``k``.
GradFn = Callable[[Params, int], tuple[Params, Tensor]]
SolverState = tuple[Params, ...]


class AbstractInnerSolver:
    """Base of inner solvers: ``steps`` iterations, optional early stop at ``||∇_y g|| <= tol``.

    Subclasses define :meth:`init` (the solver state from a start, whose first
    entry is the iterate), :meth:`step` (one pure update from the gradient) and
    may override :meth:`terminate`.
    """

    steps: int
    tol: float | None

    def _check(self) -> None:
        name = type(self).__name__
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"{name}(steps={self.steps!r}): steps must be a non-negative integer.")
        if self.tol is not None and not (self.tol >= 0):
            raise ValueError(f"{name}(tol={self.tol!r}): tolerances must be non-negative (or None to run all steps).")

    def init(self, params: Params) -> SolverState:
        raise NotImplementedError

    def step(self, state: SolverState, grad: Params) -> SolverState:
        raise NotImplementedError

    def terminate(self, grad_norm: Tensor) -> Tensor:
        """True once the iterate is accepted (``||∇_y g|| <= tol``)."""
        return grad_norm <= self.tol


class LoopState(NamedTuple):
    """The inner loop's carry; every field is a tensor or a tuple of trees."""

    solver: SolverState
    steps: Tensor
    done: Tensor
    bad_step: Tensor
    loss0: Tensor
    loss: Tensor
    grad_norm: Tensor


def loop_start(solver: AbstractInnerSolver, params0: Params) -> LoopState:
    like = next(iter(params0.values()))
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    izero = torch.zeros((), dtype=torch.int64, device=like.device)
    return LoopState(solver.init(params0), izero, torch.zeros((), dtype=torch.bool, device=like.device),
                     izero - 1, zero, zero, zero)


def loop_run(solver: AbstractInnerSolver, loop: LoopState, grad_fn: GradFn, start: int, stop: int) -> LoopState:
    """Run steps ``start .. stop-1``; pure in its inputs.

    The per-step bookkeeping is the squared gradient norm: the dot product when ``tol`` stops
    the loop, otherwise (a diagnostic only) one norm per leaf (:func:`_sq_norm`, a quarter of
    the kernels: under ``vmap`` and ITD's ``grad`` each kernel goes through both transforms).
    Losses and squared gradient norms are kept in lists and checked once at the end of
    the run (:func:`_first_bad`), which finds the same first NaN/inf step as a check at
    every step would. The loop is short and fixed, so the lists cost nothing but the
    scalars they hold.
    """
    if stop <= start:
        return loop
    runner = _runner.current()  # None unless a bl.Compiled call runs the steps as compiled units
    if runner is not None and (ran := runner.loop_run(solver, loop, grad_fn, start, stop)) is not None:
        return ran
    if stop - start > 1 and _runner.scanning():  # traced inside a bl.Compiled unit that loops
        from ..compile._primitives import scanned_steps
        if (ran := scanned_steps(solver, loop, grad_fn, start, stop)) is not None:
            return ran
    masked = solver.tol is not None
    state, steps, done, bad, loss0, loss, gnorm = loop
    losses, sq_norms = [], []
    for k in range(start, stop):
        grad, loss = grad_fn(state[0], k)
        # With tol the norm decides termination: the exact dot. Without, it is a diagnostic only.
        sq_norm = tree_dot(grad, grad) if masked else _sq_norm(grad)
        losses.append(loss)
        sq_norms.append(sq_norm)
        new = solver.step(state, grad)
        if masked:
            done = done | solver.terminate(torch.sqrt(sq_norm))
            state = tuple(tree_where(~done, n, o) for n, o in zip(new, state))
            steps = steps + (~done).long()
        else:
            state = new
    if not masked:
        steps = steps + (stop - start)
    if start == 0:
        loss0 = losses[0]
    bad = _first_bad(bad, start, losses, sq_norms)
    return LoopState(state, steps, done, bad, loss0, losses[-1], torch.sqrt(sq_norms[-1]))


def _sq_norm(grad: Params) -> Tensor:
    """``||grad||²`` in few kernels: one norm per leaf, then the sum of their squares.

    Under ``vmap`` and ITD's ``grad`` every kernel is dispatched through both transforms; this
    form dispatches a quarter of :func:`tree_dot`'s calls (no reshapes). The squares are formed
    and summed in the leaves' dtype, so the result is ``inf`` when ``||grad||²`` leaves the
    dtype's range, as with the dot product (and NaN/inf whenever an entry is).
    """
    norms = [torch.linalg.vector_norm(v) for v in grad.values()]
    if len(norms) == 1:
        return norms[0] * norms[0]
    stacked = torch.stack(norms)
    return (stacked * stacked).sum()


def _first_bad(bad: Tensor, start: int, losses: list[Tensor], sq_norms: list[Tensor]) -> Tensor:
    """``bad`` if a NaN/inf was already recorded, else the first step of this run (numbered
    from ``start``) whose loss or squared gradient norm is NaN/inf, else ``-1``.

    ``isfinite(‖g‖²)`` is ``isfinite(‖g‖)``: the check is the one a per-step test makes.
    ``v - v`` is exactly 0 for a finite ``v`` and NaN for NaN/inf, so one ``!= 0`` tests the
    loss and the norm of every step at once (fewer kernels than ``isfinite``).
    """
    if len(losses) == 1:
        check = (losses[0] - losses[0]) + (sq_norms[0] - sq_norms[0])
        return torch.where((bad < 0) & (check != 0), start, bad)
    value, norm = torch.stack(losses), torch.stack(sq_norms)
    nonfinite = ((value - value) + (norm - norm)) != 0
    first = torch.argmax(nonfinite.to(torch.uint8), dim=0) + start  # argmax: the first maximum
    return torch.where((bad < 0) & nonfinite.any(), first, bad)


def loop_finish(solver: AbstractInnerSolver, loop: LoopState, grad_fn: GradFn, *,
                check_growth: bool = True) -> InnerSolution:
    """Close the loop: final convergence test (only with ``tol``) and the status code."""
    state, steps, done, bad, loss0, loss, gnorm = loop
    num_grad = solver.steps
    if solver.tol is not None:
        grad, final_loss = grad_fn(state[0], solver.steps)
        final_norm = tree_norm(grad)
        done = done | solver.terminate(final_norm)
        # Where the loop stopped early, the last evaluated values already describe the iterate.
        gnorm, loss = final_norm, final_loss
        num_grad += 1
    # combine(0, bad >= 0, inner_nonfinite) in two kernels: the first status needs no first-failure test
    code = torch.where(bad >= 0, RESULTS.inner_nonfinite.code, 0)
    if check_growth and solver.steps > 1:
        grew = loss > loss0 + 1e-2 * loss0.abs() + 1e-6
        code = combine(code, grew, RESULTS.inner_diverged)
    if solver.tol is not None:
        code = combine(code, ~done, RESULTS.inner_max_steps)
    return InnerSolution(state[0], steps, gnorm, loss0, loss, bad, code, num_grad)


def solve(solver: AbstractInnerSolver, params0: Params, grad_fn: GradFn, *,
          check_growth: bool = True) -> InnerSolution:
    """Run the whole inner solve from ``params0``."""
    loop = loop_run(solver, loop_start(solver, params0), grad_fn, 0, solver.steps)
    return loop_finish(solver, loop, grad_fn, check_growth=check_growth)
