"""``hypergrad``: check the inputs, run the estimator, pack and check the result."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from ._problem import BilevelProblem, check_same_structure, check_tree
from ._result import RESULTS, BilevelError, Hypergrad, combine
from ._tree import Batch, Params, tree_detach, tree_isfinite
from .estimators._base import AbstractEstimator, Counts, Estimate
from .inner._base import AbstractInnerSolver

_CALL = "hypergrad(...)"


def hypergrad(problem: BilevelProblem, hparams: Params, params0: Params | None = None, *,
              inner: AbstractInnerSolver, estimator: AbstractEstimator, inner_batch: Batch = None,
              outer_batch: Batch = None, throw: bool = True, adjoint0: Params | None = None) -> Hypergrad:
    r"""Estimate the hypergradient :math:`\nabla\Phi(x)` of :math:`\Phi(x) = f(x, y(x))`.

    Args:
        problem: the :class:`BilevelProblem`.
        hparams: the outer variables :math:`x`, a ``dict[str, Tensor]`` of floating tensors.
        params0: the inner start (warm start); ``None`` to start at ``problem.init(hparams)``.
            With both given, ``params0`` must match ``init``'s output and the start is a constant.
        inner: the inner solver, e.g. ``bl.GradientDescent(lr=0.1, steps=50)``.
        estimator: ``bl.ITD()``, ``bl.FirstOrder()``, ``bl.AID(...)``, ... — it decides how
            the inner loop runs and how it is differentiated.
        inner_batch, outer_batch: passed as the third argument of ``g`` and ``f``.
        throw: raise :class:`BilevelError` on any status but ``RESULTS.successful`` (default).
            With ``throw=False`` the status is in ``result``.
        adjoint0: warm start of the linear solve (AID, IMAML): a previous ``Hypergrad.adjoint``.

    Returns:
        :class:`Hypergrad` with ``value`` (shaped like ``hparams``), ``params``
        (the inner solution), ``result``, ``stats``, ``outer_value`` and ``adjoint``.
        Inputs are never modified. The call works inside :func:`torch.func.vmap`
        (then ``result`` is a tensor of status codes and nothing is raised; see
        :func:`vmap_hypergrad` for a batched call that checks every task).

    Example:
        >>> import torch, bilevel as bl
        >>> g = lambda x, y, b: 0.5 * ((y["w"] - x["c"]) ** 2).sum() + 0.5 * (y["w"] ** 2).sum()
        >>> f = lambda x, y, b: 0.5 * ((y["w"] - 1.0) ** 2).sum()
        >>> hg = bl.hypergrad(bl.BilevelProblem(inner=g, outer=f), {"c": torch.zeros(3)},
        ...                   {"w": torch.zeros(3)}, inner=bl.GradientDescent(lr=0.5, steps=60),
        ...                   estimator=bl.AID(linear_solver=bl.CG(max_steps=5)))
        >>> hg.value["c"]  # y*(c) = c / 2, so dΦ/dc = (c/2 - 1) / 2
        tensor([-0.5000, -0.5000, -0.5000])
    """
    started = time.perf_counter()
    x, y0, a0 = _checked_inputs(problem, hparams, params0, inner, estimator, adjoint0, _CALL)
    estimate, counts = estimator.run(problem, x, y0, inner, inner_batch, outer_batch, a0)
    estimate = _check_value(estimate)
    return _pack(estimate, counts, started, problem, inner, estimator, throw, task_dim=False)


def vmap_hypergrad(problem: BilevelProblem, hparams: Params, params0: Params | None = None, *,
                   inner: AbstractInnerSolver, estimator: AbstractEstimator, inner_batch: Batch = None,
                   outer_batch: Batch = None, in_dims: tuple[int | None, int | None, int | None, int | None] = (0, 0, 0, 0),
                   throw: bool = True, adjoint0: Params | None = None, chunk_size: int | None = None) -> Hypergrad:
    """:func:`hypergrad` for a batch of tasks, as one :func:`torch.func.vmap`.

    Args:
        in_dims: which of ``(hparams, params0, inner_batch, outer_batch)`` carry
            a leading task dimension (``0``) and which are shared (``None``).
            A meta-learner shares ``hparams`` and batches the data:
            ``in_dims=(None, None, 0, 0)``. ``adjoint0``, when given, is batched
            like ``params0``.
        chunk_size: passed to :func:`torch.func.vmap` to bound memory.
        Other arguments as in :func:`hypergrad`.

    Returns:
        :class:`Hypergrad` whose ``value``, ``params``, ``outer_value`` and the
        per-task ``stats`` tensors have a leading task dimension (``value`` is
        per task even for shared ``hparams``: average it for a meta-gradient).
        ``result`` is ``RESULTS.successful`` when every task succeeded, else the
        status of the first failing task, whose index the error message names;
        ``task_results`` lists every task's status.

    Example:
        >>> import torch, bilevel as bl
        >>> g = lambda x, y, b: 0.5 * ((y["w"] - b) ** 2).sum() + 0.5 * x["lam"] * (y["w"] ** 2).sum()
        >>> f = lambda x, y, b: 0.5 * ((y["w"] - b) ** 2).sum()
        >>> hg = bl.vmap_hypergrad(bl.BilevelProblem(inner=g, outer=f), {"lam": torch.tensor(1.0)},
        ...                        {"w": torch.zeros(4, 3)}, inner=bl.GradientDescent(lr=0.3, steps=80),
        ...                        estimator=bl.AID(), inner_batch=torch.randn(4, 3),
        ...                        outer_batch=torch.randn(4, 3), in_dims=(None, 0, 0, 0))
        >>> hg.value["lam"].shape
        torch.Size([4])
    """
    started = time.perf_counter()
    if len(in_dims) != 4 or any(d not in (0, None) for d in in_dims):
        raise ValueError(f"vmap_hypergrad(in_dims={in_dims!r}): expected four entries, each 0 (batched over "
                         "tasks) or None (shared), for (hparams, params0, inner_batch, outer_batch).")
    x, y0, a0 = _checked_inputs(problem, hparams, params0, inner, estimator, adjoint0, "vmap_hypergrad(...)")
    if y0 is None and in_dims[1] == 0:
        in_dims = (in_dims[0], None, in_dims[2], in_dims[3])
    counts_seen: list[Counts] = []

    def one_task(x_t, y_t, bi_t, bo_t, a_t):
        estimate, counts = estimator.run(problem, x_t, y_t, inner, bi_t, bo_t, a_t)
        counts_seen.append(counts)
        return _check_value(estimate)

    dims = (*in_dims, in_dims[1] if a0 is not None else None)
    estimate = torch.func.vmap(one_task, in_dims=dims, chunk_size=chunk_size)(x, y0, inner_batch, outer_batch, a0)
    return _pack(estimate, counts_seen[0], started, problem, inner, estimator, throw, task_dim=True)


def _checked_inputs(problem, hparams, params0, inner, estimator, adjoint0, call):
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"{call}: problem is a {type(problem).__name__}; expected bl.BilevelProblem(inner=g, outer=f).")
    if not isinstance(inner, AbstractInnerSolver):
        raise TypeError(f"{call}: inner={inner!r} is not an inner solver. Fix: pass e.g. "
                        "inner=bl.GradientDescent(lr=0.1, steps=50).")
    if not isinstance(estimator, AbstractEstimator):
        raise TypeError(f"{call}: estimator={estimator!r} is not an estimator. Fix: pass e.g. estimator=bl.ITD() "
                        "or estimator=bl.AID(linear_solver=bl.CG(max_steps=20)).")
    check_tree(hparams, "hparams", call)
    x = tree_detach(hparams)
    y0 = None
    if params0 is not None:
        check_tree(params0, "params0", call)
        y0 = tree_detach(params0)
        if problem.init is not None:
            check_same_structure(y0, problem.start(x), "params0", "init(hparams)", call)
    elif problem.init is None:
        raise ValueError(f"{call}: params0 is None and the problem has no init. Fix: pass params0 "
                         "(the inner start) or BilevelProblem(init=...).")
    a0 = None
    if adjoint0 is not None:
        check_tree(adjoint0, "adjoint0", call)
        a0 = tree_detach(adjoint0)
    return x, y0, a0


def _check_value(estimate: Estimate) -> Estimate:
    bad = ~tree_isfinite(estimate.value)
    return estimate._replace(code=combine(estimate.code, bad, RESULTS.nonfinite_hypergradient))


def _pack(estimate: Estimate, counts: Counts, started: float, problem: BilevelProblem,
          inner: AbstractInnerSolver, estimator: AbstractEstimator, throw: bool, task_dim: bool) -> Hypergrad:
    stats: dict[str, Any] = {
        "inner_steps": estimate.inner_steps,
        "linear_steps": estimate.linear_steps,
        "residual": estimate.residual,
        "num_grad": counts.num_grad,
        "num_hvp": counts.num_hvp,
        "wall_time_s": 0.0,
    }
    codes = _concrete(estimate.code)
    if codes is None:  # inside a user's vmap: statuses stay tensors, nothing is raised
        stats["wall_time_s"] = time.perf_counter() - started
        return Hypergrad(estimate.value, estimate.params, estimate.code, stats, estimate.outer_value,
                         estimate.adjoint)
    if not task_dim:
        for key in ("inner_steps", "linear_steps", "residual"):
            stats[key] = stats[key].item()
    task_results = [RESULTS.from_code(c) for c in (codes if task_dim else [codes])]
    failing = [i for i, r in enumerate(task_results) if r is not RESULTS.successful]
    result = task_results[failing[0]] if failing else RESULTS.successful
    stats["wall_time_s"] = time.perf_counter() - started
    hg = Hypergrad(estimate.value, estimate.params, result, stats, estimate.outer_value, estimate.adjoint,
                   task_results if task_dim else None)
    if throw and failing:
        task = failing[0]
        info = _message_info(estimate, inner, estimator, task if task_dim else None)
        where = f" (task {task} of {len(task_results)}; {len(failing)} failed)" if task_dim else ""
        call = "vmap_hypergrad" if task_dim else "hypergrad"
        message = (f"{call}(estimator={estimator!r}, inner={inner!r}){where}: {result.name}: "
                   f"{result.message(info)} Pass throw=False to get the estimate with its status instead.")
        raise BilevelError(message, result, hg)
    return hg


def _concrete(code: Tensor) -> int | list[int] | None:
    """The status code(s) as Python ints, or None under a vmap transform."""
    try:
        return code.tolist()
    except RuntimeError:
        return None


def _message_info(estimate: Estimate, inner: AbstractInnerSolver, estimator: AbstractEstimator,
                  task: int | None) -> dict[str, Any]:
    def pick(t: Tensor) -> Any:
        return t[task] if task is not None and t.dim() > 0 else t

    info: dict[str, Any] = {
        "inner_lr": getattr(inner, "lr", "?"), "inner_max": inner.steps,
        "inner_tol": inner.tol if inner.tol is not None else float("nan"),
        "inner_steps": pick(estimate.inner_steps), "inner_grad_norm": pick(estimate.inner_grad_norm),
        "inner_loss0": pick(estimate.inner_loss0), "inner_loss": pick(estimate.inner_loss),
        "inner_bad_step": pick(estimate.inner_bad_step), "residual": pick(estimate.residual),
        "estimator": repr(estimator),
    }
    solver = getattr(estimator, "linear_solver", None)
    if solver is not None:
        info["linear_solver"] = repr(solver)
        info["linear_max"] = getattr(solver, "max_steps", getattr(solver, "steps", "?"))
    for key, value in estimate.info.items():
        info[key] = pick(value)
    for key in ("smoothing", "directions"):
        if hasattr(estimator, key):
            info[f"esj_{key}"] = getattr(estimator, key)
    return info
