"""asv: ESJ with its Q perturbed inner solves batched by vmap, against Q sequential inner solves.

ESJ needs Q + 1 forward inner solves. Run as one ``vmap`` over the perturbed
hyperparameters, each inner step becomes one batched operation (a matrix-matrix
product instead of Q + 1 matrix-vector products, and one Python-level step
instead of Q + 1), so the time per hypergradient should stay well below that of
Q separate solves; the target is ``ESJ / (Q x one solve) <= 0.6``.

Problems: the learned-start ridge problem of :mod:`benchmarks.bench_memory` at
``p = 100_000`` inner parameters (64 rows, N = 20 inner steps: one solve is memory-bandwidth
bound), with the data product written ``X @ w`` and ``w @ X.T`` (the same
function; under ``vmap`` the second's backward is a row-major matrix product,
which CPU BLAS runs several times faster here), and at ``p = 1_000`` (16 rows,
N = 100: one solve is dominated by per-step overhead).

This module imports only torch, bilevel and bench_memory, so it also works as a plain module.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

import bilevel as bl
from bilevel.estimators._base import inner_grad_fn
from bilevel.inner import solve

try:
    from .bench_memory import make_case
except ImportError:  # imported as a top-level module
    from bench_memory import make_case

#: name -> (d, rows, N, row_major)
PROBLEMS = {"p=100000, X @ w": (100_000, 64, 20, False), "p=100000, w @ X.T": (100_000, 64, 20, True),
            "p=1000, X @ w": (1_000, 16, 100, False)}
DIRECTIONS = (4, 8, 16)


def calls(problem_name: str, directions: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """``(one ESJ hypergradient, one plain inner solve)`` as zero-argument calls."""
    dim, rows, steps, row_major = PROBLEMS[problem_name]
    case = make_case(dim=dim, rows=rows, row_major=row_major)
    problem, x, train = case["problem"], case["hparams"], case["train"]
    inner = bl.GradientDescent(lr=0.5, steps=steps)
    esj = bl.ESJ(directions=directions, smoothing=1e-2, seed=0)

    def one_esj() -> bl.Hypergrad:
        return bl.hypergrad(problem, x, inner=inner, estimator=esj, inner_batch=train, outer_batch=case["val"],
                            throw=False)

    def one_solve() -> object:
        return solve(inner, problem.start(x), inner_grad_fn(problem, x, train)).params

    return one_esj, one_solve


def best_cpu_time(fn: Callable[[], object], repeat: int) -> float:
    """Best-of-``repeat`` CPU time (``time.process_time``) after one warm-up call, GC off."""
    fn()
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
    finally:
        gc.enable()
    return best


def measure_esj(directions: list[int], repeat: int = 5) -> list[dict]:
    rows = []
    for problem_name, (_, _, steps, _) in PROBLEMS.items():
        for q in directions:
            one_esj, one_solve = calls(problem_name, q)
            t_esj, t_solve = best_cpu_time(one_esj, repeat), best_cpu_time(one_solve, repeat)
            rows.append(dict(problem=problem_name, steps=steps, q=q, t_esj=t_esj, t_solve=t_solve,
                             ratio=t_esj / (q * t_solve)))
    return rows


class ESJBatching:
    """``time_esj`` (Q batched) and ``time_one_solve``; ``track_ratio`` = ESJ / (Q x one solve), CPU time."""

    params = (list(PROBLEMS), list(DIRECTIONS))
    param_names = ("problem", "directions")
    timeout = 600

    def setup(self, problem_name: str, directions: int) -> None:
        torch.set_num_threads(1)
        self.esj, self.solve = calls(problem_name, directions)
        self.esj(), self.solve()  # warm-up: torch.func's first call in a process is much slower

    def time_esj(self, problem_name: str, directions: int) -> None:
        self.esj()

    def time_one_solve(self, problem_name: str, directions: int) -> None:
        self.solve()

    def track_ratio(self, problem_name: str, directions: int) -> float:
        return best_cpu_time(self.esj, 3) / (directions * best_cpu_time(self.solve, 3))

    track_ratio.unit = "ESJ time / (Q x one solve)"
