"""``bilevel meta-train``: meta-train on the sinusoid benchmark, then evaluate, plot and tabulate."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

from .. import estimators, inner, linear
from ..datasets import Sinusoid
from ._learner import AbstractMetaLearner
from .anil import ANIL
from .checkpoint import CheckpointError
from .evaluate import evaluate, results_table, sinusoid_figure
from .maml import MAML
from .meta_sgd import LearnedSGD, MetaSGD
from .shared_embedding import RidgeHead, SharedEmbedding
from .train import Trainer, describe

METHODS = ("maml", "fomaml", "reptile", "anil", "metasgd", "imaml", "esj", "shared-ridge")
TASKS = ("sinusoid", "sinusoid-freq", "omniglot")
#: Inner steps per method when --inner-steps is not given (Reptile and iMAML need several).
DEFAULT_STEPS = {"reptile": 5, "imaml": 40}
EVAL_SEED = 20_170_703


def sinusoid_net(hidden: int = 40, head: bool = True) -> nn.Sequential:
    """MAML's sinusoid regressor 1-40-40-1 with ReLU (without the last layer: the embedding)."""
    layers: list[nn.Module] = [nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, 1)) if head else nn.Sequential(*layers)


def make_learner(method: str, *, inner_lr: float = 0.01, inner_steps: int | None = None, lam: float | None = None,
                 directions: int = 16, smoothing: float = 1e-2, seed: int = 0, init: str = "torch") -> AbstractMetaLearner:
    """The learner ``bilevel meta-train --method METHOD`` trains (model seeded by ``seed``; ``init="small"``
    draws the weights from a normal with standard deviation 0.01 truncated at two, and zeroes the biases)."""
    steps = DEFAULT_STEPS.get(method, 1) if inner_steps is None else inner_steps
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = sinusoid_net(head=method != "shared-ridge")
        if init == "small":
            for layer in net:
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.02, b=0.02)
                    nn.init.zeros_(layer.bias)
    gd = inner.GradientDescent(lr=inner_lr, steps=steps)
    if method == "maml":
        return MAML(net, inner=gd)
    if method == "fomaml":
        return MAML(net, inner=gd, estimator=estimators.FirstOrder())
    if method == "reptile":
        return MAML(net, inner=gd, estimator=estimators.Reptile())
    if method == "imaml":
        # lam = 2 and a few CG steps as in Rajeswaran et al. 2019 (Omniglot: lam = 2.0, 5 CG steps). The inner
        # loop is GD of the evaluation's step alpha on the proximal loss, 40 steps, so that y_N is near the
        # proximal minimiser the implicit gradient assumes; rtol 0.5 because H + lam I is not positive definite
        # on every task (ReLU net; tighter tolerances dropped most tasks). The implicit gradient has no brake on
        # curvature, so the start sharpens past 2 / alpha after ~1500 meta-steps (docs/results.md, sinusoid).
        cg = linear.CG(max_steps=10, rtol=0.5, atol=1e-6)
        return MAML(net, inner=gd, estimator=estimators.IMAML(lam=lam or 2.0, linear_solver=cg))
    if method == "esj":
        return MAML(net, inner=gd, estimator=estimators.ESJ(directions=directions, smoothing=smoothing, seed=seed))
    if method == "anil":
        return ANIL(net, inner=gd)
    if method == "metasgd":
        return MetaSGD(net, inner=LearnedSGD(steps=steps), init_lr=inner_lr)
    if method == "shared-ridge":
        return SharedEmbedding(net, head=RidgeHead(lam=lam or 0.1))
    raise ValueError(f"make_learner(method={method!r}): expected one of {METHODS}.")


def protocol_learner(learner: AbstractMetaLearner, inner_lr: float) -> AbstractMetaLearner:
    """The learner evaluation adapts with: plain gradient descent of step ``inner_lr`` for MAML-type
    learners whatever they trained with (the published protocol); Meta-SGD keeps its learned step
    sizes and the shared embedding its closed-form head."""
    if isinstance(learner, (MAML, ANIL)):
        return dataclasses.replace(learner, inner=inner.GradientDescent(lr=inner_lr, steps=1))
    return learner


