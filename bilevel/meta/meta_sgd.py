"""Meta-SGD: meta-learn the initial weights and a step size per weight."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._tree import Params
from ..estimators import ITD
from ..estimators._base import AbstractEstimator
from ..inner._base import AbstractInnerSolver, SolverState
from ._learner import AbstractMetaLearner
from ._model import Forward, Loss, mse


@dataclass(frozen=True)
class LearnedSGD(AbstractInnerSolver):
    r"""Gradient descent with a step size per entry, carried inside the iterate:
    :math:`w_{k+1} = w_k - \alpha_w \odot \nabla_w g` for every key ``w`` of the iterate that has a
    partner ``prefix + w`` holding :math:`\alpha_w` (same shape); the partners themselves do not move.

    The step sizes enter the iterate through the problem's ``init(hparams)`` (see
    :class:`MetaSGD`), so every estimator sees them as part of the learned start and ITD
    differentiates the adapted weights with respect to them; the inner-solver protocol
    (``init / step / terminate``) is unchanged.

    Args:
        steps: number of steps (default 1, as in Meta-SGD).
        tol: optional early-stop tolerance on :math:`\|\nabla g\|` (see :class:`~bilevel.GradientDescent`).
        prefix: key prefix of the step sizes (default ``"lr."``).

    Example:
        >>> import torch
        >>> from bilevel.meta import LearnedSGD
        >>> y = {"w": torch.ones(2), "lr.w": torch.tensor([0.1, 0.5])}
        >>> LearnedSGD().step((y,), {"w": torch.ones(2), "lr.w": torch.zeros(2)})[0]["w"]
        tensor([0.9000, 0.5000])
    """

    steps: int = 1
    tol: float | None = None
    prefix: str = "lr."

    def __post_init__(self) -> None:
        self._check()
        if not isinstance(self.prefix, str) or not self.prefix:
            raise ValueError(f"LearnedSGD(prefix={self.prefix!r}): expected a non-empty string.")

    def init(self, params: Params) -> SolverState:
        for key, value in params.items():
            if key.startswith(self.prefix):
                continue
            rate = params.get(self.prefix + key)
            if rate is None or rate.shape != value.shape:
                found = "is missing" if rate is None else f"has shape {tuple(rate.shape)}"
                raise ValueError(f"LearnedSGD: the iterate's step size {self.prefix + key!r} for {key!r} "
                                 f"(shape {tuple(value.shape)}) {found}. Fix: build the problem with "
                                 "bl.meta.MetaSGD, whose init(hparams) carries a step size per weight.")
        return (params,)

    def step(self, state: SolverState, grad: Params) -> SolverState:
        y, p = state[0], self.prefix
        return ({k: v if k.startswith(p) else v - y[p + k] * grad[k] for k, v in y.items()},)


@dataclass(frozen=True)
class MetaSGD(AbstractMetaLearner):
    r"""Meta-SGD: MAML whose inner step sizes are meta-learned too, one per weight.

    The meta-parameters are the initial weights :math:`\theta` and step sizes :math:`\alpha`
    (same shapes, keys ``"lr." + name``); each task adapts
    :math:`y_{k+1} = y_k - \alpha \odot \nabla_y \ell(y_k; S_t)` from :math:`y_0 = \theta`.
    Composition keeps the core contract: ``init(x)`` places :math:`\theta` and :math:`\alpha` in
    the iterate and :class:`LearnedSGD` reads :math:`\alpha` from there, so with
    :class:`~bilevel.ITD` (default) the meta-gradient of both is exact, and
    :class:`~bilevel.ESJ` estimates both. First-order estimators (``FirstOrder``, ``IMAML``,
    ``Reptile``) drop :math:`\partial y_N / \partial\alpha` and return a zero gradient for
    :math:`\alpha` — the learned step sizes then stay at ``init_lr``.

    Args:
        model: an ``nn.Module`` or a function ``forward(params, x)``.
        inner: a :class:`LearnedSGD` (default one step, as in the paper).
        estimator: default ``bl.ITD()``.
        loss: default :func:`mse`.
        init_lr: the step sizes' start (default 0.01, MAML's sinusoid step size).

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.datasets import Sinusoid
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
        >>> msgd = bl.meta.MetaSGD(net)
        >>> x = msgd.init_hparams()
        >>> sorted(x)
        ['0.bias', '0.weight', '2.bias', '2.weight', 'lr.0.bias', 'lr.0.weight', 'lr.2.bias', 'lr.2.weight']
        >>> mg = msgd.meta_gradient(x, Sinusoid.meta_sgd(shots=5).sample(4, seed=0))
        >>> mg.value["lr.2.weight"].shape
        torch.Size([1, 40])

    Reference: Z. Li, F. Zhou, F. Chen, H. Li, "Meta-SGD: Learning to learn quickly for few-shot
    learning", arXiv:1707.09835, 2017, Algorithm 1.
    """

    model: nn.Module | Forward
    inner: AbstractInnerSolver = field(default_factory=LearnedSGD)
    estimator: AbstractEstimator = field(default_factory=ITD)
    loss: Loss = mse
    init_lr: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.inner, LearnedSGD):
            raise TypeError(f"MetaSGD(inner={self.inner!r}): the step sizes are meta-parameters, so the inner "
                            "solver must read them from the iterate. Fix: pass inner=bl.meta.LearnedSGD(steps=...).")
        if not (isinstance(self.init_lr, (int, float)) and self.init_lr == self.init_lr):
            raise ValueError(f"MetaSGD(init_lr={self.init_lr!r}): expected a number.")
        self._setup()

    def init_hparams(self, params: Params | None = None) -> Params:
        """The model's weights (copies) and a step size ``init_lr`` per weight (``"lr." + name``)."""
        weights = self._forward.parameters() if params is None else {k: v.detach().clone() for k, v in params.items()}
        prefix = self.inner.prefix
        clash = [k for k in weights if k.startswith(prefix)]
        if clash:
            raise ValueError(f"MetaSGD: the parameters {clash} already start with the step-size prefix "
                             f"{prefix!r}. Fix: pass inner=bl.meta.LearnedSGD(prefix='alpha:') or another prefix.")
        rates = {prefix + k: torch.full_like(v, float(self.init_lr)) for k, v in weights.items()}
        return {**weights, **rates}

    def step_sizes(self, hparams: Params) -> Params:
        """The learned step sizes, keyed by weight name."""
        p = self.inner.prefix
        return {k[len(p):]: v for k, v in hparams.items() if k.startswith(p)}

    def _start(self, hparams: Params) -> Params:
        return dict(hparams)

    def _predict(self, hparams: Params, params: Params, x: Tensor) -> Tensor:
        p = self.inner.prefix
        return self._forward({k: v for k, v in params.items() if not k.startswith(p)}, x)
