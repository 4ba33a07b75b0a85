"""Exact solve by materialising the operator: for references and small problems."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._result import RESULTS, LinearSolution, combine
from .._tree import Params, tree_ravel, tree_size, tree_unravel
from ._base import AbstractLinearSolver, MatVec


@dataclass(frozen=True)
class Dense(AbstractLinearSolver):
    r"""Exact solve of :math:`A v = b`: build :math:`A` column by column (one
    batched operator application over the ``n`` basis vectors, with ``vmap``)
    and call :func:`torch.linalg.solve`.

    Costs ``n`` operator applications and :math:`O(n^2)` memory, so it is meant
    for references and problems with a few thousand inner parameters at most.
    ``x0`` is ignored.

    Example:
        >>> import bilevel as bl
        >>> bl.AID(linear_solver=bl.Dense())
        AID(linear_solver=Dense(), hvp='auto')
    """

    def solve(self, matvec: MatVec, b: Params, x0: Params | None = None) -> LinearSolution:
        n = tree_size(b)
        flat_b = tree_ravel(b)
        eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)

        def column(e: torch.Tensor) -> torch.Tensor:
            return tree_ravel(matvec(tree_unravel(e, b)))

        a = torch.func.vmap(column)(eye).transpose(0, 1)  # rows of vmap are A e_i = columns
        v = torch.linalg.solve(a, flat_b)
        r_norm = torch.linalg.vector_norm(flat_b - a @ v)
        b_norm = torch.linalg.vector_norm(flat_b)
        residual = r_norm / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        code = torch.zeros((), dtype=torch.int64, device=flat_b.device)
        code = combine(code, ~torch.isfinite(residual), RESULTS.linear_nonfinite)
        steps = torch.full((), 1, dtype=torch.int64, device=flat_b.device)
        return LinearSolution(tree_unravel(v, b), steps, residual, code, n)
