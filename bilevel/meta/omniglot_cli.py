"""``bilevel meta-train --task omniglot``: meta-train a conv net on N-way K-shot Omniglot, report test accuracy."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from ..datasets import Omniglot
from .checkpoint import CheckpointError, describe
from .omniglot import EpisodeFamily, evaluate_accuracy, make_learner
from .train import Trainer

#: ``--method`` values that have an Omniglot learner.
OMNIGLOT_METHODS = ("maml", "fomaml", "anil", "metasgd", "shared-ridge")
EVAL_SEED = 20_170_703


def default_data() -> Path:
    """``$BILEVEL_DATA/omniglot`` if the variable is set, else ``../shared/data/omniglot`` from the working folder."""
    root = os.environ.get("BILEVEL_DATA")
    return (Path(root) if root else Path("..") / "shared" / "data") / "omniglot"


def run_omniglot(args: argparse.Namespace) -> int:
    """Train on the ``maml-train`` characters, evaluate on ``--eval-tasks`` ``maml-test`` episodes."""
    from .._cli import UsageError

    if args.method not in OMNIGLOT_METHODS:
        raise UsageError(f"--method {args.method} --task omniglot: not available on Omniglot yet; "
                         f"use one of {', '.join(OMNIGLOT_METHODS)}.")
    if args.ways < 2 or args.shots + args.queries > 20:
        raise UsageError(f"--ways {args.ways} --shots {args.shots} --queries {args.queries}: need ways >= 2 and "
                         "shots + queries <= 20 (drawings per character). Fix: e.g. --shots 1 --queries 15.")
    torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else default_data()
    one_hot = args.method == "shared-ridge"
    try:
        train_set = Omniglot(data, "maml-train", rotations=True)
        test_set = Omniglot(data, "maml-test", rotations=True)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--data {data}: {err}") from err
    family = EpisodeFamily(train_set, args.ways, args.shots, args.queries, one_hot=one_hot)
    learner, theta = make_learner(args.method, args.ways, inner_lr=args.inner_lr, inner_steps=args.inner_steps or 1,
                                  lam=args.lam, seed=args.seed)
    iterations = args.iterations if args.iterations is not None else (10**9 if args.minutes else 60_000)
    trainer = Trainer(iterations=iterations, minutes=args.minutes, meta_batch=args.meta_batch,
                      outer_lr=args.outer_lr, seed=args.seed, val_every=args.val_every,
                      checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                      on_failure="drop" if args.drop_failed_tasks else "raise")
    out = Path(args.out or f"runs/meta-omniglot-{args.ways}way{args.shots}shot-{args.method}")
    try:
        trained = trainer.run(learner, family, out, hparams=theta, resume=not args.no_resume)
    except CheckpointError as err:
        raise UsageError(f"{err} (or pass --no-resume)") from err
    test = EpisodeFamily(test_set, args.ways, args.shots, args.queries, one_hot=one_hot)
    acc = evaluate_accuracy(learner, trained.hparams, test, args.eval_tasks, seed=EVAL_SEED)
    command = "bilevel " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "bilevel meta-train"
    line = (f"{args.method}, {args.ways}-way {args.shots}-shot Omniglot: test accuracy {acc} "
            f"({args.eval_tasks} maml-test episodes, {trained.iteration} meta-steps, {trained.elapsed_s / 60:.1f} min)")
    (out / "results.md").write_text(f"{line}\n\nCommand: `{command}`\n\nLearner: `{describe(learner)}`\n")
    summary = {"method": args.method, "task": "omniglot", "ways": args.ways, "shots": args.shots,
               "iterations": trained.iteration, "elapsed_s": trained.elapsed_s, "stopped": trained.stopped,
               "eval_tasks": args.eval_tasks, "command": command,
               "accuracy": {"mean": acc.mean, "ci95": acc.ci95}}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(line)
    print(f"wrote {out}/checkpoint.pt, metrics.csv, results.md, results.json")
    return 0
