"""The two comparisons of ``bilevel hpo``: which estimator configurations run, and what is measured.

Every method runs the same outer loop (:func:`~bilevel.problems.runner.run_method`: Adam on the
hyperparameters, warm starts of the inner solution and of AID's adjoint across outer steps);
they differ in the inner solver, the estimator and the batches it draws.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import estimators as est
from .._batch import Sampler
from .._tree import Params
from ..inner import GradientDescent, Momentum
from ..linear import CG, Dense, Neumann
from .data import Splits
from .hyperclean import MLP, HyperClean, Linear, detection_metrics, hyperclean_problem
from .logreg import LogRegHPO, grid_search, logreg_problem
from .runner import Method, run_method, write_report

LOGREG_METHODS = ("reference", "aid-cg", "aid-neumann", "stocbio", "itd", "esj")
HYPERCLEAN_METHODS = ("aid-cg", "aid-neumann", "stocbio", "itd", "esj")


@dataclass(frozen=True)
class Config:
    """Options shared by both problems (``bilevel hpo --help`` documents each)."""

    steps: int = 100
    time_limit: float = math.inf
    outer_lr: float = 0.1
    inner_steps: int = 50
    linear_steps: int = 50
    batch_size: int = 500
    inner_lr: float | None = None
    eval_every: int = 1
    seed: int = 0
    progress: bool = True


def logreg_methods(hpo: LogRegHPO, names: list[str], cfg: Config) -> list[Method]:
    """Inner step ``1/L`` at the starting weights unless ``cfg.inner_lr`` is given; ``L`` bounds the inner
    Hessian (:meth:`LogRegHPO.lipschitz`).
    Reverse-over-reverse HVPs: about 4x cheaper than forward-over-reverse on this problem (measured)."""
    lr = cfg.inner_lr or 1.0 / hpo.lipschitz(hpo.hparams())
    k = cfg.inner_steps
    heavy = Momentum(lr=lr, momentum=0.9, steps=k)
    full = lambda t: hpo.train  # noqa: E731
    sampled = lambda t: Sampler.minibatches(hpo.train[:2], cfg.batch_size, seed=cfg.seed * 100_003 + t)  # noqa: E731
    table = {
        "reference": Method("reference", GradientDescent(lr=lr, steps=0), est.AID(Dense(), hvp="reverse"), full,
                            start=lambda x, y: hpo.solve_inner(x, y)),
        "aid-cg": Method("aid-cg", heavy, est.AID(CG(max_steps=cfg.linear_steps, rtol=1e-6), hvp="reverse"), full),
        "aid-neumann": Method("aid-neumann", heavy,
                              est.AID(Neumann(steps=cfg.linear_steps, alpha=lr), hvp="reverse"), full),
        "stocbio": Method("stocbio", GradientDescent(lr=lr, steps=k),
                          est.AID(Neumann(steps=cfg.linear_steps, alpha=lr), hvp="reverse"), sampled),
        "itd": Method("itd", heavy, est.ITD(), full),
        "esj": Method("esj", heavy, est.ESJ(directions=16, smoothing=1e-2,
                                             seed=torch.Generator().manual_seed(cfg.seed)), full),
    }
    return [table[n] for n in names]


def run_logreg(splits: Splits, names: list[str], cfg: Config, out: Path, *, lam0: float = 1e-3,
               grid: tuple[float, ...] = tuple(10.0 ** (k / 4) for k in range(-24, 1))) -> list[dict[str, Any]]:
    """Per-feature L2 weights of logistic regression: every method in ``names``, and the grid search."""
    hpo = logreg_problem(splits.train, splits.val)
    tic, cpu_tic = time.perf_counter(), time.process_time()
    rows = grid_search(hpo, list(grid), splits.test)
    grid_time, grid_cpu = time.perf_counter() - tic, time.process_time() - cpu_tic
    best = min(rows, key=lambda r: r["val_loss"])
    oracle = min(rows, key=lambda r: r["test_loss"])
    table = [{"method": f"grid search ({len(grid)} shared weights), best lam={best['lam']:.3g}", "steps": len(grid),
              "time_s": grid_time, "cpu_s": grid_cpu, "val_loss": best["val_loss"], "test_loss": best["test_loss"],
              "test_accuracy": best["test_accuracy"], "final status": "-"},
             {"method": f"(shared lam best on *test*, lam={oracle['lam']:.3g}: not selectable)", "steps": "-",
              "time_s": "-", "cpu_s": "-", "val_loss": oracle["val_loss"], "test_loss": oracle["test_loss"],
              "test_accuracy": oracle["test_accuracy"], "final status": "-"}]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "grid.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    refit: dict[str, Params] = {}

    def evaluate(name: str):
        def fn(x: Params, y: Params) -> dict[str, float]:
            refit[name] = hpo.solve_inner(x, refit.get(name))  # the model these weights give, solved exactly
            test = hpo.metrics(refit[name], splits.test)
            return {"val_loss": hpo.metrics(refit[name], hpo.val)["loss"], "test_loss": test["loss"],
                    "test_accuracy": test["accuracy"], "iterate_test_loss": hpo.metrics(y, splits.test)["loss"]}
        return fn

    curves = []
    for method in logreg_methods(hpo, names, cfg):
        start = hpo.solve_inner(hpo.hparams(lam0))  # every method starts from the exact solution at lam0
        mine, _, _ = run_method(hpo.problem, method, hpo.hparams(lam0), start, outer_batch=hpo.val,
                                evaluate=evaluate(method.name), steps=cfg.steps, lr=cfg.outer_lr,
                                time_limit=cfg.time_limit, eval_every=cfg.eval_every, progress=cfg.progress)
        curves += mine
        last = mine[-1]
        table.append({"method": method.name, "steps": last["step"], "time_s": last["time_s"],
                      "cpu_s": last["cpu_s"], "val_loss": last["val_loss"], "test_loss": last["test_loss"],
                      "test_accuracy": last["test_accuracy"], "final status": last["result"]})
    note = (f"a9a: {len(splits.train[1])} training / {len(splits.val[1])} validation rows (seed {cfg.seed}), "
            f"test = a9a.t ({len(splits.test[1])} rows). Per-feature methods start at lam={lam0:g} for every "
            "feature; losses and accuracies are those of the inner problem solved exactly (Newton) at the "
            "learned weights. The grid's line is its best-on-validation shared weight.")
    write_report(out, curves, metric="test_loss", ylabel="test loss (a9a.t)",
                 title="a9a: per-feature L2 weights", table=table,
                 lines={"grid search (best shared lam)": best["test_loss"]}, note=note)
    return table


def hyperclean_methods(hc: HyperClean, names: list[str], cfg: Config) -> list[Method]:
    """Inner step ``1/L`` from the largest eigenvalue of the features' second moment (the linear model's
    bound; a quarter of it for the MLP) unless ``cfg.inner_lr`` is given; reverse-mode HVPs (cheaper than
    forward-over-reverse through the cross-entropy here)."""
    z = hc.train[0]
    lr = cfg.inner_lr or 1.0 / (0.5 * torch.linalg.eigvalsh(z.T @ z / len(z))[-1].item() + hc.l2)
    if isinstance(hc.classifier, MLP) and cfg.inner_lr is None:
        lr = lr / 4  # the bound above is the linear model's; a ReLU layer's curvature is larger
    k = cfg.inner_steps
    heavy = Momentum(lr=lr, momentum=0.9, steps=k)
    full = lambda t: hc.train_batch  # noqa: E731
    sampled = lambda t: Sampler.minibatches(hc.train, cfg.batch_size, seed=cfg.seed * 100_003 + t)  # noqa: E731
    table = {
        "aid-cg": Method("aid-cg", heavy, est.AID(CG(max_steps=cfg.linear_steps, rtol=1e-3), hvp="reverse"), full),
        "aid-neumann": Method("aid-neumann", heavy,
                              est.AID(Neumann(steps=cfg.linear_steps, alpha=lr), hvp="reverse"), full),
        "stocbio": Method("stocbio", GradientDescent(lr=lr, steps=k),
                          est.AID(Neumann(steps=cfg.linear_steps, alpha=lr), hvp="reverse"), sampled),
        "itd": Method("itd", heavy, est.ITD(), full),
        "esj": Method("esj", heavy, est.ESJ(directions=8, smoothing=1e-1,
                                             seed=torch.Generator().manual_seed(cfg.seed)), full),
    }
    return [table[n] for n in names]


def run_hyperclean(splits: Splits, names: list[str], cfg: Config, out: Path, *, classifier: str = "linear",
                   hidden: int = 300, l2: float = 1e-3,
                   tune_l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)) -> list[dict[str, Any]]:
    """Data hyper-cleaning on noisy MNIST: every method in ``names``, and the baselines (no cleaning at
    ``l2``, no cleaning with the L2 weight tuned on the validation set from ``tune_l2``, the clean-subset
    oracle)."""
    d = splits.train[0].shape[1]
    model = Linear(d) if classifier == "linear" else MLP(d, hidden=hidden)
    hc = hyperclean_problem(splits.train, splits.val, model, l2=l2)
    clean = ~splits.corrupted
    table = []
    baselines = {}
    for name, weights in (("train on corrupted data (no cleaning)", torch.ones(len(clean))),
                          ("oracle: train on the clean subset only", clean.double())):
        tic, cpu_tic = time.perf_counter(), time.process_time()
        fitted = hc.fit(weights, hc.params0(cfg.seed))
        test = hc.metrics(fitted, splits.test)
        baselines[name] = test["accuracy"]
        table.append({"method": name, "steps": "-", "time_s": time.perf_counter() - tic,
                      "cpu_s": time.process_time() - cpu_tic,
                      "test_accuracy": test["accuracy"], "refit_test_accuracy": "-", "auc": "-",
                      "precision": "-", "recall": "-", "final status": "-"})

    if tune_l2:  # the stronger baseline: no cleaning, but the L2 weight chosen on the clean validation set
        tic, cpu_tic = time.perf_counter(), time.process_time()
        fits = {w: hyperclean_problem(splits.train, splits.val, model, l2=w) for w in tune_l2}
        fits = {w: p.fit(torch.ones(len(clean)), p.params0(cfg.seed)) for w, p in fits.items()}
        best = max(fits, key=lambda w: hc.metrics(fits[w], hc.val)["accuracy"])
        test = hc.metrics(fits[best], splits.test)
        name = f"train on corrupted data, l2={best:g} tuned on validation"
        baselines[name] = test["accuracy"]
        table.append({"method": name, "steps": "-", "time_s": time.perf_counter() - tic,
                      "cpu_s": time.process_time() - cpu_tic, "test_accuracy": test["accuracy"],
                      "refit_test_accuracy": "-", "auc": "-", "precision": "-", "recall": "-", "final status": "-"})

    def evaluate(x: Params, y: Params) -> dict[str, float]:
        test = hc.metrics(y, splits.test)
        return {"val_loss": hc.metrics(y, hc.val)["loss"], "test_loss": test["loss"],
                "test_accuracy": test["accuracy"], **detection_metrics(x["weight_logits"], splits.corrupted)}

    curves = []
    for method in hyperclean_methods(hc, names, cfg):
        mine, x, y = run_method(hc.problem, method, hc.hparams(), hc.params0(cfg.seed), outer_batch=hc.val,
                                evaluate=evaluate, steps=cfg.steps, lr=cfg.outer_lr, time_limit=cfg.time_limit,
                                eval_every=cfg.eval_every, progress=cfg.progress)
        curves += mine
        last = mine[-1]
        refit = hc.metrics(hc.fit(torch.sigmoid(x["weight_logits"]), y), splits.test)["accuracy"]
        table.append({"method": method.name, "steps": last["step"], "time_s": last["time_s"],
                      "cpu_s": last["cpu_s"], "test_accuracy": last["test_accuracy"], "refit_test_accuracy": refit,
                      "auc": last["auc"],
                      "precision": last["precision"], "recall": last["recall"], "final status": last["result"]})
    note = (f"MNIST: {len(clean)} training images with {int(splits.corrupted.sum())} labels corrupted "
            f"(seed {cfg.seed}), {len(splits.val[1])} clean validation, {len(splits.test[1])} test images; "
            f"{model!r}, l2={l2:g}. test_accuracy: the classifier trained alongside the weights at the last "
            "step; refit: trained to convergence (L-BFGS) with the final weights. auc/precision/recall: the "
            "weights as a detector of corrupted labels (flagged when the weight is below 1/2).")
    write_report(out, curves, metric="test_accuracy", ylabel="test accuracy (MNIST)",
                 title=f"MNIST hyper-cleaning, {splits.corrupted.double().mean().item():.0%} corrupted labels",
                 table=table, lines=baselines, note=note)
    return table


def with_defaults(cfg: Config, **overrides: Any) -> Config:
    """``cfg`` with the given fields replaced where they are not None."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
