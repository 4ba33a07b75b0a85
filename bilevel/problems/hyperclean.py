"""Data hyper-cleaning: learn one weight per training example so that a model trained on noisy labels
does well on a small clean validation set."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .._problem import BilevelProblem
from .._tree import Params

#: ``(features (n, d), labels (n,), example indices (n,))``; a
#: :meth:`bilevel.Sampler.minibatches` draw of ``(features, labels)`` has this form.
CleanBatch = tuple[Tensor, ...]


@dataclass(frozen=True)
class Linear:
    """Linear softmax classifier ``logits = x W + b``; ``W`` is L2-penalised."""

    in_features: int
    num_classes: int = 10
    penalised: tuple[str, ...] = field(default=("W",), init=False)

    def init(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> Params:
        return {"W": torch.zeros(self.in_features, self.num_classes, dtype=dtype),
                "b": torch.zeros(self.num_classes, dtype=dtype)}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        return x @ params["W"] + params["b"]


@dataclass(frozen=True)
class MLP:
    """One-hidden-layer ReLU network ``relu(x W1 + b1) W2 + b2``; ``W1``, ``W2`` are L2-penalised.

    The inner problem is then non-convex: AID's assumptions hold only locally.
    """

    in_features: int
    hidden: int = 300
    num_classes: int = 10
    penalised: tuple[str, ...] = field(default=("W1", "W2"), init=False)

    def init(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> Params:
        gen = torch.Generator().manual_seed(seed)

        def uniform(*shape: int, fan_in: int) -> Tensor:  # PyTorch's default nn.Linear scale
            return (torch.rand(*shape, generator=gen, dtype=dtype) * 2 - 1) / math.sqrt(fan_in)
        return {"W1": uniform(self.in_features, self.hidden, fan_in=self.in_features),
                "b1": uniform(self.hidden, fan_in=self.in_features),
                "W2": uniform(self.hidden, self.num_classes, fan_in=self.hidden),
                "b2": uniform(self.num_classes, fan_in=self.hidden)}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        return torch.relu(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]


Classifier = Linear | MLP


@dataclass(frozen=True)
class HyperClean:
    r"""Data hyper-cleaning (Franceschi et al. 2017) as a bilevel problem:

    .. math::

        \min_{x \in \mathbb R^n} \; \frac1m \sum_{j \in val} \ell(h_{y^*(x)}(z_j), t_j), \qquad
        y^*(x) = \arg\min_y \; \frac1n \sum_{i=1}^{n} \sigma(x_i)\, \ell(h_y(z_i), \tilde t_i)
        + \frac{\lambda}{2} \|W\|^2,

    with :math:`\ell` the cross-entropy, :math:`\tilde t` the (noisy) training
    labels and :math:`\sigma(x_i) \in (0, 1)` the learned weight of example
    :math:`i`. ``hparams = {"weight_logits": (n,)}``; ``params`` are the
    classifier's. The inner batch is ``(z, t, index)`` so mini-batches carry the
    indices of their examples' weights (:meth:`bilevel.Sampler.minibatches`
    draws exactly that). Build it with :func:`hyperclean_problem`.
    """

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    classifier: Classifier
    l2: float = 1e-3

    @property
    def problem(self) -> BilevelProblem:
        classifier, l2 = self.classifier, self.l2

        def inner(hparams: Params, params: Params, batch: CleanBatch) -> Tensor:
            z, t, index = batch
            ce = F.cross_entropy(classifier(params, z), t, reduction="none")
            weights = torch.sigmoid(hparams["weight_logits"][index])
            return (weights * ce).mean() + 0.5 * l2 * sum((params[k] ** 2).sum() for k in classifier.penalised)

        def outer(hparams: Params, params: Params, batch: CleanBatch) -> Tensor:
            return F.cross_entropy(classifier(params, batch[0]), batch[1])
        return BilevelProblem(inner=inner, outer=outer)

    @property
    def train_batch(self) -> CleanBatch:
        """The whole training set as one inner batch ``(z, t, arange(n))``."""
        return (*self.train, torch.arange(self.train[1].shape[0]))

    def hparams(self, logit: float = 0.0) -> Params:
        """Every example at weight ``sigmoid(logit)`` (default 0.5)."""
        return {"weight_logits": torch.full((self.train[1].shape[0],), logit, dtype=self.train[0].dtype)}

    def params0(self, seed: int = 0) -> Params:
        return self.classifier.init(self.train[0].dtype, seed)

    def fit(self, weights: Tensor, params0: Params | None = None, *, steps: int = 300) -> Params:
        """Train the classifier with fixed per-example ``weights`` (in [0, 1]) by L-BFGS (baselines, refits)."""
        z, t = self.train
        params = {k: v.detach().clone().requires_grad_(True) for k, v in (params0 or self.params0()).items()}
        opt = torch.optim.LBFGS(list(params.values()), max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                                history_size=20, line_search_fn="strong_wolfe")
        w = weights.to(z.dtype)

        def closure() -> Tensor:
            opt.zero_grad()
            ce = F.cross_entropy(self.classifier(params, z), t, reduction="none")
            loss = (w * ce).mean() + 0.5 * self.l2 * sum((params[k] ** 2).sum() for k in self.classifier.penalised)
            loss.backward()
            return loss
        opt.step(closure)
        return {k: v.detach() for k, v in params.items()}

    def metrics(self, params: Params, batch: tuple[Tensor, ...]) -> dict[str, float]:
        """``loss`` (mean cross-entropy) and ``accuracy`` of ``params`` on ``(z, t)``."""
        with torch.no_grad():
            logits = self.classifier(params, batch[0])
            return {"loss": F.cross_entropy(logits, batch[1]).item(),
                    "accuracy": (logits.argmax(1) == batch[1]).double().mean().item()}


def detection_metrics(weight_logits: Tensor, corrupted: Tensor) -> dict[str, float]:
    """How well the learned weights separate corrupted from clean examples.

    ``auc``: probability that a random clean example has a larger weight than a random
    corrupted one (ties count one half; 0.5 = chance, 1 = perfect). ``precision``,
    ``recall``, ``f1``: of flagging an example as corrupted when its weight is below 1/2.

    Example:
        >>> import torch
        >>> detection_metrics(torch.tensor([2.0, 1.0, -1.0, -3.0]), torch.tensor([False, False, True, True]))
        {'auc': 1.0, 'precision': 1.0, 'recall': 1.0, 'f1': 1.0}
    """
    s, c = weight_logits.detach().flatten(), corrupted.flatten().bool()
    if s.shape != c.shape:
        raise ValueError(f"detection_metrics: {s.numel()} weights but {c.numel()} corruption flags.")
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # average rank of each distinct value, 1-based
    rank = (first + (counts + 1) / 2.0).double()[inverse]
    n_clean, n_bad = int((~c).sum()), int(c.sum())
    auc = ((rank[~c].sum() - n_clean * (n_clean + 1) / 2) / max(n_clean * n_bad, 1)).item()
    flagged = s < 0
    hits = int((flagged & c).sum())
    precision = hits / max(int(flagged.sum()), 1)
    recall = hits / max(n_bad, 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"auc": auc, "precision": precision, "recall": recall, "f1": f1}


def hyperclean_problem(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
                       classifier: Classifier | None = None, *, l2: float = 1e-3) -> HyperClean:
    """Data hyper-cleaning on ``train = (features, noisy labels)`` with a clean ``val``.

    Args:
        train: features ``(n, d)`` (floating) and int64 labels ``(n,)``, possibly corrupted.
        val: clean features ``(m, d)`` and labels ``(m,)``.
        classifier: :class:`Linear` (default, ``Linear(d, num_classes)``) or :class:`MLP`.
        l2: weight of the L2 penalty on the classifier's weight matrices (default ``1e-3``);
            it makes the linear inner problem strongly convex.

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.problems import hyperclean_problem
        >>> z, t = torch.randn(50, 4), torch.randint(0, 3, (50,))
        >>> hc = hyperclean_problem((z[:40], t[:40]), (z[40:], t[40:]))
        >>> hg = bl.hypergrad(hc.problem, hc.hparams(), hc.params0(), inner=bl.GradientDescent(lr=0.5, steps=20),
        ...                   estimator=bl.AID(linear_solver=bl.CG(max_steps=30, rtol=1e-4)),
        ...                   inner_batch=hc.train_batch, outer_batch=hc.val)
        >>> hg.value["weight_logits"].shape
        torch.Size([40])

    Reference: L. Franceschi, M. Donini, P. Frasconi, M. Pontil, "Forward and reverse
    gradient-based hyperparameter optimization", ICML 2017 (data hyper-cleaning);
    A. Shaban et al., "Truncated back-propagation for bilevel optimization", AISTATS 2019.
    """
    call = "hyperclean_problem(train, val)"
    pairs = {}
    for name, pair in (("train", train), ("val", val)):
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(v, Tensor) for v in pair)):
            raise TypeError(f"{call}: {name} must be a pair (features, labels) of tensors.")
        z, t = pair
        if z.dim() != 2 or t.dim() != 1 or z.shape[0] != t.shape[0] or z.shape[0] == 0:
            raise ValueError(f"{call}: {name} must be features (n, d) and labels (n,) with n >= 1; got "
                             f"{tuple(z.shape)} and {tuple(t.shape)}. Fix: flatten images with z.reshape(n, -1).")
        if not z.is_floating_point() or t.dtype != torch.int64:
            raise TypeError(f"{call}: {name} features must be floating and labels int64; got {z.dtype} and "
                            f"{t.dtype}.")
        pairs[name] = (z, t)
    d = pairs["train"][0].shape[1]
    if pairs["val"][0].shape[1] != d:
        raise ValueError(f"{call}: val has {pairs['val'][0].shape[1]} features but train has {d}.")
    num_classes = int(max(pairs["train"][1].max(), pairs["val"][1].max())) + 1
    classifier = Linear(d, max(num_classes, 2)) if classifier is None else classifier
    if not isinstance(classifier, (Linear, MLP)) or classifier.in_features != d:
        raise ValueError(f"{call}: classifier={classifier!r} must be Linear or MLP with in_features={d}.")
    for name, (_, t) in pairs.items():
        if int(t.min()) < 0 or int(t.max()) >= classifier.num_classes:
            raise ValueError(f"{call}: {name} labels span {int(t.min())}..{int(t.max())}; expected "
                             f"0..{classifier.num_classes - 1} for classifier={classifier!r}.")
    if not (isinstance(l2, (int, float)) and l2 >= 0):
        raise ValueError(f"{call}: l2={l2!r} must be a non-negative number (e.g. 1e-3).")
    return HyperClean(train=pairs["train"], val=pairs["val"], classifier=classifier, l2=float(l2))
