"""An outer loop for users: T hypergradient steps with warm starts and a history."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._hypergrad import hypergrad
from ._problem import BilevelProblem, check_tree
from ._result import RESULTS
from ._tree import Batch, Params, tree_norm
from .estimators._base import AbstractEstimator
from .inner._base import AbstractInnerSolver

OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


@dataclass
class SolverResult:
    """What :meth:`BilevelSolver.run` produced.

    Attributes:
        hparams: the final hyperparameters (new tensors; the caller's are untouched).
        params: the last inner solution.
        history: one dict per outer step: ``step``, ``outer_value`` (``f`` at the
            inner solution, before the update), ``hypergrad_norm``, ``result``
            (status name) and every key of ``Hypergrad.stats``.
    """

    hparams: Params
    params: Params
    history: list[dict[str, Any]] = field(default_factory=list)

    def column(self, key: str) -> list[Any]:
        """One history column, e.g. ``result.column("outer_value")``."""
        return [row[key] for row in self.history]


@dataclass(frozen=True)
class BilevelSolver:
    r"""Minimise :math:`\Phi(x) = f(x, y(x))` by ``steps`` hypergradient steps.

    Each outer step calls :func:`bilevel.hypergrad`, feeds the estimate to a
    ``torch.optim`` optimizer (or plain gradient descent with step ``lr``) and
    records the outer objective, the hypergradient norm and the solve's stats.
    With ``warm_start=True`` the next inner solve starts at the previous inner
    solution (when the start is not learned, i.e. the problem has no ``init``)
    and the next linear solve (AID, IMAML) starts at the previous adjoint —
    the warm starts of AID-BiO (Ji, Yang, Liang, ICML 2021).

    Args:
        problem, inner, estimator: as in :func:`bilevel.hypergrad`.
        optimizer: ``factory(list_of_tensors) -> torch.optim.Optimizer``, e.g.
            ``lambda p: torch.optim.Adam(p, lr=1e-2)``; ``None`` for plain steps of size ``lr``.
        lr: the outer step size when ``optimizer`` is ``None``.
        warm_start: reuse the previous inner solution and adjoint (default ``True``).

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.testing import ridge_problem
        >>> r = ridge_problem(n_samples=100, dim=5, seed=0)
        >>> solver = bl.BilevelSolver(r.problem, inner=bl.GradientDescent(lr=0.2, steps=100),
        ...                           estimator=bl.AID(), optimizer=lambda p: torch.optim.Adam(p, lr=0.1))
        >>> out = solver.run(r.hparams(), r.params0(), steps=20, inner_batch=r.train, outer_batch=r.val)
        >>> out.history[-1]["outer_value"] < out.history[0]["outer_value"]
        True
    """

    problem: BilevelProblem
    inner: AbstractInnerSolver
    estimator: AbstractEstimator
    optimizer: OptimizerFactory | None = None
    lr: float = 0.1
    warm_start: bool = True

    def __post_init__(self) -> None:
        if self.optimizer is None and not (self.lr > 0):
            raise ValueError(f"BilevelSolver(lr={self.lr!r}): the outer step size must be positive.")
        if self.optimizer is not None and not callable(self.optimizer):
            raise TypeError(f"BilevelSolver(optimizer={self.optimizer!r}): expected a factory "
                            "lambda params: torch.optim.Adam(params, lr=...), or None.")

    def run(self, hparams: Params, params0: Params | None = None, *, steps: int,
            inner_batch: Batch = None, outer_batch: Batch = None,
            batches: Callable[[int], tuple[Batch, Batch]] | None = None, throw: bool = True,
            progress: bool = False, callback: Callable[[int, Params, Any], None] | None = None) -> SolverResult:
        """Run ``steps`` outer steps from ``hparams``.

        Args:
            hparams, params0: the start (copied; never modified).
            steps: number of outer steps.
            inner_batch, outer_batch: fixed batches (or :class:`~bilevel.Sampler`).
            batches: optional ``batches(step) -> (inner_batch, outer_batch)`` for data that
                changes with the outer step; overrides the fixed batches.
            throw: raise on a failed hypergradient (default) or record its status and go on.
            progress: show a tqdm progress bar.
            callback: ``callback(step, hparams, hypergrad)`` after each step.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"BilevelSolver.run(steps={steps!r}): steps must be a non-negative integer.")
        check_tree(hparams, "hparams", "BilevelSolver.run(...)")
        x = {k: v.detach().clone() for k, v in hparams.items()}
        opt = (self.optimizer or (lambda p: torch.optim.SGD(p, lr=self.lr)))(list(x.values()))
        y, adjoint = params0, None
        result = SolverResult(hparams=x, params=params0 or {})
        bar = _progress(steps, progress)
        for step in range(steps):
            bi, bo = batches(step) if batches is not None else (inner_batch, outer_batch)
            hg = hypergrad(self.problem, x, y, inner=self.inner, estimator=self.estimator, inner_batch=bi,
                           outer_batch=bo, throw=throw, adjoint0=adjoint)
            for key, value in x.items():
                value.grad = hg.value[key].detach().clone()
            opt.step()
            if self.warm_start:
                y = hg.params if self.problem.init is None else y
                adjoint = hg.adjoint
            row = {"step": step, "outer_value": float(hg.outer_value),
                   "hypergrad_norm": float(tree_norm(hg.value)),
                   "result": hg.result.name if isinstance(hg.result, RESULTS) else str(hg.result), **hg.stats}
            result.history.append(row)
            result.params = hg.params
            if bar is not None:
                bar.update(1)
                bar.set_postfix(outer=f"{row['outer_value']:.4g}", grad=f"{row['hypergrad_norm']:.2g}")
            if callback is not None:
                callback(step, x, hg)
        if bar is not None:
            bar.close()
        for value in x.values():
            value.grad = None
        return result


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="outer steps", unit="step")
