"""Checkpoints of meta-training: atomic writes, validated reads, a stable text of the configuration."""

from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = 1
COLUMNS = ("iteration", "elapsed_s", "train_loss", "val_loss", "dropped_tasks")


#: Options added to the configuration after format 1 was written, with the behaviour that
#: checkpoints without them had: a checkpoint that lacks the key matches this value.
LEGACY_DEFAULTS = {"on_failure": "raise"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, corrupt, or written for another configuration."""


def describe(obj: object) -> str:
    """A stable text of a configuration (no memory addresses): dataclasses field by field,
    functions by qualified name, modules by their repr."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = ", ".join(f"{f.name}={describe(getattr(obj, f.name))}" for f in dataclasses.fields(obj) if f.repr)
        return f"{type(obj).__name__}({fields})"
    if isinstance(obj, nn.Module):
        return " ".join(repr(obj).split())
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in obj) + ")"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return repr(obj)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, flushed to disk, then renamed over
    ``path``. If anything fails the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; check its contents and, when
    ``config`` is given, that it was written for the same configuration."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"load_checkpoint({str(path)!r}): the file is not a readable checkpoint "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); it may be "
                              "truncated or corrupt. Fix: delete it to start over, or use another out folder.") from err
    keys = {"config", "iteration", "elapsed_s", "hparams", "optimizer", "generator", "history"}
    if not isinstance(state, dict) or not keys <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"load_checkpoint({str(path)!r}): not a bilevel meta-training checkpoint "
                              f"(expected the keys {sorted(keys)}, found {found}).")
    if config is not None and {**LEGACY_DEFAULTS, **state["config"]} != config:
        saved = {**LEGACY_DEFAULTS, **state["config"]}
        diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {config.get(k)!r} now"
                for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
        raise CheckpointError(f"load_checkpoint({str(path)!r}): the checkpoint was written for a different "
                              f"configuration ({'; '.join(diff)}). Fix: run with the same options to resume, "
                              "or give a new out folder to start afresh.")
    return state


def write_metrics(path: str | os.PathLike, history: list[dict[str, float]]) -> None:
    """Write the history as CSV, atomically (a resumed run rewrites it from its checkpoint)."""
    write_csv_atomic(path, history, COLUMNS)


def write_csv_atomic(path: str | os.PathLike, rows: list[dict[str, float]], columns) -> None:
    """Write ``rows`` as CSV with the header ``columns``: to a temporary file, then renamed over
    ``path``, so a reader (or a run killed mid-write) never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
