"""What every convergence study shares: checked options, CSV written row by row, findings, figures.

A study is a frozen dataclass whose fields are its options; constructing it checks them
(so bad input fails before any work starts) and :meth:`AbstractStudy.run` writes, into one
output directory, a CSV per measurement (one row per finished cell, flushed at once, so an
interrupted run keeps what it finished), PNG figures, and ``NAME.md``: the findings table
(claim, source, what we measured, agreement) and the study's own tables.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._tree import Params, tree_norm, tree_sub

RowHook = Callable[[str, dict[str, Any]], None]


class StudyError(ValueError):
    """A bad study option (unknown study, empty or non-positive grid, unwritable directory)."""


def check_grid(values: Iterable[int], name: str, call: str) -> tuple[int, ...]:
    """``values`` as a tuple of positive ints, or a :class:`StudyError` that names the fix."""
    try:
        grid = tuple(values)
    except TypeError:
        raise StudyError(f"{call}: {name}={values!r} is not a sequence. Fix: pass e.g. {name}=(1, 2, 4).") from None
    if not grid:
        raise StudyError(f"{call}: {name} is empty; a study needs at least one value. Fix: pass e.g. {name}=(1, 2, 4).")
    for v in grid:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise StudyError(f"{call}: {name} contains {v!r}; every entry must be a positive integer "
                             f"(a number of steps). Fix: drop it, e.g. {name}=(1, 2, 4).")
    return grid


def check_positive(value: Any, name: str, call: str, *, integer: bool = True) -> None:
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and not isinstance(value, bool)
    if not ok or not (value > 0) or not math.isfinite(value):
        kind = "a positive integer" if integer else "a positive finite number"
        raise StudyError(f"{call}: {name}={value!r}; expected {kind}.")


def prepare_out_dir(out: str | os.PathLike, call: str) -> Path:
    """Create ``out`` (with parents) and check that a file can be written there."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise StudyError(f"{call}: cannot write to the output directory {str(path)!r} ({err.strerror or err}). "
                         "Fix: pass --out DIR for a directory you can write to.") from None
    return path


class CsvLog:
    """A CSV file written one row at a time: each row is flushed to disk as soon as it is finished.

    ``rows`` keeps the rows for the figures. ``on_row(file_name, row)`` is called after each
    row is on disk (progress reporting, or a test that interrupts a study after ``k`` rows).
    """

    def __init__(self, path: Path, columns: Sequence[str], on_row: RowHook | None = None) -> None:
        self.path, self.columns, self.on_row = path, tuple(columns), on_row
        self.rows: list[dict[str, Any]] = []
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        self._writer.writeheader()
        self._file.flush()

    def write(self, **row: Any) -> dict[str, Any]:
        missing = set(self.columns) - set(row)
        extra = set(row) - set(self.columns)
        if missing or extra:  # a programming error in a study: name it exactly
            raise KeyError(f"CsvLog({self.path.name}): row has extra {sorted(extra)} / missing {sorted(missing)}.")
        self._writer.writerow({k: _cell(v) for k, v in row.items()})
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(self.path.name, row)
        return row

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "CsvLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


@dataclass(frozen=True)
class Finding:
    """One published claim and what our measurement says about it.

    Attributes:
        claim: the claim, in one sentence.
        source: the citation (authors, venue, year).
        measured: what we measured, in one sentence with the numbers.
        agrees: ``True`` (our measurement agrees), ``False`` (it does not) or ``None`` (inconclusive).
    """

    claim: str
    source: str
    measured: str
    agrees: bool | None

    @property
    def verdict(self) -> str:
        return {True: "agrees", False: "disagrees", None: "inconclusive"}[self.agrees]


@dataclass
class StudyReport:
    """What a study wrote: its directory, files, findings, and extra markdown tables."""

    name: str
    title: str
    out: Path
    setup: list[str]
    findings: list[Finding] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    command: str = ""

    def markdown(self) -> str:
        command = self.command or f"bilevel convergence --study {self.name}"
        lines = [f"# {self.title}", "", f"Regenerate: `{command}`", "", "## Setup", ""]
        lines += [f"- {s}" for s in self.setup] + ["", "## Findings", ""]
        rows = [(f.claim, f.source, f.measured, f"**{f.verdict}**") for f in self.findings]
        lines += [markdown_table(("claim", "source", "our measurement", "verdict"), rows), ""]
        for heading, table in self.tables.items():
            lines += [f"## {heading}", "", table, ""]
        pngs = [p for p in self.files if p.suffix == ".png"]
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
        return "\n".join(lines)

    def write(self) -> Path:
        path = self.out / f"{self.name}.md"
        path.write_text(self.markdown())
        if path not in self.files:
            self.files.append(path)
        return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def esc(c: Any) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def new_figure(ncols: int, nrows: int = 1, width: float = 5.0, height: float = 3.8) -> tuple[Any, list]:
    """A figure with an Agg canvas (no pyplot, no global backend change) and a flat list of axes.

    matplotlib is imported here, not at module level, so that the benchmarks (one process per
    measurement) do not pay for it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_figure(fig: Any, path: Path, files: list[Path]) -> Path:
    fig.savefig(path, dpi=110)
    files.append(path)
    return path


def rel_error(value: Params, exact: Params) -> float:
    """``||value - exact|| / ||exact||`` in float64."""
    v = {k: t.detach().to(torch.float64) for k, t in value.items()}
    e = {k: t.detach().to(torch.float64) for k, t in exact.items()}
    return (tree_norm(tree_sub(v, e)) / tree_norm(e)).item()


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (to stderr) or a do-nothing stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="run", leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def options_of(study: Any) -> list[str]:
    """``name=value`` for every option of a study dataclass (for the setup list)."""
    return [f"{f.name}={getattr(study, f.name)!r}" for f in fields(study)]


class AbstractStudy:
    """Base of the studies: ``run(out, progress=True, on_row=None) -> StudyReport``.

    Subclasses are frozen dataclasses; ``name`` is the ``--study`` name, ``title`` the
    heading of the report, and ``quick()`` returns tiny settings for smoke tests.
    """

    name: ClassVar[str]
    title: ClassVar[str]

    @classmethod
    def quick(cls, **overrides: Any) -> "AbstractStudy":
        raise NotImplementedError

    def run(self, out: str | os.PathLike, *, progress: bool = True, on_row: RowHook | None = None) -> StudyReport:
        raise NotImplementedError
