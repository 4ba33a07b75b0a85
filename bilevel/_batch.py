"""Batches: a fixed batch, or a :class:`Sampler` that draws a fresh one per inner step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._tree import Batch


class Sampler:
    """A source of mini-batches indexed by inner step.

    ``Sampler(fn)`` calls ``fn(step)`` for the batch of inner step ``step``
    (so a seeded ``fn`` makes stochastic runs reproducible);
    ``Sampler.from_iterable(it)`` takes ``next(it)`` instead. Passed as
    ``inner_batch`` to :func:`bilevel.hypergrad`, the inner solver draws a
    fresh batch for every step (stochastic ITD, ESJ-S, stocBiO); ESJ uses the
    same draws for the perturbed and unperturbed solves.

    Example:
        >>> import torch, bilevel as bl
        >>> data = torch.randn(100, 3)
        >>> sampler = bl.Sampler(lambda step: data[torch.randint(0, 100, (10,),
        ...                      generator=torch.Generator().manual_seed(step))])
        >>> sampler(0).shape
        torch.Size([10, 3])
    """

    def __init__(self, fn: Callable[[int], Batch]) -> None:
        if not callable(fn):
            raise TypeError(f"Sampler(fn={fn!r}): expected a callable fn(step) -> batch.")
        self.fn = fn

    @classmethod
    def from_iterable(cls, iterable: Iterable[Batch]) -> "Sampler":
        it: Iterator[Batch] = iter(iterable)

        def draw(step: int) -> Batch:
            try:
                return next(it)
            except StopIteration:
                raise RuntimeError(f"Sampler.from_iterable: the iterable was exhausted at inner step {step}. "
                                   "Fix: pass an endless iterator (e.g. itertools.cycle(loader)).") from None
        return cls(draw)

    def __call__(self, step: int) -> Batch:
        return self.fn(step)

    def __repr__(self) -> str:
        return f"Sampler({getattr(self.fn, '__qualname__', self.fn)!r})"


def batch_at(batch: Any, step: int) -> Batch:
    """The batch for inner step ``step``: a fresh draw for a :class:`Sampler`, else ``batch`` itself."""
    return batch(step) if isinstance(batch, Sampler) else batch


def is_stochastic(batch: Any) -> bool:
    return isinstance(batch, Sampler)
