"""``bilevel hpo``: hyperparameter optimisation and data hyper-cleaning on real data, method against method.

Examples::

    bilevel hpo --problem logreg-a9a --method all --out results/a9a
    bilevel hpo --problem hyperclean-mnist --method stocbio,aid-cg --time-limit 600 --out results/mnist

Each run writes ``curves.csv`` (one row per evaluated outer step), ``curves.png`` (the
test metric against wall time, one line per method, baselines dashed) and
``results.md`` (the final table) into ``--out``, and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .._cli import UsageError, finite_float, positive_int
from .data import a9a_splits, mnist_hyperclean_splits
from .experiments import HYPERCLEAN_METHODS, LOGREG_METHODS, Config, run_hyperclean, run_logreg, with_defaults
from .runner import check_writable, markdown_table

PROBLEMS = {"logreg-a9a": LOGREG_METHODS, "hyperclean-mnist": HYPERCLEAN_METHODS}
#: Per-problem defaults of the options left unset on the command line.
DEFAULTS = {
    "logreg-a9a": dict(steps=100, inner_steps=50, linear_steps=50, batch_size=500, outer_lr=0.1,
                       n_train=5000, n_val=20000),
    "hyperclean-mnist": dict(steps=5000, inner_steps=10, linear_steps=10, batch_size=2000, outer_lr=0.1,
                             n_train=20000, n_val=5000, time_limit=600.0),
}
_DATA = {"logreg-a9a": "a9a", "hyperclean-mnist": "mnist"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bilevel hpo``."""
    p = subparsers.add_parser("hpo", help="hyperparameter optimisation / data hyper-cleaning on real data",
                              description="Hyperparameter optimisation (per-feature L2 weights of logistic "
                              "regression on a9a) and data hyper-cleaning (noisy MNIST) on real data, estimator "
                              "against estimator.",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="methods: logreg-a9a: " + ", ".join(LOGREG_METHODS)
                              + "; hyperclean-mnist: " + ", ".join(HYPERCLEAN_METHODS)
                              + ". Defaults per problem: " + "; ".join(
                                  f"{k}: " + ", ".join(f"{o}={v}" for o, v in d.items()) for k, d in DEFAULTS.items()))
    p.add_argument("--problem", required=True, choices=sorted(PROBLEMS), help="which problem")
    p.add_argument("--method", default="all", help="comma-separated method names, or 'all' (default)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default hpo-PROBLEM)")
    p.add_argument("--data", type=Path, default=None,
                   help="folder holding a9a/ and mnist/ (default $BILEVEL_DATA, else ../shared/data)")
    p.add_argument("--steps", type=positive_int, help="outer steps per method")
    p.add_argument("--time-limit", type=finite_float(), help="seconds of outer loop per method")
    p.add_argument("--outer-lr", type=finite_float(), help="Adam step on the hyperparameters")
    p.add_argument("--inner-steps", type=positive_int, help="inner steps per outer step")
    p.add_argument("--inner-lr", type=finite_float(), help="inner step size (default 1/L from the data)")
    p.add_argument("--linear-steps", type=positive_int, help="CG / Neumann steps per hypergradient")
    p.add_argument("--batch-size", type=positive_int, help="mini-batch of stocBiO's samplers")
    p.add_argument("--n-train", type=positive_int, help="training examples")
    p.add_argument("--n-val", type=positive_int, help="validation examples")
    p.add_argument("--n-test", type=positive_int, default=10000, help="MNIST test examples (default 10000)")
    p.add_argument("--corruption", type=finite_float(), default=0.5,
                   help="fraction of MNIST training labels corrupted, in [0, 1) (default 0.5)")
    p.add_argument("--classifier", choices=("linear", "mlp"), default="linear", help="hyper-cleaning model")
    p.add_argument("--hidden", type=positive_int, default=300, help="MLP hidden units (default 300)")
    p.add_argument("--eval-every", type=positive_int, default=1, help="evaluate every K outer steps (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, corruption and samplers (default 0)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-tuned-baseline", action="store_true",
                   help="hyper-cleaning: skip the baseline with the L2 weight tuned on validation (4 fits)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def parse_methods(text: str, problem: str) -> list[str]:
    """``'all'`` or a comma-separated list of the problem's method names, in the given order."""
    valid = PROBLEMS[problem]
    names = list(valid) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise UsageError(f"--method {text!r}: unknown method {unknown[0] if unknown else '(none)'!r} for "
                         f"--problem {problem}. Fix: pass 'all' or some of {', '.join(valid)}.")
    return list(dict.fromkeys(names))


def data_root(given: Path | None) -> Path:
    if given is not None:
        return given
    env = os.environ.get("BILEVEL_DATA")
    return Path(env) if env else Path("..") / "shared" / "data"


def _load() -> str:
    """The 1-minute load average, or "n/a" where the platform has none."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "n/a"


def run(args: argparse.Namespace) -> int:
    """Run ``bilevel hpo``; returns the exit status (1 when the data cannot be read)."""
    names = parse_methods(args.method, args.problem)
    if not 0 <= args.corruption < 1:
        raise UsageError(f"--corruption {args.corruption:g}: the fraction of corrupted labels must lie in [0, 1). "
                         "Fix: pass e.g. --corruption 0.5.")
    defaults = DEFAULTS[args.problem]
    n_train, n_val = args.n_train or defaults["n_train"], args.n_val or defaults["n_val"]
    cfg = with_defaults(Config(), **{k: v for k, v in defaults.items() if k not in ("n_train", "n_val")})
    cfg = with_defaults(cfg, steps=args.steps, time_limit=args.time_limit, outer_lr=args.outer_lr,
                        inner_steps=args.inner_steps, linear_steps=args.linear_steps, batch_size=args.batch_size,
                        inner_lr=args.inner_lr,
                        eval_every=args.eval_every, seed=args.seed, progress=not args.no_progress)
    for option, value in (("--outer-lr", cfg.outer_lr), ("--time-limit", cfg.time_limit),
                          ("--inner-lr", cfg.inner_lr or 1.0)):
        if not value > 0:
            raise UsageError(f"{option} {value:g}: must be positive.")
    try:
        out = check_writable(args.out or Path(f"hpo-{args.problem}"), "bilevel hpo")
    except ValueError as err:
        raise UsageError(str(err).removeprefix("bilevel hpo: ")) from None
    root = data_root(args.data) / _DATA[args.problem]
    torch.set_num_threads(args.threads)
    load_before = _load()
    try:
        if args.problem == "logreg-a9a":
            splits = a9a_splits(root, n_train=n_train, n_val=n_val, seed=args.seed)
            if cfg.batch_size > n_train:
                raise UsageError(f"--batch-size {cfg.batch_size} exceeds --n-train {n_train}.")
            table = run_logreg(splits, names, cfg, out)
        else:
            splits = mnist_hyperclean_splits(root, n_train=n_train, n_val=n_val, n_test=args.n_test,
                                             corruption=args.corruption, seed=args.seed)
            if cfg.batch_size > n_train:
                raise UsageError(f"--batch-size {cfg.batch_size} exceeds --n-train {n_train}.")
            table = run_hyperclean(splits, names, cfg, out, classifier=args.classifier, hidden=args.hidden,
                                   tune_l2=() if args.no_tuned_baseline else (1e-4, 1e-3, 1e-2, 1e-1))
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, UsageError):
            raise
        print(f"bilevel hpo: error: {err}", file=sys.stderr)
        return 1
    settings = (f"Settings: --problem {args.problem} --method {','.join(names)} --n-train {n_train} --n-val {n_val} "
                f"--seed {cfg.seed} --steps {cfg.steps}"
                + (f" --time-limit {cfg.time_limit:g}" if cfg.time_limit < float("inf") else "")
                + f" --outer-lr {cfg.outer_lr:g} "
                f"--inner-steps {cfg.inner_steps} --linear-steps {cfg.linear_steps} --batch-size {cfg.batch_size}"
                + (f" --inner-lr {cfg.inner_lr:g}" if cfg.inner_lr else "")
                + (f" --corruption {args.corruption:g} --classifier {args.classifier} --n-test {args.n_test}"
                   + (f" --hidden {args.hidden}" if args.classifier == "mlp" else "")
                   if args.problem == "hyperclean-mnist" else "")
                + (f" --eval-every {cfg.eval_every}" if cfg.eval_every != 1 else "")
                + f"; torch threads {args.threads}; load average (1 min) {load_before} at the start, "
                f"{_load()} at the end.")
    with open(out / "results.md", "a") as fh:  # what produced the numbers, for the record
        fh.write("\n" + settings + "\n")
    print(markdown_table(table))
    print(settings)
    print(f"wrote {out / 'curves.csv'}, {out / 'curves.png'}, {out / 'results.md'}")
    return 0
