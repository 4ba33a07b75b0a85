"""``bilevel meta-train --task omniglot``: meta-train a conv net on N-way K-shot Omniglot with a
validation-accuracy curve against wall-clock seconds and meta-steps, then report test accuracy.

Training runs in segments of ``--val-acc-every`` meta-steps through :class:`~bilevel.meta.Trainer`
(checkpoint and exact resume after every segment); between segments the query accuracy on
``--val-episodes`` fixed ``maml-val`` episodes is measured *outside* the timed training, so the
``--minutes`` budget and the curve's seconds count meta-training only. ``curve.csv`` holds
``iteration, train_s, cpu_s, val_acc, val_ci95``; ``python -m bilevel.meta.omniglot_cli plot RUN ...``
draws the time-to-accuracy figures of several runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from ..datasets import Omniglot
from .checkpoint import CheckpointError, describe, load_checkpoint, write_csv_atomic
from .omniglot import METHODS, EpisodeFamily, evaluate_accuracy, make_learner
from .train import CHECKPOINT, Trainer

#: ``--method`` values that have an Omniglot learner.
OMNIGLOT_METHODS = METHODS
EVAL_SEED = 20_170_703
VAL_SEED = 1_234_567
#: Characters of the 1200 ``maml-train`` ones held out as ``maml-val`` (with their rotations: 400 classes).
VALIDATION_CHARACTERS = 100
CURVE = "curve.csv"
CURVE_COLUMNS = ("iteration", "train_s", "cpu_s", "val_acc", "val_ci95")


def default_data() -> Path:
    """``$BILEVEL_DATA/omniglot`` if the variable is set, else ``../shared/data/omniglot`` from the working folder."""
    root = os.environ.get("BILEVEL_DATA")
    return (Path(root) if root else Path("..") / "shared" / "data") / "omniglot"


def add_omniglot_arguments(p: argparse.ArgumentParser) -> None:
    """The options only ``--task omniglot`` reads (registered on ``bilevel meta-train``)."""
    p.add_argument("--val-acc-every", type=int, default=50,
                   help="omniglot: meta-steps between validation-accuracy points of curve.csv (50)")
    p.add_argument("--val-episodes", type=int, default=100,
                   help="omniglot: maml-val episodes per validation-accuracy point (100)")
    p.add_argument("--eval-queries", type=int, default=15, help="omniglot: query images per class at evaluation (15)")


def read_curve(path: Path) -> list[dict[str, float]]:
    """The rows of a ``curve.csv`` (empty if the file does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def time_to(rows: list[dict[str, float]], level: float) -> tuple[float, float] | None:
    """``(train_s, iteration)`` of the first curve point with validation accuracy >= ``level``, else None."""
    for row in rows:
        if row["val_acc"] >= level:
            return row["train_s"], row["iteration"]
    return None


def run_omniglot(args: argparse.Namespace) -> int:
    """Train on ``maml-train`` (less ``maml-val``), curve on ``maml-val``, evaluate on ``maml-test``."""
    from .._cli import UsageError

    if args.method not in OMNIGLOT_METHODS:
        raise UsageError(f"--method {args.method} --task omniglot: not available on Omniglot; "
                         f"use one of {', '.join(OMNIGLOT_METHODS)}.")
    if args.ways < 2 or args.shots + max(args.queries, args.eval_queries) > 20:
        raise UsageError(f"--ways {args.ways} --shots {args.shots} --queries {args.queries} --eval-queries "
                         f"{args.eval_queries}: need ways >= 2 and shots + queries <= 20 (drawings per character). "
                         "Fix: e.g. --shots 1 --queries 15.")
    for name in ("val_acc_every", "val_episodes", "eval_queries", "queries"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1.")
    torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else default_data()
    one_hot = args.method == "shared-ridge"
    try:
        train_set = Omniglot(data, "maml-train", rotations=True, validation=VALIDATION_CHARACTERS)
        val_set = Omniglot(data, "maml-val", rotations=True, validation=VALIDATION_CHARACTERS)
        test_set = Omniglot(data, "maml-test", rotations=True)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--data {data}: {err}") from err
    family = EpisodeFamily(train_set, args.ways, args.shots, args.queries, one_hot=one_hot)
    val = EpisodeFamily(val_set, args.ways, args.shots, args.eval_queries, one_hot=one_hot)
    inner_lr = args.inner_lr
    if args.method == "shared-softmax" and "meta_train_parser" in vars(args) and \
            inner_lr == args.meta_train_parser.get_default("inner_lr"):
        inner_lr = None  # --inner-lr left at its default: the head's own step, 1/L (see make_learner)
    learner, theta = make_learner(args.method, args.ways, inner_lr=inner_lr, inner_steps=args.inner_steps,
                                  lam=args.lam, seed=args.seed, directions=args.directions,
                                  smoothing=args.smoothing)
    limit = args.iterations if args.iterations is not None else (10**9 if args.minutes else 60_000)
    out = Path(args.out or f"runs/meta-omniglot-{args.ways}way{args.shots}shot-{args.method}")
    out.mkdir(parents=True, exist_ok=True)
    if args.no_resume:
        for name in (CHECKPOINT, CURVE):
            (out / name).unlink(missing_ok=True)
    resume = (out / CHECKPOINT).exists()
    rows = read_curve(out / CURVE) if resume else []
    iteration, elapsed = 0, 0.0
    if resume:
        try:
            state = load_checkpoint(out / CHECKPOINT)
        except CheckpointError as err:
            raise UsageError(f"{err} (or pass --no-resume)") from err
        iteration, elapsed = int(state["iteration"]), float(state["elapsed_s"])
        theta = {k: v.clone() for k, v in state["hparams"].items()}
    cpu = rows[-1]["cpu_s"] if rows else 0.0

    def point(hparams: dict) -> None:
        acc = evaluate_accuracy(learner, hparams, val, args.val_episodes, seed=VAL_SEED, chunk=25)
        rows.append({"iteration": iteration, "train_s": round(elapsed, 3), "cpu_s": round(cpu, 3),
                     "val_acc": round(acc.mean, 5), "val_ci95": round(acc.ci95, 5)})
        write_csv_atomic(out / CURVE, rows, CURVE_COLUMNS)
        if not args.no_progress:
            print(f"[{args.method}] it {iteration} train {elapsed:.0f}s cpu {cpu:.0f}s val {acc}", flush=True)

    if not rows:
        point(theta)
    budget = math.inf if args.minutes is None else 60.0 * args.minutes
    trained = None
    while iteration < limit and elapsed < budget:
        goal = min(limit, (iteration // args.val_acc_every + 1) * args.val_acc_every)
        trainer = Trainer(iterations=goal, minutes=args.minutes, meta_batch=args.meta_batch, outer_lr=args.outer_lr,
                          seed=args.seed, val_every=10**9, val_tasks=4, checkpoint_every=10**9, progress=False,
                          on_failure="drop" if args.drop_failed_tasks else "raise")
        started = time.process_time()
        try:
            trained = trainer.run(learner, family, out, hparams=theta, resume=True)
        except CheckpointError as err:
            raise UsageError(f"{err} (or pass --no-resume)") from err
        cpu += time.process_time() - started
        iteration, elapsed, theta = trained.iteration, trained.elapsed_s, trained.hparams
        point(theta)
    test = EpisodeFamily(test_set, args.ways, args.shots, args.eval_queries, one_hot=one_hot)
    acc = evaluate_accuracy(learner, theta, test, args.eval_tasks, seed=EVAL_SEED, chunk=25)
    from .cli import command_line  # cli imports this module lazily; import it back the same way

    command = command_line(args) if hasattr(args, "meta_train_parser") else \
        "bilevel " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    reach = {f"{int(100 * lv)}": time_to(rows, lv) for lv in (0.9, 0.95, 0.97)}
    line = (f"{args.method}, {args.ways}-way {args.shots}-shot Omniglot: test accuracy {acc} "
            f"({args.eval_tasks} maml-test episodes, {iteration} meta-steps, {elapsed / 60:.1f} min training, "
            f"{cpu / 60:.1f} CPU min)")
    reached = "; ".join(f"val {k}%: " + (f"{v[0]:.0f} s / {v[1]:.0f} it." if v else "not reached")
                        for k, v in reach.items())
    (out / "results.md").write_text(f"{line}\n\nTime to validation accuracy: {reached}\n\nCommand: `{command}`\n\n"
                                    f"Learner: `{describe(learner)}`\n")
    summary = {"method": args.method, "task": "omniglot", "ways": args.ways, "shots": args.shots,
               "queries": args.queries, "meta_batch": args.meta_batch, "iterations": iteration,
               "elapsed_s": elapsed, "cpu_s": cpu, "budget_min": args.minutes, "eval_tasks": args.eval_tasks,
               "command": command, "load_average": os.getloadavg(),
               "accuracy": {"mean": acc.mean, "ci95": acc.ci95},
               "time_to_val": {k: (None if v is None else {"train_s": v[0], "iteration": v[1]})
                               for k, v in reach.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(line)
    print(f"Time to validation accuracy: {reached}")
    print(f"wrote {out}/checkpoint.pt, curve.csv, results.md, results.json")
    return 0


def plot(runs: list[str | os.PathLike], out: str | os.PathLike, title: str = "") -> list[Path]:
    """Draw validation accuracy against training wall-clock seconds, against CPU seconds and against
    meta-steps, one curve per run folder (labelled with its ``results.json`` method and ways, else the
    folder name); writes ``OUT_seconds.png``, ``OUT_cpu_seconds.png`` and ``OUT_iterations.png`` and
    returns their paths. On a shared machine compare runs by CPU seconds: wall-clock seconds
    include whatever share of the core other jobs took."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, suffix, label in (("train_s", "seconds", "meta-training wall-clock seconds"),
                                 ("cpu_s", "cpu_seconds", "meta-training CPU seconds (process time)"),
                                 ("iteration", "iterations", "meta-steps (outer iterations)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for run in runs:
            rows = read_curve(Path(run) / CURVE)
            if not rows:
                raise ValueError(f"plot(runs=[..., {str(run)!r}, ...]): no {CURVE} there. Fix: pass run folders "
                                 "written by bilevel meta-train --task omniglot.")
            meta = Path(run) / "results.json"
            info = json.loads(meta.read_text()) if meta.exists() else {}
            name = f"{info['method']} ({info.get('ways', '?')}-way)" if "method" in info else Path(run).name
            ax.plot([r[x_key] for r in rows], [100 * r["val_acc"] for r in rows], marker=".", label=name)
        for level in (90, 95, 97):
            ax.axhline(level, color="grey", lw=0.6, ls=":")
        ax.set_xlabel(label)
        ax.set_ylabel("maml-val query accuracy (%)")
        ax.set_ylim(15, 100)
        ax.set_title(title)
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        path = Path(f"{out}_{suffix}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m bilevel.meta.omniglot_cli plot RUN [RUN ...] --out PREFIX [--title T]``."""
    p = argparse.ArgumentParser(prog="python -m bilevel.meta.omniglot_cli",
                                description="Time-to-accuracy figures of Omniglot meta-training runs.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("plot", help="validation accuracy vs seconds and vs meta-steps, one curve per run")
    q.add_argument("runs", nargs="+", help="run folders (each with curve.csv)")
    q.add_argument("--out", required=True, help="output prefix: writes PREFIX_seconds.png, PREFIX_cpu_seconds.png and "
                   "PREFIX_iterations.png")
    q.add_argument("--title", default="")
    args = p.parse_args(argv)
    for path in plot(args.runs, args.out, args.title):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
