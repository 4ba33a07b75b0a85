"""Heavy-ball momentum on the inner objective."""

from __future__ import annotations

from dataclasses import dataclass

from .._tree import Params, tree_add, tree_axpy, tree_scale, tree_zeros_like
from ._base import AbstractInnerSolver, SolverState


@dataclass(frozen=True)
class Momentum(AbstractInnerSolver):
    r"""Heavy-ball (Polyak) momentum

    .. math::

        v_{k+1} = \beta v_k - \eta \nabla_y g(x, y_k), \qquad y_{k+1} = y_k + v_{k+1},
        \qquad v_0 = 0.

    Args:
        lr: step size :math:`\eta > 0`.
        momentum: :math:`\beta \in [0, 1)`; ``momentum=0`` is gradient descent.
        steps: number of steps (default 50).
        tol: optional early-stop tolerance on :math:`\|\nabla_y g\|` (see :class:`GradientDescent`).

    Reference: B. T. Polyak, "Some methods of speeding up the convergence of
    iteration methods", USSR Comp. Math. and Math. Physics 4(5), 1964.

    Example:
        >>> import bilevel as bl
        >>> bl.Momentum(lr=0.05, momentum=0.9, steps=200)
        Momentum(lr=0.05, momentum=0.9, steps=200, tol=None)
    """

    lr: float
    momentum: float = 0.9
    steps: int = 50
    tol: float | None = None

    def __post_init__(self) -> None:
        self._check()
        if not (self.lr > 0):
            raise ValueError(f"Momentum(lr={self.lr!r}): the step size must be positive.")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"Momentum(momentum={self.momentum!r}): momentum must lie in [0, 1).")

    def init(self, params: Params) -> SolverState:
        return (params, tree_zeros_like(params))

    def step(self, state: SolverState, grad: Params) -> SolverState:
        params, velocity = state
        velocity = tree_axpy(-self.lr, grad, tree_scale(velocity, self.momentum))
        return (tree_add(params, velocity), velocity)
