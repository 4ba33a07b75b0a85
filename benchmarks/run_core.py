"""The core benchmark measurements without asv: one markdown table.

    python -m benchmarks.run_core [--dims 200 2000] [--repeat 11] [--out docs/performance.md]

For each estimator and dimension it reports the best-of-``repeat`` wall time of
``bl.hypergrad`` and of the hand-written torch.func reference (interleaved, float32,
one thread), their ratio, the relative error against the closed-form ridge
hypergradient in float32 and float64, how far the library's value is from the
reference's (float64), the HVP and gradient counts, and the float32 status.

With ``--out FILE``: if FILE contains the markers ``<!-- run_core:begin -->`` and
``<!-- run_core:end -->`` the table replaces what lies between them (the prose
around it stays); otherwise FILE is written with the table alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

import torch

from ._reference import (ESTIMATORS, exact_solution, library_call, make_case, reference_call, rel_error,
                         time_ratio)

BEGIN, END = "<!-- run_core:begin -->", "<!-- run_core:end -->"


def measure(dims: list[int], repeat: int, estimators: list[str]) -> list[dict]:
    rows = []
    for dim in dims:
        solution = exact_solution(dim)
        case32 = make_case(dim, torch.float32, solution)
        case64 = make_case(dim, torch.float64, solution)
        for name in estimators:
            t_lib, t_ref, ratio = time_ratio(name, case32, repeat)
            hg32 = library_call(name, case32)()
            hg64 = library_call(name, case64)()
            ref64 = reference_call(name, case64)()["log_lam"]
            value64 = hg64.value["log_lam"]
            scale = torch.linalg.vector_norm(ref64).item()
            gap = torch.linalg.vector_norm(value64 - ref64).item() / (scale if scale > 0 else 1.0)
            rows.append(dict(estimator=name, dim=dim, t_lib=t_lib, t_ref=t_ref, ratio=ratio,
                             err32=rel_error(hg32.value["log_lam"], case32.exact),
                             err64=rel_error(value64, case64.exact), gap=gap,
                             num_hvp=hg32.stats["num_hvp"], num_grad=hg32.stats["num_grad"],
                             status=hg32.result.name))
            print(f"  {name:18s} d={dim:5d}  lib {t_lib * 1e3:8.1f} ms  ref {t_ref * 1e3:8.1f} ms  "
                  f"ratio {ratio:.3f}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| estimator | d | `bl.hypergrad` (ms) | reference (ms) | ratio | rel. error f32 | rel. error f64 "
            "| library vs reference (f64) | HVPs | gradients | status (f32) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['dim']} | {r['t_lib'] * 1e3:.1f} | {r['t_ref'] * 1e3:.1f} | "
                     f"**{r['ratio']:.3f}** | {r['err32']:.2e} | {r['err64']:.2e} | {r['gap']:.1e} | "
                     f"{r['num_hvp']} | {r['num_grad']} | `{r['status']}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_core", description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--repeat", type=int, default=11, help="best of this many interleaved runs (default 11)")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    parser.add_argument("--out", default=None, help="markdown file to write the table into")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = measure(args.dims, args.repeat, args.estimators)
    command = "python -m benchmarks.run_core " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (f"{table(rows)}\n\n"
            f"Produced by `{command.strip()}` on {started} ({platform.machine()}, "
            f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, Python {platform.python_version()}, "
            f"one thread, best of {args.repeat}).")
    print(text)
    if args.out:
        old = open(args.out).read() if os.path.exists(args.out) else ""
        if BEGIN in old and END in old:
            new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", old,
                         flags=re.S)
        else:
            new = f"{BEGIN}\n{text}\n{END}\n"
        with open(args.out, "w") as fh:
            fh.write(new)


if __name__ == "__main__":
    main()
