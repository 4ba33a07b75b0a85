"""Batches: a fixed batch, or a :class:`Sampler` that draws a fresh one per inner step."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from ._tree import Batch


class Sampler:
    """A source of mini-batches indexed by inner step.

    ``Sampler(fn)`` calls ``fn(step)`` for the batch of inner step ``step``
    (so a seeded ``fn`` makes stochastic runs reproducible);
    ``Sampler.from_iterable(it)`` takes ``next(it)`` instead. Passed as
    ``inner_batch`` to :func:`bilevel.hypergrad`, the inner solver draws a
    fresh batch for every step (stochastic ITD, ESJ-S, stocBiO); ESJ uses the
    same draws for the perturbed and unperturbed solves. After ``N`` inner
    steps (draws ``0..N-1``), AID and IMAML continue from draw ``N``: a
    solver that resamples its operator (:class:`~bilevel.Neumann`, i.e.
    stocBiO) takes one draw per Hessian-vector product, CG and Dense one draw
    for the whole solve, and the cross term ``∇²_xy g v`` the next draw. As
    ``outer_batch`` a sampler is drawn once per call, at step 0. The docs page
    "Hyperparameter optimization" tabulates who draws what.

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

    @classmethod
    def minibatches(cls, data: Tensor | tuple[Tensor, ...], batch_size: int, *, seed: int = 0) -> "Sampler":
        """Uniform mini-batches of ``data`` (a tensor or a tuple of tensors sharing dimension 0).

        Draw ``step`` takes ``batch_size`` distinct rows chosen by a generator seeded with
        ``(seed, step)``, so the same ``(seed, step)`` always gives the same rows (ITD can replay a
        step, ESJ's solves share it). A tuple also carries, as its last entry, the int64 row
        indices, for objectives with per-example hyperparameters; a tensor gives ``(rows, indices)``.
        For fresh batches at every outer step, build a sampler per outer step with a new seed
        (e.g. ``BilevelSolver.run(batches=lambda t: (bl.Sampler.minibatches(train, 256, seed=t), val))``).

        Example:
            >>> import torch, bilevel as bl
            >>> X, y = torch.randn(100, 3), torch.randn(100)
            >>> Xb, yb, idx = bl.Sampler.minibatches((X, y), 10, seed=0)(0)
            >>> Xb.shape, bool(torch.equal(Xb, X[idx]))
            (torch.Size([10, 3]), True)
        """
        tensors = data if isinstance(data, tuple) else (data,)
        call = f"Sampler.minibatches(batch_size={batch_size!r}, seed={seed!r})"
        if not tensors or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in tensors):
            raise TypeError(f"{call}: data must be a tensor or a tuple of tensors with a sample dimension 0.")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"{call}: the tensors of data have {[t.shape[0] for t in tensors]} rows; "
                             "expected the same number. Fix: pass (X, y) with one row per sample.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
            raise ValueError(f"{call}: batch_size must be an int in 1..{n} (the number of samples).")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{call}: seed must be an int. Fix: pass e.g. seed=0.")

        def draw(step: int) -> tuple[Tensor, ...]:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
            index = torch.randperm(n, generator=gen)[:batch_size].to(tensors[0].device)
            return (*(t[index] for t in tensors), index)

        draw.__qualname__ = f"minibatches(n={n}, batch_size={batch_size}, seed={seed})"
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


def draws(batch: Any, first: int) -> Callable[[], Batch]:
    """Successive draws ``first, first + 1, ...`` of a :class:`Sampler`; ``batch`` itself every time otherwise."""
    if not is_stochastic(batch):
        return lambda: batch
    counter = itertools.count(first)
    return lambda: batch(next(counter))
