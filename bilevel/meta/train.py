"""Meta-training: an outer optimizer over meta-batches, validation, atomic checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._tree import Params
from ._learner import AbstractMetaLearner, MetaGradient
from .checkpoint import FORMAT, CheckpointError, describe, load_checkpoint, save_checkpoint, write_metrics
from .tasks import check_meta_batch

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


@dataclass
class TrainResult:
    """What :meth:`Trainer.run` produced.

    Attributes:
        hparams: the final meta-parameters.
        iteration: meta-steps done in all (resumed runs included).
        history: one row per validation: ``iteration``, ``elapsed_s``, ``train_loss`` (mean query
            loss of the meta-batches since the last row), ``val_loss`` (mean query loss of the
            validation tasks after adaptation) and ``dropped_tasks`` (failed tasks left out since
            the last row; always 0 with ``on_failure="raise"``).
        elapsed_s: training time in all, resumed segments included.
        stopped: ``"iterations"``, ``"minutes"`` (time budget) or ``"done"`` (nothing left to do).
    """

    hparams: Params
    iteration: int
    history: list[dict[str, float]] = field(default_factory=list)
    elapsed_s: float = 0.0
    stopped: str = "iterations"


@dataclass(frozen=True)
class Trainer:
    r"""Meta-train a learner: ``iterations`` outer steps on meta-batches of ``meta_batch`` tasks.

    Each step draws a meta-batch from ``family.sample(meta_batch, generator)``, computes the
    learner's vmapped meta-gradient and takes one step of the outer optimizer. Every
    ``val_every`` steps the mean query loss after adaptation on ``val_tasks`` fixed tasks is
    recorded (and written to ``metrics.csv``); every ``checkpoint_every`` steps, and at the end,
    a checkpoint is written atomically (temporary file, then rename: a failed write leaves the
    previous checkpoint intact). A run given an ``out`` folder that holds a checkpoint resumes
    from it — meta-parameters, optimizer state, the task generator's state, iteration, history —
    so a killed and resumed run ends with exactly the parameters of an uninterrupted one with the
    same seed. Estimators with an integer ``seed`` field (:class:`~bilevel.ESJ`) are re-seeded
    with ``seed + iteration`` at every step: fresh directions, reproducible on resume.

    Args:
        iterations: meta-steps in all (default 70 000, MAML's sinusoid budget).
        minutes: optional training-time budget in minutes (resumed segments count); the run stops
            at whichever of ``iterations`` and ``minutes`` comes first.
        meta_batch: tasks per meta-step (default 25).
        outer_lr: the outer step size (default 1e-3).
        optimizer: ``"adam"`` (default) or ``"sgd"``.
        seed: seeds the task generator (validation tasks use ``seed + 1_000_003``).
        val_every, val_tasks: validation period and size (defaults 1000 and 100).
        checkpoint_every: checkpoint period (default 1000).
        progress: show a tqdm progress bar (default ``True``).
        on_failure: ``"raise"`` (default): a task whose hypergradient fails (say, a diverging
            inner loop) stops training with the :class:`~bilevel.BilevelError`; ``"drop"``: such
            tasks are left out of that step's mean (a step whose tasks all fail is skipped) and
            counted in the ``dropped_tasks`` column — never silently.

    Example:
        >>> import torch, bilevel as bl, tempfile
        >>> from bilevel.datasets import Sinusoid
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
        >>> trainer = bl.meta.Trainer(iterations=20, meta_batch=5, val_every=10, checkpoint_every=10, progress=False)
        >>> out = trainer.run(bl.meta.MAML(net), Sinusoid(shots=10), tempfile.mkdtemp())
        >>> out.iteration, len(out.history)
        (20, 2)
    """

    iterations: int = 70_000
    minutes: float | None = None
    meta_batch: int = 25
    outer_lr: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    val_every: int = 1000
    val_tasks: int = 100
    checkpoint_every: int = 1000
    progress: bool = True
    on_failure: str = "raise"

    def __post_init__(self) -> None:
        check_meta_batch(self.meta_batch, "Trainer")
        for name in ("iterations", "val_every", "val_tasks", "checkpoint_every", "seed"):
            value, low = getattr(self, name), 0 if name in ("iterations", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Trainer({name}={value!r}): expected an int >= {low}.")
        if self.minutes is not None and not (self.minutes > 0):
            raise ValueError(f"Trainer(minutes={self.minutes!r}): the time budget must be positive (or None).")
        if not (self.outer_lr > 0):
            raise ValueError(f"Trainer(outer_lr={self.outer_lr!r}): the outer step size must be positive.")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"Trainer(optimizer={self.optimizer!r}): expected 'adam' or 'sgd'.")
        if self.on_failure not in ("raise", "drop"):
            raise ValueError(f"Trainer(on_failure={self.on_failure!r}): expected 'raise' or 'drop'.")

    def config(self, learner: AbstractMetaLearner, family: object) -> dict[str, Any]:
        """What a checkpoint must match to be resumed (budgets and periods may change)."""
        return {"format": FORMAT, "learner": describe(learner), "family": describe(family),
                "meta_batch": self.meta_batch, "outer_lr": self.outer_lr, "optimizer": self.optimizer,
                "seed": self.seed, "val_every": self.val_every, "val_tasks": self.val_tasks,
                "on_failure": self.on_failure}

    def run(self, learner: AbstractMetaLearner, family: object, out: str | os.PathLike | None = None, *,
            hparams: Params | None = None, resume: bool = True,
            callback: Callable[[int, Params, MetaGradient], None] | None = None) -> TrainResult:
        """Meta-train ``learner`` on tasks from ``family`` (anything with ``sample(n, generator)``).

        Args:
            out: folder for ``checkpoint.pt`` and ``metrics.csv``; ``None`` writes nothing.
            hparams: the start (default ``learner.init_hparams()``); ignored when resuming.
            resume: continue from ``out/checkpoint.pt`` when it exists (default ``True``).
            callback: ``callback(iteration, hparams, meta_gradient)`` after every step.
        """
        config = self.config(learner, family)
        x = {k: v.detach().clone() for k, v in (hparams or learner.init_hparams()).items()}
        opt = (torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD)(list(x.values()), lr=self.outer_lr)
        gen = torch.Generator().manual_seed(self.seed)
        folder = None if out is None else Path(out)
        result = TrainResult(hparams=x, iteration=0)
        if folder is not None and resume and (folder / CHECKPOINT).exists():
            _restore(load_checkpoint(folder / CHECKPOINT, config), x, opt, gen, result)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        val = family.sample(self.val_tasks, self.seed + 1_000_003)  # type: ignore[attr-defined]
        reseed = isinstance(getattr(learner.estimator, "seed", None), int)
        deadline = math.inf if self.minutes is None else 60.0 * self.minutes
        begun, losses, dropped = time.perf_counter() - result.elapsed_s, [], 0
        result.stopped = "done" if result.iteration >= self.iterations or result.elapsed_s >= deadline else "iterations"
        bar = tqdm(total=self.iterations, initial=result.iteration, disable=not self.progress, mininterval=1.0,
                   desc=f"meta-train {type(learner).__name__}")
        while result.stopped != "done" and result.iteration < self.iterations:
            estimator = (dataclasses.replace(learner.estimator, seed=learner.estimator.seed + result.iteration)
                         if reseed else None)
            mg = learner.meta_gradient(x, family.sample(self.meta_batch, gen), estimator=estimator,  # type: ignore
                                       throw=self.on_failure == "raise")
            value, loss, failed = _kept(mg)
            dropped += failed
            if value is not None:
                for key, param in x.items():
                    param.grad = value[key].detach()
                opt.step()
                losses.append(loss)
            result.iteration += 1
            result.elapsed_s = time.perf_counter() - begun
            timed_out = result.elapsed_s >= deadline
            last = timed_out or result.iteration == self.iterations
            if result.iteration % self.val_every == 0 or last:
                result.history.append({"iteration": result.iteration, "elapsed_s": round(result.elapsed_s, 3),
                                       "train_loss": sum(losses) / len(losses) if losses else math.nan,
                                       "val_loss": validation_loss(learner, x, val), "dropped_tasks": dropped})
                losses, dropped = [], 0
                bar.set_postfix(train=f"{result.history[-1]['train_loss']:.3f}",
                                val=f"{result.history[-1]['val_loss']:.3f}")
                if folder is not None:
                    write_metrics(folder / METRICS, result.history)
            if folder is not None and (result.iteration % self.checkpoint_every == 0 or last):
                save_checkpoint(folder / CHECKPOINT, _state(config, x, opt, gen, result))
            bar.update(1)
            if callback is not None:
                callback(result.iteration, x, mg)
            if timed_out:
                result.stopped = "minutes"
                break
        bar.close()
        return result


def _kept(mg: MetaGradient) -> tuple[Params | None, float, int]:
    """The meta-gradient and loss over the tasks that succeeded, and how many failed."""
    results = mg.hypergrad.task_results or []
    ok = torch.tensor([r.code == 0 for r in results], dtype=torch.bool)
    failed = int((~ok).sum()) if results else 0
    if failed == 0:
        return mg.value, float(mg.loss), 0
    if failed == len(results):
        return None, math.nan, failed
    value = {k: v[ok].mean(0) for k, v in mg.hypergrad.value.items()}
    return value, float(mg.hypergrad.outer_value[ok].mean()), failed


def validation_loss(learner: AbstractMetaLearner, hparams: Params, tasks: object) -> float:
    """Mean query loss of ``tasks`` after adapting with the learner's inner solver."""
    return float(learner.losses(hparams, learner.adapt(hparams, tasks), tasks).mean())


def _state(config: dict, x: Params, opt: torch.optim.Optimizer, gen: torch.Generator,
           result: TrainResult) -> dict[str, Any]:
    return {"config": config, "iteration": result.iteration, "elapsed_s": result.elapsed_s,
            "hparams": {k: v.detach().clone() for k, v in x.items()}, "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "history": [dict(r) for r in result.history]}


def _restore(state: dict[str, Any], x: Params, opt: torch.optim.Optimizer, gen: torch.Generator,
             result: TrainResult) -> None:
    saved = state["hparams"]
    if set(saved) != set(x) or any(saved[k].shape != x[k].shape for k in x):
        raise CheckpointError("Trainer.run: the checkpoint's meta-parameters do not match the learner's "
                              f"({sorted(saved)} vs {sorted(x)}). Fix: resume with the same model, or use a new out folder.")
    with torch.no_grad():
        for k, v in x.items():
            v.copy_(saved[k])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    result.iteration, result.elapsed_s = int(state["iteration"]), float(state["elapsed_s"])
    result.history = [dict(r) for r in state["history"]]
