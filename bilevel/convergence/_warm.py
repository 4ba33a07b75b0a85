r"""The wall-time part of study 3: outer objective against wall time, warm starts on and off.

Each run is :class:`bilevel.BilevelSolver` (plain GD on :math:`x = \log\lambda`, step :math:`\beta`)
with fixed small :math:`N` inner steps and :math:`K` linear steps. After every outer step the
callback projects :math:`x` onto the box :math:`[x_0 + \log 0.01, x_0 + \log 10]` (which keeps the
inner step :math:`1/L` safe) and evaluates the exact :math:`\Phi(x_t)`; the callback's time is
excluded from the clock. A reference run with exact hypergradients sets the target.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .. import BilevelSolver, GradientDescent
from .._tree import Params
from ._common import CsvLog
from ._hgrun import ESTIMATORS, Setting, make_estimator
from ._hyper import HyperCase

WARM_COLUMNS = ("problem", "estimator", "warm_start", "step", "time_s", "phi", "phi_gap", "status")
BOX = (math.log(0.01), math.log(10.0))   # log-lambda box around the start point
OUTER_STEP = 1.0                         # largest change of log(lambda) in the first exact step


class _Diverged(Exception):
    pass


def _box(log_lam: float) -> tuple[float, float]:
    return log_lam + BOX[0], log_lam + BOX[1]


def run_walltime(case: HyperCase, log_lam: float, study: Any, s: Setting, log: CsvLog, bar) -> dict[str, float]:
    """All runs on one problem; returns the start value, the exact run's final value, the target and beta."""
    x0 = case.hparams(log_lam)
    lo, hi = _box(log_lam)
    lr = 1.0 / case.lipschitz(case.hparams(hi))            # safe for every x in the box
    beta = OUTER_STEP / case.hypergrad(x0)["log_lam"].abs().max().item()
    steps = study.outer_steps
    # reference: exact hypergradients, same projected GD
    x = {k: v.clone() for k, v in x0.items()}
    phi0 = case.value(x)
    exact_phi = []
    for step in range(steps):
        x = {"log_lam": (x["log_lam"] - beta * case.hypergrad(x)["log_lam"]).clamp(lo, hi)}
        exact_phi.append(case.value(x))
    final = exact_phi[-1]
    for step, phi in enumerate(exact_phi):
        log.write(problem=case.name, estimator="exact", warm_start="", step=step, time_s=float("nan"), phi=phi,
                  phi_gap=phi - final, status="successful")
    bar.update(1)
    for name in ESTIMATORS:
        for warm in (True, False):
            _one_run(case, x0, name, warm, lr, beta, (lo, hi), steps, final, study, s, log)
            bar.update(1)
    return {"phi0": phi0, "final": final, "target": final + study.target * (phi0 - final), "beta": beta,
            "N": study.warm_n, "K": study.warm_k}


def _one_run(case: HyperCase, x0: Params, name: str, warm: bool, lr: float, beta: float,
             box: tuple[float, float], steps: int, final: float, study: Any, s: Setting, log: CsvLog) -> None:
    setting = Setting(s.imaml_lam, s.esj_directions, s.esj_smoothing, torch.Generator().manual_seed(s.seed), s.hvp)
    estimator = make_estimator(name, study.warm_k, lr, setting)
    problem = case.prox_problem() if name == "IMAML-CG" else case.problem
    solver = BilevelSolver(problem, inner=GradientDescent(lr=lr, steps=study.warm_n), estimator=estimator,
                           lr=beta, warm_start=warm)
    clock = {"algo": 0.0, "since": time.perf_counter()}

    def callback(step: int, hparams: Params, hg) -> None:
        clock["algo"] += time.perf_counter() - clock["since"]
        with torch.no_grad():
            hparams["log_lam"].clamp_(*box)
        phi = case.value(hparams)
        status = hg.result.name if hasattr(hg.result, "name") else str(hg.result)
        log.write(problem=case.name, estimator=name, warm_start=warm, step=step, time_s=clock["algo"], phi=phi,
                  phi_gap=phi - final, status=status)
        if not math.isfinite(phi):
            raise _Diverged
        clock["since"] = time.perf_counter()

    try:
        solver.run(x0, case.params0(), steps=steps, inner_batch=case.train, outer_batch=case.val, throw=False,
                   callback=callback)
    except _Diverged:
        pass


def time_to_target(rows: list[dict[str, Any]], problem: str, name: str, warm: bool, target_phi: float) -> float:
    """Algorithm seconds until ``phi <= target_phi`` first holds (``inf`` if never)."""
    for row in rows:
        if (row["problem"] == problem and row["estimator"] == name and row["warm_start"] is warm
                and row["phi"] <= target_phi):
            return row["time_s"]
    return math.inf
