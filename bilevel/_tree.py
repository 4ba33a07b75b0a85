"""Small helpers over ``dict[str, Tensor]`` trees.

Parameters and hyperparameters are flat dictionaries of tensors; these helpers
keep the estimators free of per-key loops. Every helper is pure: it returns new
tensors and never modifies its arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Params = dict[str, Tensor]
Batch = Any


def tree_map(fn: Callable[..., Tensor], tree: Params, *rest: Params) -> Params:
    """Apply ``fn`` key by key to one or more trees with the same keys."""
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def tree_add(a: Params, b: Params) -> Params:
    return {k: a[k] + b[k] for k in a}


def tree_sub(a: Params, b: Params) -> Params:
    return {k: a[k] - b[k] for k in a}


def tree_scale(a: Params, s: float | Tensor) -> Params:
    return {k: v * s for k, v in a.items()}


def tree_axpy(alpha: float | Tensor, x: Params, y: Params) -> Params:
    """``alpha * x + y``, one fused kernel per leaf (``add`` with a number, ``addcmul`` with a tensor)."""
    if isinstance(alpha, Tensor):
        return {k: torch.addcmul(y[k], alpha, x[k]) for k in y}
    return {k: torch.add(y[k], x[k], alpha=alpha) for k in y}


def tree_dot(a: Params, b: Params) -> Tensor:
    """Sum over keys of the Euclidean inner products (a 0-dim tensor).

    One ``torch.dot`` per leaf (and one ``stack``/``sum`` for several leaves): the
    inner loop and CG call this every iteration, so it stays a kernel or two.
    """
    dots = [torch.dot(_flat(a[k]), _flat(b[k])) for k in a]
    if len(dots) == 1:
        return dots[0]
    return torch.stack(dots).sum() if dots else torch.zeros(())


def tree_norm(a: Params) -> Tensor:
    """Euclidean norm of the concatenated leaves."""
    return torch.sqrt(tree_dot(a, a))


def tree_zeros_like(a: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def tree_detach(a: Params) -> Params:
    return {k: v.detach() for k, v in a.items()}


def tree_where(cond: Tensor, a: Params, b: Params) -> Params:
    """``a`` where the 0-dim boolean ``cond`` holds, else ``b`` (vmap-safe)."""
    return {k: torch.where(cond, a[k], b[k]) for k in a}


def tree_isfinite(a: Params) -> Tensor:
    """A 0-dim boolean tensor: every entry of every leaf is finite."""
    flags = [torch.isfinite(v).all() for v in a.values()]
    if len(flags) == 1:
        return flags[0]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def tree_allzero(a: Params) -> Tensor:
    """A 0-dim boolean tensor: every entry of every leaf is exactly zero."""
    return torch.stack([(v == 0).all() for v in a.values()]).all()


def tree_ravel(a: Params) -> Tensor:
    """Concatenate the leaves into one vector (keys in insertion order)."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def tree_unravel(vec: Tensor, like: Params) -> Params:
    """Inverse of :func:`tree_ravel` for trees shaped like ``like``."""
    out, start = {}, 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vec[start:start + n].reshape(v.shape)
        start += n
    return out


def tree_size(a: Params) -> int:
    return sum(v.numel() for v in a.values())


def _flat(v: Tensor) -> Tensor:
    return v if v.dim() == 1 else v.reshape(-1)
