"""The bilevel problem: two scalar objectives and an optional learned start."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._tree import Batch, Params

Objective = Callable[[Params, Params, Batch], Tensor]
Init = Callable[[Params], Params]


@dataclass(frozen=True)
class BilevelProblem:
    r"""A bilevel problem

    .. math::

        \min_x \; \Phi(x) = f(x, y(x)), \qquad y(x) \approx \arg\min_y g(x, y).

    Args:
        inner: ``g(hparams, params, batch) -> scalar tensor``, the inner objective.
        outer: ``f(hparams, params, batch) -> scalar tensor``, the outer objective.
        init: optional ``init(hparams) -> params``, the inner start when the
            start itself is learned (MAML: the identity on the meta-parameters;
            ANIL: the head weights). Estimators that differentiate through the
            start (ITD, FirstOrder, IMAML, ESJ, Reptile) see this dependence;
            without ``init`` the start is ``params0`` and is a constant.

    ``hparams`` and ``params`` are ``dict[str, Tensor]``. A ``torch.nn.Module``
    enters through :func:`torch.func.functional_call` inside ``g`` and ``f``.

    Example:
        >>> import torch, bilevel as bl
        >>> g = lambda x, y, b: 0.5 * ((y["w"] - x["c"]) ** 2).sum()
        >>> f = lambda x, y, b: (y["w"] ** 2).sum()
        >>> problem = bl.BilevelProblem(inner=g, outer=f)
    """

    inner: Objective
    outer: Objective
    init: Init | None = None

    def __post_init__(self) -> None:
        for name in ("inner", "outer"):
            if not callable(getattr(self, name)):
                raise TypeError(f"BilevelProblem({name}={getattr(self, name)!r}): expected a callable "
                                f"{name}(hparams, params, batch) -> scalar tensor.")
        if self.init is not None and not callable(self.init):
            raise TypeError(f"BilevelProblem(init={self.init!r}): expected None or a callable "
                            "init(hparams) -> params dict.")

    def inner_value(self, hparams: Params, params: Params, batch: Batch) -> Tensor:
        """``g(hparams, params, batch)``, checked to be a floating scalar tensor."""
        return _evaluate(self.inner, "inner", hparams, params, batch)

    def outer_value(self, hparams: Params, params: Params, batch: Batch) -> Tensor:
        """``f(hparams, params, batch)``, checked to be a floating scalar tensor."""
        return _evaluate(self.outer, "outer", hparams, params, batch)

    def start(self, hparams: Params) -> Params:
        """``init(hparams)``, checked to be a dict of floating tensors."""
        if self.init is None:
            raise ValueError("hypergrad(...): params0 is None and the problem has no init. Fix: pass "
                             "params0 (the inner start) or BilevelProblem(init=...).")
        try:
            out = self.init(hparams)
        except Exception as err:
            err.add_note("hypergrad(...): raised inside the problem's init(hparams). Fix: check that init maps the "
                         "hparams dict to a params dict.")
            raise
        check_tree(out, "init(hparams)", "hypergrad(...)")
        return out


def _evaluate(fn: Objective, name: str, hparams: Params, params: Params, batch: Batch) -> Tensor:
    try:
        out = fn(hparams, params, batch)
    except Exception as err:
        err.add_note(f"hypergrad(...): raised inside the {name} objective {_name(fn)}(hparams, params, batch) "
                     f"with batch = {_describe(batch)}. Fix: check that the batch passed as {name}_batch= "
                     "has the structure this objective expects.")
        raise
    if not isinstance(out, Tensor):
        raise TypeError(f"hypergrad(...): {name} objective {_name(fn)} returned {type(out).__name__}; "
                        "expected a scalar tensor. Fix: return a torch.Tensor (e.g. loss.sum() or loss.mean()).")
    if out.dim() != 0:
        raise ValueError(f"hypergrad(...): {name} objective {_name(fn)} returned shape {tuple(out.shape)}; "
                         "expected a scalar tensor. Fix: reduce it, e.g. with .mean() or .sum().")
    if not out.is_floating_point():
        raise TypeError(f"hypergrad(...): {name} objective {_name(fn)} returned dtype {out.dtype}; "
                        "expected a floating scalar. Fix: compute the loss in float32 or float64.")
    return out


def _describe(batch: object, depth: int = 0) -> str:
    """A short description of a batch for error notes (shapes, not values)."""
    if isinstance(batch, Tensor):
        return f"Tensor(shape={tuple(batch.shape)}, dtype={batch.dtype})"
    if isinstance(batch, (tuple, list)) and depth < 2:
        inner = ", ".join(_describe(b, depth + 1) for b in batch[:4])
        return f"{type(batch).__name__} of {len(batch)} [{inner}{', ...' if len(batch) > 4 else ''}]"
    if isinstance(batch, dict):
        return f"dict with keys {sorted(map(str, batch))[:8]}"
    return "None" if batch is None else type(batch).__name__


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def check_tree(tree: object, what: str, call: str) -> None:
    """Raise a clear error unless ``tree`` is a non-empty dict of floating tensors."""
    if not isinstance(tree, dict):
        raise TypeError(f"{call}: {what} is a {type(tree).__name__}; expected a dict[str, Tensor]. "
                        "Fix: pass e.g. dict(model.named_parameters()) or {'w': tensor}.")
    if not tree:
        raise ValueError(f"{call}: {what} is an empty dict; expected at least one tensor. "
                         "Fix: pass e.g. {'w': torch.zeros(3)}.")
    for key, value in tree.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{call}: {what}[{key!r}] is a {type(value).__name__}; expected a tensor. "
                            "Fix: wrap it with torch.as_tensor(..., dtype=torch.float32).")
        if not value.is_floating_point():
            raise TypeError(f"{call}: {what}[{key!r}] has dtype {value.dtype}; expected a floating dtype "
                            "(float32 or float64). Fix: convert it with .float() or .double().")


def check_same_structure(a: Params, b: Params, what_a: str, what_b: str, call: str) -> None:
    """Raise unless ``a`` and ``b`` have the same keys, shapes and dtypes."""
    if set(a) != set(b):
        raise ValueError(f"{call}: {what_a} has keys {sorted(a)} but {what_b} has keys {sorted(b)}. "
                         f"Fix: give {what_a} the same keys as {what_b}.")
    for key in a:
        if a[key].shape != b[key].shape:
            raise ValueError(f"{call}: {what_a}[{key!r}] has shape {tuple(a[key].shape)} but "
                             f"{what_b}[{key!r}] has shape {tuple(b[key].shape)}. Fix: make them match.")
        if a[key].dtype != b[key].dtype:
            raise TypeError(f"{call}: {what_a}[{key!r}] has dtype {a[key].dtype} but "
                            f"{what_b}[{key!r}] has dtype {b[key].dtype}. Fix: convert one of them.")


def as_tensor_like(value: float, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)
