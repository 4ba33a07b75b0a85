"""MAML: meta-learn the initial weights; the inner loop fine-tunes all of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from .._tree import Params
from ..estimators import ITD
from ..estimators._base import AbstractEstimator
from ..inner import GradientDescent
from ..inner._base import AbstractInnerSolver
from ._learner import AbstractMetaLearner
from ._model import Forward, Loss, mse


@dataclass(frozen=True)
class MAML(AbstractMetaLearner):
    r"""Model-agnostic meta-learning as a bilevel problem.

    The meta-parameters :math:`x = \theta` are the model's initial weights and every task adapts
    all of them from there (``init`` is the identity):

    .. math::

        \min_\theta \frac1T \sum_t \ell(y_{t,N}(\theta); Q_t), \qquad
        y_{t,0} = \theta, \quad y_{t,k+1} = y_{t,k} - \alpha \nabla_y \ell(y_{t,k}; S_t).

    The estimator decides what the meta-gradient is: :class:`~bilevel.ITD` (default) is
    second-order MAML, exact through the :math:`N` steps; :class:`~bilevel.FirstOrder` is
    FO-MAML; ``bl.IMAML(lam=...)`` is iMAML (the inner problem gains
    :math:`\frac{\lambda}{2}\|y - \theta\|^2`); ``bl.ESJ(...)`` is an evolution-strategies MAML;
    ``bl.Reptile()`` is Reptile (the direction :math:`\theta - y_N`, a pseudo-gradient). AID
    cannot see a learned start and reports ``RESULTS.zero_hypergradient``.

    Args:
        model: an ``nn.Module`` (called through :func:`torch.func.functional_call`) or a
            function ``forward(params, x)``.
        inner: the inner solver (default ``bl.GradientDescent(lr=0.01, steps=1)``, MAML's sinusoid
            setting). Evaluation adapts with the same solver.
        estimator: default ``bl.ITD()``.
        loss: ``loss(predictions, targets) -> scalar`` of one task (default :func:`mse`).

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.datasets import Sinusoid
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40),
        ...                           torch.nn.ReLU(), torch.nn.Linear(40, 1))
        >>> maml = bl.meta.MAML(net)
        >>> theta = maml.init_hparams()
        >>> mg = maml.meta_gradient(theta, Sinusoid(shots=10).sample(25, seed=0))
        >>> mg.value["0.weight"].shape, mg.loss.dim()
        (torch.Size([40, 1]), 0)

    Reference: C. Finn, P. Abbeel, S. Levine, "Model-agnostic meta-learning for fast adaptation
    of deep networks", ICML 2017, Algorithm 2.
    """

    model: nn.Module | Forward
    inner: AbstractInnerSolver = field(default_factory=lambda: GradientDescent(lr=0.01, steps=1))
    estimator: AbstractEstimator = field(default_factory=ITD)
    loss: Loss = mse

    def __post_init__(self) -> None:
        self._setup()

    def init_hparams(self, params: Params | None = None) -> Params:
        """The model's initial weights (copies), or copies of ``params``."""
        return self._forward.parameters() if params is None else {k: v.detach().clone() for k, v in params.items()}

    def _start(self, hparams: Params) -> Params:
        return dict(hparams)

    def _predict(self, hparams: Params, params: Params, x: Tensor) -> Tensor:
        return self._forward(params, x)
