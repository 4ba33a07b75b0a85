"""Conjugate gradient for symmetric positive-definite operators."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._result import RESULTS, LinearSolution, combine
from .._tree import Params, tree_axpy, tree_dot, tree_norm, tree_sub, tree_zeros_like
from ._base import AbstractLinearSolver, MatVec


@dataclass(frozen=True)
class CG(AbstractLinearSolver):
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

    def solve(self, matvec: MatVec, b: Params, x0: Params | None = None) -> LinearSolution:
        num_hvp = 0
        if x0 is None:
            x, r = tree_zeros_like(b), b
        else:
            x, r = x0, tree_sub(b, matvec(x0))
            num_hvp += 1
        p, rs = r, tree_dot(r, r)
        b_norm = tree_norm(b)
        tol = torch.clamp(self.rtol * b_norm, min=self.atol)
        steps = torch.zeros((), dtype=torch.int64, device=b_norm.device)
        zero, one = torch.zeros_like(rs), torch.ones_like(rs)  # made once: the loop is all small kernels
        for _ in range(self.max_steps):
            active = torch.sqrt(rs) > tol
            ap = matvec(p)
            pap = tree_dot(p, ap)
            alpha = torch.where(active, rs / torch.where(pap != 0, pap, one), zero)
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            rs_new = tree_dot(r, r)
            beta = rs_new / torch.where(rs != 0, rs, one)
            p = tree_axpy(beta, p, r)
            rs = rs_new
            steps = steps + active
        num_hvp += self.max_steps
        r_norm = torch.sqrt(rs)
        residual = r_norm / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        code = torch.zeros((), dtype=torch.int64, device=b_norm.device)
        code = combine(code, ~torch.isfinite(r_norm), RESULTS.linear_nonfinite)
        code = combine(code, r_norm > tol, RESULTS.linear_max_steps)
        return LinearSolution(x, steps, residual, code, num_hvp)
