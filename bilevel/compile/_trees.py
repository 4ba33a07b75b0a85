"""Keys and tree plumbing for compiled units.

:func:`static_key` says what a non-tensor object computes (so that equal problems share a
compiled unit); :func:`split` / :func:`merge` separate a tree into its tensor leaves and the
rest (once, when a unit is prepared); :func:`tensors_of` / :func:`rebuild` are the fast
per-call versions for a known structure.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Hashable
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._problem import BilevelProblem

_TENSOR = object()  # marks where a tensor leaf sat among the static leaves


def static_key(obj: Any, depth: int = 0) -> Hashable:
    """A hashable key that determines what ``obj`` computes.

    Functions are keyed by their code, defaults and closure contents (so a closure rebuilt
    with equal contents, like iMAML's proximal objective, keys the same), tensors by identity
    (the compiled unit keeps the original alive), hashable values by value, anything else by
    identity.
    """
    if depth > 6:
        return ("id", id(obj))
    if isinstance(obj, Tensor):
        return ("tensor", id(obj))
    if isinstance(obj, types.FunctionType):
        cells = tuple(static_key(c.cell_contents, depth + 1) if _filled(c) else None for c in obj.__closure__ or ())
        return ("function", obj.__code__, id(obj.__globals__), static_key(obj.__defaults__, depth + 1), cells)
    if isinstance(obj, types.MethodType):
        return ("method", obj.__func__, static_key(obj.__self__, depth + 1))
    if isinstance(obj, BilevelProblem):
        return ("problem", *(static_key(f, depth + 1) for f in (obj.inner, obj.outer, obj.init)))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # field by field: tensors by identity
        return (type(obj), tuple(static_key(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)))
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(static_key(o, depth + 1) for o in obj))
    if isinstance(obj, dict):
        return (dict, tuple((k, static_key(v, depth + 1)) for k, v in obj.items()))
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return (type(obj), obj)  # the type too: True == 1 == 1.0, but they compute differently


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def split(tree: Any) -> tuple[list[Tensor], Any, tuple]:
    """``(tensor leaves, structure, leaves with tensors replaced by a marker)``."""
    leaves, spec = tree_flatten(tree)
    statics = tuple(_TENSOR if isinstance(v, Tensor) else v for v in leaves)
    return [v for v in leaves if isinstance(v, Tensor)], spec, statics


def merge(tensors: Any, spec: Any, statics: tuple) -> Any:
    it = iter(tensors)
    return tree_unflatten([next(it) if s is _TENSOR else s for s in statics], spec)


def tensors_of(tree: Any, out: list[Tensor]) -> list[Tensor]:
    """The tensor leaves of ``tree`` in :func:`tree_flatten`'s order (dicts, tuples, lists and
    named tuples are walked; anything else is a leaf), without building a tree spec: the
    per-call path of a prepared unit."""
    if isinstance(tree, Tensor):
        out.append(tree)
    elif type(tree) is dict or isinstance(tree, dict):
        for v in tree.values():
            tensors_of(v, out)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            tensors_of(v, out)
    return out


def template_of(tree: Any) -> Any:
    """``tree`` with every tensor replaced by a marker (what :func:`rebuild` fills in)."""
    if isinstance(tree, Tensor):
        return _TENSOR
    if isinstance(tree, dict):
        return {k: template_of(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(template_of(v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(template_of(v) for v in tree)
    return tree


def rebuild(template: Any, it: Any) -> Any:
    if template is _TENSOR:
        return next(it)
    if isinstance(template, dict):
        return {k: rebuild(v, it) for k, v in template.items()}
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*(rebuild(v, it) for v in template))
    if isinstance(template, (tuple, list)):
        return type(template)(rebuild(v, it) for v in template)
    return template
