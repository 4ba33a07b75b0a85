"""Plain gradient descent on the inner objective."""

from __future__ import annotations

from dataclasses import dataclass

from .._tree import Params, tree_axpy
from ._base import AbstractInnerSolver, SolverState


@dataclass(frozen=True)
class GradientDescent(AbstractInnerSolver):
    r"""Gradient descent :math:`y_{k+1} = y_k - \eta \nabla_y g(x, y_k)`.

    Args:
        lr: step size :math:`\eta > 0`.
        steps: number of steps :math:`N` (default 50).
        tol: optional; once :math:`\|\nabla_y g\| \le` ``tol`` the iterate is frozen
            (the loop still has a fixed length, so it runs under ``vmap``), and a
            solve that never reaches ``tol`` reports ``RESULTS.inner_max_steps``.

    Example:
        >>> import bilevel as bl
        >>> bl.GradientDescent(lr=0.1, steps=100, tol=1e-8)
        GradientDescent(lr=0.1, steps=100, tol=1e-08)
    """

    lr: float
    steps: int = 50
    tol: float | None = None

    def __post_init__(self) -> None:
        self._check()
        if not (self.lr > 0):
            raise ValueError(f"GradientDescent(lr={self.lr!r}): the step size must be positive.")

    def init(self, params: Params) -> SolverState:
        return (params,)

    def step(self, state: SolverState, grad: Params) -> SolverState:
        return (tree_axpy(-self.lr, grad, state[0]),)
