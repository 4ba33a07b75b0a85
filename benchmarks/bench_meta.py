"""Meta-learning benchmark: one MAML meta-gradient on the sinusoid setup (issue 4).

Setup: MAML's sinusoid regressor 1-40-40-1 (ReLU), meta-batch 25 tasks, 10 support and 10 query
points per task, ``N`` in {1, 5} inner gradient steps of size 0.01, float32, one thread. A
meta-step's meta-gradient is computed three ways:

* ``library``: ``bl.meta.MAML(net, inner=bl.GradientDescent(0.01, N)).meta_gradient(theta, tasks)``
  — one :func:`bilevel.vmap_hypergrad` with ``in_dims=(None, None, 0, 0)``, ITD per task, mean.
* ``reference``: the same written by hand with :mod:`torch.func` — ``vmap`` over tasks of
  ``grad`` of the query loss after ``N`` unrolled steps, then the mean (per-task gradients, as the
  library forms them). ``reference_fused`` is the variant ``grad`` of the mean of a ``vmap``
  (no per-task gradients); the ratio target is measured against the faster of the two.
* ``loop``: a Python loop over tasks with ``torch.autograd.grad(create_graph=True)`` — how MAML is
  commonly written without torch.func.

Targets: library at most 1.10 x reference, and at least 3 x faster than the loop.
``track_*`` report the ratios from interleaved best-of timings on CPU time
(``time.thread_time``), which load on a shared machine affects less than wall time.
``python -m benchmarks.run_meta`` prints the same numbers without asv.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import bilevel as bl
from bilevel.datasets import Sinusoid

from ._reference import best_of

Params = dict[str, Tensor]
META_BATCH, SHOTS, ALPHA = 25, 10, 0.01
STEPS = (1, 5)
REPEAT = 15


def make_setup(steps: int, seed: int = 0) -> dict[str, Callable[[], object]]:
    """The three meta-gradient calls (and the shared data) for ``steps`` inner steps."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    tasks = Sinusoid(shots=SHOTS).sample(META_BATCH, seed=seed)
    sx, sy, qx, qy = tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
    maml = bl.meta.MAML(net, inner=bl.GradientDescent(lr=ALPHA, steps=steps))

    def loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return ((functional_call(net, params, (x,)) - y) ** 2).mean()

    def task_loss(params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        for _ in range(steps):
            g = grad(loss)(params, xs, ys)
            params = {k: params[k] - ALPHA * g[k] for k in params}
        return loss(params, xq, yq)

    per_task = vmap(grad(task_loss), in_dims=(None, 0, 0, 0, 0))

    def reference() -> Params:
        return {k: v.mean(0) for k, v in per_task(theta, sx, sy, qx, qy).items()}

    def reference_fused() -> Params:
        return grad(lambda p: vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy).mean())(theta)

    def library() -> Params:
        return maml.meta_gradient(theta, tasks).value

    def loop() -> list[Tensor]:
        leaves = [v.clone().requires_grad_(True) for v in theta.values()]
        total = 0.0
        for t in range(META_BATCH):
            params = dict(zip(theta, leaves))
            for _ in range(steps):
                inner = ((functional_call(net, params, (sx[t],)) - sy[t]) ** 2).mean()
                grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
                params = {k: v - ALPHA * g for (k, v), g in zip(params.items(), grads)}
            total = total + ((functional_call(net, params, (qx[t],)) - qy[t]) ** 2).mean()
        return list(torch.autograd.grad(total / META_BATCH, leaves))

    return {"library": library, "reference": reference, "reference_fused": reference_fused, "loop": loop}


def ratios(steps: int, repeat: int = REPEAT) -> dict[str, float]:
    """Best-of CPU times (seconds) of the four calls and the two target ratios."""
    calls = make_setup(steps)
    best = best_of(calls, repeat, clock=time.thread_time)
    ref = min(best["reference"], best["reference_fused"])
    return {**best, "library/reference": best["library"] / ref, "loop/library": best["loop"] / best["library"]}


class MAMLSinusoidStep:
    """One MAML meta-gradient, meta-batch 25, 10-shot, N inner steps."""

    params = ([*STEPS], ["library", "reference", "reference_fused", "loop"])
    param_names = ("steps", "implementation")
    number = 1
    repeat = (5, 20, 20.0)
    timeout = 600.0

    def setup(self, steps: int, implementation: str) -> None:
        torch.set_num_threads(1)
        self.call = make_setup(steps)[implementation]
        self.call()

    def time_meta_gradient(self, steps: int, implementation: str) -> None:
        self.call()


class MAMLSinusoidRatios:
    """The target ratios from interleaved timings (library / reference and loop / library)."""

    params = [*STEPS]
    param_names = ("steps",)
    timeout = 600.0

    def setup_cache(self) -> dict[int, dict[str, float]]:
        torch.set_num_threads(1)
        return {steps: ratios(steps) for steps in STEPS}

    def track_library_over_reference(self, cache, steps: int) -> float:
        return cache[steps]["library/reference"]

    def track_loop_over_library(self, cache, steps: int) -> float:
        return cache[steps]["loop/library"]


def check_agreement(steps: int) -> float:
    """Largest absolute difference between the library's and the reference's meta-gradient."""
    calls = make_setup(steps)
    lib, ref = calls["library"](), calls["reference"]()
    return max(float((lib[k] - ref[k]).abs().max()) for k in ref)
