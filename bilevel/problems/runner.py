"""One outer loop for every method of an HPO comparison, timed apart from evaluation, and its report."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._hypergrad import hypergrad
from .._problem import BilevelProblem
from .._result import RESULTS
from .._tree import Batch, Params, tree_norm
from ..estimators._base import AbstractEstimator
from ..inner._base import AbstractInnerSolver


@dataclass(frozen=True)
class Method:
    """One way to run the outer loop.

    Args:
        name: label in tables and plots.
        inner, estimator: as in :func:`bilevel.hypergrad`.
        inner_batch: ``inner_batch(t)`` gives the inner batch (fixed, or a fresh
            :class:`~bilevel.Sampler`) of outer step ``t``.
        start: optional ``start(hparams, previous_params) -> params0`` run before each
            hypergradient (e.g. an exact reference solve); timed with the method.
        warm_start: start each inner solve (and AID's linear solve) where the last ended.
    """

    name: str
    inner: AbstractInnerSolver
    estimator: AbstractEstimator
    inner_batch: Callable[[int], Batch]
    start: Callable[[Params, Params], Params] | None = None
    warm_start: bool = True


def run_method(problem: BilevelProblem, method: Method, hparams: Params, params0: Params, *,
               outer_batch: Batch, evaluate: Callable[[Params, Params], dict[str, float]], steps: int,
               lr: float, time_limit: float = math.inf, eval_every: int = 1,
               progress: bool = False) -> tuple[list[dict[str, Any]], Params, Params]:
    """Adam on ``hparams`` with ``method``'s hypergradients, for ``steps`` outer steps or ``time_limit`` s.

    ``time_s`` (wall) and ``cpu_s`` (process CPU time, which load from other processes on a
    shared machine does not inflate) count the hypergradients and updates only; ``evaluate(hparams, params)``
    (test metrics, say) runs every ``eval_every`` steps outside the clock. Failed statuses
    (a linear solve short of its tolerance, ...) do not stop the run: they are recorded in
    the ``result`` column. Returns ``(rows, final hparams, final inner params)``.
    """
    x = {k: v.detach().clone().requires_grad_(True) for k, v in hparams.items()}
    opt = torch.optim.Adam(list(x.values()), lr=lr)
    y, adjoint, elapsed, cpu, rows = params0, None, 0.0, 0.0, []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=method.name, unit="step", leave=False)
    for step in range(steps):
        tic, cpu_tic = time.perf_counter(), time.process_time()
        start = method.start(x, y) if method.start is not None else y
        hg = hypergrad(problem, x, start, inner=method.inner, estimator=method.estimator,
                       inner_batch=method.inner_batch(step), outer_batch=outer_batch, throw=False,
                       adjoint0=adjoint if method.warm_start else None)
        for key, value in x.items():
            value.grad = hg.value[key].detach().clone()
        opt.step()
        if method.warm_start:
            y, adjoint = hg.params, hg.adjoint
        elapsed += time.perf_counter() - tic
        cpu += time.process_time() - cpu_tic
        last = step == steps - 1 or elapsed >= time_limit
        if step % eval_every == 0 or last:
            status = hg.result.name if isinstance(hg.result, RESULTS) else str(hg.result)
            rows.append({"method": method.name, "step": step + 1, "time_s": elapsed, "cpu_s": cpu,
                         "outer_value": float(hg.outer_value), "hypergrad_norm": float(tree_norm(hg.value)),
                         "result": status, "num_hvp": hg.stats["num_hvp"],
                         **evaluate({k: v.detach() for k, v in x.items()}, hg.params)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(val=f"{float(hg.outer_value):.4g}", t=f"{elapsed:.0f}s")
        if last:
            break
    if bar is not None:
        bar.close()
    return rows, {k: v.detach() for k, v in x.items()}, hg.params


def write_report(out: Path, rows: list[dict[str, Any]], *, metric: str, ylabel: str, title: str,
                 table: list[dict[str, Any]], lines: dict[str, float] | None = None, note: str = "") -> None:
    """``curves.csv`` (every row), ``curves.png`` (``metric`` against wall time, one line per method,
    dashed horizontal lines for ``lines``) and ``results.md`` (``table`` as markdown, then ``note``)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "curves.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        ax.plot([r["time_s"] for r in mine], [r[metric] for r in mine], marker=".", markersize=3, label=name)
    for i, (name, value) in enumerate((lines or {}).items()):
        ax.axhline(value, linestyle="--", linewidth=1, color=f"C{(i + 6) % 10}", label=name)
    ax.set_xlabel("wall time of the outer loop (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    (out / "results.md").write_text(markdown_table(table) + ("\n" + note + "\n" if note else ""))


def markdown_table(table: list[dict[str, Any]]) -> str:
    """Rows of dicts as a GitHub markdown table (floats to 4 significant digits)."""
    keys = list(dict.fromkeys(k for row in table for k in row))

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in table]
    return "\n".join(lines) + "\n"


def check_writable(out: Path, call: str) -> Path:
    """Create ``out`` and make sure a file can be written there, or raise naming the folder."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".bilevel-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{call}: cannot write to --out {str(out)!r} ({err.strerror or err}). Fix: pass a "
                         "folder you can write to, e.g. --out results/hpo.") from None
    return out
