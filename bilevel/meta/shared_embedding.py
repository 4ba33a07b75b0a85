"""Shared-embedding meta-learning: the outer loop learns an embedding, each task fits its own head to optimum."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import vmap

from .._problem import BilevelProblem
from .._tree import Params
from ..estimators._base import AbstractEstimator
from ..inner import GradientDescent
from ..inner._base import AbstractInnerSolver
from ._learner import AbstractMetaLearner
from ._model import Forward, Functional, cross_entropy, mse
from .closed_form import ClosedForm
from .tasks import Pair, support_of


@dataclass(frozen=True)
class RidgeHead:
    r"""A linear head :math:`\hat y = \Phi w + b` fitted by ridge regression,
    :math:`\min_{w,b} \operatorname{mse}(\Phi w + b, Y) + \frac{\lambda}{2}\|w\|^2` (the bias is not
    penalised), with the closed form

    .. math::

        \begin{bmatrix} w \\ b \end{bmatrix} = \big(\tilde\Phi^\top\tilde\Phi + \tfrac{K m \lambda}{2} D\big)^{-1}
        \tilde\Phi^\top Y, \qquad \tilde\Phi = [\Phi\ \mathbf 1], \quad D = \operatorname{diag}(1, \dots, 1, 0),

    for :math:`K` support points and :math:`m` outputs. Targets are ``(K, m)``.

    Args:
        lam: the ridge penalty :math:`\lambda > 0` (default 1.0).
    """

    lam: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, (int, float)) and self.lam > 0):
            raise ValueError(f"RidgeHead(lam={self.lam!r}): the ridge penalty must be positive.")

    def zeros(self, features: int, targets: Tensor) -> Params:
        outputs = targets.shape[-1] if targets.dim() > 2 else 1
        return {"w": targets.new_zeros(features, outputs), "b": targets.new_zeros(outputs)}

    def predict(self, params: Params, features: Tensor) -> Tensor:
        return features @ params["w"] + params["b"]

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return mse(pred, target)

    def penalty(self, params: Params) -> Tensor:
        return 0.5 * self.lam * (params["w"] ** 2).sum()

    def solve(self, features: Tensor, target: Tensor) -> Params:
        """The ridge solution for ``(K, d)`` features and ``(K, m)`` targets."""
        k, d = features.shape
        tilde = torch.cat([features, features.new_ones(k, 1)], dim=1)
        scale = torch.ones(d + 1, dtype=features.dtype, device=features.device)
        scale[-1] = 0
        gram = tilde.T @ tilde + (0.5 * k * target.shape[-1] * self.lam) * torch.diag(scale)
        coef = torch.linalg.solve(gram, tilde.T @ target)
        return {"w": coef[:d], "b": coef[d]}


@dataclass(frozen=True)
class SoftmaxHead:
    r"""A linear softmax head fitted by regularised multinomial logistic regression,
    :math:`\min_{w,b} \operatorname{CE}(\Phi w + b, c) + \frac{\lambda}{2}(\|w\|^2 + \|b\|^2)`, solved
    iteratively (no closed form). The penalty covers the bias too, so the head problem is strongly
    convex (the softmax is invariant to a common shift of the biases) and implicit
    differentiation is well posed. Targets are ``(K,)`` integer labels in ``0 .. ways-1``.

    With ``scaled_step=True`` the head's objective is divided, task by task, by an upper bound
    :math:`L` of its smoothness (the largest eigenvalue of its Hessian), computed from the task's
    features :math:`\tilde\Phi = [\Phi\ \mathbf 1]` (:math:`K` rows) as

    .. math::

        L = \frac{\lambda_{\max}(\tilde\Phi\tilde\Phi^\top)}{2K} + \lambda

    (the softmax's log-partition has Hessian :math:`\operatorname{diag}(p) - pp^\top \preceq \frac12 I`),
    and held constant (detached). The minimiser is unchanged, so an implicit hypergradient is too
    (AID's linear system and cross term both scale by :math:`1/L`); what changes is the inner
    solver's step: gradient descent with step :math:`\eta` on the scaled objective is gradient descent
    with step :math:`\eta / L` on the head's, so :math:`\eta \le 1` is safe (monotone descent) on every
    task, whatever the scale of the embedding — a fixed step is not: the embedding's feature norms
    grow during meta-training. ``L`` is a tensor (no ``.item()``), so it runs under ``vmap``. The
    inner objective's *values* (``hg.stats``, the growth check) are those of the scaled objective,
    and an :class:`~bilevel.IMAML` proximal term added to it weighs :math:`L` times more.

    Args:
        ways: number of classes.
        lam: the penalty :math:`\lambda > 0` (default 0.1), which makes the head strongly convex.
        scaled_step: divide the head's objective by the bound :math:`L` above (default ``False``).
    """

    ways: int
    lam: float = 0.1
    scaled_step: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.ways, bool) or not isinstance(self.ways, int) or self.ways < 2:
            raise ValueError(f"SoftmaxHead(ways={self.ways!r}): expected an int >= 2 (classes per task).")
        if not (isinstance(self.lam, (int, float)) and self.lam > 0):
            raise ValueError(f"SoftmaxHead(lam={self.lam!r}): the penalty must be positive.")
        if not isinstance(self.scaled_step, bool):
            raise TypeError(f"SoftmaxHead(scaled_step={self.scaled_step!r}): expected True or False.")

    def smoothness(self, features: Tensor) -> Tensor:
        r"""The bound :math:`L = \lambda_{\max}(\tilde\Phi\tilde\Phi^\top) / (2K) + \lambda` of
        the head objective's smoothness for ``(K, d)`` features, a 0-dim tensor (not detached)."""
        k = features.shape[0]
        tilde = torch.cat([features, features.new_ones(k, 1)], dim=1)
        return torch.linalg.eigvalsh(tilde @ tilde.T)[-1] / (2 * k) + self.lam

    def zeros(self, features: int, targets: Tensor, dtype: torch.dtype = torch.float32) -> Params:
        return {"w": torch.zeros(features, self.ways, dtype=dtype), "b": torch.zeros(self.ways, dtype=dtype)}

    def predict(self, params: Params, features: Tensor) -> Tensor:
        return features @ params["w"] + params["b"]

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(pred, target)

    def penalty(self, params: Params) -> Tensor:
        return 0.5 * self.lam * ((params["w"] ** 2).sum() + (params["b"] ** 2).sum())


@dataclass(frozen=True)
class _HeadSolution:
    """``(hparams, support) -> head``: the head's closed form on the embedded support set."""

    forward: Functional = field(repr=False, compare=False)
    head: RidgeHead = field(default_factory=RidgeHead)

    def __call__(self, hparams: Params, batch: Pair) -> Params:
        x, y = batch
        return self.head.solve(self.forward(hparams, x), y)

    def __repr__(self) -> str:
        return f"{self.head!r}.solve"


@dataclass(frozen=True)
class SharedEmbedding(AbstractMetaLearner):
    r"""Meta-learn a shared embedding :math:`\phi`; each task fits a head :math:`w_t` to optimum on its
    embedded support set, with no learned head init:

    .. math::

        \min_\phi \frac1T \sum_t \ell\big(h(w_t^*(\phi), \phi(X_{Q_t})), Y_{Q_t}\big), \qquad
        w_t^*(\phi) = \arg\min_w \ell\big(h(w, \phi(X_{S_t})), Y_{S_t}\big) + \tfrac{\lambda}{2}\|w\|^2.

    The head is :class:`RidgeHead` (regression; solved in closed form with ``estimator=None``,
    R2D2, or by the inner solver) or :class:`SoftmaxHead` (classification; iterative). With the
    inner solver every task's head starts at zero — the problem's ``init`` is that constant, not
    learned, so its Jacobian is zero — and any estimator differentiates it: ``bl.AID(...)``
    (implicit, natural here since the head is solved to optimum), ``bl.ITD()``, ``bl.ESJ(...)``,
    or ``bl.IMAML(lam=mu)``, whose proximal term :math:`\frac{\mu}{2}\|w - 0\|^2` then simply
    strengthens the head's penalty (on the bias too).

    Args:
        model: the embedding, an ``nn.Module`` or ``forward(params, x)``, mapping ``(K, ...)``
            inputs to ``(K, d)`` features.
        head: default ``RidgeHead()``.
        inner: the head's solver (default ``bl.GradientDescent(lr=0.1, steps=100)``), unused in closed form.
        estimator: ``None`` (default) for the ridge head's closed form (a :class:`ClosedForm`),
            or any estimator.

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.datasets import Sinusoid
        >>> embed = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU())
        >>> r2d2 = bl.meta.SharedEmbedding(embed, head=bl.meta.RidgeHead(lam=0.1))
        >>> mg = r2d2.meta_gradient(r2d2.init_hparams(), Sinusoid(shots=10).sample(25, seed=0))
        >>> sorted(mg.value)
        ['0.bias', '0.weight', '2.bias', '2.weight']

    References: L. Bertinetto et al., "Meta-learning with differentiable closed-form solvers",
    ICLR 2019 (ridge head); K. Lee, S. Maji, A. Ravichandran, S. Soatto, "Meta-learning with
    differentiable convex optimization", CVPR 2019 (MetaOptNet, convex classification heads);
    K. Ji, J. D. Lee, Y. Liang, H. V. Poor, NeurIPS 2020 (the bilevel shared-embedding view).
    """

    model: nn.Module | Forward
    head: RidgeHead | SoftmaxHead = field(default_factory=RidgeHead)
    inner: AbstractInnerSolver = field(default_factory=lambda: GradientDescent(lr=0.1, steps=100))
    estimator: AbstractEstimator | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.head, (RidgeHead, SoftmaxHead)):
            raise TypeError(f"SharedEmbedding(head={self.head!r}): expected bl.meta.RidgeHead(...) or "
                            "bl.meta.SoftmaxHead(ways=...).")
        if self.estimator is None:
            if not isinstance(self.head, RidgeHead):
                raise ValueError(f"SharedEmbedding(head={self.head!r}, estimator=None): only the ridge head has a "
                                 "closed form. Fix: pass an estimator, e.g. estimator=bl.AID(linear_solver=bl.CG()).")
            object.__setattr__(self, "estimator", ClosedForm(_HeadSolution(Functional(self.model, "SharedEmbedding"),
                                                                            self.head)))
        self._setup()

    def init_hparams(self, params: Params | None = None) -> Params:
        """The embedding's weights (copies)."""
        return self._forward.parameters() if params is None else {k: v.detach().clone() for k, v in params.items()}

    @property
    def problem(self) -> BilevelProblem:
        """The problem of one task without a start: pass the zero head as ``params0``."""
        return BilevelProblem(inner=self._inner_objective, outer=self._outer_objective)

    def _start(self, hparams: Params) -> Params:
        raise NotImplementedError  # the zero head is built per meta-batch by _task_problem

    def _task_problem(self, hparams: Params, support: Pair) -> BilevelProblem:
        """The problem whose ``init`` is the constant zero head (not learned: ``J_init = 0``), in its
        ``features`` form: each task's support set is embedded once, not at every inner step."""
        zeros = self.zero_head(hparams, support)
        return BilevelProblem(inner=self._inner_on_features, outer=self._outer_objective, init=lambda x: dict(zeros),
                              features=self._support_features)

    def zero_head(self, hparams: Params, support: Pair) -> Params:
        """Each task's head start: zeros shaped by the embedding's feature count and the targets."""
        x, y = support
        with torch.no_grad():
            features = self._forward(hparams, x[0, :1])
        if features.dim() != 2:
            raise ValueError(f"SharedEmbedding(model=...): the embedding maps a (1, ...) input to shape "
                             f"{tuple(features.shape)}; expected (1, features). Fix: end it with nn.Flatten().")
        zeros = self.head.zeros(features.shape[1], y)
        return {k: v.to(dtype=features.dtype, device=features.device) for k, v in zeros.items()}

    def _predict(self, hparams: Params, params: Params, x: Tensor) -> Tensor:
        return self.head.predict(params, self._forward(hparams, x))

    def _embed(self, hparams: Params, x: Tensor) -> Tensor:
        return self._forward(hparams, x)

    def _head(self, hparams: Params, params: Params, features: Tensor) -> Tensor:
        return self.head.predict(params, features)

    def _inner_on_features(self, hparams: Params, params: Params, batch: Pair) -> Tensor:
        features, y = batch
        value = self.head.loss(self.head.predict(params, features), y) + self.head.penalty(params)
        if isinstance(self.head, SoftmaxHead) and self.head.scaled_step:
            value = value / self.head.smoothness(features.detach())
        return value

    def _inner_objective(self, hparams: Params, params: Params, batch: Pair) -> Tensor:
        return self._inner_on_features(hparams, params, self._support_features(hparams, batch))

    def _loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.head.loss(pred, target)

    def _penalty(self, params: Params) -> Tensor:
        return self.head.penalty(params)

    def adapt(self, hparams: Params, tasks: object, steps: int | None = None) -> Params:
        """Fit every task's head: in closed form (``steps`` is ignored) or by the inner solver from zero."""
        if not isinstance(self.estimator, ClosedForm):
            return super().adapt(hparams, tasks, steps)
        support = support_of(tasks, "SharedEmbedding.adapt(...)")
        return vmap(lambda s: self.estimator.solution(hparams, s))(support)
