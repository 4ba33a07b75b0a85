r"""Small meta-learning problems on sinusoid tasks, and the timed outer loop of studies 1 and 2.

Models are plain functions of parameter dicts (no ``nn.Module``), so a task's inner problem is
a :class:`bilevel.BilevelProblem` with a learned start ``init(x)``:

* ANIL (:func:`anil_problem`): a shared body :math:`\phi` (1-40-40-m, tanh, features scaled by
  :math:`1/\sqrt m` so that :math:`\|h\| \le 1`) and a head :math:`u` adapted in the inner loop from
  the meta-learned start ``x["head.*"]``. The *linear* head with an L2 penalty
  :math:`\frac\gamma2\|u\|^2` is strongly convex in :math:`u`; the *two-layer* head (m-r-1, tanh)
  is nonconvex.
* MAML (:func:`maml_problem`): a 1-40-40-1 ReLU network whose every weight is adapted from
  ``init(x) = x``.

:func:`train` runs meta-gradient steps (one :func:`bilevel.vmap_hypergrad` per step, ITD by
default) on fresh task batches and records the meta-objective on a fixed set of evaluation
tasks, with the evaluation kept out of the clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import RESULTS, BilevelProblem, FirstOrder, GradientDescent, ITD, vmap_hypergrad
from .._tree import Params
from ..datasets import Sinusoid

HIDDEN = 40


def _linear(gen: torch.Generator, fan_in: int, fan_out: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    bound = 1.0 / math.sqrt(fan_in)
    w = (torch.rand(fan_in, fan_out, generator=gen, dtype=dtype) * 2 - 1) * bound
    return w, torch.zeros(fan_out, dtype=dtype)


def init_anil(head: str, features: int, head_hidden: int, seed: int, dtype=torch.float32) -> Params:
    """Meta-parameters ``body.*`` (shared) and ``head.*`` (the inner start) of an ANIL learner."""
    gen = torch.Generator().manual_seed(seed)
    x: Params = {}
    for i, (a, b) in enumerate(((1, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, features))):
        x[f"body.w{i}"], x[f"body.b{i}"] = _linear(gen, a, b, dtype)
    if head == "linear":
        x["head.w"], x["head.b"] = torch.zeros(features, dtype=dtype), torch.zeros((), dtype=dtype)
    else:
        x["head.w1"], x["head.b1"] = _linear(gen, features, head_hidden, dtype)
        w2, _ = _linear(gen, head_hidden, 1, dtype)
        x["head.w2"], x["head.b2"] = w2[:, 0], torch.zeros((), dtype=dtype)
    return x


def _features(x: Params, inputs: Tensor) -> Tensor:
    h = inputs
    for i in range(3):
        h = torch.tanh(h @ x[f"body.w{i}"] + x[f"body.b{i}"])
    return h / math.sqrt(h.shape[-1])


def _head(u: Params, h: Tensor) -> Tensor:
    if "w" in u:
        return h @ u["w"] + u["b"]
    return torch.tanh(h @ u["w1"] + u["b1"]) @ u["w2"] + u["b2"]


def anil_problem(gamma: float) -> BilevelProblem:
    """ANIL: inner = support MSE of the head (+ gamma/2 ||u||^2 for the linear head), outer = query MSE."""
    def inner(x: Params, u: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        loss = ((_head(u, _features(x, inputs)) - targets[..., 0]) ** 2).mean()
        if "w" in u:
            loss = loss + 0.5 * gamma * ((u["w"] ** 2).sum() + u["b"] ** 2)
        return loss

    def outer(x: Params, u: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return ((_head(u, _features(x, inputs)) - targets[..., 0]) ** 2).mean()

    def init(x: Params) -> Params:
        return {k[5:]: v for k, v in x.items() if k.startswith("head.")}
    return BilevelProblem(inner=inner, outer=outer, init=init)


def init_maml(seed: int, dtype=torch.float32) -> Params:
    gen = torch.Generator().manual_seed(seed)
    x: Params = {}
    for i, (a, b) in enumerate(((1, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 1))):
        x[f"w{i}"], x[f"b{i}"] = _linear(gen, a, b, dtype)
    return x


def _mlp(y: Params, inputs: Tensor) -> Tensor:
    h = torch.relu(inputs @ y["w0"] + y["b0"])
    h = torch.relu(h @ y["w1"] + y["b1"])
    return h @ y["w2"] + y["b2"]


def maml_problem() -> BilevelProblem:
    """MAML: every weight adapted from ``init(x) = x``; support MSE inside, query MSE outside."""
    def loss(x: Params, y: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        return ((_mlp(y, batch[0]) - batch[1]) ** 2).mean()
    return BilevelProblem(inner=loss, outer=loss, init=lambda x: dict(x))


def rf_problem(features: int, seed: int, dtype=torch.float32) -> BilevelProblem:
    r"""MAML on a linear model over fixed random Fourier features
    :math:`\phi(x) = \sqrt{2/m}\cos(\omega x + b)`: every task's loss is quadratic in the weights, so
    the meta-objective is a convex quadratic and SGD reaches its noise floor within a few hundred steps."""
    gen = torch.Generator().manual_seed(seed + 17)
    omega = torch.randn(features, generator=gen, dtype=dtype)
    phase = torch.rand(features, generator=gen, dtype=dtype) * 2 * math.pi

    def loss(x: Params, y: Params, batch: tuple[Tensor, Tensor]) -> Tensor:
        feats = math.sqrt(2.0 / features) * torch.cos(batch[0] * omega + phase)
        return ((feats @ y["w"] - batch[1][..., 0]) ** 2).mean()
    return BilevelProblem(inner=loss, outer=loss, init=lambda x: dict(x))


def init_rf(features: int, dtype=torch.float32) -> Params:
    return {"w": torch.zeros(features, dtype=dtype)}


def meta_loss(problem: BilevelProblem, x: Params, tasks, lr: float, steps: int) -> float:
    """Mean query loss after ``steps`` inner GD steps of size ``lr`` (the N-step meta-objective)."""
    hg = vmap_hypergrad(problem, x, None, inner=GradientDescent(lr=lr, steps=steps), estimator=FirstOrder(),
                        inner_batch=(tasks.support_x, tasks.support_y),
                        outer_batch=(tasks.query_x, tasks.query_y), in_dims=(None, None, 0, 0), throw=False)
    return hg.outer_value.mean().item()


def train(problem: BilevelProblem, x0: Params, *, lr: float, steps: int, outer_steps: int, meta_batch: int,
          outer_lr: float, optimizer: str, family: Sinusoid, eval_tasks, eval_every: int, seed: int,
          record: Callable[[dict[str, Any]], None], estimator=None) -> None:
    """Meta-train from ``x0``; call ``record(point)`` at step 0 and every ``eval_every`` steps.

    A point holds ``step``, ``time_s`` and ``cpu_s`` (wall-clock and process CPU seconds of the
    meta-gradient steps so far; evaluation excluded),
    ``meta_loss`` on ``eval_tasks``, ``train_loss`` (the last batch's query loss), ``failed_tasks``
    (tasks of the last batch whose inner solve reported a failure, e.g. a growing inner loss) and ``status``.
    A non-finite meta-gradient or evaluation ends the run with ``status='diverged'``.
    """
    x = {k: v.detach().clone() for k, v in x0.items()}
    params = list(x.values())
    opt = (torch.optim.Adam(params, lr=outer_lr) if optimizer == "adam" else torch.optim.SGD(params, lr=outer_lr))
    gen = torch.Generator().manual_seed(seed)
    inner = GradientDescent(lr=lr, steps=steps)
    estimator = ITD() if estimator is None else estimator
    elapsed, cpu, train_loss, failed = 0.0, 0.0, float("nan"), 0
    for step in range(outer_steps + 1):
        if step % eval_every == 0 or step == outer_steps:
            value = meta_loss(problem, x, eval_tasks, lr, steps)
            ok = math.isfinite(value) and (step == 0 or math.isfinite(train_loss))
            record(dict(step=step, time_s=elapsed, cpu_s=cpu, meta_loss=value, train_loss=train_loss,
                        failed_tasks=failed, status="ok" if ok else "diverged"))
            if not ok:
                return
        if step == outer_steps:
            return
        tasks = family.sample(meta_batch, gen)
        t0, c0 = time.perf_counter(), time.process_time()
        hg = vmap_hypergrad(problem, x, None, inner=inner, estimator=estimator,
                            inner_batch=(tasks.support_x, tasks.support_y),
                            outer_batch=(tasks.query_x, tasks.query_y), in_dims=(None, None, 0, 0), throw=False)
        for key, value in x.items():
            value.grad = hg.value[key].mean(0)
        opt.step()
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        train_loss = hg.outer_value.mean().item()
        failed = sum(r is not RESULTS.successful for r in hg.task_results)
