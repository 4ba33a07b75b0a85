r"""Study 1: ANIL with a strongly-convex head against a nonconvex head, over the inner step count N.

ANIL (Raghu et al. 2020) adapts only the head :math:`u` in the inner loop; the body :math:`\phi`
and the head's start are meta-learned. Ji, Lee, Liang and Poor (NeurIPS 2020) show that the inner
loss geometry decides how :math:`N` acts: for a head whose inner loss is strongly convex, the
convergence rate per outer iteration improves with :math:`N` and saturates (the inner error
:math:`(1 - \alpha\mu)^N` vanishes) while the cost per iteration grows linearly in :math:`N`, so
progress per unit time first improves and then worsens (choose a moderate :math:`N`); for a
nonconvex head, the meta-gradient's smoothness constants grow with :math:`N`, and both rates
get worse as :math:`N` grows (choose a small :math:`N`).

Setup: sinusoid regression tasks (:class:`bilevel.datasets.Sinusoid`, 10 support and 10 query
points), a 1-40-40-m tanh body, either a *linear* head with the L2-regularised squared loss
(strongly convex in :math:`u`) or a *two-layer* m-r-1 tanh head (nonconvex), N inner GD steps
of size :math:`\alpha` from the meta-learned head, ITD meta-gradients (back-propagation through
the inner loop, as ANIL does), Adam on the meta-parameters. The meta-objective is the query loss
after N-step adaptation on 100 fixed evaluation tasks. For each head the level is 90% of the way
from the smallest-N run's first value to its lowest; we report the iterations and seconds each run
needs to reach it (a run that never does counts as slowest).

Reference: K. Ji, J. D. Lee, Y. Liang, H. V. Poor, "Convergence of meta-learning with task-specific
adaptation over partial parameters", NeurIPS 2020 (Theorems 1-2 and Section 5).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ..datasets import Sinusoid
from ._common import (AbstractStudy, CsvLog, Finding, RowHook, StudyError, StudyReport, check_grid, check_positive,
                      markdown_table, new_figure, options_of, prepare_out_dir, progress_bar, save_figure)
from ._curves import reach, reference_level, spearman
from ._meta import anil_problem, init_anil, train

COLUMNS = ("head", "N", "step", "time_s", "cpu_s", "meta_loss", "train_loss", "failed_tasks", "status")
HEADS = ("linear", "two-layer")
SOURCE = "Ji, Lee, Liang, Poor, NeurIPS 2020"


@dataclass(frozen=True)
class AnilStudy(AbstractStudy):
    """Options of study 1.

    Args:
        n_grid: inner step counts N (default 1, 2, 4, 8, 16, 32).
        outer_steps, meta_batch, outer_lr: meta-training length, tasks per step, Adam step.
        alpha: inner GD step size (both heads).
        gamma: L2 weight of the linear head's inner loss (its strong convexity).
        features, head_hidden: body output width m and the two-layer head's width r.
        eval_tasks, eval_every: evaluation set size and spacing (in outer steps).
        seed: initialisation, task batches and evaluation tasks.

    Example:
        >>> from bilevel.convergence import AnilStudy
        >>> study = AnilStudy(n_grid=(1, 4, 16), outer_steps=50)   # checked here, before any work
        >>> report = study.run("runs/anil-small", progress=False)  # doctest: +SKIP
        >>> [f.verdict for f in report.findings]                   # doctest: +SKIP
        ['agrees', 'agrees', 'agrees', 'disagrees']
    """

    name: ClassVar[str] = "anil"
    title: ClassVar[str] = "Study 1 — ANIL: strongly-convex vs nonconvex head over inner steps N"

    n_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    outer_steps: int = 100
    meta_batch: int = 8
    outer_lr: float = 3e-3
    alpha: float = 0.2
    gamma: float = 0.5
    features: int = 10
    head_hidden: int = 20
    eval_tasks: int = 100
    eval_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        call = "bilevel convergence --study anil"
        object.__setattr__(self, "n_grid", check_grid(self.n_grid, "n_grid", call))
        for name in ("outer_steps", "meta_batch", "features", "head_hidden", "eval_tasks", "eval_every"):
            check_positive(getattr(self, name), name, call)
        for name in ("outer_lr", "alpha", "gamma"):
            check_positive(getattr(self, name), name, call, integer=False)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise StudyError(f"{call}: seed={self.seed!r}; expected an integer.")

    @classmethod
    def quick(cls, **overrides: Any) -> "AnilStudy":
        small = dict(n_grid=(1, 2), outer_steps=4, meta_batch=2, eval_tasks=4, eval_every=2)
        return replace(cls(), **{**small, **overrides})

    def run(self, out: str | os.PathLike, *, progress: bool = True, on_row: RowHook | None = None) -> StudyReport:
        out = prepare_out_dir(out, "bilevel convergence --study anil")
        report = StudyReport(self.name, self.title, out, setup=self._setup())
        family = Sinusoid(shots=10, queries=10)
        eval_tasks = family.sample(self.eval_tasks, seed=self.seed + 1000)
        bar = progress_bar(len(HEADS) * len(self.n_grid), "anil", progress)
        curves: dict[tuple[str, int], list] = {}
        with CsvLog(out / "anil_curves.csv", COLUMNS, on_row) as log:
            report.files.append(log.path)
            try:
                for head in HEADS:
                    problem = anil_problem(self.gamma)
                    x0 = init_anil(head, self.features, self.head_hidden, self.seed)
                    for n in self.n_grid:
                        pts = curves.setdefault((head, n), [])
                        train(problem, x0, lr=self.alpha, steps=n, outer_steps=self.outer_steps,
                              meta_batch=self.meta_batch, outer_lr=self.outer_lr, optimizer="adam", family=family,
                              eval_tasks=eval_tasks, eval_every=self.eval_every, seed=self.seed,
                              record=lambda p, head=head, n=n, pts=pts: pts.append(log.write(head=head, N=n, **p)))
                        bar.update(1)
            finally:
                bar.close()
        self._report(report, curves)
        report.write()
        return report

    def _report(self, report: StudyReport, curves: dict) -> None:
        fig, axes = new_figure(2, 2)
        summary, reached = [], {}
        for row, head in enumerate(HEADS):
            runs = {n: curves[(head, n)] for n in self.n_grid}
            level = reference_level(runs[self.n_grid[0]])
            for i, n in enumerate(self.n_grid):
                pts = runs[n]
                color = f"C{i}"
                for col, key in enumerate(("step", "cpu_s")):
                    axes[2 * row + col].plot([p[key] for p in pts], [p["meta_loss"] for p in pts], color=color,
                                             marker=".", label=f"N={n}")
                its, secs = reach(pts, level, clock="cpu_s")
                reached[(head, n)] = (its, secs)
                summary.append((head, n, f"{pts[-1]['meta_loss']:.4f}", _num(its, 0), _num(secs, 2),
                                f"{pts[-1]['cpu_s'] / max(self.outer_steps, 1) * 1e3:.1f}"))
            first = runs[self.n_grid[0]][0]["meta_loss"]
            off = [f"N={n}" for n in self.n_grid if any(p["meta_loss"] > 2.5 * first for p in runs[n])]
            for col, xlabel in enumerate(("outer iteration", "CPU time [s] (one thread; wall time in the CSV)")):
                ax = axes[2 * row + col]
                if level == level:
                    ax.axhline(level, color="k", ls=":", lw=1, label=f"level (90% of N={self.n_grid[0]}'s decrease)")
                ax.set(yscale="log", xlabel=xlabel, ylabel="meta-objective (query MSE after N steps)",
                       title=f"{head} head ({'strongly convex' if head == 'linear' else 'nonconvex'})")
                if off and first == first:  # a run that blew up would flatten every other curve
                    low = min(p["meta_loss"] for pts in runs.values() for p in pts if p["meta_loss"] > 0)
                    ax.set_ylim(0.9 * low, 2.5 * first)
                    ax.text(0.98, 0.98, f"off scale: {', '.join(off)}", transform=ax.transAxes, ha="right",
                            va="top", fontsize=7)
                ax.grid(True, alpha=0.3)
            axes[2 * row].legend(fontsize=7, ncol=2)
        save_figure(fig, report.out / "anil.png", report.files)
        report.tables["Per N: final meta-objective, iterations and seconds to the level"] = markdown_table(
            ("head", "N", "final meta-objective", "iterations to level", "CPU seconds to level",
             "CPU ms per iteration"),
            summary)
        report.findings.extend(self._findings(reached))

    def _findings(self, reached: dict) -> list[Finding]:
        ns = list(self.n_grid)
        its = {h: [reached[(h, n)][0] for n in ns] for h in HEADS}
        secs = {h: [reached[(h, n)][1] for n in ns] for h in HEADS}
        text = lambda v, d: ", ".join(f"N={n}: {_num(x, d)}" for n, x in zip(ns, v))  # noqa: E731
        sc_its, sc_secs = its["linear"], secs["linear"]
        if len(ns) >= 3:
            gains = [a / b if b > 0 else float("inf") for a, b in zip(sc_its, sc_its[1:])]
            improves = sc_its[-1] < sc_its[0] and gains[-1] < gains[0]
            best = min(range(len(ns)), key=lambda i: sc_secs[i])
            margin = sc_secs[best] <= 0.9 * min(sc_secs[0], sc_secs[-1])  # timing noise: demand a 10% win
            interior = (0 < best < len(ns) - 1) and (True if margin else None)
        else:
            improves = interior = None
        nc_its, nc_secs = its["two-layer"], secs["two-layer"]
        enough = len(ns) >= 3
        best_its = ns[min(range(len(ns)), key=lambda i: nc_its[i])]
        return [
            Finding("Strongly-convex head: progress per outer iteration improves with N and saturates.", SOURCE,
                    f"Iterations to the level: {text(sc_its, 0)}.", improves),
            Finding("Strongly-convex head: progress per unit time first improves, then worsens, as N grows "
                    "(a moderate N is best).", SOURCE,
                    f"CPU seconds to the level: {text(sc_secs, 2)} (an interior optimum counts as agreement when it is "
                    "at least 10% faster than both ends, otherwise inconclusive).", interior),
            Finding("Nonconvex head: larger N makes convergence slower per unit time (a small N is best).", SOURCE,
                    f"CPU seconds to the level: {text(nc_secs, 2)} (rank correlation with N: "
                    f"{spearman(ns, nc_secs):.2f}).",
                    (spearman(ns, nc_secs) > 0.5 and nc_secs[0] == min(nc_secs)) if enough else None),
            Finding("Nonconvex head: larger N makes convergence slower per outer iteration.", SOURCE,
                    f"Iterations to the level: {text(nc_its, 0)}; fewest at N={best_its} "
                    f"(rank correlation with N: {spearman(ns, nc_its):.2f}).",
                    (best_its == ns[0] and spearman(ns, nc_its) > 0.5) if enough else None),
        ]

    def _setup(self) -> list[str]:
        return [
            "Tasks: Sinusoid (amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]), 10 support and 10 query "
            "points; 100 fixed evaluation tasks.",
            f"Body 1-40-40-{self.features} tanh (features scaled by 1/sqrt(m)); linear head with inner loss "
            f"MSE + {self.gamma}/2 ||u||^2 (strongly convex), or two-layer {self.features}-{self.head_hidden}-1 "
            "tanh head with the plain MSE (nonconvex).",
            f"Inner: N GD steps of size alpha={self.alpha} from the meta-learned head; meta-gradient by ITD; "
            f"Adam(lr={self.outer_lr}) on body and head start; meta-batch {self.meta_batch}; "
            f"{self.outer_steps} outer steps; same seed (so the same task batches) for every N.",
            "Time counts meta-gradient steps only (evaluation excluded), one thread. The findings and the time "
            "axis use process CPU time, which load from other processes on a shared machine does not inflate; "
            "the CSV also has the wall time (equal to the CPU time on an idle machine).",
            "Options: " + ", ".join(options_of(self)),
        ]


def _num(x: float, digits: int) -> str:
    return "not reached" if x == float("inf") else f"{x:.{digits}f}"
