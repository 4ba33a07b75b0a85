"""The MAML meta-step benchmark without asv: one markdown table.

    python -m benchmarks.run_meta [--repeat 15]

For N = 1 and 5 inner steps it prints the best-of-``repeat`` CPU time of one meta-gradient
(meta-batch 25, 10-shot sinusoid, 1-40-40-1 ReLU, float32, one thread) for the library, the two
hand-written torch.func references and the per-task autograd loop, and the two target ratios.
"""

from __future__ import annotations

import argparse
import platform

import torch

from .bench_meta import STEPS, check_agreement, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; "
          f"best of {args.repeat} interleaved runs, CPU time (time.thread_time)\n")
    print("| N | library (ms) | reference vmap(grad) (ms) | reference grad(vmap) (ms) | autograd loop (ms) "
          "| library / best reference | loop / library | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for steps in STEPS:
        r = ratios(steps, args.repeat)
        print(f"| {steps} | {1e3 * r['library']:.2f} | {1e3 * r['reference']:.2f} | {1e3 * r['reference_fused']:.2f} "
              f"| {1e3 * r['loop']:.2f} | {r['library/reference']:.3f} | {r['loop/library']:.2f} "
              f"| {check_agreement(steps):.1e} |")


if __name__ == "__main__":
    main()
