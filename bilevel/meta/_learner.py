"""What every meta-learner shares: the bilevel problem built from a forward, the vmapped meta-gradient,
adaptation and prediction.

A meta-learner is a frozen dataclass whose fields are its options (model, inner solver,
estimator, loss). It defines four small hooks — the initial meta-parameters, the learned start
``init(hparams)`` (or a fixed start), the prediction ``forward(hparams, params, x)`` of one task and
an optional inner penalty — and inherits the rest: the problem

.. math::

    g(x, y; S) = \\ell(\\text{predict}(x, y, X_S), Y_S) + \\text{penalty}(y), \\qquad
    f(x, y; Q) = \\ell(\\text{predict}(x, y, X_Q), Y_Q),

the meta-gradient :math:`\\frac1T\\sum_t \\nabla\\Phi_t(x)` as one
:func:`bilevel.vmap_hypergrad` call with ``in_dims=(None, None, 0, 0)``, and adaptation.

A learner whose prediction splits into a body that the inner loop keeps fixed and a head that
it adapts (ANIL on a :class:`~bilevel.meta.convnet.ConvNet` or an ``nn.Sequential``, a shared
embedding) also defines :meth:`_embed` and :meth:`_head`; its meta-batches are then solved with
the same problem in its ``features`` form (:class:`~bilevel.BilevelProblem`): the body's
features of each support set are computed once per task instead of at every inner step, and
the meta-gradient is the same to float rounding. :attr:`problem` stays the folded form.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import NamedTuple

from torch import Tensor
from torch.func import vmap

from .._hypergrad import vmap_hypergrad
from .._problem import BilevelProblem, check_tree
from .._result import Hypergrad
from .._tree import Params
from ..estimators._base import AbstractEstimator, inner_grad_fn
from ..inner._base import AbstractInnerSolver, solve
from ._model import Functional
from .tasks import Pair, split, support_of


class MetaGradient(NamedTuple):
    """The result of :meth:`AbstractMetaLearner.meta_gradient`.

    Attributes:
        value: the meta-gradient, the mean over the meta-batch of each task's hypergradient
            (shaped like ``hparams``: what the outer optimizer steps on).
        loss: the mean outer (query) loss after adaptation, a 0-dim tensor.
        hypergrad: the per-task :class:`~bilevel.Hypergrad` of :func:`bilevel.vmap_hypergrad`
            (statuses, stats, per-task values; the adapted parameters with ``return_params=True``).
    """

    value: Params
    loss: Tensor
    hypergrad: Hypergrad


class AbstractMetaLearner:
    """Base of the meta-learners (:class:`MAML`, :class:`ANIL`, :class:`MetaSGD`, :class:`SharedEmbedding`).

    Subclasses are frozen dataclasses with the fields ``model``, ``inner``, ``estimator`` (and a
    loss), call :meth:`_setup` in ``__post_init__`` and define :meth:`init_hparams`,
    :meth:`_start`, :meth:`_predict` (and optionally :meth:`_task_problem`, :meth:`_penalty`).
    """

    model: object
    inner: AbstractInnerSolver
    estimator: AbstractEstimator

    # -- hooks -------------------------------------------------------------------------------
    def init_hparams(self, params: Params | None = None) -> Params:
        """The meta-parameters to start meta-training from (fresh tensors)."""
        raise NotImplementedError

    def _start(self, hparams: Params) -> Params:
        """``init(hparams)``: the inner start of every task (MAML: the identity)."""
        raise NotImplementedError

    def _task_problem(self, hparams: Params, support: Pair) -> BilevelProblem:
        """The problem a meta-batch is solved with (:attr:`problem`; overridden when the start's
        shape depends on the data, as for a shared embedding's head): :attr:`problem`, in its
        ``features`` form when the prediction splits into body and head."""
        return self._split_problem

    def _predict(self, hparams: Params, params: Params, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.loss(pred, target)  # type: ignore[attr-defined]

    def _penalty(self, params: Params) -> Tensor | None:
        return None

    def _embed(self, hparams: Params, x: Tensor) -> Tensor | None:
        """The body's features of inputs ``x`` (``None``: the prediction does not split)."""
        return None

    def _head(self, hparams: Params, params: Params, features: Tensor) -> Tensor:
        """The head's prediction from the body's features (when :meth:`_embed` splits)."""
        raise NotImplementedError

    # -- shared machinery --------------------------------------------------------------------
    def _setup(self) -> None:
        name = type(self).__name__
        if not isinstance(self.inner, AbstractInnerSolver):
            raise TypeError(f"{name}(inner={self.inner!r}): expected an inner solver, e.g. "
                            "bl.GradientDescent(lr=0.01, steps=1).")
        if not isinstance(self.estimator, AbstractEstimator):
            raise TypeError(f"{name}(estimator={self.estimator!r}): expected an estimator, e.g. bl.ITD(), "
                            "bl.FirstOrder(), bl.IMAML(...), bl.ESJ(...) or bl.Reptile().")
        object.__setattr__(self, "_forward", Functional(self.model, name))

    def _inner_objective(self, hparams: Params, params: Params, batch: Pair) -> Tensor:
        x, y = batch
        value = self._loss(self._predict(hparams, params, x), y)
        penalty = self._penalty(params)
        return value if penalty is None else value + penalty

    def _outer_objective(self, hparams: Params, params: Params, batch: Pair) -> Tensor:
        x, y = batch
        return self._loss(self._predict(hparams, params, x), y)

    def _support_features(self, hparams: Params, batch: Pair) -> Pair:
        """The ``features`` of the split problem: ``(X, Y) -> (body(X), Y)``."""
        x, y = batch
        return self._embed(hparams, x), y

    def _inner_on_features(self, hparams: Params, params: Params, batch: Pair) -> Tensor:
        """The inner objective of the split problem, on ``(body features, targets)``."""
        features, y = batch
        value = self._loss(self._head(hparams, params, features), y)
        penalty = self._penalty(params)
        return value if penalty is None else value + penalty

    @cached_property
    def problem(self) -> BilevelProblem:
        """The :class:`~bilevel.BilevelProblem` of one task (inner batch: support, outer batch: query)."""
        return BilevelProblem(inner=self._inner_objective, outer=self._outer_objective,
                              init=self._start)

    @cached_property
    def _split_problem(self) -> BilevelProblem:
        """:attr:`problem` in its ``features`` form when the prediction splits, else :attr:`problem`."""
        if not self._splits:
            return self.problem
        return BilevelProblem(inner=self._inner_on_features, outer=self._outer_objective, init=self._start,
                              features=self._support_features)

    @property
    def _splits(self) -> bool:
        return type(self)._embed is not AbstractMetaLearner._embed

    def meta_gradient(self, hparams: Params, tasks: object, *, throw: bool = True,
                      chunk_size: int | None = None, estimator: AbstractEstimator | None = None,
                      return_params: bool = False) -> MetaGradient:
        """The meta-gradient over a meta-batch: one :func:`bilevel.vmap_hypergrad` call over tasks.

        Args:
            hparams: the meta-parameters (see :meth:`init_hparams`).
            tasks: a meta-batch with ``support_x, support_y, query_x, query_y`` (leading task dim).
            throw: raise :class:`~bilevel.BilevelError` when any task fails (default).
            chunk_size: map over at most this many tasks at once (bounds memory).
            estimator: use this estimator for this call instead of the learner's (the trainer
                passes an ``ESJ`` re-seeded at every step, so its directions are fresh).
            return_params: also return each task's adapted parameters as ``hypergrad.params``
                (default ``False``: the meta-gradient does not need them, and bringing them out
                of the transforms costs about 2% of a sinusoid MAML meta-step; :meth:`adapt`
                computes them on their own).
        """
        call = f"{type(self).__name__}.meta_gradient(...)"
        check_tree(hparams, "hparams", call)
        support, query = split(tasks, call)
        hg = vmap_hypergrad(self._task_problem(hparams, support), hparams, None, inner=self.inner,
                            estimator=self.estimator if estimator is None else estimator, inner_batch=support, outer_batch=query,
                            in_dims=(None, None, 0, 0), throw=throw, chunk_size=chunk_size,
                            return_params=return_params)
        return MetaGradient({k: v.mean(0) for k, v in hg.value.items()}, hg.outer_value.mean(), hg)

    def adapt(self, hparams: Params, tasks: object, steps: int | None = None) -> Params:
        """Adapt to every task's support set: the inner solver run from the start, vmapped over tasks.

        Args:
            hparams: the meta-parameters.
            tasks: a meta-batch (its support set is used) or a ``(support_x, support_y)`` pair.
            steps: inner steps; ``None`` for the inner solver's own ``steps`` (``0``: the start).

        Returns:
            The adapted inner parameters with a leading task dimension.
        """
        support = support_of(tasks, f"{type(self).__name__}.adapt(...)")
        inner = self.inner if steps is None else dataclasses.replace(self.inner, steps=steps)
        problem = self._task_problem(hparams, support)

        def one(batch: Pair) -> Params:
            return solve(inner, problem.start(hparams), inner_grad_fn(problem, hparams, batch),
                         check_growth=False).params

        return vmap(one)(support)

    def predict(self, hparams: Params, params: Params, x: Tensor) -> Tensor:
        """Predictions of each task's adapted ``params`` (leading task dim) at inputs ``x``:
        per task ``(T, M, ...)`` or shared ``(M, ...)``; returns ``(T, M, ...)``."""
        count = next(iter(params.values())).shape[0]
        shared = x.dim() < 3 or x.shape[0] != count
        return vmap(lambda p, inp: self._predict(hparams, p, inp), in_dims=(0, None if shared else 0))(params, x)

    def losses(self, hparams: Params, params: Params, tasks: object) -> Tensor:
        """Each task's query loss at its adapted ``params``: a ``(T,)`` tensor."""
        _, query = split(tasks, f"{type(self).__name__}.losses(...)")
        return vmap(lambda p, q: self._outer_objective(hparams, p, q))(params, query)
