r"""The estimator accuracy-cost frontier on the ridge problem at d = 2000.

For each estimator and each target relative error (1e-3 and 1e-6 by default) we search the
cheapest setting — fewest oracle calls, i.e. inner gradients plus Hessian-vector products — on
geometric grids of the inner step count N and the linear-solver step count K, and report its
gradient and HVP counts and its wall time (best of three calls, single thread). Since the error
does not increase with N or with K, the cheapest reaching setting lies on the staircase
"smallest K that works for each N", which a walk over N (ascending) and K (descending) finds with
about ``len(n_grid) + len(k_grid)`` evaluations per estimator. iMAML is searched for each proximal
strength in ``imaml_lams`` whose bias floor (known exactly) is below half the target; AID with a
dense solve is evaluated at AID-CG's N (only the inner steps matter for it); ESJ, whose error is about
:math:`\sqrt{(p+1)/Q}` here, is evaluated at a few direction counts Q.

References: R. Grazzi, L. Franceschi, M. Pontil, S. Salzo, ICML 2020 (iteration complexity of ITD
and AID); K. Ji, J. Yang, Y. Liang, ICML 2021 (AID-BiO, ITD-BiO).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ._common import (AbstractStudy, CsvLog, Finding, RowHook, StudyError, StudyReport, check_grid, check_positive,
                      markdown_table, new_figure, options_of, prepare_out_dir, progress_bar, save_figure)
from ._hgrun import STYLE, Setting, describe, measure
from ._hyper import HyperCase, ridge_case
from ._search import Search, cost as _cost, dense_call

COLUMNS = ("estimator", "N", "K", "lam", "Q", "rel_error", "bias_floor", "seconds", "num_grad", "num_hvp", "status")
ORDER = ("ITD", "AID-CG", "AID-Neumann", "AID-Dense", "IMAML-CG", "ESJ")  # AID-Dense after AID-CG: it reuses its N


@dataclass(frozen=True)
class FrontierStudy(AbstractStudy):
    """Options of the frontier.

    Args:
        dim, n_samples, lam: the ridge problem (d features, n training rows) and the point lambda.
        targets: relative errors to reach.
        n_grid, k_grid: inner and linear-solver step counts searched (ascending).
        imaml_lams: iMAML proximal strengths tried; esj_grid: ESJ direction counts tried.
        seed: data and ESJ directions.

    Example:
        >>> from bilevel.convergence import FrontierStudy
        >>> FrontierStudy(dim=500, targets=(1e-4,)).targets
        (0.0001,)
        >>> report = FrontierStudy().run("runs/frontier", progress=False)  # doctest: +SKIP
    """

    name: ClassVar[str] = "frontier"
    title: ClassVar[str] = "Estimator accuracy-cost frontier on ridge regression"

    dim: int = 2000
    n_samples: int = 1000
    lam: float = 1.0
    targets: tuple[float, ...] = (1e-3, 1e-6)
    n_grid: tuple[int, ...] = (4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512)
    k_grid: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128)
    imaml_lams: tuple[float, ...] = (1e-4, 1e-7)
    esj_grid: tuple[int, ...] = (8, 32)
    seed: int = 0

    def __post_init__(self) -> None:
        call = "bilevel convergence --study frontier"
        for name in ("n_grid", "k_grid", "esj_grid"):
            object.__setattr__(self, name, tuple(sorted(check_grid(getattr(self, name), name, call))))
        for name in ("dim", "n_samples"):
            check_positive(getattr(self, name), name, call)
        check_positive(self.lam, "lam", call, integer=False)
        if not self.targets or not all(isinstance(t, (int, float)) and 0 < t < 1 for t in self.targets):
            raise StudyError(f"{call}: targets={self.targets!r}; expected relative errors in (0, 1), e.g. (1e-3, 1e-6).")
        if not self.imaml_lams or not all(isinstance(v, (int, float)) and v > 0 for v in self.imaml_lams):
            raise StudyError(f"{call}: imaml_lams={self.imaml_lams!r}; expected positive proximal strengths.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise StudyError(f"{call}: seed={self.seed!r}; expected an integer.")

    @classmethod
    def quick(cls, **overrides: Any) -> "FrontierStudy":
        small = dict(dim=30, n_samples=40, n_grid=(8, 32, 128), k_grid=(2, 8, 32), esj_grid=(4,),
                     imaml_lams=(1e-6,))
        return replace(cls(), **{**small, **overrides})

    def run(self, out: str | os.PathLike, *, progress: bool = True, on_row: RowHook | None = None) -> StudyReport:
        out = prepare_out_dir(out, "bilevel convergence --study frontier")
        case = ridge_case(self.dim, self.n_samples, self.seed)
        x = case.hparams(math.log(self.lam))
        lr = 1.0 / case.lipschitz(x)
        exact = case.hypergrad(x)
        report = StudyReport(self.name, self.title, out, setup=self._setup(case, x))
        bar = progress_bar(len(ORDER), "frontier", progress)
        best: dict[tuple[str, float], dict[str, Any]] = {}
        try:
            with CsvLog(out / "frontier_evaluations.csv", COLUMNS, on_row) as log:
                report.files.append(log.path)
                search = Search(case, x, exact, lr, self, log)
                search.warm_up()
                for name in ORDER:
                    for target in self.targets:
                        found = search.cheapest(name, target)
                        if found is not None:
                            best[(name, target)] = found
                    bar.update(1)
                rows = search.rows
        finally:
            bar.close()
        self._report(report, case, x, exact, lr, rows, best)
        report.write()
        return report

    def _report(self, report: StudyReport, case: HyperCase, x, exact, lr: float, rows: list, best: dict) -> None:
        table = []
        for name in ORDER:
            for target in self.targets:
                r = best.get((name, target))
                if r is None:
                    tried = [e for e in rows if e["estimator"] == name]
                    low = min((e["rel_error"] for e in tried), default=float("nan"))
                    table.append((name, f"{target:g}", f"not reached (best error {low:.2g})", "", "", "", ""))
                    continue
                secs = _best_of(case, x, exact, r, lr, self)
                table.append((name, f"{target:g}", describe(name, r["N"], r["K"], _setting(r)),
                              r["num_grad"], r["num_hvp"], f"{secs:.3f}", f"{r['rel_error']:.1e}"))
        report.tables["Cheapest setting per estimator (fewest gradients + HVPs) reaching each target"] = \
            markdown_table(("estimator", "target", "setting", "grads", "HVPs", "seconds (best of 3)", "rel. error"),
                           table)
        fig, axes = new_figure(2)
        for name in ORDER:
            pts = [e for e in rows if e["estimator"] == name]
            color, marker = STYLE.get(name, ("C5", "x"))
            for ax, key in zip(axes, ("calls", "seconds")):
                front = _pareto([(_cost(e) if key == "calls" else e["seconds"], e["rel_error"]) for e in pts])
                if front:  # iMAML with a tiny lam traces AID-CG: dash it so both stay visible
                    ax.step(*zip(*front), where="post", color=color, label=name, lw=1.3,
                            ls="--" if name == "IMAML-CG" else "-")
                    ax.scatter(*zip(*front), color=color, marker=marker, s=16)
        for ax, xlabel in zip(axes, ("gradients + HVPs", "seconds (one call, single thread)")):
            for t in self.targets:
                ax.axhline(t, color="k", ls=":", lw=1)
            ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="lowest relative error at this cost",
                   title=f"accuracy-cost frontier (ridge d={self.dim}, n={self.n_samples})")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
        save_figure(fig, report.out / "frontier.png", report.files)
        cg = [best.get(("AID-CG", t)) for t in self.targets]
        others = [best.get((n, t)) for n in ("ITD", "AID-Neumann") for t in self.targets]
        ok = all(c is not None for c in cg) and all(
            o is None or cg[i % len(cg)]["num_grad"] + cg[i % len(cg)]["num_hvp"] <= o["num_grad"] + o["num_hvp"]
            for i, o in enumerate(others))
        report.findings.append(Finding(
            "AID with conjugate gradient is the most efficient hypergradient approximation among ITD and AID.",
            "Grazzi, Franceschi, Pontil, Salzo, ICML 2020",
            "Cheapest oracle calls per target: " + "; ".join(
                f"{n} " + "/".join(_calls(best.get((n, t))) for t in self.targets) for n in ORDER[:3]) + ".", ok))

    def _setup(self, case: HyperCase, x) -> list[str]:
        return [
            f"Ridge problem d={self.dim}, n={self.n_samples} (bilevel.testing.ridge_problem), lambda={self.lam:g} "
            f"for every feature; inner Hessian condition number kappa={case.condition(x):.1f}.",
            "Inner: GD with step 1/L from zero; CG runs exactly K steps; Neumann alpha = 1/L; HVPs reverse-over-"
            "reverse; iMAML's proximal centre is the zero start; ESJ Gaussian directions, mu=1e-3.",
            "Cost = gradients + HVPs as counted by Hypergrad.stats (deterministic); the search walks the staircase "
            "of the smallest K that reaches the target for each N. Seconds: best of three calls of the chosen "
            "setting, single thread.",
            "Options: " + ", ".join(options_of(self)),
        ]


def _calls(r: dict[str, Any] | None) -> str:
    return "-" if r is None else str(r["num_grad"] + r["num_hvp"])


def _setting(r: dict[str, Any]) -> Setting:
    return Setting(imaml_lam=r["lam"] or 1e-3, esj_directions=r["Q"] or 1)


def _best_of(case: HyperCase, x, exact, r: dict[str, Any], lr: float, study: FrontierStudy,
             repeat: int = 3) -> float:
    if r["estimator"] == "AID-Dense":
        return min(dense_call(case, x, r["N"], lr)[1] for _ in range(repeat))
    s = replace(_setting(r), seed=study.seed)
    return min(measure(case, x, exact, r["estimator"], r["N"], r["K"], lr, s)["seconds"] for _ in range(repeat))


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower-left envelope: each point whose error is below every cheaper point's."""
    front, low = [], float("inf")
    for cost, err in sorted(points):
        if err < low:
            front.append((cost, max(err, 1e-16)))
            low = err
    return front
