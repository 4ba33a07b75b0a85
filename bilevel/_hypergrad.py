"""``hypergrad``: check the inputs, run the estimator, pack and check the result."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from . import _runner
from ._batch import batch_at
from ._problem import BilevelProblem, check_same_structure, check_tree
from ._result import RESULTS, BilevelError, Hypergrad
from ._tree import Batch, Params, tree_detach
from .estimators._base import _KEEP_PARAMS, AbstractEstimator, Counts, Estimate, packed_fields
from .inner._base import AbstractInnerSolver

_CALL = "hypergrad(...)"


def hypergrad(problem: BilevelProblem, hparams: Params, params0: Params | None = None, *,
              inner: AbstractInnerSolver, estimator: AbstractEstimator, inner_batch: Batch = None,
              outer_batch: Batch = None, throw: bool = True, adjoint0: Params | None = None,
              return_params: bool = True) -> Hypergrad:
    r"""Estimate the hypergradient :math:`\nabla\Phi(x)` of :math:`\Phi(x) = f(x, y(x))`.

    Args:
        problem: the :class:`BilevelProblem`.
        hparams: the outer variables :math:`x`, a ``dict[str, Tensor]`` of floating tensors.
        params0: the inner start (warm start); ``None`` to start at ``problem.init(hparams)``.
            With both given, ``params0`` must match ``init``'s output and the start is a constant.
        inner: the inner solver, e.g. ``bl.GradientDescent(lr=0.1, steps=50)``.
        estimator: ``bl.ITD()``, ``bl.FirstOrder()``, ``bl.AID(...)``, ... — it decides how
            the inner loop runs and how it is differentiated.
        inner_batch, outer_batch: passed as the third argument of ``g`` and ``f``. Either may
            be a :class:`~bilevel.Sampler`: ``inner_batch`` is then drawn per inner step (and,
            for AID, per linear solve or Hessian-vector product, see :class:`~bilevel.AID`);
            ``outer_batch`` is drawn once per call, at step 0.
        throw: raise :class:`BilevelError` on any status but ``RESULTS.successful`` (default).
            With ``throw=False`` the status is in ``result``.
        adjoint0: warm start of the linear solve (AID, IMAML): a previous ``Hypergrad.adjoint``.
        return_params: return the inner solution as ``Hypergrad.params`` (default). With
            ``False`` it is ``None``, and estimators that would return it from inside a
            transform (ITD: through its ``grad``) do not: a little faster when only the
            hypergradient is wanted.

    Returns:
        :class:`Hypergrad` with ``value`` (shaped like ``hparams``), ``params``
        (the inner solution; ``None`` with ``return_params=False``), ``result``, ``stats``, ``outer_value`` and ``adjoint``.
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
    started, compiled0 = time.perf_counter(), _runner.compile_clock()
    x, y0, a0 = _checked_inputs(problem, hparams, params0, inner, estimator, adjoint0, _CALL)
    token = _KEEP_PARAMS.set(bool(return_params))
    try:
        estimate, counts = estimator.run(problem, x, y0, inner, inner_batch, batch_at(outer_batch, 0), a0)
    finally:
        _KEEP_PARAMS.reset(token)
    estimate = _check_value(estimate.unpacked())
    if not return_params:
        estimate = estimate._replace(params=None)
    return _pack(estimate, counts, started, problem, inner, estimator, throw, task_dim=False, compiled0=compiled0)


