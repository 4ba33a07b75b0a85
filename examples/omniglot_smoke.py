"""Smoke run and per-step timings for few-shot Omniglot (issue 5, code-level part).

    OMP_NUM_THREADS=1 PYTHONPATH=. python examples/omniglot_smoke.py time
    OMP_NUM_THREADS=1 PYTHONPATH=. python examples/omniglot_smoke.py train --method maml --seconds 150

``time``: seconds per meta-step at meta-batch 8, 5-way 1-shot, 15 queries (median of 5 after one
warm-up step) for each method, and the sampler's episodes/s. ``train``: Adam on meta-batches of 8
'maml-train' episodes (the 90/180/270 degree rotations added as new classes) for a wall-clock
budget (evaluation excluded); every ``--eval-every`` steps the query accuracy (mean ± 95% CI)
after adaptation on ``--eval-episodes`` fixed 'maml-test' episodes (no rotations, 15 queries per class).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bilevel.datasets import EpisodeSampler, Omniglot
from bilevel.meta.omniglot import EpisodeFamily, evaluate_accuracy, make_learner

DATA, CACHE = "/work/shared/data/omniglot", "/tmp/bilevel-omniglot-cache"


def timings(args: argparse.Namespace) -> None:
    train = Omniglot(args.data, "maml-train", rotations=True, cache_dir=args.cache)
    sampler = EpisodeSampler(train, ways=5, shots=1, queries=15, seed=0)
    start = time.perf_counter()
    for _ in range(50):
        sampler.sample(8)
    print(f"sampler: {400 / (time.perf_counter() - start):.0f} episodes/s (5-way 1-shot 15 queries, batches of 8)")
    for method in args.methods:
        learner, theta = make_learner(method, 5, inner_lr=0.4)
        family = EpisodeFamily(train, 5, 1, 15, one_hot=method == "shared-ridge")
        gen = torch.Generator().manual_seed(0)
        times = []
        for i in range(6):
            tasks = family.sample(8, gen)
            start = time.perf_counter()
            learner.meta_gradient(theta, tasks)
            if i:
                times.append(time.perf_counter() - start)
        print(f"{method}: {statistics.median(times):.3f} s per meta-step (median of 5; min {min(times):.3f})",
              flush=True)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    ridge = args.method == "shared-ridge"
    family = EpisodeFamily(Omniglot(args.data, "maml-train", rotations=True, cache_dir=args.cache), 5, 1,
                           args.queries, one_hot=ridge)
    test = EpisodeFamily(Omniglot(args.data, "maml-test", cache_dir=args.cache), 5, 1, 15, one_hot=ridge)
    learner, theta = make_learner(args.method, 5, inner_lr=args.inner_lr, seed=args.seed)
    opt = torch.optim.Adam(list(theta.values()), lr=args.outer_lr)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{args.method}: step  train_s  train_loss  test_acc (mean ± 95% CI over {args.eval_episodes} episodes)")
    step, trained, losses = 0, 0.0, []
    while True:
        if step % args.eval_every == 0 or trained >= args.seconds:
            acc = evaluate_accuracy(learner, theta, test, args.eval_episodes, chunk=25)
            loss = sum(losses) / len(losses) if losses else float("nan")
            print(f"{step:5d}  {trained:7.1f}  {loss:10.3f}  {acc}", flush=True)
            losses = []
            if trained >= args.seconds:
                break
        start = time.perf_counter()
        mg = learner.meta_gradient(theta, family.sample(args.meta_batch, gen))
        for k, v in theta.items():
            v.grad = mg.value[k]
        opt.step()
        trained += time.perf_counter() - start
        losses.append(float(mg.loss))
        step += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("time", "train"))
    p.add_argument("--methods", nargs="+", default=["maml", "fomaml", "anil", "shared-ridge"])
    p.add_argument("--method", default="maml")
    p.add_argument("--seconds", type=float, default=150.0, help="training-time budget (evaluation excluded)")
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--queries", type=int, default=15, help="query images per class of the training episodes")
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=DATA)
    p.add_argument("--cache", default=CACHE)
    args = p.parse_args()
    torch.set_num_threads(1)
    (timings if args.mode == "time" else train)(args)


if __name__ == "__main__":
    main()
