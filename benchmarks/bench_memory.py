"""asv: peak memory of the memory-lean estimators against N, on a problem with 10^5 inner parameters.

AID, IMAML and ESJ run the inner loop without a tape, so their memory should not
grow with the number of inner steps N; taped ITD keeps every step; memory-lean
ITD (``ITD(checkpoint_every="sqrt")``) keeps about 2 sqrt(N) steps' worth.

The problem (float32): a learned-start ridge regression,

    g(x, w) = 1/2 ||X w - t||^2 + 1/2 exp(log_lam) ||w||^2,   init(x) = x["w0"],
    f(x, w) = 1/2 ||X_val w - t_val||^2,

with ``d = 100_000`` inner parameters, 64 training and 64 validation rows
(features N(0, 1/d), so the inner Hessian has eigenvalues in [1, ~2] and
``lr = 0.5`` is safe). ``x = {"log_lam": scalar, "w0": (d,)}``.

asv measures ``peakmem_*`` as the benchmark process's maximum RSS, which
includes the interpreter, torch and the data (asv starts a fresh process for
every parameter combination). ``python -m benchmarks.run_memory`` reports the
same and, separately, the growth of RSS during the call.

Allocator: with glibc's default malloc, freed blocks of the sizes ESJ's
batched solve allocates stay in the heap, and RSS grows with N although the
live tensors do not (fragmentation, not retention). ``allocator="fixed-mmap"``
calls ``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` first (as the environment variable
``MALLOC_MMAP_THRESHOLD_=131072`` would), so large tensors are returned to the
system when freed and RSS tracks live memory; ``"default"`` leaves malloc alone.

This module imports only torch and bilevel, so it also works as a plain module.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

import torch

import bilevel as bl

DIM = 100_000
N_ROWS = 64
STEPS = (10, 100, 1000)
ESTIMATORS = ("AID", "IMAML", "ESJ", "ITD", "ITD-checkpoint")
#: The estimator objects, by table name (float32: CG's rtol is set for float32).
ESTIMATOR_OBJECTS: dict[str, bl.AbstractEstimator] = {
    "AID": bl.AID(linear_solver=bl.CG(max_steps=10, rtol=1e-5)),
    "IMAML": bl.IMAML(lam=1.0, linear_solver=bl.CG(max_steps=10, rtol=1e-5)),
    "ESJ": bl.ESJ(directions=8, smoothing=1e-2, seed=0),
    "ITD": bl.ITD(),
    "ITD-checkpoint": bl.ITD(checkpoint_every="sqrt"),
}
LR = 0.5
ALLOCATORS = ("default", "fixed-mmap")
MMAP_THRESHOLD = 128 * 1024


def use_allocator(allocator: str) -> None:
    """``"fixed-mmap"``: glibc ``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` (no-op elsewhere); ``"default"``: nothing."""
    if allocator == "fixed-mmap":
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass
    elif allocator != "default":
        raise ValueError(f"use_allocator({allocator!r}): expected one of {ALLOCATORS}.")


def inner(x: dict, y: dict, batch: tuple) -> torch.Tensor:
    features, target = batch
    w = y["w"]
    return 0.5 * ((features @ w - target) ** 2).sum() + 0.5 * torch.exp(x["log_lam"]) * (w ** 2).sum()


def inner_row_major(x: dict, y: dict, batch: tuple) -> torch.Tensor:
    """``inner`` with the product written ``w @ X^T``: the same function, but under ``vmap`` over ``w``
    its backward is the row-major product ``R X`` instead of ``X^T R^T`` (see benchmarks.bench_esj)."""
    features, target = batch
    w = y["w"]
    return 0.5 * ((w @ features.T - target) ** 2).sum() + 0.5 * torch.exp(x["log_lam"]) * (w ** 2).sum()


def outer(x: dict, y: dict, batch: tuple) -> torch.Tensor:
    features, target = batch
    return 0.5 * ((features @ y["w"] - target) ** 2).sum()


def make_case(dim: int = DIM, rows: int = N_ROWS, seed: int = 0, dtype: torch.dtype = torch.float32,
              row_major: bool = False) -> dict[str, Any]:
    """Problem, hparams and batches (about ``2 * rows * dim`` floats of data)."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, generator=gen, dtype=dtype)

    def rows_of(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.randn(n, dim, generator=gen, dtype=dtype) / dim ** 0.5
        return features, features @ w_true + 0.1 * torch.randn(n, generator=gen, dtype=dtype)

    problem = bl.BilevelProblem(inner=inner_row_major if row_major else inner, outer=outer,
                                init=lambda x: {"w": x["w0"]})
    hparams = {"log_lam": torch.zeros((), dtype=dtype), "w0": torch.zeros(dim, dtype=dtype)}
    return dict(problem=problem, hparams=hparams, train=rows_of(rows), val=rows_of(rows))


def hypergrad_call(case: dict[str, Any], name: str, steps: int) -> Callable[[], bl.Hypergrad]:
    """A zero-argument ``bl.hypergrad`` call for estimator ``name`` and ``steps`` inner steps."""
    estimator, solver = ESTIMATOR_OBJECTS[name], bl.GradientDescent(lr=LR, steps=steps)

    def call() -> bl.Hypergrad:
        return bl.hypergrad(case["problem"], case["hparams"], inner=solver, estimator=estimator,
                            inner_batch=case["train"], outer_batch=case["val"], throw=False)
    return call


class PeakMemory:
    """``peakmem_hypergrad``: max RSS of one hypergradient (asv includes setup: data ~ 51 MB)."""

    params = (list(ESTIMATORS), list(STEPS), list(ALLOCATORS))
    param_names = ("estimator", "inner_steps", "allocator")
    timeout = 900

    def setup(self, name: str, steps: int, allocator: str) -> None:
        use_allocator(allocator)
        torch.set_num_threads(1)
        self.case = make_case()
        hypergrad_call(self.case, name, 1)()  # warm-up, as in benchmarks.run_memory
        self.call = hypergrad_call(self.case, name, steps)

    def peakmem_hypergrad(self, name: str, steps: int, allocator: str) -> None:
        self.call()
