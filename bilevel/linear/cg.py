"""Conjugate gradient for symmetric positive-definite operators."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .._result import RESULTS, LinearSolution, combine
from .._tree import Params, tree_axpy, tree_dot, tree_norm, tree_sub, tree_zeros_like
from ._base import IterativeLinearSolver, MatVec


@dataclass(frozen=True)
class CG(IterativeLinearSolver):
    r"""Conjugate gradient (Hestenes & Stiefel, 1952) for :math:`A v = b`, :math:`A` SPD.

    Runs ``max_steps`` iterations; once :math:`\|b - A v\| \le \max(\text{rtol}\,\|b\|,
    \text{atol})` the iterate is frozen (fixed loop length, so it runs under
    ``vmap``). A solve that ends above tolerance reports
    ``RESULTS.linear_max_steps``.

    Args:
        max_steps: iteration budget (each iteration is one operator application).
        rtol: relative tolerance on the residual, default ``1e-10``.
        atol: absolute tolerance on the residual, default ``0``.

    Reference: M. R. Hestenes, E. Stiefel, "Methods of conjugate gradients for
    solving linear systems", J. Res. NBS 49(6), 1952.

    Example:
        >>> import bilevel as bl
        >>> bl.AID(linear_solver=bl.CG(max_steps=20, rtol=1e-10))
        AID(linear_solver=CG(max_steps=20, rtol=1e-10, atol=0.0), hvp='auto')
    """

    max_steps: int = 20
    rtol: float = 1e-10
    atol: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"CG(max_steps={self.max_steps!r}): max_steps must be a positive integer.")
        for name in ("rtol", "atol"):
            if not (getattr(self, name) >= 0):
                raise ValueError(f"CG({name}={getattr(self, name)!r}): tolerances must be non-negative.")

    @property
    def iterations(self) -> int:
        return self.max_steps

    def start(self, matvec: MatVec, b: Params, x0: Params | None) -> tuple[tuple, _Context]:
        num_hvp = 0
        if x0 is None:
            x, r = tree_zeros_like(b), b
        else:
            x, r = x0, tree_sub(b, matvec(x0))
            num_hvp += 1
        rs = tree_dot(r, r)
        b_norm = tree_norm(b)
        tol = torch.clamp(self.rtol * b_norm, min=self.atol)
        steps = torch.zeros((), dtype=torch.int64, device=b_norm.device)
        zero, one = torch.zeros_like(rs), torch.ones_like(rs)  # made once: the loop is all small kernels
        return (x, r, r, rs, steps), _Context(b_norm, tol, zero, one, num_hvp)

    def iterate(self, matvec: MatVec, carry: tuple, context: _Context) -> tuple:
        x, r, p, rs, steps = carry
        active = torch.sqrt(rs) > context.tol
        ap = matvec(p)
        pap = tree_dot(p, ap)
        alpha = torch.where(active, rs / torch.where(pap != 0, pap, context.one), context.zero)
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        rs_new = tree_dot(r, r)
        beta = rs_new / torch.where(rs != 0, rs, context.one)
        p = tree_axpy(beta, p, r)
        return x, r, p, rs_new, steps + active

    def finish(self, matvec: MatVec, b: Params, carry: tuple, context: _Context) -> LinearSolution:
        x, _, _, rs, steps = carry
        b_norm, tol = context.b_norm, context.tol
        r_norm = torch.sqrt(rs)
        residual = r_norm / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        code = torch.zeros((), dtype=torch.int64, device=b_norm.device)
        code = combine(code, ~torch.isfinite(r_norm), RESULTS.linear_nonfinite)
        code = combine(code, r_norm > tol, RESULTS.linear_max_steps)
        return LinearSolution(x, steps, residual, code, context.num_hvp + self.max_steps)


class _Context(NamedTuple):
    b_norm: torch.Tensor
    tol: torch.Tensor
    zero: torch.Tensor
    one: torch.Tensor
    num_hvp: int
