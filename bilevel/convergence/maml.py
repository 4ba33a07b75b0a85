r"""Study 2: multi-step MAML — inner step size fixed vs proportional to 1/N, and the meta-batch size.

Ji, Yang and Liang (JMLR 2022) analyse N-step MAML in the nonconvex setting. The meta-gradient
multiplies N factors :math:`(I - \alpha \nabla^2 \ell)`, so its size and smoothness grow like
:math:`(1 + \alpha L)^N`; their guarantees need an inner step size :math:`\alpha` chosen inversely
proportional to N (:math:`\alpha = O(1/(NL))`), and then the meta-gradient stays well behaved for
every N. Their bounds also carry variance terms that shrink with the meta-batch size B (the number
of tasks per meta-gradient), so at a fixed outer step size the error floor decreases as B grows.

Setup: sinusoid regression tasks (10 support and 10 query points), the 1-40-40-1 ReLU network of
MAML (Finn et al. 2017), every weight adapted by N inner GD steps, ITD meta-gradients (exact
second-order MAML), plain SGD on the initialisation (the meta-update the theory analyses).

1. *step size*: for every N, :math:`\alpha = \alpha_0` (fixed), a smaller fixed
   :math:`\alpha = \alpha_s`, and :math:`\alpha = \alpha_0 / N`; meta-objective (query MSE after N
   steps on fixed evaluation tasks) against outer iterations; a run that turns non-finite is
   marked diverged.
2. *meta-batch*: MAML on a linear model over fixed random Fourier features (each task's loss is
   quadratic, so SGD at a constant step reaches its noise floor within a few hundred steps, which
   the network does not on this budget), N fixed, B in ``batch_grid``. The floor is the mean
   meta-objective over the last quarter of the run; it "decreases with B" when the largest B's floor
   is more than two standard errors below the smallest B's and no step up in B raises it by more
   than two standard errors. We also fit floor(B) = L + c / B.

Reference: K. Ji, J. Yang, Y. Liang, "Theoretical convergence of multi-step model-agnostic
meta-learning", JMLR 23 (2022) (arXiv:2002.07836).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ..datasets import Sinusoid
from ._common import (AbstractStudy, CsvLog, Finding, RowHook, StudyError, StudyReport, check_grid, check_positive,
                      markdown_table, new_figure, options_of, prepare_out_dir, progress_bar, save_figure)
from ._meta import init_maml, init_rf, maml_problem, rf_problem, train

STEP_COLUMNS = ("schedule", "N", "alpha", "step", "time_s", "cpu_s", "meta_loss", "train_loss", "failed_tasks",
                "status")
BATCH_COLUMNS = ("meta_batch", "N", "alpha", "step", "time_s", "cpu_s", "meta_loss", "train_loss", "failed_tasks",
                 "status")
SOURCE = "Ji, Yang, Liang, JMLR 2022"


@dataclass(frozen=True)
class MamlStudy(AbstractStudy):
    """Options of study 2.

    Args:
        n_grid: inner step counts N (default 1, 2, 4, 8, 16, 32).
        alpha: the base inner step size alpha_0 (fixed schedule: alpha_0; 1/N schedule: alpha_0 / N).
        alpha_small: the smaller fixed step size alpha_s.
        outer_steps, meta_batch, outer_lr: meta-training length, tasks per step, SGD step.
        batch_grid, batch_n, batch_steps: meta-batch sizes of part 2, its N and its number of outer steps.
        batch_alpha, batch_lr, batch_features: part 2's inner step, outer SGD step and number of
            random Fourier features.
        eval_tasks, eval_every: evaluation set size and spacing.
        seed: initialisation, task batches, evaluation tasks.

    Example:
        >>> from bilevel.convergence import MamlStudy
        >>> MamlStudy(alpha=0.05).alpha_small    # the other options keep their defaults
        0.03
        >>> MamlStudy(n_grid=(0,))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        bilevel.convergence._common.StudyError: ...: n_grid contains 0; every entry must be a positive integer ...
    """

    name: ClassVar[str] = "maml"
    title: ClassVar[str] = "Study 2 — multi-step MAML: inner step size fixed vs 1/N, and meta-batch size"

    n_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    alpha: float = 0.1
    alpha_small: float = 0.03
    outer_steps: int = 100
    meta_batch: int = 8
    outer_lr: float = 0.03
    batch_grid: tuple[int, ...] = (1, 4, 16, 64)
    batch_n: int = 4
    batch_steps: int = 300
    batch_alpha: float = 0.2
    batch_lr: float = 0.6
    batch_features: int = 40
    eval_tasks: int = 100
    eval_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        call = "bilevel convergence --study maml"
        object.__setattr__(self, "n_grid", check_grid(self.n_grid, "n_grid", call))
        object.__setattr__(self, "batch_grid", check_grid(self.batch_grid, "batch_grid", call))
        for name in ("outer_steps", "meta_batch", "batch_n", "batch_steps", "batch_features", "eval_tasks",
                     "eval_every"):
            check_positive(getattr(self, name), name, call)
        for name in ("alpha", "alpha_small", "outer_lr", "batch_alpha", "batch_lr"):
            check_positive(getattr(self, name), name, call, integer=False)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise StudyError(f"{call}: seed={self.seed!r}; expected an integer.")

    @classmethod
    def quick(cls, **overrides: Any) -> "MamlStudy":
        small = dict(n_grid=(1, 2), outer_steps=4, meta_batch=2, batch_grid=(1, 2), batch_n=1, batch_steps=4,
                     eval_tasks=4, eval_every=2)
        return replace(cls(), **{**small, **overrides})

    def run(self, out: str | os.PathLike, *, progress: bool = True, on_row: RowHook | None = None) -> StudyReport:
        out = prepare_out_dir(out, "bilevel convergence --study maml")
        report = StudyReport(self.name, self.title, out, setup=self._setup())
        family = Sinusoid(shots=10, queries=10)
        eval_tasks = family.sample(self.eval_tasks, seed=self.seed + 1000)
        problem, x0 = maml_problem(), init_maml(self.seed)
        bar = progress_bar(3 * len(self.n_grid) + len(self.batch_grid), "maml", progress)
        steps: dict[tuple[str, int], list] = {}
        batches: dict[int, list] = {}
        common = dict(optimizer="sgd", family=family, eval_tasks=eval_tasks, eval_every=self.eval_every,
                      seed=self.seed)
        try:
            with CsvLog(out / "maml_step_size.csv", STEP_COLUMNS, on_row) as log:
                report.files.append(log.path)
                for n in self.n_grid:
                    for schedule, alpha in self._schedules(n):
                        pts = steps.setdefault((schedule, n), [])
                        train(problem, x0, lr=alpha, steps=n, meta_batch=self.meta_batch,
                              outer_steps=self.outer_steps, outer_lr=self.outer_lr, **common,
                              record=lambda p, s=schedule, n=n, a=alpha, pts=pts: pts.append(
                                  log.write(schedule=s, N=n, alpha=a, **p)))
                        bar.update(1)
            with CsvLog(out / "maml_meta_batch.csv", BATCH_COLUMNS, on_row) as log:
                report.files.append(log.path)
                alpha, rf = self.batch_alpha, rf_problem(self.batch_features, self.seed)
                for b in self.batch_grid:
                    pts = batches.setdefault(b, [])
                    train(rf, init_rf(self.batch_features), lr=alpha, steps=self.batch_n, meta_batch=b,
                          outer_steps=self.batch_steps, outer_lr=self.batch_lr, **common,
                          record=lambda p, b=b, pts=pts: pts.append(
                              log.write(meta_batch=b, N=self.batch_n, alpha=alpha, **p)))
                    bar.update(1)
        finally:
            bar.close()
        self._report(report, steps, batches)
        report.write()
        return report

    def _schedules(self, n: int) -> tuple[tuple[str, float], ...]:
        return (("fixed", self.alpha), ("fixed-small", self.alpha_small), ("1/N", self.alpha / n))

    def _report(self, report: StudyReport, steps: dict, batches: dict) -> None:
        fig, axes = new_figure(2, 2)
        rows, outcome = [], {}
        names = [name for name, _ in self._schedules(1)]
        for i, n in enumerate(self.n_grid):
            for ax, schedule in zip(axes[:3], names):
                pts = steps[(schedule, n)]
                ax.plot([p["step"] for p in pts], [p["meta_loss"] for p in pts], color=f"C{i}", marker=".",
                        label=f"N={n}")
                first, last = pts[0]["meta_loss"], pts[-1]["meta_loss"]
                diverged = pts[-1]["status"] == "diverged" or not math.isfinite(last)
                finite = [p for p in pts if math.isfinite(p["meta_loss"])]
                if diverged and finite:  # mark where the run left the plot
                    ax.plot(finite[-1]["step"], finite[-1]["meta_loss"], marker="x", ms=9, mew=2, color=f"C{i}")
                failed = max(p["failed_tasks"] for p in pts)
                outcome[(schedule, n)] = "diverged" if diverged else ("no progress" if last >= first else "converges")
                rows.append((n, schedule, f"{pts[0]['meta_loss']:.3f}", f"{last:.3f}", failed, outcome[(schedule, n)]))
        titles = (f"alpha = {self.alpha:g} (fixed)", f"alpha = {self.alpha_small:g} (fixed)",
                  f"alpha = {self.alpha:g} / N")
        for ax, title in zip(axes[:3], titles):
            ax.set(yscale="log", xlabel="outer iteration", ylabel="meta-objective (query MSE after N steps)",
                   title=title + "  (x: diverged)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        floors = {}
        for i, b in enumerate(self.batch_grid):
            pts = batches[b]
            axes[3].plot([p["step"] for p in pts], [p["meta_loss"] for p in pts], color=f"C{i}", label=f"B={b}")
            floors[b] = _mean_se([p["meta_loss"] for p in pts[-max(1, len(pts) // 4):]])
        axes[3].set(yscale="log", xlabel="outer iteration", ylabel="meta-objective",
                    title=f"meta-batch B (random features, N={self.batch_n}, alpha={self.batch_alpha:g})")
        axes[3].grid(True, alpha=0.3)
        axes[3].legend(fontsize=7)
        save_figure(fig, report.out / "maml.png", report.files)
        report.tables["Step-size schedules: start and final meta-objective"] = markdown_table(
            ("N", "schedule", "start", "final", "max failed inner solves in a batch", "outcome"), rows)
        report.tables["Meta-batch size: error floor (mean meta-objective over the last quarter)"] = markdown_table(
            ("B", "floor", "standard error"), [(b, f"{m:.4f}", f"{se:.4f}") for b, (m, se) in floors.items()])
        report.findings.extend(self._findings(outcome, floors))

    def _findings(self, outcome: dict, floors: dict) -> list[Finding]:
        ns = list(self.n_grid)
        scaled_ok = all(outcome[("1/N", n)] == "converges" for n in ns)
        bad_fixed = [n for n in ns if outcome[("fixed", n)] != "converges"]
        text = ", ".join(f"N={n}: {outcome[('fixed', n)]}" for n in ns)
        small = ", ".join(f"N={n}: {outcome[('fixed-small', n)]}" for n in ns)
        bs = list(floors)
        means = [floors[b][0] for b in bs]
        tol = [2 * math.hypot(floors[a][1], floors[b][1]) for a, b in zip(bs, bs[1:])]
        no_rise = all(later <= earlier + t for earlier, later, t in zip(means, means[1:], tol))
        drop = means[-1] < means[0] - 2 * math.hypot(floors[bs[0]][1], floors[bs[-1]][1])
        level, slope = _fit_inverse(bs, means)
        return [
            Finding("With a fixed inner step size, N-step MAML can fail to converge as N grows; an inner step size "
                    "proportional to 1/N keeps the meta-gradient well behaved for every N.", SOURCE,
                    f"Fixed alpha={self.alpha:g}: {text}. alpha={self.alpha:g}/N: "
                    f"{'converges for every N' if scaled_ok else 'fails for some N'}. Smaller fixed "
                    f"alpha={self.alpha_small:g} (alpha*N <= {self.alpha_small * max(ns):.2g} on this grid): {small}.",
                    scaled_ok and bool(bad_fixed) if len(ns) >= 3 else None),
            Finding("The error floor decreases as the meta-batch size B grows (variance terms in 1/B).", SOURCE,
                    "Floor (mean of the last quarter, +- standard error) by B: "
                    + ", ".join(f"B={b}: {floors[b][0]:.3f} +- {floors[b][1]:.3f}" for b in bs)
                    + f"; least-squares fit floor = {level:.3f} + {slope:.3f} / B.",
                    (drop and no_rise) if len(bs) >= 3 else None),
        ]

    def _setup(self) -> list[str]:
        return [
            "Tasks: Sinusoid (amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]), 10 support and 10 query "
            "points; 100 fixed evaluation tasks.",
            "Model: 1-40-40-1 ReLU network (MAML's sinusoid network); every weight adapted; ITD meta-gradient "
            f"(second-order MAML); SGD(lr={self.outer_lr}) on the initialisation; meta-batch {self.meta_batch}.",
            f"Part 1: alpha = {self.alpha:g} and alpha = {self.alpha_small:g} for every N, vs alpha = "
            f"{self.alpha:g}/N. Part 2: MAML on a linear model over {self.batch_features} fixed random Fourier "
            f"features, N = {self.batch_n}, alpha = {self.batch_alpha:g}, SGD(lr={self.batch_lr}) for "
            f"{self.batch_steps} steps, meta-batch B in {list(self.batch_grid)}.",
            "Same seed (so the same initialisation and task stream) for every run; wall time excludes evaluation.",
            "Options: " + ", ".join(options_of(self)),
        ]


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (successive evaluations are treated as independent)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.inf, 0.0
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(var / len(finite))


def _fit_inverse(bs: list[int], floors: list[float]) -> tuple[float, float]:
    """Least-squares ``floor = level + slope / B``."""
    xs = [1.0 / b for b in bs]
    if len(xs) < 2 or not all(math.isfinite(f) for f in floors):
        return math.nan, math.nan
    mx, my = sum(xs) / len(xs), sum(floors) / len(floors)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, floors)) / sxx if sxx > 0 else math.nan
    return my - slope * mx, slope
