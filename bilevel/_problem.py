"""The bilevel problem: two scalar objectives, an optional learned start and optional inner features."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._batch import Sampler, batch_at, is_stochastic
from ._tree import Batch, Params

Objective = Callable[[Params, Params, Batch], Tensor]
Init = Callable[[Params], Params]
#: ``features(hparams, inner_batch) -> batch``: per-task preprocessing of the inner batch.
Features = Callable[[Params, Batch], Batch]


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
        features: optional ``features(hparams, inner_batch) -> batch``, a
            differentiable preprocessing of the *inner* batch that depends on
            ``hparams`` only (never on ``params``); ``g`` then receives
            ``features(hparams, inner_batch)`` as its batch. See "Features" below.

    ``hparams`` and ``params`` are ``dict[str, Tensor]``. A ``torch.nn.Module``
    enters through :func:`torch.func.functional_call` inside ``g`` and ``f``.

    **Features.** A problem with ``features=phi`` is *exactly* the problem with
    inner objective ``lambda x, y, b: g(x, y, phi(x, b))`` and no features: every
    estimator returns the same hypergradient for both forms (to float rounding),
    including the dependence of ``g`` on ``x`` through ``phi`` (ITD
    differentiates through it, AID and iMAML form their cross term
    :math:`\nabla^2_{xy} g\,v` of the composition, ESJ evaluates ``phi`` at the
    perturbed hyperparameters). Only the cost differs: ``phi`` runs once per
    inner solve instead of inside every inner step, linear-solver product and
    ESJ step. The typical use is a meta-learner whose inner loop adapts only a
    head on top of a body that the inner loop keeps fixed (ANIL, a shared
    embedding): ``phi`` computes the body's features of the support set once per
    task. Rules: ``phi`` must not depend on ``params`` (it cannot see them), and
    its output is the batch ``g`` takes. With a :class:`~bilevel.Sampler` as
    ``inner_batch``, ``phi`` is applied to each draw as it is drawn. The outer
    batch is **not** preprocessed: ``f`` is evaluated once per call, so there
    is nothing to save; an ``f`` that wants the same features computes them
    itself. Cost counters (``num_grad``, ``num_hvp``) do not count ``phi``.

    Example:
        >>> import torch, bilevel as bl
        >>> g = lambda x, y, b: 0.5 * ((y["w"] - x["c"]) ** 2).sum()
        >>> f = lambda x, y, b: (y["w"] ** 2).sum()
        >>> problem = bl.BilevelProblem(inner=g, outer=f)

        With features: a body ``tanh(b @ x["A"])`` computed once per solve; the
        inner objective fits a head ``w`` on it.

        >>> body = lambda x, b: (torch.tanh(b[0] @ x["A"]), b[1])
        >>> g = lambda x, y, b: 0.5 * ((b[0] @ y["w"] - b[1]) ** 2).mean() + 0.05 * (y["w"] ** 2).sum()
        >>> f = lambda x, y, b: 0.5 * ((torch.tanh(b[0] @ x["A"]) @ y["w"] - b[1]) ** 2).mean()
        >>> problem = bl.BilevelProblem(inner=g, outer=f, features=body)
        >>> data = lambda: (torch.randn(6, 3), torch.randn(6))
        >>> hg = bl.hypergrad(problem, {"A": torch.randn(3, 4)}, {"w": torch.zeros(4)},
        ...                   inner=bl.GradientDescent(lr=0.5, steps=10), estimator=bl.ITD(),
        ...                   inner_batch=data(), outer_batch=data())
        >>> hg.value["A"].shape  # the body's weights get their gradient through the features
        torch.Size([3, 4])
    """

    inner: Objective
    outer: Objective
    init: Init | None = None
    features: Features | None = None

    def __post_init__(self) -> None:
        for name in ("inner", "outer"):
            if not callable(getattr(self, name)):
                raise TypeError(f"BilevelProblem({name}={getattr(self, name)!r}): expected a callable "
                                f"{name}(hparams, params, batch) -> scalar tensor.")
        if self.init is not None and not callable(self.init):
            raise TypeError(f"BilevelProblem(init={self.init!r}): expected None or a callable "
                            "init(hparams) -> params dict.")
        if self.features is not None and not callable(self.features):
            raise TypeError(f"BilevelProblem(features={self.features!r}): expected None or a callable "
                            "features(hparams, inner_batch) -> the batch the inner objective takes. Fix: pass "
                            "a function, e.g. features=lambda x, b: (body(x, b[0]), b[1]).")

    def inner_value(self, hparams: Params, params: Params, batch: Batch) -> Tensor:
        """``g(hparams, params, batch)``, checked to be a floating scalar tensor. ``batch`` is the
        inner objective's own batch: with ``features``, already ``features(hparams, inner_batch)``."""
        return _evaluate(self.inner, "inner", hparams, params, batch, self.features or self._featured)

    def featurize(self, hparams: Params, batch: Batch) -> Batch:
        """``features(hparams, batch)`` (``batch`` itself without features), checked not to be ``None``.
        A :class:`~bilevel.Sampler` gives a sampler whose every draw is preprocessed when drawn."""
        if self.features is None:
            return batch
        if is_stochastic(batch):
            return Sampler(_FeaturedDraws(self, hparams, batch))
        try:
            out = self.features(hparams, batch)
        except Exception as err:
            err.add_note(f"hypergrad(...): raised inside the problem's features {_name(self.features)}(hparams, "
                         f"inner_batch) with inner_batch = {_describe(batch)}. Fix: check that features takes "
                         "(hparams, inner_batch) and that the batch passed as inner_batch= has the structure "
                         "it expects.")
            raise
        if out is None:
            raise TypeError(f"hypergrad(...): the problem's features {_name(self.features)}(hparams, inner_batch) "
                            "returned None; expected the batch the inner objective takes. Fix: return it "
                            "(e.g. `return body(hparams, x), y`).")
        return out

    def featured(self) -> BilevelProblem:
        """The problem whose inner objective takes already preprocessed batches: the same ``g``,
        ``f`` and ``init``, no ``features`` (itself when there are none). The inner loops of the
        estimators run on it with ``featurize(hparams, inner_batch)``."""
        if self.features is None:
            return self
        core = dataclasses.replace(self, features=None)
        object.__setattr__(core, "_featured", self.features)  # for error notes only
        return core

    def folded(self) -> BilevelProblem:
        """The same problem without ``features``: inner objective ``g(x, y, features(x, b))`` on
        raw batches (itself when there are none). Derivatives with respect to ``x`` of
        anything involving ``g`` (AID's cross term) are taken on this form."""
        if self.features is None:
            return self
        return BilevelProblem(inner=_Folded(self), outer=self.outer, init=self.init)

    _featured = None

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


