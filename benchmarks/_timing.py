"""Timing and reporting helpers shared by the benchmark runners (``run_core``, ``run_compile``, ...).

* :func:`best_of` — interleaved best-of-``repeat`` timing of several calls (wall or thread clock);
* :func:`cpu_seconds` — CPU seconds of this process and all its descendants (compiler subprocesses, compile workers);
* :func:`run_note` — the "Produced by ``command`` on ... (machine, torch, clock, load)" line under a table;
* :func:`write_between_markers` — put a table into a markdown file between two HTML-comment markers;
* :func:`markdown_table`, :func:`publish`, :func:`runner_parser` — the table, its note and file, the
  shared command line.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import resource
import time
from collections.abc import Callable


def best_of(fns: dict[str, Callable[[], object]], repeat: int = 7,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Best-of-``repeat`` time (seconds) of each call, interleaved so that load on a shared
    machine hits all of them alike (the order alternates between rounds); one warm-up call
    each; GC off while timing (as :mod:`timeit` does). ``clock`` is wall time by default;
    ``time.thread_time`` (CPU time of the calling thread) is steadier on a loaded machine."""
    for fn in fns.values():
        fn()
    best = {key: float("inf") for key in fns}
    keys = list(fns)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeat):
            for key in (keys if i % 2 == 0 else keys[::-1]):
                start = clock()
                fns[key]()
                best[key] = min(best[key], clock() - start)
    finally:
        if was_enabled:
            gc.enable()
    return best


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and all its descendants: the children that
    have finished (``getrusage``) and, on Linux, those still running (read from ``/proc``), such
    as the compile workers of inductor's subprocess pool, whose C++ compiler runs would otherwise
    be counted only when the pool exits."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + _live_descendants_seconds()


def _live_descendants_seconds() -> float:
    """CPU seconds of the running descendants of this process and of their finished children
    (``/proc/PID/stat`` fields utime, stime, cutime, cstime); 0.0 where ``/proc`` is missing."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0.0
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(name)
        parent[pid] = int(fields[1])
        ticks[pid] = sum(int(v) for v in fields[11:15])
    me, total = os.getpid(), 0
    for pid in ticks:
        p, seen = parent.get(pid), 0
        while p not in (None, 0, 1, me) and seen < 64:
            p, seen = parent.get(p), seen + 1
        if p == me and pid != me:
            total += ticks[pid]
    return total / os.sysconf("SC_CLK_TCK")


def run_note(command: str, started: str, details: str, load: bool = True) -> str:
    """``Produced by `command` on started (machine, torch, Python, details, load average at the end).``"""
    import torch

    average = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"Produced by `{command.strip()}` on {started} ({platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"torch {torch.__version__}, Python {platform.python_version()}, {details}"
            + (f"; load average {average} (1/5/15 min) at the end" if load else "") + ").")


def write_between_markers(path: str, begin: str, end: str, text: str) -> None:
    """Replace what lies between ``begin`` and ``end`` in ``path`` by ``text`` (the prose around
    it stays); if the markers are missing, append them with ``text`` between (or create the file)."""
    old = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = f"{old}\n{block}\n" if old else f"{block}\n"
    with open(path, "w") as fh:
        fh.write(new)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table from a header and rows of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def publish(module: str, argv: list[str] | None, table: str, started: str, details: str, out: str | None,
            begin: str, end: str, load: bool = True) -> str:
    """Print ``table`` with its :func:`run_note` (the command is ``python -m module`` and ``argv``, or
    this process's arguments) and, with ``out``, write both between ``begin`` and ``end`` in that file."""
    import sys

    command = f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"{table}\n\n{run_note(command, started, details, load=load)}"
    print(text)
    if out:
        write_between_markers(out, begin, end, text)
    return text


def runner_parser(module: str, doc: str, repeat: int) -> argparse.ArgumentParser:
    """The command line every runner shares: ``--repeat`` (best of) and ``--out`` (markdown file)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=repeat, help=f"best of this many interleaved runs (default {repeat})")
    parser.add_argument("--out", default=None, help="markdown file to write the table into")
    return parser
