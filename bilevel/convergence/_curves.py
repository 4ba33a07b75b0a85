"""Reading training curves: when a run first reaches a loss level, in iterations and in seconds."""

from __future__ import annotations

import math
from typing import Any

Rows = list[dict[str, Any]]


def reach(points: Rows, level: float, clock: str = "time_s") -> tuple[float, float]:
    """``(iterations, seconds)`` at which the curve first reaches ``level`` (linear interpolation
    between evaluation points; seconds from the ``clock`` column); ``(inf, inf)`` if it never does."""
    prev = None
    for p in points:
        if p["meta_loss"] <= level:
            if prev is None:
                return float(p["step"]), p[clock]
            frac = (prev["meta_loss"] - level) / max(prev["meta_loss"] - p["meta_loss"], 1e-300)
            return (prev["step"] + frac * (p["step"] - prev["step"]),
                    prev[clock] + frac * (p[clock] - prev[clock]))
        prev = p
    return math.inf, math.inf


def reference_level(points: Rows, fraction: float = 0.9) -> float:
    """The loss level ``fraction`` of the way from a reference curve's first value to its lowest one
    (``nan`` if the curve never decreases). Other curves may reach it sooner, later or never."""
    finite = [p["meta_loss"] for p in points if math.isfinite(p["meta_loss"])]
    if not finite or min(finite) >= finite[0]:
        return math.nan
    return finite[0] - fraction * (finite[0] - min(finite))


def spearman(xs: list[float], ys: list[float]) -> float:
    """Rank correlation (ties by average rank; infinities rank last)."""
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den > 0 else 0.0
