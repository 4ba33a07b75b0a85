"""The ``bilevel`` command line: argparse with one module per subcommand.

Each module in :data:`SUBCOMMANDS` exposes ``add_parser(subparsers)``, which adds
its parser and registers the function to run with ``set_defaults(func=...)``;
the function takes the parsed arguments and returns the exit status. A new
subcommand is one new module and one new line in :data:`SUBCOMMANDS`.
Argument problems that argparse cannot see (say, a size too large) are raised
as :class:`UsageError` and reported like argparse's own: usage, message, exit 2.
The argument types :func:`positive_int`, :func:`nonnegative_int` and
:func:`finite_float` give every subcommand the same messages for bad numbers.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable, Sequence

#: Modules that define subcommands, in the order ``bilevel --help`` lists them.
SUBCOMMANDS: list[str] = [
    "bilevel._compare",        # bilevel compare
    "bilevel.convergence.cli",  # bilevel convergence
    "bilevel.meta.cli",        # bilevel meta-train
    "bilevel.problems.cli",    # bilevel hpo
]


class UsageError(ValueError):
    """A bad command-line argument found after parsing; ``main`` reports it and exits with status 2."""


def positive_int(text: str) -> int:
    """argparse ``type=`` for an integer >= 1."""
    value = _parse(int, text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse ``type=`` for an integer >= 0 (below 2**63, so it fits a torch seed)."""
    value = _parse(int, text, "a non-negative integer")
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer below 2**63, got {value}")
    return value


def finite_float(bound: float = math.inf) -> Callable[[str], float]:
    """argparse ``type=`` for a finite number of absolute value at most ``bound``."""
    def parse(text: str) -> float:
        value = _parse(float, text, "a number")
        if not (math.isfinite(value) and abs(value) <= bound):
            raise argparse.ArgumentTypeError(f"expected a finite number in [-{bound:g}, {bound:g}], got {text}")
        return value
    return parse


def _parse(kind: type, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``bilevel`` parser with every subcommand of :data:`SUBCOMMANDS` registered."""
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="bilevel",
        description="Hypergradients for bilevel optimization and meta-learning.",
        epilog="Run 'bilevel COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"bilevel {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bilevel ARGS``; returns the exit status (0 on success, 2 on a usage error).

    Example:
        >>> from bilevel._cli import main
        >>> main(["compare", "--dim", "5", "--samples", "20"])  # doctest: +SKIP
        0
    """
    from ._result import BilevelError

    parser, subparsers = _build()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        subparsers.choices[args.command].error(str(err))  # prints usage and exits with status 2
    except BilevelError as err:  # a solve that failed mid-run: its message names the call, the value, the fix
        hint = (" (Or pass --drop-failed-tasks to leave failing tasks out of the meta-batch; checkpoints "
                "already written are kept.)" if args.command == "meta-train" else "")
        print(f"bilevel {args.command}: error: {err}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bilevel: interrupted", file=sys.stderr)
        return 130
    return 2  # pragma: no cover  (error() does not return)

