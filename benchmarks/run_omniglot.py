"""The Omniglot meta-step benchmark without asv: one markdown table (issue 5).

    OMP_NUM_THREADS=1 python -m benchmarks.run_omniglot [--repeat 5] [--queries 15] [--inner-steps N]
        [--methods maml anil ...]

Best-of-``repeat`` interleaved CPU time (``time.thread_time``) of one meta-gradient per method
(5-way 1-shot, meta-batch 8, 64-filter conv net, float32, one thread) and of drawing one meta-batch
of 8 episodes, the ratios the issue sets targets for, and the load average before and after.
``--inner-steps N`` gives every method ``N`` inner steps (default: one, five for Reptile and iMAML);
``--inner-steps 5`` is the setting of the ANIL paper (Raghu et al. 2020).
Needs the Omniglot files (``$BILEVEL_DATA/omniglot``).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from .bench_omniglot import META_BATCH, QUERIES, REPEAT, data_root, load_train, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=REPEAT)
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--methods", nargs="+", default=["maml", "anil", "shared-ridge"])
    parser.add_argument("--inner-steps", type=int, default=None,
                        help="inner steps of every method (default: each method's own)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = load_train()
    if train is None:
        raise SystemExit(f"Omniglot not found at {data_root()}: set BILEVEL_DATA")
    before = os.getloadavg()
    r = ratios(train, tuple(args.methods), args.repeat, args.queries, args.inner_steps)
    after = os.getloadavg()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; best of "
          f"{args.repeat} interleaved runs, CPU time (time.thread_time); 5-way 1-shot, {args.queries} queries, "
          f"inner steps {'per method' if args.inner_steps is None else args.inner_steps}, "
          f"meta-batch {META_BATCH}; load average (1, 5, 15 min) before {before[0]:.2f} {before[1]:.2f} "
          f"{before[2]:.2f}, after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}\n")
    print("| call | CPU s per call |")
    print("|---|---|")
    for key in ("sampler", *args.methods):
        print(f"| {key if key != 'sampler' else 'sampler (8 episodes)'} | {r[key]:.4f} |")
    print()
    if "anil/maml" in r:
        print(f"ANIL / MAML meta-step: {r['anil/maml']:.3f} (target <= 0.6)")
    if "anil_step/sampler_batch" in r:
        print(f"ANIL meta-step / sampler meta-batch: {r['anil_step/sampler_batch']:.0f} (target >= 20); sampler "
              f"{r['sampler_episodes_per_s']:.0f} episodes/s")


if __name__ == "__main__":
    main()
