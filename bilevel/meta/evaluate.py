"""Evaluation: adapt on held-out tasks for a few step counts; MSE as mean ± 95% CI; the sinusoid figure."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from .._tree import Params
from ._learner import AbstractMetaLearner
from .tasks import num_tasks, split, support_of

#: Relative round-off allowed before a rise of the support loss counts as divergence.
GROWTH_RTOL = 1e-6


@dataclass(frozen=True)
class Evaluation:
    r"""Per-task query losses after adaptation, and the support losses along the way, with
    statistics that stay finite.

    A task has **diverged** after :math:`n` steps when its query loss is not finite, or when the
    support (inner) loss it descends was not finite or had *risen* above its start after some
    :math:`m \le n` steps, :math:`\ell_S(y_m) > \ell_S(y_0)\,(1 + 10^{-6})`. Gradient descent of
    step :math:`\alpha` on an :math:`L`-smooth loss never raises the loss when
    :math:`\alpha < 2/L`, so a rise means the step was too large for that task's curvature (MAML's
    meta-learned sinusoid start has support-loss Hessians with :math:`\lambda_{\max}` of 250-620 on
    5-point tasks, above :math:`2/\alpha = 200`). :meth:`mean` and :meth:`ci95` are over the
    other tasks, :meth:`num_diverged` counts the diverged ones and :meth:`median` is over all tasks
    (a non-finite loss counts as :math:`+\infty`).

    Attributes:
        steps: the inner step counts evaluated (``0`` is the start, before adaptation).
        losses: ``(len(steps), tasks)`` query losses, one row per step count.
        support_path: ``(max(steps) + 1, tasks)`` support (inner) losses after ``0, 1, ...,
            max(steps)`` steps, or ``None`` (then only non-finite query losses count as diverged).
    """

    steps: tuple[int, ...]
    losses: Tensor
    support_path: Tensor | None = None

    def _row(self, steps: int) -> int:
        if steps not in self.steps:
            raise ValueError(f"Evaluation: {steps} steps were not evaluated (evaluated: {self.steps}). "
                             f"Fix: pass steps=(..., {steps}) to bl.meta.evaluate.")
        return self.steps.index(steps)

    def diverged(self, steps: int) -> Tensor:
        """``(tasks,)`` booleans: which tasks diverged within ``steps`` steps (see the class)."""
        bad = ~torch.isfinite(self.losses[self._row(steps)])
        if self.support_path is not None:
            path, start = self.support_path[:steps + 1], self.support_path[0]
            rose = path > start + GROWTH_RTOL * (1 + start.abs())
            bad |= (~torch.isfinite(path) | (torch.isfinite(start) & rose)).any(0)
        return bad

    def num_diverged(self, steps: int) -> int:
        return int(self.diverged(steps).sum())

    def kept(self, steps: int) -> Tensor:
        """The query losses of the tasks that did not diverge (float64)."""
        return self.losses[self._row(steps)].double()[~self.diverged(steps)]

    def mean(self, steps: int) -> float:
        """Mean query loss over the tasks that did not diverge (``nan`` only if all did)."""
        row = self.kept(steps)
        return float(row.mean()) if row.numel() else math.nan

    def ci95(self, steps: int) -> float:
        """Half-width of the normal 95% confidence interval of :meth:`mean`: 1.96 · std / √kept tasks."""
        row = self.kept(steps)
        return float(1.96 * row.std(unbiased=True) / math.sqrt(row.numel())) if row.numel() > 1 else math.nan

    def median(self, steps: int) -> float:
        """Median query loss over all tasks, a non-finite loss counting as ``+inf``."""
        row = self.losses[self._row(steps)].double()
        return float(torch.where(torch.isnan(row), math.inf, row).median())

    def cell(self, steps: int) -> str:
        """``"mean ± ci95"``, with ``" (k diverged)"`` when tasks diverged; never ``nan ± nan``."""
        total, bad = self.losses.shape[1], self.num_diverged(steps)
        if bad == total:
            return f"all {total} diverged"
        text = f"{self.mean(steps):.3f}" + (f" ± {self.ci95(steps):.3f}" if total - bad > 1 else " (1 task)")
        return text + (f" ({bad} diverged)" if bad else "")

    def summary(self, steps: int) -> dict[str, float | int]:
        """The statistics of one step count, for JSON: mean, ci95, median, diverged, tasks."""
        out = {"mean": self.mean(steps), "ci95": self.ci95(steps), "median": self.median(steps)}
        out = {k: (v if math.isfinite(v) else None) for k, v in out.items()}  # JSON has no nan / inf
        return {**out, "diverged": self.num_diverged(steps), "tasks": int(self.losses.shape[1])}


def evaluate(learner: AbstractMetaLearner, hparams: Params, tasks: object,
             steps: tuple[int, ...] = (0, 1, 5, 10)) -> Evaluation:
    """Adapt to every task's support set for each step count in ``steps``; record the query loss
    and the support (inner) loss of every task.

    Adaptation is :meth:`AbstractMetaLearner.adapt` with the learner's own inner solver and step
    size (MAML: plain gradient descent with the training :math:`\\alpha`; Meta-SGD: the learned
    step sizes), run afresh for ``n`` steps from the start, for each ``n``. Use at least 600 tasks
    for the published protocol. The support loss is recorded after every step count up to
    ``max(steps)``; tasks whose adaptation diverges are counted, not averaged in (see
    :class:`Evaluation`).

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
    support = support_of(tasks, "evaluate(...)")

    def support_loss(params: Params) -> Tensor:
        return vmap(lambda p, s: learner._inner_objective(hparams, p, s))(params, support).detach()

    # Each count adapts afresh from the start (nothing is carried between counts), so the path
    # of support losses is exact for every inner solver: sum(range(max(steps) + 1)) inner steps.
    with torch.no_grad():
        path, queries = [], {}
        for n in range(max(steps) + 1):
            params = learner.adapt(hparams, tasks, steps=n)
            path.append(support_loss(params))
            if n in steps:
                queries[n] = learner.losses(hparams, params, tasks).detach()
    return Evaluation(tuple(steps), torch.stack([queries[n] for n in steps]), torch.stack(path))