def vmap_hypergrad(problem: BilevelProblem, hparams: Params, params0: Params | None = None, *,
                   inner: AbstractInnerSolver, estimator: AbstractEstimator, inner_batch: Batch = None,
                   outer_batch: Batch = None, in_dims: tuple[int | None, int | None, int | None, int | None] = (0, 0, 0, 0),
                   throw: bool = True, adjoint0: Params | None = None, chunk_size: int | None = None,
                   return_params: bool = True) -> Hypergrad:
    """:func:`hypergrad` for a batch of tasks, as one :func:`torch.func.vmap`.

    Arguments not listed below are as in :func:`hypergrad`.

    Args:
        in_dims: which of ``(hparams, params0, inner_batch, outer_batch)`` carry
            a leading task dimension (``0``) and which are shared (``None``).
            A meta-learner shares ``hparams`` and batches the data:
            ``in_dims=(None, None, 0, 0)``. A ``None`` input (no params0, no
            batch) is shared whatever its entry says. ``adjoint0``, when given,
            carries a task dimension (each task has its own adjoint: pass back a
            previous call's ``Hypergrad.adjoint``).
        chunk_size: passed to :func:`torch.func.vmap` to bound memory.
        return_params: as in :func:`hypergrad`; with ``False`` the per-task inner solutions do
            not leave the ``vmap`` (``params`` is ``None``).

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
    started, compiled0 = time.perf_counter(), _runner.compile_clock()
    if len(in_dims) != 4 or any(d not in (0, None) for d in in_dims):
        raise ValueError(f"vmap_hypergrad(in_dims={in_dims!r}): expected four entries, each 0 (batched over "
                         "tasks) or None (shared), for (hparams, params0, inner_batch, outer_batch).")
    call = "vmap_hypergrad(...)"
    x, y0, a0 = _checked_inputs(problem, hparams, params0, inner, estimator, adjoint0, call, per_task=True)
    args = (x, y0, inner_batch, outer_batch, a0)
    dims = tuple(None if arg is None else d for arg, d in zip(args, (*in_dims, 0)))
    if all(d is None for d in dims):
        raise ValueError(f"vmap_hypergrad(in_dims={in_dims!r}): no input carries a task dimension. Fix: mark the "
                         "batched inputs with 0, or call bl.hypergrad for a single task.")
    counts_seen: list[Counts] = []

    # Only the batched inputs go through the vmap; the shared ones are closed over (the same for
    # vmap, and their containers are not flattened and matched with in_dims at every call).
    batched = [i for i, d in enumerate(dims) if d is not None]

    def one_task(*per_task):
        x_t, y_t, bi_t, bo_t, a_t = _merge(args, batched, per_task)
        _check_starts(problem, x_t, y_t, a_t, call)  # per task: the inputs may be batched differently
        estimate, counts = estimator.run(problem, x_t, y_t, inner, bi_t, bo_t, a_t)
        counts_seen.append(counts)
        return _to_vmap_output(estimate, keys, return_params)

    keys: list[list[str]] = []  # the value's and params' keys of a flat output (_to_vmap_output)
    token = _KEEP_PARAMS.set(bool(return_params))
    try:
        out = torch.func.vmap(one_task, chunk_size=chunk_size)(*(args[i] for i in batched))
    finally:
        _KEEP_PARAMS.reset(token)
    estimate = _from_vmap_output(out, keys)
    if not return_params:
        estimate = estimate._replace(params=None)
    # The value check runs once on the stacked values, not per task inside the vmap (a dozen
    # plain kernels instead of every isfinite through the batching rules); same statuses.
    estimate = _check_value(estimate, task_dim=True)
    return _pack(estimate, counts_seen[0], started, problem, inner, estimator, throw, task_dim=True,
                 compiled0=compiled0)


def _merge(args: tuple, batched: list[int], per_task: tuple) -> list:
    """``args`` with the entries at ``batched`` replaced by ``per_task`` (in order)."""
    merged = list(args)
    for i, value in zip(batched, per_task):
        merged[i] = value
    return merged


def _to_vmap_output(estimate: Estimate, keys: list, keep_params: bool = True) -> tuple:
    """What leaves the task ``vmap``: as few containers and tensors as the estimate allows (``vmap``
    refuses ``None`` and handles each container and tensor in Python). For a packed estimate
    (:attr:`Estimate.packed`, which holds ``outer_value``) one flat tuple, the leaves of ``value``
    and ``params`` then ``packed``, their keys appended to ``keys``; else every field but
    ``packed``, with an empty dict for a ``None`` adjoint. Without ``keep_params`` the params
    stay inside (an empty dict leaves instead)."""
    if not keep_params and estimate.params:
        estimate = estimate._replace(params={})
    if estimate.packed is not None and not estimate.info and estimate.adjoint is None:
        keys.extend((list(estimate.value), list(estimate.params)))
        return (*estimate.value.values(), *estimate.params.values(), estimate.packed)
    return tuple(estimate._replace(adjoint={} if estimate.adjoint is None else estimate.adjoint))[:-1]


def _from_vmap_output(out: tuple, keys: list) -> Estimate:
    """The :class:`Estimate` (unpacked) from :func:`_to_vmap_output`'s form, now with a task dimension."""
    if keys:
        value_keys, params_keys = keys[0], keys[1]
        value = dict(zip(value_keys, out[:len(value_keys)]))
        params = dict(zip(params_keys, out[len(value_keys):-1]))
        return Estimate(value=value, params=params, outer_value=None, adjoint=None, info={},
                        packed=out[-1], **packed_fields()).unpacked()
    estimate = Estimate(*out)
    return estimate._replace(adjoint=estimate.adjoint or None)