@dataclass(frozen=True, eq=False)
class _FeaturedDraws:
    """``step -> features(hparams, draw step)``: a :class:`~bilevel.Sampler`'s draws, preprocessed."""

    problem: BilevelProblem
    hparams: Params
    batch: Sampler

    def __call__(self, step: int) -> Batch:
        return self.problem.featurize(self.hparams, batch_at(self.batch, step))


@dataclass(frozen=True)
class _Folded:
    """``(x, y, b) -> g(x, y, features(x, b))``: a problem's inner objective with its features folded in."""

    problem: BilevelProblem

    def __call__(self, hparams: Params, params: Params, batch: Batch) -> Tensor:
        return self.problem.inner_value(hparams, params, self.problem.featurize(hparams, batch))

    def __post_init__(self) -> None:  # how error notes and compiled-unit names call it
        object.__setattr__(self, "__qualname__", f"{_name(self.problem.inner)}∘{_name(self.problem.features)}")


def _evaluate(fn: Objective, name: str, hparams: Params, params: Params, batch: Batch,
              features: Features | None = None) -> Tensor:
    try:
        out = fn(hparams, params, batch)
    except Exception as err:
        if features is not None:
            err.add_note(f"hypergrad(...): raised inside the {name} objective {_name(fn)}(hparams, params, batch) "
                         f"with batch = features(hparams, inner_batch) = {_describe(batch)}, the output of the "
                         f"problem's features {_name(features)}. Fix: make features return the batch the inner "
                         "objective expects (with features, g receives features(hparams, inner_batch), not "
                         "inner_batch).")
            raise
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
