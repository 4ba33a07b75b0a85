"""ANIL: almost no inner loop — the inner loop adapts only the head; the outer loop learns body and head init."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace

from torch import Tensor, nn
from torch.func import functional_call

from .._tree import Params
from ..estimators import ITD
from ..estimators._base import AbstractEstimator
from ..inner import GradientDescent
from ..inner._base import AbstractInnerSolver
from ._learner import AbstractMetaLearner
from ._model import Forward, Loss, mse
from .convnet import ConvNet


@dataclass(frozen=True)
class ANIL(AbstractMetaLearner):
    r"""ANIL: MAML whose inner loop adapts only the head.

    The meta-parameters are all of the model's weights, split into a body :math:`\phi` and a
    head :math:`w`; the inner parameters are the head alone, started at the learned head
    (``init(x) = w``), while the body stays at :math:`\phi` inside the inner loop:

    .. math::

        \min_{\phi, w} \frac1T \sum_t \ell(\phi, u_{t,N}; Q_t), \qquad u_{t,0} = w, \quad
        u_{t,k+1} = u_{t,k} - \alpha \nabla_u \ell(\phi, u_{t,k}; S_t).

    The body's meta-gradient flows through :math:`\phi`'s direct use and through the inner
    steps (second order with :class:`~bilevel.ITD`); any estimator works as for :class:`MAML`.

    Since the body is fixed during the inner loop, its features of the support set are computed
    once per task (the problem's ``features``, :class:`~bilevel.BilevelProblem`) when the model
    splits into body and head: a :class:`~bilevel.meta.convnet.ConvNet` with ``head=("head",)``,
    or an ``nn.Sequential`` whose head is its last module(s) (the head's parameters are exactly
    those of a run of final modules). Any other model (a plain forward function, a module of
    another shape) runs the whole forward at every inner step. The meta-gradient is the same
    either way, to float rounding; only the cost differs.

    Args:
        model: an ``nn.Module`` or a function ``forward(params, x)``.
        head: names (or name prefixes, e.g. ``("4",)`` or ``("fc",)``) of the head parameters;
            ``None`` (default) takes the parameters of the module's last layer with parameters.
        inner: default ``bl.GradientDescent(lr=0.01, steps=1)``.
        estimator: default ``bl.ITD()``.
        loss: default :func:`mse`.

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.datasets import Sinusoid
        >>> net = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 1))
        >>> anil = bl.meta.ANIL(net)
        >>> anil.head_names(anil.init_hparams())
        ('2.weight', '2.bias')
        >>> mg = anil.meta_gradient(anil.init_hparams(), Sinusoid(shots=5).sample(4, seed=0))
        >>> sorted(mg.value)
        ['0.bias', '0.weight', '2.bias', '2.weight']

    References: A. Raghu, M. Raghu, S. Bengio, O. Vinyals, "Rapid learning or feature reuse?
    Towards understanding the effectiveness of MAML", ICLR 2020; K. Ji, J. D. Lee, Y. Liang,
    H. V. Poor, "Convergence of meta-learning with task-specific adaptation over partial
    parameters", NeurIPS 2020.
    """

    model: nn.Module | Forward
    head: tuple[str, ...] | None = None
    inner: AbstractInnerSolver = field(default_factory=lambda: GradientDescent(lr=0.01, steps=1))
    estimator: AbstractEstimator = field(default_factory=ITD)
    loss: Loss = mse

    def __post_init__(self) -> None:
        if isinstance(self.head, str):
            object.__setattr__(self, "head", (self.head,))
        if self.head is None and not isinstance(self.model, nn.Module):
            raise ValueError("ANIL(head=None): with a plain forward function the head cannot be found "
                             "automatically. Fix: pass head=('name', ...) naming the head parameters.")
        if self.head is None:
            object.__setattr__(self, "head", _last_layer(self.model))
        self._setup()

    def head_names(self, hparams: Params) -> tuple[str, ...]:
        """The keys of ``hparams`` that form the head (adapted in the inner loop)."""
        names = tuple(k for k in hparams if any(k == p or k.startswith(p + ".") for p in self.head))
        if not names or len(names) == len(hparams):
            what = "no parameter" if not names else "every parameter"
            raise ValueError(f"ANIL(head={self.head!r}): {what} matches the head; the parameters are "
                             f"{list(hparams)}. Fix: name the head's parameters (or their prefix), leaving a body.")
        return names

    def init_hparams(self, params: Params | None = None) -> Params:
        """The model's weights (copies): body and head init, both meta-learned."""
        out = self._forward.parameters() if params is None else {k: v.detach().clone() for k, v in params.items()}
        self.head_names(out)
        return out

    def _start(self, hparams: Params) -> Params:
        return {k: hparams[k] for k in self.head_names(hparams)}

    def _predict(self, hparams: Params, params: Params, x: Tensor) -> Tensor:
        return self._forward({**hparams, **params}, x)

    @property
    def _splits(self) -> bool:
        return self._body_head is not None

    def _embed(self, hparams: Params, x: Tensor) -> Tensor:
        return self._body_head[0](hparams, x)

    def _head(self, hparams: Params, params: Params, features: Tensor) -> Tensor:
        return self._body_head[1](params, features)

    @property
    def _body_head(self) -> tuple[Forward, Forward] | None:
        """``(body(hparams, x), head(head_params, features))`` when the model splits, else ``None``."""
        if "_split" not in self.__dict__:
            object.__setattr__(self, "_split", _split(self.model, self._forward.module, self.head))
        return self.__dict__["_split"]


def _split(model: object, module: nn.Module | None, head: tuple[str, ...]) -> tuple[Forward, Forward] | None:
    """The body and the head of ``model`` with head parameters ``head`` (names or prefixes), or ``None``."""
    if isinstance(model, ConvNet):
        if model.ways is None or set(head) not in ({"head"}, {"head.weight", "head.bias"}):
            return None
        body = replace(model, ways=None)
        return body, lambda p, h: nn.functional.linear(h, p["head.weight"], p["head.bias"])
    if not isinstance(module, nn.Sequential):
        return None
    children = list(module.named_children())
    owns = [[n for n, _ in child.named_parameters()] for _, child in children]
    in_head = [[any(f"{name}.{n}" == p or f"{name}.{n}".startswith(p + ".") for p in head) for n in names]
               for (name, _), names in zip(children, owns)]
    first = next((i for i, flags in enumerate(in_head) if any(flags)), None)
    if first is None or not any(owns[:first]):
        return None
    if not all(all(flags) for flags in in_head[first:]) or any(any(flags) for flags in in_head[:first]):
        return None
    body_module = nn.Sequential(OrderedDict(children[:first]))
    head_module = nn.Sequential(OrderedDict(children[first:]))
    body_names = {f"{name}.{n}" for (name, _), names in zip(children[:first], owns[:first]) for n in names}

    def body(params: Params, x: Tensor) -> Tensor:
        return functional_call(body_module, {k: v for k, v in params.items() if k in body_names}, (x,))

    def head_fn(params: Params, features: Tensor) -> Tensor:
        return functional_call(head_module, params, (features,))

    return body, head_fn


def _last_layer(model: nn.Module) -> tuple[str, ...]:
    owners = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise ValueError("ANIL(model=...): the model has no parameters.")
    return (owners[-1],) if owners[-1] else tuple(n for n, _ in model.named_parameters(recurse=False))
