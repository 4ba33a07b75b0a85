"""Peak memory against N and ESJ batching, without asv: two markdown tables.

    python -m benchmarks.run_memory [--steps 10 100 1000] [--dim 100000] [--repeat 5] [--out FILE]

Memory: every (estimator, N) runs in a fresh ``python -c`` subprocess (one
thread) that builds the problem of :mod:`benchmarks.bench_memory`, makes one
warm-up call with N = 1 (one-time allocations of torch's transforms), reads its
current RSS (``/proc/self/statm``), makes the measured call and reports
``getrusage(RUSAGE_SELF).ru_maxrss``. The table gives that peak (what asv's
``peakmem_`` reports) and the growth of RSS during the call (peak minus the RSS
just before it), which isolates what the estimator itself holds.

ESJ: CPU time (``time.process_time``, best of ``repeat``, one thread) of one
ESJ hypergradient with Q directions batched by ``vmap`` against one plain inner
solve, from :mod:`benchmarks.bench_esj`.

With ``--out FILE``: the tables replace what lies between the markers
``<!-- run_memory:begin -->`` and ``<!-- run_memory:end -->`` in FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

BEGIN, END = "<!-- run_memory:begin -->", "<!-- run_memory:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import gc, json, os, resource, sys
import torch
torch.set_num_threads(1)
from benchmarks.bench_memory import hypergrad_call, make_case, use_allocator
name, steps, dim, allocator = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
use_allocator(allocator)
case = make_case(dim=dim)
hypergrad_call(case, name, 1)()
gc.collect()
page_kb = os.sysconf("SC_PAGE_SIZE") / 1024
before_kb = int(open("/proc/self/statm").read().split()[1]) * page_kb
hg = hypergrad_call(case, name, steps)()
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(peak_mb=peak_kb / 1024, before_mb=before_kb / 1024, status=hg.result.name,
                      num_grad=hg.stats["num_grad"], num_hvp=hg.stats["num_hvp"])))
"""


def measure_memory(names: list[str], steps: list[int], dim: int, allocators: list[str]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    rows = []
    for allocator in allocators:
        for n in steps:
            for name in names:
                out = subprocess.run([sys.executable, "-c", CHILD, name, str(n), str(dim), allocator], cwd=ROOT,
                                     env=env, capture_output=True, text=True, check=True).stdout
                row = dict(json.loads(out.strip().splitlines()[-1]), estimator=name, steps=n, allocator=allocator)
                row["growth_mb"] = max(0.0, row["peak_mb"] - row["before_mb"])
                rows.append(row)
                print(f"  {allocator:10s} {name:15s} N={n:5d}  peak {row['peak_mb']:8.1f} MB  "
                      f"growth {row['growth_mb']:8.1f} MB", file=sys.stderr, flush=True)
    return rows


def memory_table(rows: list[dict]) -> str:
    steps = sorted({r["steps"] for r in rows})
    keys = list(dict.fromkeys((r["allocator"], r["estimator"]) for r in rows))
    cell = {(r["allocator"], r["estimator"], r["steps"]): r for r in rows}
    head = "| allocator | estimator | " + " | ".join(f"peak RSS N={n} (MB)" for n in steps) + " | " + \
        " | ".join(f"growth N={n} (MB)" for n in steps) + " | status |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for allocator, name in keys:
        peaks = " | ".join(f"{cell[allocator, name, n]['peak_mb']:.0f}" for n in steps)
        growth = " | ".join(f"{cell[allocator, name, n]['growth_mb']:.1f}" for n in steps)
        lines.append(f"| {allocator} | {name} | {peaks} | {growth} | `{cell[allocator, name, steps[-1]]['status']}` |")
    return "\n".join(lines)


def memory_summary(rows: list[dict]) -> str:
    cell = {(r["allocator"], r["estimator"], r["steps"]): r for r in rows}
    steps = sorted({r["steps"] for r in rows})
    out = []
    for allocator in dict.fromkeys(r["allocator"] for r in rows):
        lean = [k for k in ("AID", "IMAML", "ESJ") if (allocator, k, steps[0]) in cell]
        peaks = [cell[allocator, k, n]["peak_mb"] for k in lean for n in steps]
        if peaks:
            out.append(f"- {allocator}: {', '.join(lean)} across N = {', '.join(map(str, steps))}: peak RSS from "
                       f"{min(peaks):.0f} to {max(peaks):.0f} MB (largest / smallest = {max(peaks) / min(peaks):.3f}).")
        big = steps[-1]
        if (allocator, "ITD", big) in cell and (allocator, "ITD-checkpoint", big) in cell:
            taped, ckpt = cell[allocator, "ITD", big], cell[allocator, "ITD-checkpoint", big]
            out.append(f"- {allocator}, N = {big}: memory-lean ITD's peak RSS is "
                       f"{100 * ckpt['peak_mb'] / taped['peak_mb']:.1f}% of taped ITD's ({ckpt['peak_mb']:.0f} / "
                       f"{taped['peak_mb']:.0f} MB); its growth during the call is "
                       f"{100 * ckpt['growth_mb'] / max(taped['growth_mb'], 1e-9):.1f}% of taped ITD's "
                       f"({ckpt['growth_mb']:.1f} / {taped['growth_mb']:.1f} MB).")
    return "\n".join(out)


def esj_table(rows: list[dict]) -> str:
    head = ("| problem | N | Q | one inner solve (ms) | ESJ, Q batched (ms) | Q sequential solves (ms) | "
            "ESJ / (Q x one solve) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['steps']} | {r['q']} | {r['t_solve'] * 1e3:.1f} | "
                     f"{r['t_esj'] * 1e3:.1f} | {r['q'] * r['t_solve'] * 1e3:.1f} | **{r['ratio']:.3f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--estimators", nargs="+", default=None)
    parser.add_argument("--allocators", nargs="+", default=["fixed-mmap", "default"])
    parser.add_argument("--directions", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", choices=["memory", "esj"], default=None)
    parser.add_argument("--out", default=None, help="markdown file to write the tables into")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from .bench_esj import measure_esj
    from .bench_memory import ESTIMATORS
    started = time.strftime("%Y-%m-%d %H:%M")
    parts = []
    if args.only in (None, "memory"):
        rows = measure_memory(args.estimators or list(ESTIMATORS), args.steps, args.dim, args.allocators)
        parts += [memory_table(rows), memory_summary(rows)]
    if args.only in (None, "esj"):
        parts.append(esj_table(measure_esj(args.directions, args.repeat)))
    command = "python -m benchmarks.run_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    parts.append(f"Produced by `{command.strip()}` on {started} ({platform.machine()}, {os.cpu_count()} logical "
                 f"CPUs shared with other jobs, torch {torch.__version__}, Python {platform.python_version()}, "
                 "one thread).")
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        old = open(args.out).read() if os.path.exists(args.out) else ""
        block = f"{BEGIN}\n{text}\n{END}"
        new = (re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, old, flags=re.S)
               if BEGIN in old and END in old else old + ("\n" if old else "") + block + "\n")
        with open(args.out, "w") as fh:
            fh.write(new)


if __name__ == "__main__":
    main()
