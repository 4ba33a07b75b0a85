"""Compiled execution (``bl.Compiled``) against eager: run and compile times, as markdown tables.

    python -m benchmarks.run_compile [--dims 200 2000] [--configs AID+CG/chunk:10 ...] [--maml]
                                     [--repeat 7] [--clock thread|wall] [--warm-disk-cache]
                                     [--json ROWS] [--render ROWS] [--out docs/compile.md]

Every configuration runs in a fresh worker process (``--worker``), so that its compile time is
what a user pays in a new process: the inductor and AOT-autograd on-disk caches are switched off
unless ``--warm-disk-cache``. In the worker, the first ``bl.hypergrad`` call compiles
(``compile_s`` is its ``stats["compile_s"]``, ``compile CPU`` the CPU seconds of the worker and its
compiler subprocesses during that call); then the compiled call, the library's eager call and the
hand-written eager torch.func reference of :mod:`benchmarks._reference` are timed best-of-``repeat``,
interleaved, in that process. Float32, one thread, ridge problem with n = 1000, 100 gradient steps,
then 10 CG iterations (AID+CG) or 10 Neumann terms, 10 taped steps for ITD(truncate=10).

A configuration is ``ESTIMATOR/GRANULARITY[:CHUNK][/HVP][/dynamic]``, e.g. ``AID+CG/chunk:10/forward``;
``ESTIMATOR`` is one of :data:`benchmarks._reference.ESTIMATORS`. ``HVP/forward`` and ``HVP/reverse``
time one Hessian-vector product of the ridge inner objective (eager and as the compiled unit).
``--maml`` adds the MAML sinusoid meta-step (meta-batch 25, N = 1 and 5, vmapped over tasks;
:mod:`benchmarks.bench_meta`) with ``bl.Compiled(bl.ITD(), granularity=...)`` against the
library's eager meta-gradient and the hand-written vmapped torch.func reference.

``--json ROWS`` appends every measured row to ROWS (JSON lines); ``--render ROWS`` makes the tables
from such a file without measuring. With ``--out FILE`` the tables replace what lies between
``<!-- run_compile:begin -->`` and ``<!-- run_compile:end -->`` in FILE (the prose around it stays).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

BEGIN, END = "<!-- run_compile:begin -->", "<!-- run_compile:end -->"
DEFAULT_CONFIGS = ("AID+CG/chunk:10", "AID+CG/step", "AID+CG/chunk:5", "AID+CG/chunk:20", "AID+CG/solve",
                   "AID+CG/chunk:10/forward", "FirstOrder/chunk:10", "AID+Neumann/chunk:10",
                   "ITD(truncate=10)/chunk:10", "ITD/chunk:10", "HVP/forward", "HVP/reverse")
MAML_CONFIGS = ("MAML:1/estimator", "MAML:5/estimator", "MAML:1/chunk:10", "MAML:5/chunk:10")


def parse(config: str) -> tuple[str, str, int, str | None]:
    """``(estimator, granularity, chunk, hvp)`` of ``ESTIMATOR/GRANULARITY[:CHUNK][/HVP]``."""
    name, gran, chunk, hvp, _ = parse_options(config)
    return name, gran, chunk, hvp


def parse_options(config: str) -> tuple[str, str, int, str | None, bool]:
    """:func:`parse` and whether the configuration asks for ``dynamic=True`` (a ``/dynamic`` part)."""
    parts = config.split("/")
    name, gran = parts[0], parts[1]
    hvp = next((p for p in parts[2:] if p in ("forward", "reverse")), None)
    gran, _, chunk = gran.partition(":")
    return name, gran, int(chunk) if chunk else 10, hvp, "dynamic" in parts[2:]


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (inductor's compiler subprocesses)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def worker(dim: int, config: str, repeat: int, clock_name: str, warm_disk_cache: bool) -> dict:
    import torch
    torch.set_num_threads(1)
    if not warm_disk_cache:
        import torch._functorch.config
        import torch._inductor.config
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    import bilevel as bl
    from ._reference import best_of
    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    name, gran, chunk, hvp, dynamic = parse_options(config)
    if name.startswith("MAML:"):
        return maml_worker(int(name.split(":")[1]), gran, chunk, repeat, clock)
    if name == "HVP":
        return hvp_worker(dim, gran, repeat, clock)
    from ._reference import exact_solution, library_estimator, make_case, reference_call
    case = make_case(dim, torch.float32, exact_solution(dim))
    inner = bl.GradientDescent(lr=case.lr, steps=100)
    plain = library_estimator(name, case.lr)
    compiled = bl.Compiled(plain, granularity=gran, chunk=chunk, hvp=hvp, dynamic=dynamic)
    train, val = case.ridge.train, case.ridge.val

    def call(estimator):
        return lambda: bl.hypergrad(case.ridge.problem, case.hparams, case.params0, inner=inner,
                                    estimator=estimator, inner_batch=train, outer_batch=val, throw=False)

    started, cpu0 = time.perf_counter(), cpu_seconds()
    first = call(compiled)()
    first_wall, first_cpu = time.perf_counter() - started, cpu_seconds() - cpu0
    second = call(compiled)()
    eager = call(plain)()
    diff = ((first.value["log_lam"] - eager.value["log_lam"]).norm() / eager.value["log_lam"].norm()).item()
    best = best_of({"compiled": call(compiled), "eager": call(plain), "reference": reference_call(name, case)},
                   repeat, clock=clock)
    return dict(dim=dim, config=config, compile_s=first.stats["compile_s"], first_call_s=first_wall,
                compile_cpu_s=first_cpu, second_compile_s=second.stats["compile_s"], rel_diff=diff,
                status=first.result.name, **{f"{k}_ms": v * 1e3 for k, v in best.items()})


def maml_worker(steps: int, gran: str, chunk: int, repeat: int, clock) -> dict:
    import torch
    from torch import nn

    import bilevel as bl
    from bilevel.datasets import Sinusoid

    from ._reference import best_of
    from .bench_meta import ALPHA, META_BATCH, SHOTS, make_setup
    calls = make_setup(steps)  # the hand-written reference, on the same network, data and seed
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    tasks = Sinusoid(shots=SHOTS).sample(META_BATCH, seed=0)
    inner = bl.GradientDescent(lr=ALPHA, steps=steps)
    eager = bl.meta.MAML(net, inner=inner)
    compiled = bl.meta.MAML(net, inner=inner, estimator=bl.Compiled(bl.ITD(), granularity=gran, chunk=chunk))
    started, cpu0 = time.perf_counter(), cpu_seconds()
    first = compiled.meta_gradient(theta, tasks)
    first_wall, first_cpu = time.perf_counter() - started, cpu_seconds() - cpu0
    second = compiled.meta_gradient(theta, tasks)
    ref = eager.meta_gradient(theta, tasks)
    diff = max(float((first.value[k] - ref.value[k]).norm() / ref.value[k].norm()) for k in ref.value)
    best = best_of({"compiled": lambda: compiled.meta_gradient(theta, tasks),
                    "eager": lambda: eager.meta_gradient(theta, tasks),
                    "reference": calls["reference"]}, repeat, clock=clock)
    return dict(dim=0, config=f"MAML N={steps}/{gran}" + (f":{chunk}" if gran == "chunk" else ""),
                compile_s=first.hypergrad.stats["compile_s"], first_call_s=first_wall, compile_cpu_s=first_cpu,
                second_compile_s=second.hypergrad.stats["compile_s"], rel_diff=diff,
                status=first.hypergrad.result.name, **{f"{k}_ms": v * 1e3 for k, v in best.items()})


def hvp_worker(dim: int, mode: str, repeat: int, clock) -> dict:
    """One Hessian-vector product of the ridge inner objective at the inner start: eager (as
    ``bl.AID`` forms it) against the compiled unit ``bl.Compiled`` runs, in HVP mode ``mode``."""
    import torch

    from bilevel import _runner
    from bilevel.compile._primitives import Runner
    from bilevel.compile._unit import Options
    from bilevel.estimators._base import hvp_yy

    from ._reference import best_of, exact_solution, make_case
    case = make_case(dim, torch.float32, exact_solution(dim))
    problem, x, y, batch = case.ridge.problem, case.hparams, case.params0, case.ridge.train
    v = {"w": torch.randn(dim, generator=torch.Generator().manual_seed(0))}
    runner = Runner(10, Options())

    def compiled():
        with _runner.installed(runner):
            return hvp_yy(problem, x, y, batch, mode)(v)

    started, cpu0 = time.perf_counter(), cpu_seconds()
    compile0 = _runner.compile_clock()
    first = compiled()
    first_wall, first_cpu = time.perf_counter() - started, cpu_seconds() - cpu0
    compile_s = _runner.compile_clock() - compile0
    eager = hvp_yy(problem, x, y, batch, mode)(v)
    diff = float((first["w"] - eager["w"]).norm() / eager["w"].norm())
    forward = hvp_yy(problem, x, y, batch, "forward")
    best = best_of({"compiled": compiled, "eager": lambda: hvp_yy(problem, x, y, batch, mode)(v),
                    "reference": lambda: forward(v)}, repeat, clock=clock)
    return dict(dim=dim, config=f"HVP/{mode}", compile_s=compile_s, first_call_s=first_wall, compile_cpu_s=first_cpu,
                second_compile_s=0.0, rel_diff=diff, status="successful",
                **{f"{k}_ms": v * 1e3 for k, v in best.items()})


def table(rows: list[dict]) -> str:
    """Markdown tables: the ridge hypergradient, the MAML meta-gradient, one HVP (whichever rows exist)."""
    head = ("| problem | configuration | reference (ms) | library eager (ms) | compiled (ms) | reference / compiled "
            "| eager / compiled | compile_s (first call) | compile CPU s | compile_s (second call) | rel. diff. vs eager "
            "| status |")
    hvp_head = ("| d | HVP mode | eager forward-over-reverse (ms) | eager, this mode (ms) | compiled, this mode (ms) "
                "| compile_s | compile CPU s | rel. diff. vs eager |")
    parts = []
    for kind in ("ridge", "maml", "hvp"):
        chosen = [r for r in rows if _kind(r) == kind]
        if not chosen:
            continue
        lines = [hvp_head if kind == "hvp" else head]
        lines.append("|" + "---|" * (lines[0].count("|") - 1))
        for r in chosen:
            if kind == "hvp":
                lines.append(f"| {r['dim']} | `{r['config'].split('/')[1]}` | {r['reference_ms']:.3f} | "
                             f"{r['eager_ms']:.3f} | {r['compiled_ms']:.3f} | {r['compile_s']:.1f} | "
                             f"{r['compile_cpu_s']:.1f} | {r['rel_diff']:.1e} |")
                continue
            problem = f"ridge d={r['dim']}" if kind == "ridge" else "MAML sinusoid"
            lines.append(f"| {problem} | `{r['config']}` | {r['reference_ms']:.1f} | {r['eager_ms']:.1f} | "
                         f"{r['compiled_ms']:.2f} | **{r['reference_ms'] / r['compiled_ms']:.1f}x** | "
                         f"{r['eager_ms'] / r['compiled_ms']:.1f}x | {r['compile_s']:.1f} | {r['compile_cpu_s']:.1f} | "
                         f"{r['second_compile_s']:.2f} | {r['rel_diff']:.1e} | `{r['status']}` |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _kind(row: dict) -> str:
    return "hvp" if row["config"].startswith("HVP/") else "maml" if row["config"].startswith("MAML") else "ridge"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_compile", description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="*", default=[200, 2000])
    parser.add_argument("--configs", nargs="*", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--maml", action="store_true", help="add the MAML sinusoid meta-step")
    parser.add_argument("--repeat", type=int, default=7, help="best of this many interleaved runs (default 7)")
    parser.add_argument("--clock", choices=["thread", "wall"], default="thread",
                        help="thread: CPU time of the timing thread (steadier on a loaded machine); wall: wall time")
    parser.add_argument("--warm-disk-cache", action="store_true", help="keep torch's on-disk compile caches on")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker (default 1800)")
    parser.add_argument("--out", default=None, help="markdown file to write the table into")
    parser.add_argument("--json", default=None, help="also append every row, as a JSON line, to this file")
    parser.add_argument("--render", default=None, help="make the table from the rows of a --json file instead of "
                        "measuring")
    parser.add_argument("--worker", nargs=2, metavar=("DIM", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.repeat, args.clock, args.warm_disk_cache)))
        return
    started = time.strftime("%Y-%m-%d %H:%M")
    jobs = [(dim, c) for dim in args.dims for c in args.configs] + ([(0, c) for c in MAML_CONFIGS] if args.maml else [])
    if args.render:
        jobs = []
        rows = [json.loads(line) for line in open(args.render) if line.strip()]
    else:
        rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for dim, config in jobs:
        cmd = [sys.executable, "-m", "benchmarks.run_compile", "--worker", str(dim), config, "--repeat",
               str(args.repeat), "--clock", args.clock] + (["--warm-disk-cache"] if args.warm_disk_cache else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=True)
        except subprocess.CalledProcessError as err:
            print(f"  {config} d={dim}: worker failed\n{err.stderr[-2000:]}", file=sys.stderr, flush=True)
            continue
        except subprocess.TimeoutExpired:
            print(f"  {config} d={dim}: worker timed out after {args.timeout:.0f} s", file=sys.stderr, flush=True)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        print(f"  {row['config']:28s} d={dim:5d}  ref {row['reference_ms']:7.1f} ms  eager {row['eager_ms']:7.1f} ms  "
              f"compiled {row['compiled_ms']:7.2f} ms  compile {row['compile_s']:6.1f} s", file=sys.stderr, flush=True)
    command = "python -m benchmarks.run_compile " + " ".join(sys.argv[1:] if argv is None else argv)
    import torch
    text = (f"{table(rows)}\n\nProduced by `{command.strip()}` on {started} ({platform.machine()}, "
            f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, Python {platform.python_version()}, one thread, "
            f"best of {args.repeat}, {args.clock} clock, on-disk compile caches "
            f"{'on' if args.warm_disk_cache else 'off'}).")
    print(text)
    if args.out:
        old = open(args.out).read() if os.path.exists(args.out) else ""
        if BEGIN in old and END in old:
            new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", old, flags=re.S)
        else:
            new = f"{old}\n{BEGIN}\n{text}\n{END}\n"
        with open(args.out, "w") as fh:
            fh.write(new)


if __name__ == "__main__":
    main()