def _checked_inputs(problem, hparams, params0, inner, estimator, adjoint0, call, per_task=False):
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"{call}: problem is a {type(problem).__name__}; expected bl.BilevelProblem(inner=g, outer=f).")
    if not isinstance(inner, AbstractInnerSolver):
        raise TypeError(f"{call}: inner={inner!r} is not an inner solver. Fix: pass e.g. "
                        "inner=bl.GradientDescent(lr=0.1, steps=50).")
    if not isinstance(estimator, AbstractEstimator):
        raise TypeError(f"{call}: estimator={estimator!r} is not an estimator. Fix: pass e.g. estimator=bl.ITD() "
                        "or estimator=bl.AID(linear_solver=bl.CG(max_steps=20)).")
    check_tree(hparams, "hparams", call)
    x = _detached(hparams)
    y0 = None
    if params0 is not None:
        check_tree(params0, "params0", call)
        y0 = _detached(params0)
    elif problem.init is None:
        raise ValueError(f"{call}: params0 is None and the problem has no init. Fix: pass params0 "
                         "(the inner start) or BilevelProblem(init=...).")
    a0 = None
    if adjoint0 is not None:
        check_tree(adjoint0, "adjoint0", call)
        a0 = tree_detach(adjoint0)
    if not per_task:
        _check_starts(problem, x, y0, a0, call)
    return x, y0, a0


def _detached(tree: Params) -> Params:
    """``tree`` without autograd history: a copy of the dict, leaves detached where they need it
    (a ``detach`` of a tensor that does not require grad would only add a dispatched call)."""
    return {k: v.detach() if v.requires_grad else v for k, v in tree.items()}


def _check_starts(problem, x, y0, a0, call):
    """``params0`` must match ``init(x)``, and ``adjoint0`` the inner parameters."""
    if y0 is not None and problem.init is not None:
        check_same_structure(y0, problem.start(x), "params0", "init(hparams)", call)
    if a0 is not None:
        like, what = (y0, "params0") if y0 is not None else (problem.start(x), "init(hparams)")
        check_same_structure(a0, like, "adjoint0", what, call)


def _check_value(estimate: Estimate, task_dim: bool = False) -> Estimate:
    """Record ``nonfinite_hypergradient`` where the value has a NaN/inf (per task with ``task_dim``:
    the leaves' leading dimension is the task and ``code`` holds one status per task).

    ``v * 0`` is 0 where ``v`` is finite and NaN where it is NaN/inf, so the sum of ``v * 0``
    over a task's entries is 0 exactly when all are finite: the leaves are flattened into one
    ``(tasks, entries)`` tensor and checked with three kernels (a ``torch.isfinite`` on these
    sizes costs ten times more on CPU), and the status is set with one ``where``.
    """
    values = list(estimate.value.values())
    if not values:
        return estimate
    if task_dim:
        flat = torch.cat([v.reshape(v.shape[0], -1) for v in values], 1) if len(values) > 1 else \
            values[0].reshape(values[0].shape[0], -1)
        bad = (flat * 0).sum(1) != 0
    else:
        bad = (torch.cat([v.reshape(-1) for v in values]) * 0).sum() != 0
    code = estimate.code
    return estimate._replace(code=torch.where(bad & (code == 0), RESULTS.nonfinite_hypergradient.code, code))


def _pack(estimate: Estimate, counts: Counts, started: float, problem: BilevelProblem,
          inner: AbstractInnerSolver, estimator: AbstractEstimator, throw: bool, task_dim: bool,
          compiled0: float = 0.0) -> Hypergrad:
    stats: dict[str, Any] = {
        "inner_steps": estimate.inner_steps,
        "linear_steps": estimate.linear_steps,
        "residual": estimate.residual,
        "num_grad": counts.num_grad,
        "num_hvp": counts.num_hvp,
        "wall_time_s": 0.0,
        "compile_s": _runner.compile_clock() - compiled0,  # bl.Compiled: seconds spent compiling
    }
    codes = _concrete(estimate.code)
    if codes is None:  # inside a user's vmap: statuses stay tensors, nothing is raised
        stats["wall_time_s"] = time.perf_counter() - started
        return Hypergrad(estimate.value, estimate.params, estimate.code, stats, estimate.outer_value,
                         estimate.adjoint)
    if not task_dim:
        for key in ("inner_steps", "linear_steps", "residual"):
            stats[key] = stats[key].item()
    codes = codes if task_dim else [codes]
    task_results = [_BY_CODE[c] if c in _BY_CODE else RESULTS.from_code(c) for c in codes]
    failing = [i for i, c in enumerate(codes) if c != 0] if any(codes) else []
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


#: Status by integer code, built once (``RESULTS.from_code`` walks the enum at every call).
_BY_CODE = {member.code: member for member in RESULTS}


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
