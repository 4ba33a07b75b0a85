"""Compiled execution (``bl.Compiled``) against eager: run and compile times, as markdown tables.

    python -m benchmarks.run_compile [--dims 200 2000] [--configs AID+CG/chunk:10 ...] [--maml]
                                     [--repeat 7] [--clock thread|wall] [--warm-disk-cache]
                                     [--json ROWS] [--render ROWS] [--out docs/compile.md]

Every configuration runs in a fresh worker process (``--worker``), so that its compile time is
what a user pays in a new process: unless ``--warm-disk-cache``, the inductor FX-graph and
AOT-autograd on-disk caches are off and the worker gets an empty C++ kernel cache (only inductor's
precompiled header, built once per machine, is copied in), so every kernel is compiled. In the
worker, the first ``bl.hypergrad`` call compiles (``compile_s`` is its ``stats["compile_s"]``,
``compile CPU`` the CPU seconds of the worker and its compiler subprocesses during that call); a
call with a new shape (``d + 1``; MAML: one task fewer) then shows what each further shape costs
in a warm process; then the compiled call, the library's eager call (AID with the reference's
forward-over-reverse HVPs) and the hand-written eager torch.func reference of
:mod:`benchmarks._reference` are timed best-of-``repeat``, interleaved, in that process.
Float32, one thread, ridge problem with n = 1000, 100 gradient steps, then 10 CG iterations
(AID+CG) or 10 Neumann terms, 10 taped steps for ITD(truncate=10).

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
import shutil
import subprocess
import sys
import tempfile
import time

from ._timing import best_of, cpu_seconds, publish, runner_parser

BEGIN, END = "<!-- run_compile:begin -->", "<!-- run_compile:end -->"
DEFAULT_CONFIGS = ("AID+CG/auto", "AID+CG/loop", "AID+CG/chunk:10", "AID+CG/step", "AID+CG/chunk:5", "AID+CG/chunk:20",
                   "AID+CG/solve", "AID+CG/chunk:10/forward", "FirstOrder/chunk:10", "AID+Neumann/chunk:10",
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


def worker(dim: int, config: str, repeat: int, clock_name: str, warm_disk_cache: bool) -> dict:
    import torch
    torch.set_num_threads(1)
    if not warm_disk_cache:
        import torch._functorch.config
        import torch._inductor.config
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    import bilevel as bl
    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    name, gran, chunk, hvp, dynamic = parse_options(config)
    if name.startswith("MAML:"):
        return maml_worker(int(name.split(":")[1]), gran, chunk, repeat, clock, warm_disk_cache)
    if name == "HVP":
        return hvp_worker(dim, gran, repeat, clock)
    from ._reference import exact_solution, hypergrad_call, library_estimator, make_case, reference_call
    case = make_case(dim, torch.float32, exact_solution(dim))
    plain = library_estimator(name, case.lr)
    compiled = bl.Compiled(plain, granularity=gran, chunk=chunk, dynamic=dynamic, **({"hvp": hvp} if hvp else {}))
    started, cpu0 = time.perf_counter(), cpu_seconds()
    first = hypergrad_call(case, compiled)()
    first_wall, first_cpu = time.perf_counter() - started, cpu_seconds() - cpu0
    second = hypergrad_call(case, compiled)()
    cpu1 = cpu_seconds()  # a new problem shape in the same process: what each further shape costs
    shape = hypergrad_call(make_case(dim + 1, torch.float32, (case.lr, case.exact)), compiled)()
    shape_cpu = cpu_seconds() - cpu1
    eager = hypergrad_call(case, plain)()
    diff = ((first.value["log_lam"] - eager.value["log_lam"]).norm() / eager.value["log_lam"].norm()).item()
    best = best_of({"compiled": hypergrad_call(case, compiled), "eager": hypergrad_call(case, plain),
                    "reference": reference_call(name, case)}, repeat, clock=clock)
    return dict(dim=dim, config=config + (" (warm disk cache)" if warm_disk_cache else ""),
                compile_s=first.stats["compile_s"], first_call_s=first_wall,
                compile_cpu_s=first_cpu, second_compile_s=second.stats["compile_s"], rel_diff=diff,
                shape_compile_s=shape.stats["compile_s"], shape_compile_cpu_s=shape_cpu,
                status=first.result.name, load=os.getloadavg()[0], **{f"{k}_ms": v * 1e3 for k, v in best.items()})


def maml_worker(steps: int, gran: str, chunk: int, repeat: int, clock, warm_disk_cache: bool = False) -> dict:
    import torch
    from torch import nn

    import bilevel as bl
    from bilevel.datasets import Sinusoid

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
    cpu1 = cpu_seconds()  # a new shape (one task fewer) in the same process
    shape = compiled.meta_gradient(theta, Sinusoid(shots=SHOTS).sample(META_BATCH - 1, seed=1))
    shape_cpu = cpu_seconds() - cpu1
    ref = eager.meta_gradient(theta, tasks)
    diff = max(float((first.value[k] - ref.value[k]).norm() / ref.value[k].norm()) for k in ref.value)
    best = best_of({"compiled": lambda: compiled.meta_gradient(theta, tasks),
                    "eager": lambda: eager.meta_gradient(theta, tasks),
                    "reference": calls["reference"]}, repeat, clock=clock)
    return dict(dim=0, config=f"MAML N={steps}/{gran}" + (f":{chunk}" if gran == "chunk" else "")
                + (" (warm disk cache)" if warm_disk_cache else ""),
                compile_s=first.hypergrad.stats["compile_s"], first_call_s=first_wall, compile_cpu_s=first_cpu,
                second_compile_s=second.hypergrad.stats["compile_s"], rel_diff=diff,
                shape_compile_s=shape.hypergrad.stats["compile_s"], shape_compile_cpu_s=shape_cpu,
                status=first.hypergrad.result.name, load=os.getloadavg()[0],
                **{f"{k}_ms": v * 1e3 for k, v in best.items()})


def hvp_worker(dim: int, mode: str, repeat: int, clock) -> dict:
    """One Hessian-vector product of the ridge inner objective at the inner start: eager (as
    ``bl.AID`` forms it) against the compiled unit ``bl.Compiled`` runs, in HVP mode ``mode``."""
    import torch

    from bilevel import _runner
    from bilevel.compile._primitives import Runner
    from bilevel.compile._unit import Options
    from bilevel.estimators._base import hvp_yy

    from ._reference import exact_solution, make_case
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
                second_compile_s=0.0, rel_diff=diff, status="successful", load=os.getloadavg()[0],
                **{f"{k}_ms": v * 1e3 for k, v in best.items()})


def table(rows: list[dict]) -> str:
    """Markdown tables: the ridge hypergradient, the MAML meta-gradient, one HVP (whichever rows exist)."""
    head = ("| problem | configuration | reference (ms) | library eager (ms) | compiled (ms) | reference / compiled "
            "| eager / compiled | compile_s (first call) | compile CPU s | compile_s, CPU s (new shape) "
            "| compile_s (second call) | rel. diff. vs eager | status | load |")
    hvp_head = ("| d | HVP mode | eager forward-over-reverse (ms) | eager, this mode (ms) | compiled, this mode (ms) "
                "| compile_s | compile CPU s | rel. diff. vs eager | load |")
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
                             f"{r['compile_cpu_s']:.1f} | {r['rel_diff']:.1e} | {r.get('load', float('nan')):.1f} |")
                continue
            problem = f"ridge d={r['dim']}" if kind == "ridge" else "MAML sinusoid"
            lines.append(f"| {problem} | `{r['config']}` | {r['reference_ms']:.1f} | {r['eager_ms']:.1f} | "
                         f"{r['compiled_ms']:.2f} | **{r['reference_ms'] / r['compiled_ms']:.1f}x** | "
                         f"{r['eager_ms'] / r['compiled_ms']:.1f}x | {r['compile_s']:.1f} | {r['compile_cpu_s']:.1f} | "
                         f"{_shape(r)} | {r['second_compile_s']:.2f} | {r['rel_diff']:.1e} | `{r['status']}` | "
                         f"{r.get('load', float('nan')):.1f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _shape(row: dict) -> str:
    if "shape_compile_s" not in row:
        return "–"
    return f"{row['shape_compile_s']:.1f}, {row['shape_compile_cpu_s']:.1f}"


def _kind(row: dict) -> str:
    return "hvp" if row["config"].startswith("HVP/") else "maml" if row["config"].startswith("MAML") else "ridge"


def main(argv: list[str] | None = None) -> None:
    parser = runner_parser("benchmarks.run_compile", __doc__, repeat=7)
    parser.add_argument("--dims", type=int, nargs="*", default=[200, 2000])
    parser.add_argument("--configs", nargs="*", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--maml", action="store_true", help="add the MAML sinusoid meta-step")
    parser.add_argument("--clock", choices=["thread", "wall"], default="thread",
                        help="thread: CPU time of the timing thread (steadier on a loaded machine); wall: wall time")
    parser.add_argument("--warm-disk-cache", action="store_true", help="keep torch's on-disk compile caches on")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker (default 1800)")
    parser.add_argument("--json", default=None, help="also append every row, as a JSON line, to this file")
    parser.add_argument("--render", default=None, help="make the table from the rows of a --json file instead of "
                        "measuring")
    parser.add_argument("--worker", nargs=2, metavar=("DIM", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--prime", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prime:
        prime()
        return
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
    for dim, config in jobs:
        row = run_worker(dim, config, args)
        if row is None:
            continue
        rows.append(row)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        print(f"  {row['config']:28s} d={dim:5d}  ref {row['reference_ms']:7.1f} ms  eager {row['eager_ms']:7.1f} ms  "
              f"compiled {row['compiled_ms']:7.2f} ms  compile {row['compile_s']:6.1f} s  load {row.get('load', 0):.1f}",
              file=sys.stderr, flush=True)
    for path in _template:
        shutil.rmtree(path, ignore_errors=True)
    caches = "on" if args.warm_disk_cache else "off (a fresh kernel cache per worker)"
    details = f"one thread, best of {args.repeat}, {args.clock} clock, on-disk compile caches {caches}"
    if args.render:
        details = f"rows measured earlier ({details}; each row's load average in its last column)"
    publish("benchmarks.run_compile", argv, table(rows), started, details, args.out, BEGIN, END, load=not args.render)


_template: list[str] = []


def machine_template(timeout: float) -> str:
    """An inductor cache directory holding only what inductor builds once per machine, whatever
    the problem (made once per run, in a separate process): the test programs with which it picks
    the SIMD instruction set (about ten C++ compiler runs, 7-10 CPU seconds here, done in every
    process whose cache directory lacks them) and the precompiled C++ headers of its Python and C++
    wrappers (about 5 and 7 CPU seconds, kept in the default cache directory whatever
    ``TORCHINDUCTOR_CACHE_DIR`` says). No kernel of the benchmarked problems is in it."""
    if _template:
        return _template[0]
    path = tempfile.mkdtemp(prefix="bilevel-compile-machine-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": path}
    started = cpu_seconds()
    subprocess.run([sys.executable, "-m", "benchmarks.run_compile", "--prime"], env=env, timeout=timeout,
                   check=True, capture_output=True)
    print(f"  per-machine compiler setup (SIMD checks, precompiled headers): {cpu_seconds() - started:.1f} CPU s",
          file=sys.stderr, flush=True)
    _template.append(path)
    return path


def prime() -> None:
    """Build what inductor builds once per machine (see :func:`machine_template`), with a function
    unlike any benchmarked one."""
    import torch

    from torch._inductor.cpu_vec_isa import pick_vec_isa
    pick_vec_isa()
    x = torch.ones(3)
    from bilevel.compile._backend import cpp_wrapper_options
    for options in ({"cpp_wrapper": False}, {"cpp_wrapper": True}, cpp_wrapper_options()):
        torch._dynamo.reset()
        torch.compile(lambda t: (t * 2.5).exp(), options=options)(x)


def run_worker(dim: int, config: str, args: argparse.Namespace) -> dict | None:
    """One configuration in a fresh worker process; ``None`` (and a message) if it failed or timed out.

    Unless ``--warm-disk-cache``, the worker gets a fresh inductor cache directory holding only what
    inductor builds once per machine (:func:`machine_template`), so that its compile time is what a
    new problem shape costs in a new process: every C++ kernel is compiled, none is found on disk.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.run_compile", "--worker", str(dim), config, "--repeat",
           str(args.repeat), "--clock", args.clock] + (["--warm-disk-cache"] if args.warm_disk_cache else [])
    scratch = None
    if not args.warm_disk_cache:
        scratch = tempfile.mkdtemp(prefix="bilevel-compile-")
        shutil.copytree(machine_template(args.timeout), scratch, dirs_exist_ok=True)
        env["TORCHINDUCTOR_CACHE_DIR"] = scratch
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=True)
    except subprocess.CalledProcessError as err:
        print(f"  {config} d={dim}: worker failed\n{err.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    except subprocess.TimeoutExpired:
        print(f"  {config} d={dim}: worker timed out after {args.timeout:.0f} s", file=sys.stderr, flush=True)
        return None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
