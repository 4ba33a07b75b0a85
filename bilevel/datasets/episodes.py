"""N-way K-shot episodes drawn from a ``(classes, drawings, H, W)`` image tensor, batched for vmap."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .sinusoid import _generator


class Episodes(NamedTuple):
    """A meta-batch of ``B`` classification episodes, stacked so ``torch.func.vmap`` maps over dim 0.

    ``support_x``: ``(B, N*K, 1, H, W)``; ``support_y``: ``(B, N*K)`` int64 in ``0..N-1``;
    ``query_x``: ``(B, N*Q, 1, H, W)``; ``query_y``: ``(B, N*Q)``; ``classes``: ``(B, N)``, the
    dataset class behind each label. Examples are grouped by label: index ``n*K + k`` is the
    ``k``-th example of label ``n`` (the label order itself is random).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Episodes:
        """Everything moved to ``device``; the images (not the labels) also cast to ``dtype``."""
        x = {name: getattr(self, name).to(device=device, dtype=dtype) for name in ("support_x", "query_x")}
        rest = {name: getattr(self, name).to(device=device) for name in ("support_y", "query_y", "classes")}
        return Episodes(**x, **rest)


class EpisodeSampler:
    r"""Draw N-way K-shot episodes with Q queries per class, seeded and vectorised.

    Each episode picks ``ways`` distinct classes uniformly at random (their order gives the labels
    ``0..N-1``), then for each class ``shots + queries`` distinct drawings: the first ``shots`` go
    to the support set, the rest to the query set. One call draws a whole meta-batch with a few
    tensor operations (``randint`` or ``rand(...).topk``, ``argsort`` and ``index_select``), with no Python loop over
    images.

    Args:
        images: a ``(classes, drawings, H, W)`` tensor (floating, or uint8 read as ``value / 255``),
            or an object with such an ``images`` attribute, e.g. :class:`~bilevel.datasets.Omniglot`.
        ways: classes per episode :math:`N \ge 1`.
        shots: support examples per class :math:`K \ge 1`.
        queries: query examples per class :math:`Q \ge 1`; ``None`` (default) means ``shots``.
        seed: an ``int`` (default 0) or a CPU ``torch.Generator``. The sampler owns its generator:
            successive calls give new episodes, and the same seed gives the same sequence.

    Example:
        >>> import torch
        >>> from bilevel.datasets import EpisodeSampler
        >>> images = torch.rand(30, 20, 28, 28)               # or an Omniglot(...)
        >>> sampler = EpisodeSampler(images, ways=5, shots=1, queries=15, seed=0)
        >>> batch = sampler.sample(8)
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([8, 5, 1, 28, 28]), torch.Size([8, 75]))

    Reference:
        Vinyals, Blundell, Lillicrap, Kavukcuoglu, Wierstra (2016). Matching Networks for One Shot
        Learning. NeurIPS (the N-way K-shot episode protocol).
    """

    def __init__(self, images: Tensor | object, ways: int, shots: int, queries: int | None = None,
                 seed: int | torch.Generator = 0) -> None:
        data = images if isinstance(images, Tensor) else getattr(images, "images", None)
        if not isinstance(data, Tensor) or data.dim() != 4 or not (data.is_floating_point()
                                                                  or data.dtype == torch.uint8):
            what = f"shape {tuple(data.shape)} {data.dtype}" if isinstance(data, Tensor) else type(images).__name__
            raise ValueError(f"EpisodeSampler(images: {what}): expected a floating or uint8 tensor of shape "
                             "(classes, drawings, H, W), or an Omniglot. Fix: pass Omniglot(...) or its .images.")
        queries = shots if queries is None else queries
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EpisodeSampler({name}={value!r}): expected an int >= 1.")
        num_classes, drawings = data.shape[:2]
        if ways > num_classes:
            raise ValueError(f"EpisodeSampler(ways={ways}): the images hold only {num_classes} classes. Fix: pass "
                             f"ways <= {num_classes}, or more classes (e.g. Omniglot(..., rotations=True)).")
        if shots + queries > drawings:
            raise ValueError(f"EpisodeSampler(shots={shots}, queries={queries}): shots + queries = "
                             f"{shots + queries} exceeds the {drawings} drawings per class. Fix: pass "
                             f"shots + queries <= {drawings}.")
        self.images, self.ways, self.shots, self.queries = data, ways, shots, queries
        self._flat = data.reshape(num_classes * drawings, -1)  # one row per drawing (2-D: the fast index_select)
        self.generator = _generator(seed, "EpisodeSampler")

    def __repr__(self) -> str:
        return (f"EpisodeSampler(classes={self.images.shape[0]}, ways={self.ways}, shots={self.shots}, "
                f"queries={self.queries})")

    def sample(self, meta_batch: int = 1) -> Episodes:
        """Draw ``meta_batch`` episodes (stacked along dim 0) and advance the generator."""
        if isinstance(meta_batch, bool) or not isinstance(meta_batch, int) or meta_batch < 1:
            raise ValueError(f"EpisodeSampler.sample(meta_batch={meta_batch!r}): expected an int >= 1.")
        n, k, q = self.ways, self.shots, self.queries
        num_classes, drawings, height, width = self.images.shape
        classes = _distinct(meta_batch, num_classes, n, self.generator)                          # (B, N)
        draws = torch.rand(meta_batch, n, drawings, generator=self.generator).argsort(dim=2)  # (B, N, D)
        flat = (classes[..., None] * drawings + draws[..., :k + q]).to(self.images.device)
        labels = torch.arange(n, device=self.images.device)

        def gather(index: Tensor, per_class: int) -> Tensor:
            x = self._flat.index_select(0, index.reshape(-1))
            x = x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x
            return x.view(meta_batch, n * per_class, 1, height, width)

        return Episodes(
            support_x=gather(flat[..., :k], k),
            support_y=labels.repeat_interleave(k).repeat(meta_batch, 1),
            query_x=gather(flat[..., k:], q),
            query_y=labels.repeat_interleave(q).repeat(meta_batch, 1),
            classes=classes.to(self.images.device),
        )


def _distinct(batch: int, population: int, n: int, gen: torch.Generator) -> Tensor:
    """``(batch, n)`` rows of distinct ints in ``0..population-1``, each row a uniform ordered draw."""
    if population < n * n:  # few classes: the top n of C i.i.d. uniforms, a uniform ordered subset
        return torch.rand(batch, population, generator=gen).topk(n, dim=1).indices
    # many classes: draw rows with replacement and redraw the rows that repeat a class (P < 1/2 each)
    rows = torch.randint(population, (batch, n), generator=gen)
    while True:
        ordered = rows.sort(dim=1).values
        bad = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if not bool(bad.any()):
            return rows
        rows[bad] = torch.randint(population, (int(bad.sum()), n), generator=gen)
