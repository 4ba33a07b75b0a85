"""Convergence benchmarks: estimator x inner steps N x problem size, on the ridge problem.

The setting of study 3 (``bilevel convergence --study estimators``, docs/convergence.md): the
per-feature ridge problem of :func:`bilevel.testing.ridge_problem` with ``n = d / 2`` training
rows at ``lambda = 0.1`` for every feature (inner condition number about 60), float64, one
thread; N gradient-descent steps of size ``1 / L`` from zero, and K = N linear-solver steps
(CG with ``rtol=0``, Neumann with ``alpha = 1 / L``, reverse-over-reverse HVPs); iMAML with
``lam = 1e-3`` (proximal centre: the zero start); ESJ with 16 Gaussian directions.

* ``time_hypergrad``: one ``bl.hypergrad`` call.
* ``peakmem_hypergrad``: peak resident memory of that call (asv's measure: the whole process).
* ``track_rel_error``: ``||estimate - exact|| / ||exact||`` against the closed form.
* ``track_num_hvp`` / ``track_num_grad``: the cost counters of ``Hypergrad.stats``.

``asv run --python=same --quick --bench bench_convergence`` runs every combination once: 100
benchmark processes, each paying the torch import (about three minutes on an idle core).
"""

from __future__ import annotations

import math

import torch

import bilevel as bl
from bilevel.convergence._hgrun import ESTIMATORS, Setting, make_estimator
from bilevel.convergence._hyper import ridge_case

DIMS = (100, 1000)
STEPS = (10, 100)
LAM = 0.1
SETTING = Setting(imaml_lam=1e-3, esj_directions=16, esj_smoothing=1e-3, seed=0, hvp="reverse")


def _case(dim: int):
    return ridge_case(dim, dim // 2, seed=0)


class ConvergenceRidge:
    """One hypergradient per (estimator, N, d): time, peak memory, accuracy and cost counters."""

    params = (list(ESTIMATORS), list(STEPS), list(DIMS))
    param_names = ("estimator", "N", "dim")
    timeout = 300.0
    number = 1
    repeat = (1, 5, 10.0)
    warmup_time = 0.5  # time_ only: first calls pay torch.func tracing; asv --quick skips the warm-up

    def setup_cache(self) -> dict[int, dict[str, torch.Tensor]]:
        torch.set_num_threads(1)
        out = {}
        for dim in DIMS:
            case = _case(dim)
            x = case.hparams(math.log(LAM))
            out[dim] = {"exact": case.hypergrad(x)["log_lam"], "lr": torch.tensor(1.0 / case.lipschitz(x))}
        return out

    def setup(self, cache, estimator: str, n: int, dim: int) -> None:
        torch.set_num_threads(1)
        case = _case(dim)
        x = case.hparams(math.log(LAM))
        lr = float(cache[dim]["lr"])
        problem = case.prox_problem() if estimator == "IMAML-CG" else case.problem
        est = make_estimator(estimator, n, lr, SETTING)
        inner = bl.GradientDescent(lr=lr, steps=n)
        self.exact = cache[dim]["exact"]

        def call() -> bl.Hypergrad:
            return bl.hypergrad(problem, x, case.params0(), inner=inner, estimator=est, inner_batch=case.train,
                                outer_batch=case.val, throw=False)
        self.call = call

    def time_hypergrad(self, cache, estimator: str, n: int, dim: int) -> None:
        self.call()

    def peakmem_hypergrad(self, cache, estimator: str, n: int, dim: int) -> None:
        self.call()

    def track_rel_error(self, cache, estimator: str, n: int, dim: int) -> float:
        value = self.call().value["log_lam"]
        return (torch.linalg.vector_norm(value - self.exact) / torch.linalg.vector_norm(self.exact)).item()

    track_rel_error.unit = "relative error"

    def track_num_hvp(self, cache, estimator: str, n: int, dim: int) -> int:
        return int(self.call().stats["num_hvp"])

    track_num_hvp.unit = "Hessian-vector products"

    def track_num_grad(self, cache, estimator: str, n: int, dim: int) -> int:
        return int(self.call().stats["num_grad"])

    track_num_grad.unit = "gradient evaluations"
