"""``bilevel convergence --study NAME [--out DIR]``: run one convergence study from the shell.

Every option is checked before any work starts (unknown study, empty or non-positive grids,
an output directory that cannot be written: exit status 2 with a message naming the fix). The
CSV files are written row by row, so an interrupted study (Ctrl-C) keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import shlex
import sys
import time

import torch

from ._common import StudyError

_GRID_HELP = "comma-separated positive integers, e.g. 1,2,4,8"


def _grid(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"empty grid {text!r}; expected {_GRID_HELP}")
    values = []
    for p in parts:
        try:
            v = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{p!r} in {text!r} is not an integer; expected {_GRID_HELP}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{v} in {text!r} is not positive; step counts must be >= 1")
        values.append(v)
    return tuple(values)


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None


def _assignment(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected OPTION=VALUE, e.g. alpha=0.1 or n_grid=(1,2,4)")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()
    return key.strip().replace("-", "_"), parsed


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of threads")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bilevel convergence``."""
    from . import STUDIES

    p = subparsers.add_parser(
        "convergence", help="convergence studies over the inner step count N (plots, CSV, markdown)",
        description="Reproduce published findings about the inner step count N and the estimators' "
                    "accuracy-cost frontier; writes PNG plots, CSV and NAME.md (findings with agree/disagree).")
    p.add_argument("--study", required=True, metavar="NAME",
                   help=f"which study: {', '.join(sorted(STUDIES))}")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default runs/convergence/NAME)")
    p.add_argument("--seed", type=_seed, default=None, help="random seed (default 0)")
    p.add_argument("--n-grid", type=_grid, default=None, metavar="N1,N2,...",
                   help="inner step counts N (anil, maml, estimators, frontier)")
    p.add_argument("--k-grid", type=_grid, default=None, metavar="K1,K2,...",
                   help="linear-solver step counts K (estimators, frontier)")
    p.add_argument("--logreg", choices=("synthetic", "a9a"), default=None,
                   help="logistic-regression problem of the estimators study (default synthetic)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="folder holding a9a and a9a.t (with --logreg a9a)")
    p.add_argument("--set", type=_assignment, action="append", default=[], metavar="OPTION=VALUE",
                   help="any other study option, e.g. --set alpha=0.1 (repeatable; see docs/convergence.md)")
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke test, not a measurement)")
    p.add_argument("--threads", type=_threads, default=1, help="torch threads (default 1: timings are single-thread)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def options_from(args: argparse.Namespace) -> dict:
    """The study options given on the command line (the rest keep the study's defaults)."""
    opts = {"seed": args.seed, "n_grid": args.n_grid, "k_grid": args.k_grid, "logreg": args.logreg,
            "data_dir": args.data_dir}
    applies = {"k_grid": ("estimators", "frontier"), "logreg": ("estimators",), "data_dir": ("estimators",)}
    for flag, studies in applies.items():
        if opts[flag] is not None and args.study not in studies:
            raise StudyError(f"bilevel convergence --study {args.study}: --{flag.replace('_', '-')} applies to "
                             f"--study {' and '.join(studies)} only. Fix: drop it.")
    opts = {k: v for k, v in opts.items() if v is not None}
    from . import STUDIES
    cls = STUDIES.get(args.study)
    if cls is not None and args.set:
        names = [f.name for f in dataclasses.fields(cls)]
        for key, value in args.set:
            if key not in names:
                raise StudyError(f"bilevel convergence --study {args.study} --set {key}=...: unknown option. "
                                 f"Fix: use one of {', '.join(names)}.")
            opts[key] = value
    return opts


def run(args: argparse.Namespace) -> int:
    from .._cli import UsageError
    from . import make_study

    try:
        study = make_study(args.study, quick=args.quick, **options_from(args))
        out = args.out if args.out is not None else f"runs/convergence/{args.study}"
        from ._common import prepare_out_dir
        prepare_out_dir(out, f"bilevel convergence --study {args.study}")
    except StudyError as err:
        raise UsageError(str(err)) from None
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        report = study.run(out, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"bilevel convergence: interrupted; the CSV rows finished so far are in {out}", file=sys.stderr)
        return 130
    report.command = command_of(args)
    report.write()
    print(f"{report.title} — {time.perf_counter() - started:.0f} s, written to {report.out}")
    for f in report.findings:
        print(f"  [{f.verdict}] {f.claim}\n      {f.measured}")
    print(f"  files: {', '.join(p.name for p in report.files)}")
    return 0


def command_of(args: argparse.Namespace) -> str:
    """The command line that regenerates this run (for the report)."""
    parts = ["bilevel convergence", f"--study {args.study}"]
    if args.out is not None:
        parts.append(f"--out {args.out}")
    for flag in ("seed", "logreg", "data_dir"):
        value = getattr(args, flag)
        if value is not None:
            parts.append(f"--{flag.replace('_', '-')} {value}")
    for flag in ("n_grid", "k_grid"):
        value = getattr(args, flag)
        if value is not None:
            parts.append(f"--{flag.replace('_', '-')} {','.join(map(str, value))}")
    for key, value in args.set:
        parts.append("--set " + shlex.quote(f"{key}={value!r}"))
    if args.quick:
        parts.append("--quick")
    return " ".join(parts)
