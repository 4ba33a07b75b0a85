"""asv: compiled execution (``bl.Compiled``) against eager, ridge problem and MAML sinusoid (issue 8).

Setup as in :mod:`benchmarks.bench_core`: ridge with ``n = 1000``, ``d`` in {200, 2000}, float32,
one thread, 100 gradient steps then 10 CG iterations (``AID+CG``); the hand-written eager
torch.func reference of :mod:`benchmarks._reference` does the same arithmetic. MAML: meta-batch
25, ``N`` in {1, 5} steps, vmapped over tasks (:mod:`benchmarks.bench_meta`).

* ``CompiledRidgeTimes.time_compiled`` / ``time_eager`` / ``time_reference``: asv's timings of
  the three calls (the compilation happens in ``setup`` and is not timed).
* ``track_speedup``: reference time / compiled time, best of :data:`REPEAT` interleaved runs in
  one process (targets: >= 5 at d = 200, >= 3 at d = 2000; MAML: eager / compiled >= 1.5).
* ``track_compile_s``: ``hg.stats["compile_s"]`` of the first call in a fresh process with torch's
  on-disk compile caches off and an empty kernel cache (target: <= 15 s per problem shape), and
  ``track_compile_cpu_s``, the CPU seconds of that call including the C++ compiler's (steadier on a
  loaded machine).

The ``track_*`` numbers come from one worker process per parameter combination
(``python -m benchmarks.run_compile --worker DIM CONFIG``), run in ``setup_cache``.
``python -m benchmarks.run_compile`` prints the full table (every granularity, HVP modes)
without asv; ``docs/compile.md`` has the latest one.
"""

from __future__ import annotations

import argparse
import os

import torch

DIMS = (200, 2000)
CONFIGS = ("AID+CG/auto", "AID+CG/loop", "AID+CG/chunk:10", "AID+CG/step", "AID+CG/solve")
MAML = ("MAML:1/estimator", "MAML:5/estimator", "MAML:1/chunk:10", "MAML:5/chunk:10")
REPEAT = 7


def _worker(dim: int, config: str) -> dict:
    """One row of :mod:`benchmarks.run_compile`: a fresh worker process with a fresh kernel cache
    (only what inductor builds once per machine is kept, see ``run_compile.machine_template``)."""
    from .run_compile import run_worker
    args = argparse.Namespace(repeat=REPEAT, clock="thread", warm_disk_cache=False, timeout=3000.0)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    os.chdir(root)  # the worker runs ``python -m benchmarks.run_compile``
    try:
        row = run_worker(dim, config, args)
    finally:
        os.chdir(cwd)
    if row is None:
        raise RuntimeError(f"benchmarks.run_compile --worker {dim} {config} failed")
    return row


class CompiledRidgeTimes:
    """asv's own timings of the compiled, eager and reference calls (compiled in ``setup``)."""

    params = (list(DIMS), list(CONFIGS))
    param_names = ("dim", "config")
    timeout = 3600.0
    number = 1
    repeat = (3, 10, 20.0)
    warmup_time = 0.0

    def setup(self, dim: int, config: str) -> None:
        torch.set_num_threads(1)
        import bilevel as bl

        from ._reference import exact_solution, hypergrad_call, library_estimator, make_case, reference_call
        from .run_compile import parse
        name, gran, chunk, hvp = parse(config)
        case = make_case(dim, torch.float32, exact_solution(dim))
        plain = library_estimator(name, case.lr)
        self.compiled = hypergrad_call(case, bl.Compiled(plain, granularity=gran, chunk=chunk,
                                                         **({"hvp": hvp} if hvp else {})))
        self.compiled()  # compiles (not timed)
        self.eager = hypergrad_call(case, plain)
        self.reference = reference_call(name, case)

    def time_compiled(self, dim: int, config: str) -> None:
        self.compiled()

    def time_eager(self, dim: int, config: str) -> None:
        self.eager()

    def time_reference(self, dim: int, config: str) -> None:
        self.reference()


class CompiledRidge:
    """Speed-up and compile time of ``bl.Compiled(bl.AID(CG(10)), granularity=...)``, per dimension."""

    params = (list(DIMS), list(CONFIGS))
    param_names = ("dim", "config")
    timeout = 3600.0

    def setup_cache(self) -> dict:
        return {f"{dim}/{config}": _worker(dim, config) for dim in DIMS for config in CONFIGS}

    def track_speedup(self, rows, dim: int, config: str) -> float:
        row = rows[f"{dim}/{config}"]
        return row["reference_ms"] / row["compiled_ms"]

    track_speedup.unit = "reference time / compiled time"

    def track_compile_s(self, rows, dim: int, config: str) -> float:
        return rows[f"{dim}/{config}"]["compile_s"]

    track_compile_s.unit = "seconds"

    def track_compile_cpu_s(self, rows, dim: int, config: str) -> float:
        return rows[f"{dim}/{config}"]["compile_cpu_s"]

    track_compile_cpu_s.unit = "CPU seconds"


class CompiledMAML:
    """MAML sinusoid meta-gradient: ``bl.Compiled(bl.ITD(), granularity=...)`` against the eager one."""

    params = list(MAML)
    param_names = ("config",)
    timeout = 3600.0

    def setup_cache(self) -> dict:
        return {config: _worker(0, config) for config in MAML}

    def track_speedup_over_eager(self, rows, config: str) -> float:
        return rows[config]["eager_ms"] / rows[config]["compiled_ms"]

    track_speedup_over_eager.unit = "eager time / compiled time"

    def track_speedup_over_reference(self, rows, config: str) -> float:
        return rows[config]["reference_ms"] / rows[config]["compiled_ms"]

    track_speedup_over_reference.unit = "reference time / compiled time"

    def track_compile_s(self, rows, config: str) -> float:
        return rows[config]["compile_s"]

    track_compile_s.unit = "seconds"