PROTOCOL_NOTE = (" Meta-SGD is evaluated after the steps it was trained for, with its learned step sizes "
                 "(Li et al. 2017's protocol): its step sizes are fitted to that many steps, and more steps of "
                 "them diverge.")


def protocol_steps(learner: AbstractMetaLearner) -> tuple[int, ...]:
    """The step counts evaluated: 0, 1, 5 and 10 (Finn et al. 2017), and for Meta-SGD 0 and the
    number of steps its step sizes were learned for."""
    if isinstance(learner, MetaSGD):
        return (0, learner.inner.steps)
    return (0, 1, 5, 10)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bilevel meta-train``."""
    p = subparsers.add_parser(
        "meta-train", help="meta-train on the sinusoid benchmark; evaluate, plot, tabulate",
        description="Meta-train a learner on sinusoid regression (Finn et al. 2017), with checkpoints and exact "
                    "resume, then evaluate on held-out tasks (MSE after 1/5/10 steps, mean ± 95%% CI) and draw "
                    "the classic figure. Writes OUT/checkpoint.pt, metrics.csv, figure.png, results.md, results.json.")
    p.add_argument("--task", choices=TASKS, default="sinusoid",
                   help="sinusoid: MAML's family; sinusoid-freq: Meta-SGD's (frequency in [0.8, 1.2]); omniglot: "
                        "N-way K-shot characters with a 4-block conv net (pass e.g. --ways 5 --shots 1 --inner-lr 0.4)")
    p.add_argument("--method", choices=(*METHODS, "shared-softmax"), default="maml",
                   help="shared-softmax: omniglot only")
    p.add_argument("--shots", type=int, default=10, help="support (and query) points per training task (10)")
    p.add_argument("--ways", type=int, default=5, help="omniglot: classes per episode (5)")
    p.add_argument("--queries", type=int, default=15, help="omniglot: query images per class (15)")
    p.add_argument("--data", default=None, help="omniglot: data folder (default $BILEVEL_DATA/omniglot)")
    p.add_argument("--iterations", type=int, default=None,
                   help="meta-steps (default 70000, or unlimited when only --minutes is given)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training-time budget in minutes; with --iterations, whichever comes first")
    p.add_argument("--out", default=None, help="output folder (default runs/meta-TASK-METHOD)")
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--inner-lr", type=float, default=0.01, help="inner step size alpha (Meta-SGD: its start)")
    p.add_argument("--inner-steps", type=int, default=None, help="inner steps (1; reptile 5, imaml 40)")
    p.add_argument("--lam", type=float, default=None, help="iMAML proximal strength (2) / ridge penalty (0.1)")
    p.add_argument("--directions", type=int, default=16, help="ESJ directions")
    p.add_argument("--smoothing", type=float, default=1e-2, help="ESJ smoothing mu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", choices=("torch", "small"), default="torch",
                   help="network initialisation: PyTorch's default, or small (weights ~ N(0, 0.01^2) truncated, "
                        "zero biases)")
    p.add_argument("--eval-shots", type=int, default=5, help="support points of the evaluation tasks (5)")
    p.add_argument("--eval-tasks", type=int, default=1000, help="held-out evaluation tasks (>= 600)")
    p.add_argument("--val-every", type=int, default=1000)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT holds a checkpoint")
    p.add_argument("--drop-failed-tasks", action="store_true",
                   help="leave tasks whose hypergradient fails (e.g. a diverging inner loop) out of the step's "
                        "mean and count them in metrics.csv, instead of stopping")
    p.add_argument("--no-progress", action="store_true")
    from .omniglot_cli import add_omniglot_arguments
    add_omniglot_arguments(p)
    p.set_defaults(func=run, meta_train_parser=p)
    return p


def command_line(args: argparse.Namespace) -> str:
    """A ``bilevel meta-train ...`` command that reproduces the run of ``args``: every option whose
    value differs from its default, in the parser's order (however the run was started: ``bilevel``,
    ``python -m bilevel.meta.cli`` or :func:`bilevel._cli.main` from Python)."""
    parser: argparse.ArgumentParser = args.meta_train_parser
    words = ["bilevel", "meta-train"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "func", "meta_train_parser"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)  # the long form
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            words.append(flag)
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def run(args: argparse.Namespace) -> int:
    from .._cli import UsageError

    if args.task != "omniglot" and args.method not in METHODS:
        raise UsageError(f"--method {args.method} --task {args.task}: {args.method} is an Omniglot-only method "
                         f"(a softmax head needs classes). The sinusoid tasks support --method "
                         f"{'|'.join(METHODS)}. Fix: pick one of those, or pass --task omniglot.")
    for name in ("shots", "meta_batch", "eval_shots", "eval_tasks", "val_every", "checkpoint_every", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1.")
    if args.iterations is not None and args.iterations < 0 or args.minutes is not None and args.minutes <= 0:
        raise UsageError("--iterations must be >= 0 and --minutes > 0.")
    if args.eval_tasks < 600:
        print(f"meta-train: note: --eval-tasks {args.eval_tasks} is below the 600 tasks of the published protocol.",
              file=sys.stderr)
    if args.task == "omniglot":
        from .omniglot_cli import run_omniglot
        return run_omniglot(args)
    torch.set_num_threads(args.threads)
    family = Sinusoid(shots=args.shots) if args.task == "sinusoid" else Sinusoid.meta_sgd(shots=args.shots)
    learner = make_learner(args.method, inner_lr=args.inner_lr, inner_steps=args.inner_steps, lam=args.lam,
                           directions=args.directions, smoothing=args.smoothing, seed=args.seed, init=args.init)
    iterations = args.iterations if args.iterations is not None else (10**9 if args.minutes else 70_000)
    trainer = Trainer(iterations=iterations, minutes=args.minutes, meta_batch=args.meta_batch,
                      outer_lr=args.outer_lr, seed=args.seed, val_every=args.val_every,
                      checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                      on_failure="drop" if args.drop_failed_tasks else "raise")
    out = Path(args.out or f"runs/meta-{args.task}-{args.method}")
    try:
        trained = trainer.run(learner, family, out, resume=not args.no_resume)
    except CheckpointError as err:
        raise UsageError(f"{err} (or pass --no-resume)") from err

    held_out = dataclasses.replace(family, shots=args.eval_shots, queries=100)
    tasks = held_out.sample(args.eval_tasks, EVAL_SEED)
    judge = protocol_learner(learner, args.inner_lr)
    steps = protocol_steps(learner)
    ev = evaluate(judge, trained.hparams, tasks, steps=steps)
    sinusoid_figure(judge, trained.hparams, tasks, out / "figure.png", steps=(steps[1], steps[-1]),
                    title=f"{args.method}, {args.eval_shots}-shot, after {trained.iteration} meta-steps")
    command = command_line(args)
    label = f"{args.method} ({trained.iteration} it.)"
    table = results_table({label: ev}, steps=(0, 1, 5, 10), median=True)
    note = PROTOCOL_NOTE if isinstance(learner, MetaSGD) else ""
    (out / "results.md").write_text(f"{table}\n\nCommand: `{command}`\n\nLearner: `{describe(learner)}`\n\n"
                                    f"Meta-steps: {trained.iteration} ({trained.elapsed_s / 60:.1f} min, stopped by "
                                    f"{trained.stopped}); evaluation: {args.eval_tasks} held-out tasks, "
                                    f"{args.eval_shots} support and 100 query points; mean ± 95% CI over the tasks "
                                    "that did not diverge (support loss raised by adaptation, or not finite), their "
                                    f"count, and the median over all tasks.{note}\n")
    summary = {"method": args.method, "task": args.task, "iterations": trained.iteration,
               "elapsed_s": trained.elapsed_s, "stopped": trained.stopped, "eval_tasks": args.eval_tasks,
               "eval_shots": args.eval_shots, "command": command,
               "mse": {str(n): ev.summary(n) for n in ev.steps}}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    print(f"wrote {out}/checkpoint.pt, metrics.csv, figure.png, results.md, results.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bilevel.meta.cli ARGS`` (same as ``bilevel meta-train ARGS``, usage errors included)."""
    from .._cli import main as bilevel_main

    return bilevel_main(["meta-train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
