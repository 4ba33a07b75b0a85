"""The sinusoid regression task family of MAML (and its Meta-SGD variant with a random frequency)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

Range = tuple[float, float]


class TaskBatch(NamedTuple):
    """A batch of ``T`` regression tasks, stacked so that ``torch.func.vmap`` can map over dim 0.

    ``support_x, support_y``: ``(T, K, 1)``; ``query_x, query_y``: ``(T, Q, 1)``;
    ``amplitude, phase, frequency``: ``(T,)``, the ground truth of each task
    (see :meth:`Sinusoid.function`).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    amplitude: Tensor
    phase: Tensor
    frequency: Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TaskBatch:
        """Every tensor moved to ``device`` and cast to ``dtype``."""
        return TaskBatch(*(t.to(device=device, dtype=dtype) for t in self))


@dataclass(frozen=True)
class Sinusoid:
    r"""Sinusoid regression tasks :math:`y = A \sin(\omega x - \varphi)`.

    Each task draws :math:`A \sim U[a_0, a_1]`, :math:`\varphi \sim U[p_0, p_1]` and, when
    ``frequency_range`` is given, :math:`\omega \sim U[w_0, w_1]` (otherwise :math:`\omega = 1`);
    its ``shots`` support and ``queries`` query inputs are drawn independently from
    :math:`x \sim U[x_0, x_1]`. The defaults are the MAML family (Finn et al. 2017, Sec. 5.1:
    :math:`A \in [0.1, 5]`, :math:`\varphi \in [0, \pi]`, :math:`x \in [-5, 5]`);
    :meth:`meta_sgd` adds :math:`\omega \in [0.8, 1.2]` (Li et al. 2017, the regression experiments).

    Args:
        shots: support points per task :math:`K \ge 1` (default 10).
        queries: query points per task :math:`Q \ge 1`; ``None`` (default) means ``shots``.
        amplitude_range: ``(low, high)`` of :math:`A` (default ``(0.1, 5.0)``).
        phase_range: ``(low, high)`` of :math:`\varphi` (default ``(0, pi)``).
        frequency_range: ``None`` (default, :math:`\omega = 1`) or ``(low, high)`` of :math:`\omega`.
        x_range: ``(low, high)`` of the inputs (default ``(-5.0, 5.0)``).
        dtype: floating dtype of every tensor (default ``torch.float32``).

    Example:
        >>> import torch
        >>> from bilevel.datasets import Sinusoid
        >>> family = Sinusoid(shots=10)
        >>> gen = torch.Generator().manual_seed(0)
        >>> batch = family.sample(25, gen)            # a fresh batch each call: pass a generator
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([25, 10, 1]), torch.Size([25, 10, 1]))
        >>> held_out = family.sample(600, seed=1234)  # a fixed evaluation set: pass an int
        >>> grid = torch.linspace(-5, 5, 100)
        >>> family.function(held_out, grid).shape     # ground-truth curves, for plots
        torch.Size([600, 100, 1])

    References:
        Finn, Abbeel, Levine (2017). Model-Agnostic Meta-Learning for Fast Adaptation of Deep
        Networks. ICML. Li, Zhou, Chen, Li (2017). Meta-SGD: Learning to Learn Quickly for
        Few-Shot Learning. arXiv:1707.09835.
    """

    shots: int = 10
    queries: int | None = None
    amplitude_range: Range = (0.1, 5.0)
    phase_range: Range = (0.0, math.pi)
    frequency_range: Range | None = None
    x_range: Range = (-5.0, 5.0)
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("shots", "queries"):
            value = getattr(self, name)
            if value is None and name == "queries":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Sinusoid({name}={value!r}): expected an int >= 1 "
                                 f"(points per task). Fix: pass e.g. {name}=10.")
        for name in ("amplitude_range", "phase_range", "frequency_range", "x_range"):
            value = getattr(self, name)
            if value is None and name == "frequency_range":
                continue
            try:
                low, high = (float(v) for v in value)
                ok = math.isfinite(low) and math.isfinite(high) and low <= high
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"Sinusoid({name}={value!r}): expected a pair (low, high) of finite "
                                 f"numbers with low <= high. Fix: pass e.g. {name}=(0.1, 5.0).")
            object.__setattr__(self, name, (low, high))  # lists and ints become a hashable float pair
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"Sinusoid(dtype={self.dtype!r}): expected a floating torch dtype. "
                             "Fix: pass dtype=torch.float32 or torch.float64.")

    @classmethod
    def meta_sgd(cls, shots: int = 10, queries: int | None = None, **kwargs: Any) -> Sinusoid:
        """The Meta-SGD family: the MAML one plus a frequency :math:`\\omega \\sim U[0.8, 1.2]`."""
        return cls(shots=shots, queries=queries, frequency_range=(0.8, 1.2), **kwargs)

    def sample(self, num_tasks: int, seed: int | torch.Generator) -> TaskBatch:
        """Draw ``num_tasks`` tasks with their support and query points.

        Args:
            num_tasks: number of tasks :math:`T \\ge 1`.
            seed: an ``int`` (the same int gives the same tasks: use it for a fixed held-out set)
                or a CPU ``torch.Generator`` (advanced by the call: use it for training batches).
        """
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"Sinusoid.sample(num_tasks={num_tasks!r}): expected an int >= 1. "
                             "Fix: pass e.g. num_tasks=25.")
        gen = _generator(seed, "Sinusoid.sample")
        queries = self.shots if self.queries is None else self.queries

        def uniform(shape: tuple[int, ...], bounds: Range) -> Tensor:
            u = torch.rand(shape, generator=gen, dtype=self.dtype)
            return bounds[0] + (bounds[1] - bounds[0]) * u

        amplitude = uniform((num_tasks,), self.amplitude_range)
        phase = uniform((num_tasks,), self.phase_range)
        if self.frequency_range is None:
            frequency = torch.ones(num_tasks, dtype=self.dtype)
        else:
            frequency = uniform((num_tasks,), self.frequency_range)
        x = uniform((num_tasks, self.shots + queries, 1), self.x_range)
        y = _curve(amplitude, phase, frequency, x)
        return TaskBatch(x[:, :self.shots], y[:, :self.shots], x[:, self.shots:], y[:, self.shots:],
                         amplitude, phase, frequency)

    @staticmethod
    def function(tasks: TaskBatch, x: Tensor) -> Tensor:
        """The true curves :math:`A_t \\sin(\\omega_t x - \\varphi_t)` of ``tasks`` at ``x``.

        ``x`` is a shared grid of shape ``(M,)`` or ``(M, 1)``, or per-task inputs ``(T, M, 1)``;
        the result has shape ``(T, M, 1)``.
        """
        if x.dim() == 1:
            x = x[None, :, None]
        elif x.dim() == 2:
            x = x[None]
        if x.dim() != 3 or x.shape[-1] != 1 or x.shape[0] not in (1, tasks.amplitude.shape[0]):
            raise ValueError(f"Sinusoid.function(x of shape {tuple(x.shape)}): expected (M,), (M, 1) "
                             f"or (T, M, 1) with T = {tasks.amplitude.shape[0]} tasks.")
        return _curve(tasks.amplitude, tasks.phase, tasks.frequency, x)


def _curve(amplitude: Tensor, phase: Tensor, frequency: Tensor, x: Tensor) -> Tensor:
    a, p, w = (v[:, None, None] for v in (amplitude, phase, frequency))
    return a * torch.sin(w * x - p)


def _generator(seed: int | torch.Generator, call: str) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{call}(seed={seed!r}): expected an int or a torch.Generator. "
                        "Fix: pass seed=0 or torch.Generator().manual_seed(0).")
    return torch.Generator().manual_seed(seed)
