"""The core benchmark measurements without asv: one markdown table.

    python -m benchmarks.run_core [--dims 200 2000] [--repeat 11] [--out docs/performance.md]

For each estimator and dimension it reports the best-of-``repeat`` wall time of
``bl.hypergrad`` and of the hand-written torch.func reference (interleaved, float32,
one thread), their ratio, the relative error against the closed-form ridge
hypergradient in float32 and float64, how far the library's value is from the
reference's (float64), the HVP and gradient counts, and the float32 status.

With ``--out FILE``: if FILE contains the markers ``<!-- run_core:begin -->`` and
``<!-- run_core:end -->`` the table replaces what lies between them (the prose
around it stays); otherwise the markers and the table are appended to FILE (or make it).
"""

from __future__ import annotations

import sys
import time

import torch

from ._reference import (ESTIMATORS, exact_solution, library_call, make_case, reference_call, rel_error,
                         time_ratio)
from ._timing import markdown_table, publish, runner_parser

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
    header = ["estimator", "d", "`bl.hypergrad` (ms)", "reference (ms)", "ratio", "rel. error f32", "rel. error f64",
              "library vs reference (f64)", "HVPs", "gradients", "status (f32)"]
    return markdown_table(header, [[r["estimator"], str(r["dim"]), f"{r['t_lib'] * 1e3:.1f}", f"{r['t_ref'] * 1e3:.1f}",
                                    f"**{r['ratio']:.3f}**", f"{r['err32']:.2e}", f"{r['err64']:.2e}", f"{r['gap']:.1e}",
                                    str(r["num_hvp"]), str(r["num_grad"]), f"`{r['status']}`"] for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = runner_parser("benchmarks.run_core", __doc__, repeat=11)
    parser.add_argument("--dims", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = measure(args.dims, args.repeat, args.estimators)
    publish("benchmarks.run_core", argv, table(rows), started, f"one thread, best of {args.repeat}", args.out,
            BEGIN, END)


if __name__ == "__main__":
    main()