def results_table(rows: dict[str, Evaluation], steps: tuple[int, ...] = (1, 5, 10),
                  notes: dict[str, str] | None = None, median: bool = False) -> str:
    """A markdown table, one row per method: MSE (mean ± 95% CI over the tasks that did not
    diverge, and how many did) after each step count; ``median=True`` adds a median column per
    step count (over all tasks). A step count a row was not evaluated at shows ``—``."""
    def plural(n: int) -> str:
        return f"{n} step{'s' if n != 1 else ''}"

    head = "| method | " + " | ".join(plural(n) for n in steps)
    if median:
        head += " | " + " | ".join(f"median, {plural(n)}" for n in steps)
    head += " |" + (" notes |" if notes else "")
    lines = [head, "|" + "---|" * (len(steps) * (1 + median) + 1 + bool(notes))]
    for name, ev in rows.items():
        cells = [ev.cell(n) if n in ev.steps else "—" for n in steps]
        if median:
            cells += [f"{ev.median(n):.3f}" if n in ev.steps else "—" for n in steps]
        line = f"| {name} | " + " | ".join(cells) + " |"
        if notes:
            line += f" {notes.get(name, '')} |"
        lines.append(line)
    return "\n".join(lines)


def sinusoid_figure(learner: AbstractMetaLearner, hparams: Params, tasks: object, path: str | os.PathLike,
                    steps: tuple[int, ...] = (1, 10), panels: int = 3, title: str | None = None) -> None:
    """The classic MAML sinusoid figure as PNG: for the first ``panels`` tasks, the ground truth,
    the prediction before adaptation, after each step count in ``steps`` (one or two counts, e.g.
    ``(1,)`` for Meta-SGD's single learned step), and the support points.

    ``tasks`` must carry the ground truth (a :class:`~bilevel.datasets.TaskBatch` from
    :class:`~bilevel.datasets.Sinusoid`).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..datasets import Sinusoid

    steps = tuple(dict.fromkeys(n for n in steps if n > 0))
    if not 1 <= len(steps) <= 2:
        raise ValueError(f"sinusoid_figure(steps=...): expected one or two step counts > 0, got {steps}.")
    panels = min(panels, num_tasks(tasks))
    (sx, sy), _ = split(tasks, "sinusoid_figure(...)")
    grid = torch.linspace(-5.0, 5.0, 200, dtype=sx.dtype)[:, None]
    truth = Sinusoid.function(tasks, grid)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    with torch.no_grad():
        curves = {n: learner.predict(hparams, learner.adapt(hparams, tasks, steps=n), grid) for n in (0, *steps)}
    looks = (("--", "tab:blue"), ("-.", "tab:purple"))
    styles = {0: ("pre-update", ":", "tab:green"),
              **{n: (f"{n} grad step{'s' if n != 1 else ''}", *looks[i]) for i, n in enumerate(steps)}}
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
