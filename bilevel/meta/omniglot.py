"""Few-shot classification on Omniglot episodes: the task family, the learners, accuracy with a 95% CI.

An :class:`~bilevel.datasets.Episodes` meta-batch already has the layout every meta-learner takes —
``support_x (T, N*K, 1, 28, 28)``, ``support_y (T, N*K)``, ``query_x``, ``query_y`` with the task
first — so :meth:`AbstractMetaLearner.meta_gradient` maps over it with one
:func:`bilevel.vmap_hypergrad` call, ``in_dims=(None, None, 0, 0)`` (meta-parameters shared, support
and query batched), exactly as on the sinusoid. What this module adds is the glue: a family with the
``sample(n, seed)`` interface of :class:`~bilevel.meta.Trainer` (integer labels, or one-hot targets
for a ridge head), the learners built on :class:`~bilevel.meta.convnet.ConvNet` with the
classification loss, and accuracy over held-out episodes as mean ± 95% CI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import estimators, inner, linear
from .._tree import Params
from ..datasets.episodes import Episodes, EpisodeSampler
from ._learner import AbstractMetaLearner
from ._model import cross_entropy
from .anil import ANIL
from .convnet import ConvNet
from .maml import MAML
from .meta_sgd import LearnedSGD, MetaSGD
from .shared_embedding import RidgeHead, SharedEmbedding, SoftmaxHead
from .tasks import Tasks, split

METHODS = ("maml", "fomaml", "reptile", "anil", "metasgd", "imaml", "esj", "shared-ridge", "shared-softmax")
#: Inner steps per method when ``inner_steps`` is not given (Reptile and iMAML need several).
DEFAULT_STEPS = {"reptile": 5, "imaml": 5, "shared-softmax": 30}
#: The shared-softmax head's step, in units of ``1/L`` (see :class:`~bilevel.meta.SoftmaxHead`), when not given.
HEAD_STEP = 1.0


class EpisodeFamily:
    """N-way K-shot episodes as a task family: ``sample(num_tasks, seed)`` for :class:`~bilevel.meta.Trainer`.

    Args:
        images: ``(classes, drawings, H, W)`` images or an :class:`~bilevel.datasets.Omniglot`.
        ways, shots: :math:`N` and :math:`K`.
        queries: query images per class (default 15).
        one_hot: give the targets as ``(T, M, N)`` one-hot floats instead of ``(T, M)`` labels
            (what a :class:`~bilevel.meta.RidgeHead` regresses on; default ``False``).

    Example:
        >>> import torch
        >>> from bilevel.meta.omniglot import EpisodeFamily
        >>> family = EpisodeFamily(torch.rand(30, 20, 28, 28), ways=5, shots=1)
        >>> batch = family.sample(8, seed=0)
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([8, 5, 1, 28, 28]), torch.Size([8, 75]))
    """

    def __init__(self, images: Tensor | object, ways: int, shots: int, queries: int = 15,
                 one_hot: bool = False) -> None:
        self._check = EpisodeSampler(images, ways, shots, queries, seed=0)  # validates the arguments
        self.images, self.ways, self.shots, self.queries = self._check.images, ways, shots, queries
        self.one_hot = bool(one_hot)

    def __repr__(self) -> str:
        return (f"EpisodeFamily(classes={self.images.shape[0]}, ways={self.ways}, shots={self.shots}, "
                f"queries={self.queries}, one_hot={self.one_hot})")

    def sample(self, num_tasks: int, seed: int | torch.Generator) -> Episodes | Tasks:
        """Draw ``num_tasks`` episodes (an ``int`` seed gives a fixed set, a generator a fresh one)."""
        batch = EpisodeSampler(self.images, self.ways, self.shots, self.queries, seed=seed).sample(num_tasks)
        if not self.one_hot:
            return batch
        hot = lambda y: torch.nn.functional.one_hot(y, self.ways).to(batch.support_x.dtype)  # noqa: E731
        return Tasks(batch.support_x, hot(batch.support_y), batch.query_x, hot(batch.query_y))


def accuracy(pred: Tensor, target: Tensor) -> Tensor:
    """Fraction of correct argmax predictions over the last-but-one dimension: ``(..., M, N)`` scores
    against ``(..., M)`` labels or ``(..., M, N)`` one-hot targets; returns ``(...)``."""
    labels = target.argmax(-1) if target.dim() == pred.dim() else target
    if pred.shape[:-1] != labels.shape:
        raise ValueError(f"accuracy(pred, target): scores of shape {tuple(pred.shape)} do not match targets of "
                         f"shape {tuple(target.shape)}. Fix: pass (..., M, ways) scores with (..., M) labels.")
    return (pred.argmax(-1) == labels).to(torch.float64).mean(-1)


def make_learner(method: str, ways: int, *, hidden: int = 64, pool: str = "max", inner_lr: float | None = None,
                 inner_steps: int | None = None, lam: float | None = None, dtype: torch.dtype = torch.float32,
                 seed: int = 0, directions: int = 8, smoothing: float = 1e-2) -> tuple[AbstractMetaLearner, Params]:
    r"""A learner on :class:`ConvNet` for ``ways``-way classification, and its starting meta-parameters.

    ``"maml"`` (second order, :class:`~bilevel.ITD`), ``"fomaml"`` (:class:`~bilevel.FirstOrder`),
    ``"anil"`` (head-only inner loop), ``"metasgd"`` (learned per-weight steps), all with
    cross-entropy and ``inner_steps`` steps of size ``inner_lr`` (default 0.4, Finn et al.'s Omniglot
    value; one step, five for ``"reptile"`` and ``"imaml"``); ``"reptile"`` (:class:`~bilevel.Reptile`,
    first order, meta-gradient :math:`\theta - y_N`), ``"imaml"`` (:class:`~bilevel.IMAML`, proximal
    strength ``lam``, default 2.0, CG with at most 5 reverse-mode HVPs to relative residual 0.5;
    its inner step must be smaller than MAML's: 5 steps of 0.4 diverge on most tasks at the start, 0.1 on
    half of them, 0.05 on none; use ``inner_lr=0.05``), ``"esj"`` (ANIL whose head-response
    Jacobian :math:`\partial u_N / \partial \theta` is estimated by :class:`~bilevel.ESJ` from
    ``directions`` Gaussian perturbations of size ``smoothing`` — no second derivatives; the body's
    direct gradient stays exact, but the perturbations span all ~112k meta-parameters, and with 8
    directions the estimate measured as noise on the 4-block net: docs/results.md, Omniglot);
    ``"shared-ridge"`` (embedding + ridge head on
    one-hot targets in closed form, R2D2-style;
    use :class:`EpisodeFamily` with ``one_hot=True``) and ``"shared-softmax"`` (embedding + softmax
    head solved by ``inner_steps`` gradient steps, default 30, differentiated implicitly with CG; the
    head's objective is scaled by its per-task smoothness bound :math:`L`
    (:class:`~bilevel.meta.SoftmaxHead` with ``scaled_step=True``), so ``inner_lr`` is the step in
    units of :math:`1/L`: default 1.0, safe up to 1 on every task, whatever the embedding's scale).
    ``lam``: ridge (default 1.0) or softmax (default 0.1) head penalty.
    """
    if method not in METHODS:
        raise ValueError(f"make_learner(method={method!r}): expected one of {METHODS}.")
    steps = DEFAULT_STEPS.get(method, 1) if inner_steps is None else inner_steps
    if inner_lr is None:
        inner_lr = HEAD_STEP if method == "shared-softmax" else 0.4
    shared = method.startswith("shared")
    net = ConvNet(ways=None if shared else ways, hidden=hidden, pool=pool)
    params = net.init(seed, dtype)
    gd = inner.GradientDescent(lr=inner_lr, steps=steps)
    if method == "maml":
        return MAML(net, inner=gd, loss=cross_entropy), params
    if method == "fomaml":
        return MAML(net, inner=gd, estimator=estimators.FirstOrder(), loss=cross_entropy), params
    if method == "reptile":
        return MAML(net, inner=gd, estimator=estimators.Reptile(), loss=cross_entropy), params
    if method == "imaml":
        cg = linear.CG(max_steps=5, rtol=0.5, atol=1e-6)
        imaml = estimators.IMAML(lam=2.0 if lam is None else lam, linear_solver=cg, hvp="reverse")
        return MAML(net, inner=gd, estimator=imaml, loss=cross_entropy), params
    if method == "esj":
        esj = estimators.ESJ(directions=directions, smoothing=smoothing, seed=seed)
        return ANIL(net, head=("head",), inner=gd, estimator=esj, loss=cross_entropy), params
    if method == "anil":
        return ANIL(net, head=("head",), inner=gd, loss=cross_entropy), params
    if method == "metasgd":
        learner = MetaSGD(net, inner=LearnedSGD(steps=steps), init_lr=inner_lr, loss=cross_entropy)
        return learner, learner.init_hparams(params)
    if method == "shared-ridge":
        return SharedEmbedding(net, head=RidgeHead(lam=1.0 if lam is None else lam)), params
    head = SoftmaxHead(ways=ways, lam=0.1 if lam is None else lam, scaled_step=True)
    aid = estimators.AID(linear_solver=linear.CG(max_steps=30, rtol=1e-2, atol=1e-8))
    return SharedEmbedding(net, head=head, inner=gd, estimator=aid), params


@dataclass(frozen=True)
class FewShotAccuracy:
    """Query accuracy of each held-out episode after adaptation.

    Attributes:
        per_task: ``(episodes,)`` accuracies in [0, 1].
    """

    per_task: Tensor = field(repr=False)

    @property
    def mean(self) -> float:
        return float(self.per_task.mean())

    @property
    def ci95(self) -> float:
        """Half-width of the normal 95% confidence interval of the mean: 1.96 · std / √episodes."""
        n = self.per_task.numel()
        return float(1.96 * self.per_task.double().std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f} ± {100 * self.ci95:.2f} %"


def evaluate_accuracy(learner: AbstractMetaLearner, hparams: Params, family: EpisodeFamily, episodes: int = 600,
                      *, seed: int = 20_170_703, chunk: int = 50, steps: int | None = None) -> FewShotAccuracy:
    """Adapt to ``episodes`` held-out episodes (drawn with ``seed``; ``chunk`` at a time, each vmapped)
    and measure query accuracy: mean ± 95% CI (600 episodes is the usual protocol).

    ``steps``: inner steps for adaptation (default: the learner's own solver).

    Example:
        >>> import torch
        >>> from bilevel.meta.omniglot import EpisodeFamily, evaluate_accuracy, make_learner
        >>> learner, theta = make_learner("anil", ways=5, hidden=8)
        >>> family = EpisodeFamily(torch.rand(30, 20, 28, 28), ways=5, shots=1)
        >>> evaluate_accuracy(learner, theta, family, episodes=20, chunk=10).per_task.shape
        torch.Size([20])
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"evaluate_accuracy(episodes={episodes!r}): expected an int >= 1 (600 is the protocol).")
    gen = torch.Generator().manual_seed(seed)
    scores = []
    with torch.no_grad():
        for start in range(0, episodes, chunk):
            tasks = family.sample(min(chunk, episodes - start), gen)
            _, (qx, qy) = split(tasks, "evaluate_accuracy(...)")
            adapted = learner.adapt(hparams, tasks, steps=steps)
            scores.append(accuracy(learner.predict(hparams, adapted, qx), qy))
    return FewShotAccuracy(torch.cat(scores))
