r"""Study 3: AID-BiO vs ITD-BiO vs ESJ vs iMAML on per-feature L2 hyperparameter problems.

Three measurements on a ridge problem (exact hypergradient in closed form) and a logistic-regression
problem (exact hypergradient from Newton's method and a dense solve), both with
:math:`x = \log\lambda \in \mathbb R^d`:

1. *error vs N*: relative hypergradient error after :math:`N` inner GD steps (step :math:`1/L`,
   zero start), with :math:`K = N` linear-solver steps — the same iteration count for both loops,
   as in Grazzi et al. (2020);
2. *error vs K*: the inner problem solved exactly (start at :math:`y^*`), error against the number
   :math:`K` of linear-solver steps (for ITD: :math:`K` unrolled steps from :math:`y^*`);
3. *outer objective vs wall time*: :meth:`bilevel.BilevelSolver` with small fixed :math:`N, K`,
   warm starts (of :math:`y` and of the adjoint :math:`v`, AID-BiO) on and off, projected GD on
   :math:`\log\lambda` in a box; the exact :math:`\Phi(x_t)` is evaluated outside the timed region.
   The target is 95% of the decrease that exact hypergradients reach in the same number of steps.

References: R. Grazzi, L. Franceschi, M. Pontil, S. Salzo, "On the iteration complexity of
hypergradient computation", ICML 2020. K. Ji, J. Yang, Y. Liang, "Bilevel optimization: convergence
analysis and enhanced design", ICML 2021. D. Sow, K. Ji, Y. Liang, "ES-based Jacobian enables faster
bilevel optimization", arXiv:2110.07004. A. Rajeswaran, C. Finn, S. Kakade, S. Levine,
"Meta-learning with implicit gradients", NeurIPS 2019.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from ._common import (AbstractStudy, CsvLog, RowHook, StudyError, StudyReport, check_grid, check_positive,
                      options_of, prepare_out_dir, progress_bar)
from ._estimator_report import findings, plots, tables
from ._hgrun import ESTIMATORS, Setting, measure, warm_up
from ._hyper import HyperCase, a9a_case, logistic_case, ridge_case
from ._warm import WARM_COLUMNS, run_walltime

ERROR_COLUMNS = ("problem", "estimator", "N", "K", "rel_error", "bias_floor", "seconds", "num_grad", "num_hvp",
                 "status")


@dataclass(frozen=True)
class EstimatorStudy(AbstractStudy):
    """Options of study 3 (see the module docstring). Every grid entry is a positive step count.

    Args:
        n_grid: inner steps N for *error vs N* (K = N there).
        k_grid: linear-solver steps K for *error vs K*.
        ridge_dim, ridge_samples, ridge_lam: the ridge problem and the point ``lam`` (all features).
        logreg: ``"synthetic"`` (default) or ``"a9a"`` (needs ``data_dir``, the folder with a9a, a9a.t).
        logreg_dim, logreg_samples, logreg_lam: the synthetic logistic problem and its point.
        imaml_lam, esj_directions, esj_smoothing: the iMAML proximal strength and ESJ's Q and mu.
        outer_steps, warm_n, warm_k, target: the wall-time part (steps, fixed N and K, target fraction).
        seed: data, ESJ directions.

    Example:
        >>> from bilevel.convergence import EstimatorStudy
        >>> study = EstimatorStudy(n_grid=(8, 64, 512), logreg="synthetic")
        >>> report = study.run("runs/estimators", progress=False)  # doctest: +SKIP
    """

    name: ClassVar[str] = "estimators"
    title: ClassVar[str] = "Study 3 — AID-BiO vs ITD-BiO vs ESJ vs iMAML on hyperparameter problems"

    n_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    k_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    ridge_dim: int = 300
    ridge_samples: int = 150
    ridge_lam: float = 0.1
    logreg: str = "synthetic"
    logreg_dim: int = 100
    logreg_samples: int = 500
    logreg_lam: float = 1e-3
    data_dir: str | None = None
    imaml_lam: float = 1e-3
    esj_directions: int = 64
    esj_smoothing: float = 1e-3
    outer_steps: int = 100
    warm_n: int = 5
    warm_k: int = 5
    target: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        call = "bilevel convergence --study estimators"
        object.__setattr__(self, "n_grid", check_grid(self.n_grid, "n_grid", call))
        object.__setattr__(self, "k_grid", check_grid(self.k_grid, "k_grid", call))
        for name in ("ridge_dim", "ridge_samples", "logreg_dim", "logreg_samples", "esj_directions",
                     "outer_steps", "warm_n", "warm_k"):
            check_positive(getattr(self, name), name, call)
        for name in ("ridge_lam", "logreg_lam", "imaml_lam", "esj_smoothing", "target"):
            check_positive(getattr(self, name), name, call, integer=False)
        if not self.target < 1:
            raise StudyError(f"{call}: target={self.target!r}; expected a fraction in (0, 1) of the exact run's decrease.")
        if self.logreg not in ("synthetic", "a9a"):
            raise StudyError(f"{call}: logreg={self.logreg!r}; expected 'synthetic' or 'a9a'.")
        if self.logreg == "a9a" and not (self.data_dir and os.path.isfile(os.path.join(self.data_dir, "a9a"))):
            raise StudyError(f"{call}: logreg='a9a' needs data_dir, the folder holding a9a and a9a.t; got "
                             f"{self.data_dir!r}. Fix: pass --data-dir /path/to/a9a, or use the synthetic problem.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise StudyError(f"{call}: seed={self.seed!r}; expected an integer.")

    @classmethod
    def quick(cls, **overrides: Any) -> "EstimatorStudy":
        small = dict(n_grid=(2, 8), k_grid=(2, 8), ridge_dim=20, ridge_samples=30, logreg_dim=10,
                     logreg_samples=40, esj_directions=4, outer_steps=4, warm_n=3, warm_k=3)
        return replace(cls(), **{**small, **overrides})

    def cases(self) -> list[tuple[HyperCase, float]]:
        ridge = (ridge_case(self.ridge_dim, self.ridge_samples, self.seed), math.log(self.ridge_lam))
        if self.logreg == "a9a":
            return [ridge, (a9a_case(self.data_dir), math.log(self.logreg_lam))]
        return [ridge, (logistic_case(self.logreg_dim, self.logreg_samples, self.seed), math.log(self.logreg_lam))]

    def run(self, out: str | os.PathLike, *, progress: bool = True, on_row: RowHook | None = None) -> StudyReport:
        out = prepare_out_dir(out, "bilevel convergence --study estimators")
        setting = Setting(self.imaml_lam, self.esj_directions, self.esj_smoothing, self.seed)
        report = StudyReport(self.name, self.title, out, setup=self._setup())
        cases = self.cases()
        total = len(cases) * (len(ESTIMATORS) * len(self.n_grid) + (len(ESTIMATORS) - 1) * len(self.k_grid)
                              + 2 * len(ESTIMATORS) + 1)
        bar = progress_bar(total, "estimators", progress)
        logs = {}
        try:
            logs["N"] = CsvLog(out / "estimators_error_vs_N.csv", ERROR_COLUMNS, on_row)
            report.files.append(logs["N"].path)
            for case, log_lam in cases:
                self._error_vs_n(case, log_lam, setting, logs["N"], bar)
            logs["K"] = CsvLog(out / "estimators_error_vs_K.csv", ERROR_COLUMNS, on_row)
            report.files.append(logs["K"].path)
            for case, log_lam in cases:
                self._error_vs_k(case, log_lam, setting, logs["K"], bar)
            logs["T"] = CsvLog(out / "estimators_walltime.csv", WARM_COLUMNS, on_row)
            report.files.append(logs["T"].path)
            refs = {case.name: run_walltime(case, log_lam, self, setting, logs["T"], bar) for case, log_lam in cases}
        finally:
            bar.close()
            for log in logs.values():
                log.close()
        names = [c.name for c, _ in cases]
        rows = (logs["N"].rows, logs["K"].rows, logs["T"].rows)
        plots(out, names, *rows, refs, report.files)
        report.tables.update(tables(names, *rows, refs))
        report.findings.extend(findings(names, *rows, refs, self))
        report.write()
        return report

    def _error_vs_n(self, case: HyperCase, log_lam: float, s: Setting, log: CsvLog, bar) -> None:
        x = case.hparams(log_lam)
        lr = 1.0 / case.lipschitz(x)
        exact, prox = case.hypergrad(x), case.hypergrad(x, damping=self.imaml_lam)
        warm_up(case, x, lr, s)
        for name in ESTIMATORS:
            for n in self.n_grid:
                row = measure(case, x, exact, name, n, n, lr, s, prox_exact=prox)
                log.write(problem=case.name, **row)
                bar.update(1)

    def _error_vs_k(self, case: HyperCase, log_lam: float, s: Setting, log: CsvLog, bar) -> None:
        x = case.hparams(log_lam)
        lr = 1.0 / case.lipschitz(x)
        exact, prox = case.hypergrad(x), case.hypergrad(x, damping=self.imaml_lam)
        star, prox_star = case.solution(x), case.solution(x, damping=self.imaml_lam)
        for name in ESTIMATORS:
            if name == "ESJ":  # no linear solver: K does not apply
                continue
            for k in self.k_grid:
                start = prox_star if name == "IMAML-CG" else star
                n = k if name == "ITD" else 1
                row = measure(case, x, exact, name, n, k, lr, s, params0=start, prox_exact=prox)
                row["K"] = k  # for ITD: K unrolled steps from y*
                log.write(problem=case.name, **row)
                bar.update(1)

    def _setup(self) -> list[str]:
        return [
            "Problems: per-feature L2 (x = log lambda, one weight per feature); ridge from "
            "bilevel.testing.ridge_problem, logistic regression synthetic (or a9a with --logreg a9a).",
            "Inner solver: gradient descent with step 1/L from the zero start (L: bound on the inner Hessian).",
            "Relative error ||estimate - exact|| / ||exact|| against the exact implicit hypergradient "
            "(dense solve; Newton's method for the logistic inner problem).",
            "CG runs exactly K steps (rtol=0); Neumann uses alpha = 1/L; iMAML's proximal centre is the zero "
            "start, so it converges to the hypergradient of the problem with an extra (lam/2)||w||^2 "
            "(its bias floor is in the CSV).",
            "Wall-time part: projected GD on log lambda in [log(lam0/100), log(10 lam0)], the exact "
            "Phi(x_t) is evaluated outside the timed region; times are single-thread wall clock.",
            "Options: " + ", ".join(options_of(self)),
        ]
