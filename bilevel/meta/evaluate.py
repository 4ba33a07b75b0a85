"""Evaluation: adapt on held-out tasks for a few step counts; MSE as mean ± 95% CI; the sinusoid figure."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .._tree import Params
from ._learner import AbstractMetaLearner
from .tasks import num_tasks, split


@dataclass(frozen=True)
class Evaluation:
    """Per-task query losses after adaptation.

    Attributes:
        steps: the inner step counts evaluated (``0`` is the start, before adaptation).
        losses: ``(len(steps), tasks)`` query losses, one row per step count.
    """

    steps: tuple[int, ...]
    losses: Tensor

    def mean(self, steps: int) -> float:
        return float(self.losses[self.steps.index(steps)].mean())

    def ci95(self, steps: int) -> float:
        """Half-width of the normal 95% confidence interval of the mean: 1.96 · std / √tasks."""
        row = self.losses[self.steps.index(steps)].double()
        return float(1.96 * row.std(unbiased=True) / math.sqrt(row.numel())) if row.numel() > 1 else float("nan")

    def cell(self, steps: int) -> str:
        return f"{self.mean(steps):.3f} ± {self.ci95(steps):.3f}"


def evaluate(learner: AbstractMetaLearner, hparams: Params, tasks: object,
             steps: tuple[int, ...] = (0, 1, 5, 10)) -> Evaluation:
    """Adapt to every task's support set for each step count in ``steps`` and record the query loss.

    Adaptation is :meth:`AbstractMetaLearner.adapt` with the learner's own inner solver and step
    size (MAML: plain gradient descent with the training :math:`\\alpha`; Meta-SGD: the learned
    step sizes), run for ``n`` steps from the start, for each ``n``. Use at least 600 tasks for
    the published protocol.

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.datasets import Sinusoid
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
        >>> maml = bl.meta.MAML(net)
        >>> ev = bl.meta.evaluate(maml, maml.init_hparams(), Sinusoid(shots=5, queries=100).sample(600, seed=1))
        >>> ev.losses.shape
        torch.Size([4, 600])
    """
    if not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in steps):
        raise ValueError(f"evaluate(steps={steps!r}): expected a non-empty tuple of step counts >= 0.")
    split(tasks, "evaluate(...)")
    with torch.no_grad():
        rows = [learner.losses(hparams, learner.adapt(hparams, tasks, steps=n), tasks).detach() for n in steps]
    return Evaluation(tuple(steps), torch.stack(rows))


def results_table(rows: dict[str, Evaluation], steps: tuple[int, ...] = (1, 5, 10),
                  notes: dict[str, str] | None = None) -> str:
    """A markdown table, one row per method: MSE (mean ± 95% CI) after each step count."""
    head = "| method | " + " | ".join(f"{n} step{'s' if n != 1 else ''}" for n in steps) + " |"
    if notes:
        head += " notes |"
    lines = [head, "|" + "---|" * (len(steps) + 1 + bool(notes))]
    for name, ev in rows.items():
        line = f"| {name} | " + " | ".join(ev.cell(n) for n in steps) + " |"
        if notes:
            line += f" {notes.get(name, '')} |"
        lines.append(line)
    return "\n".join(lines)


def sinusoid_figure(learner: AbstractMetaLearner, hparams: Params, tasks: object, path: str | os.PathLike,
                    steps: tuple[int, int] = (1, 10), panels: int = 3, title: str | None = None) -> None:
    """The classic MAML sinusoid figure as PNG: for the first ``panels`` tasks, the ground truth,
    the prediction before adaptation, after ``steps[0]`` and ``steps[1]`` steps, and the support points.

    ``tasks`` must carry the ground truth (a :class:`~bilevel.datasets.TaskBatch` from
    :class:`~bilevel.datasets.Sinusoid`).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..datasets import Sinusoid

    panels = min(panels, num_tasks(tasks))
    (sx, sy), _ = split(tasks, "sinusoid_figure(...)")
    grid = torch.linspace(-5.0, 5.0, 200, dtype=sx.dtype)[:, None]
    truth = Sinusoid.function(tasks, grid)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    with torch.no_grad():
        curves = {n: learner.predict(hparams, learner.adapt(hparams, tasks, steps=n), grid) for n in (0, *steps)}
    styles = {0: ("pre-update", ":", "tab:green"), steps[0]: (f"{steps[0]} grad step", "--", "tab:blue"),
              steps[1]: (f"{steps[1]} grad steps", "-.", "tab:purple")}
    for t, ax in enumerate(axes[0]):
        ax.plot(grid[:, 0], truth[t, :, 0], color="tab:red", lw=2, label="ground truth")
        for n, (label, style, color) in styles.items():
            ax.plot(grid[:, 0], curves[n][t, :, 0], style, color=color, lw=1.6, label=label)
        ax.scatter(sx[t, :, 0], sy[t, :, 0], marker="^", color="k", zorder=5, label="used for grad")
        ax.set_xlim(-5, 5)
        ax.set_xlabel("x")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title or f"{type(learner).__name__}: {sx.shape[1]}-shot sinusoid regression")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)
