"""Task batching: a meta-batch is a stack of tasks, each with a support and a query set.

Every meta-learner takes the meta-batch as one object with ``support_x, support_y, query_x,
query_y`` tensors whose leading dimension is the task (a
:class:`~bilevel.datasets.TaskBatch`, an :class:`~bilevel.datasets.Episodes`, a :class:`Tasks`,
or any object with those attributes), and maps over that dimension with one ``torch.func.vmap``.
:class:`TaskPool` draws such meta-batches from a fixed data set of tasks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..datasets.sinusoid import _generator

Pair = tuple[Tensor, Tensor]


class Tasks(NamedTuple):
    """A meta-batch of ``T`` tasks: support ``(T, K, ...)`` and query ``(T, Q, ...)`` inputs and targets."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


def split(tasks: object, call: str = "meta-learner") -> tuple[Pair, Pair]:
    """``((support_x, support_y), (query_x, query_y))`` of a meta-batch, checked.

    Raises a clear error when an attribute is missing, the meta-batch is empty, a task has no
    support or no query point, or the tensors disagree on the number of tasks or of points.
    """
    names = ("support_x", "support_y", "query_x", "query_y")
    missing = [n for n in names if not isinstance(getattr(tasks, n, None), Tensor)]
    if missing:
        raise TypeError(f"{call}: the tasks ({type(tasks).__name__}) lack the tensors {missing}. Fix: pass a "
                        "meta-batch with support_x, support_y, query_x, query_y, e.g. Sinusoid(...).sample(25, gen) "
                        "or bl.meta.Tasks(support_x, support_y, query_x, query_y).")
    sx, sy, qx, qy = (getattr(tasks, n) for n in names)
    if any(t.dim() < 2 for t in (sx, sy, qx, qy)):
        raise ValueError(f"{call}: every task tensor needs a leading task dimension and a point dimension; "
                         f"got shapes {[tuple(t.shape) for t in (sx, sy, qx, qy)]}.")
    count = sx.shape[0]
    if count < 1:
        raise ValueError(f"{call}: the meta-batch holds 0 tasks. Fix: use a meta-batch size >= 1.")
    if any(t.shape[0] != count for t in (sy, qx, qy)):
        raise ValueError(f"{call}: the task tensors disagree on the number of tasks: "
                         f"{[t.shape[0] for t in (sx, sy, qx, qy)]}.")
    if sx.shape[1] < 1 or qx.shape[1] < 1:
        raise ValueError(f"{call}: every task needs at least one support and one query point; got "
                         f"{sx.shape[1]} support and {qx.shape[1]} query points (shapes {tuple(sx.shape)} and "
                         f"{tuple(qx.shape)}). Fix: sample the tasks with shots >= 1 and queries >= 1.")
    if sx.shape[1] != sy.shape[1] or qx.shape[1] != qy.shape[1]:
        raise ValueError(f"{call}: inputs and targets disagree on the number of points: support "
                         f"{sx.shape[1]} vs {sy.shape[1]}, query {qx.shape[1]} vs {qy.shape[1]}.")
    return (sx, sy), (qx, qy)


def support_of(tasks: object, call: str) -> Pair:
    """The support pair of a meta-batch, or ``tasks`` itself when it is a plain ``(x, y)`` pair."""
    if isinstance(tasks, tuple) and not hasattr(tasks, "support_x") and len(tasks) == 2:
        return tasks  # type: ignore[return-value]
    return split(tasks, call)[0]


def num_tasks(tasks: object) -> int:
    return split(tasks)[0][0].shape[0]


def check_meta_batch(meta_batch: object, call: str) -> int:
    if isinstance(meta_batch, bool) or not isinstance(meta_batch, int) or meta_batch < 1:
        raise ValueError(f"{call}(meta_batch={meta_batch!r}): the meta-batch size must be an int >= 1 "
                         "(tasks per meta-gradient). Fix: pass e.g. meta_batch=25.")
    return meta_batch


class TaskPool:
    """Meta-batches drawn from a fixed set of tasks, each holding ``P`` labelled points.

    Each draw picks ``num_tasks`` tasks uniformly with replacement and, inside each task,
    ``shots + queries`` distinct points uniformly: the first ``shots`` form the support set,
    the rest the query set.

    Args:
        x: inputs ``(num_pool_tasks, P, ...)``.
        y: targets ``(num_pool_tasks, P, ...)``.
        shots: support points per task :math:`K \\ge 1`.
        queries: query points per task :math:`Q \\ge 1`; ``None`` means ``P - shots`` (all the rest).

    Example:
        >>> import torch
        >>> from bilevel.meta import TaskPool
        >>> x = torch.randn(50, 20, 3); y = x.sum(-1, keepdim=True)
        >>> pool = TaskPool(x, y, shots=5, queries=15)
        >>> batch = pool.sample(8, seed=0)
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([8, 5, 3]), torch.Size([8, 15, 1]))
    """

    def __init__(self, x: Tensor, y: Tensor, shots: int, queries: int | None = None) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() < 2 or y.dim() < 2:
            raise ValueError("TaskPool(x, y): expected tensors shaped (tasks, points, ...).")
        if x.shape[:2] != y.shape[:2]:
            raise ValueError(f"TaskPool(x, y): x has {tuple(x.shape[:2])} (tasks, points) but y has "
                             f"{tuple(y.shape[:2])}. Fix: give every input its target.")
        points = x.shape[1]
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise ValueError(f"TaskPool(shots={shots!r}): expected an int >= 1.")
        queries = points - shots if queries is None else queries
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1 or shots + queries > points:
            raise ValueError(f"TaskPool(shots={shots}, queries={queries}): each task holds only {points} points, "
                             f"so shots + queries must be at most {points} with queries >= 1. Fix: lower shots "
                             f"(at most {points - 1}) or queries.")
        self.x, self.y, self.shots, self.queries = x, y, shots, queries

    def __repr__(self) -> str:
        return f"TaskPool(tasks={self.x.shape[0]}, points={self.x.shape[1]}, shots={self.shots}, queries={self.queries})"

    def sample(self, num_tasks: int, seed: int | torch.Generator) -> Tasks:
        """Draw ``num_tasks`` tasks (an ``int`` seed gives a fixed set, a generator a fresh one)."""
        check_meta_batch(num_tasks, "TaskPool.sample")
        gen = _generator(seed, "TaskPool.sample")
        pool, points = self.x.shape[:2]
        which = torch.randint(pool, (num_tasks,), generator=gen)
        order = torch.rand(num_tasks, points, generator=gen).argsort(dim=1)[:, :self.shots + self.queries]
        rows = which[:, None].expand_as(order)
        x, y = self.x[rows, order], self.y[rows, order]
        k = self.shots
        return Tasks(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
