"""Truncated Neumann series, written as Richardson iteration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._result import RESULTS, LinearSolution, combine
from .._tree import Params, tree_axpy, tree_norm, tree_scale, tree_sub
from ._base import IterativeLinearSolver, MatVec, SampledOperator


@dataclass(frozen=True)
class Neumann(IterativeLinearSolver):
    r"""Truncated Neumann series for :math:`A v = b`:

    .. math::

        v_K = \alpha \sum_{k=0}^{K-1} (I - \alpha A)^k b,

    computed as Richardson iteration :math:`v_{k+1} = v_k + \alpha (b - A v_k)`
    from :math:`v_0 = 0` (or from a warm start ``x0``). It converges when
    :math:`0 < \alpha < 2 / \lambda_{\max}(A)`; if the residual grows instead the
    solve reports ``RESULTS.neumann_diverged`` with an estimate of
    :math:`\lambda_{\max}` and a safe ``alpha``. Truncation itself is not an
    error: the series is a deliberate approximation (used by AID-BiO and stocBiO).

    Each term may see a different operator: with a :class:`~bilevel.Sampler` as
    ``inner_batch``, AID applies a Hessian from a fresh mini-batch at every step
    (``resamples_operator = True``), so that
    :math:`v_K = \alpha \sum_{q} \prod_{j} (I - \alpha H_j) b` with independent
    :math:`H_j` — the stochastic Neumann series of stocBiO (Ji, Yang, Liang 2021,
    Algorithm 3), unbiased for the full-batch series.

    With ``steps=K`` and ``alpha=η``, AID with this solver equals ITD with ``K``
    gradient steps of size ``η`` started at the inner optimum of a quadratic
    problem — an exact identity checked in the tests.

    Args:
        steps: number of series terms :math:`K` (``K-1`` operator applications from a cold start).
        alpha: scaling :math:`\alpha > 0`.

    Reference: K. Ji, J. Yang, Y. Liang, "Bilevel optimization: convergence
    analysis and enhanced design", ICML 2021 (stocBiO, eq. 4); J. Lorraine,
    P. Vicol, D. Duvenaud, "Optimizing millions of hyperparameters by implicit
    differentiation", AISTATS 2020.

    Example:
        >>> import bilevel as bl
        >>> bl.AID(linear_solver=bl.Neumann(steps=20, alpha=0.1))
        AID(linear_solver=Neumann(steps=20, alpha=0.1), hvp='auto')
    """

    steps: int = 20
    alpha: float = 0.1
    resamples_operator: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Neumann(steps={self.steps!r}): steps must be a positive integer.")
        if not (self.alpha > 0):
            raise ValueError(f"Neumann(alpha={self.alpha!r}): alpha must be positive "
                             "(and below 2 / the largest Hessian eigenvalue).")

    @property
    def iterations(self) -> int:
        return self.steps - 1

    def start(self, matvec: MatVec, b: Params, x0: Params | None) -> tuple[tuple, tuple]:
        num_hvp = 0
        if x0 is None:
            r = b
            v = tree_scale(b, self.alpha)
        else:
            r = tree_sub(b, matvec(x0))
            num_hvp += 1
            v = tree_axpy(self.alpha, r, x0)
        return (v, r), (b, tree_norm(r), num_hvp)

    def iterate(self, matvec: MatVec, carry: tuple, context: tuple) -> tuple:
        v, _ = carry
        r = tree_sub(context[0], matvec(v))
        return tree_axpy(self.alpha, r, v), r

    def finish(self, matvec: MatVec, b: Params, carry: tuple, context: tuple) -> LinearSolution:
        v, r = carry
        _, r0_norm, num_hvp = context
        num_hvp += self.steps - 1
        r_norm = tree_norm(r)  # residual of the second-to-last iterate: free, no extra HVP
        b_norm = tree_norm(b)
        residual = r_norm / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        # Richardson multiplies the residual by (I - alpha A) each step, so its growth rate
        # rho estimates |1 - alpha * lambda_max| when the series diverges.
        # The floor keeps rounding noise from a warm start at the solution (r0 ~ 0) from
        # reading as growth: a residual below sqrt(eps) * ||b|| is as small as it gets.
        floor = torch.finfo(r_norm.dtype).eps ** 0.5 * b_norm
        grows = r_norm > r0_norm * (1 + 1e-6) + floor
        if isinstance(matvec, SampledOperator):
            # Sampled Hessians leave a noise floor ||(H_j - H) v|| in the residual, larger than a
            # warm start's r0: only growth well beyond ||b|| is divergence.
            grows = r_norm > 2 * torch.maximum(r0_norm, b_norm)
        ratio = r_norm / torch.where(r0_norm > 0, r0_norm, torch.ones_like(r0_norm))
        rho = ratio ** (1.0 / max(self.steps - 1, 1))
        lambda_max = (1 + rho) / self.alpha
        code = torch.zeros((), dtype=torch.int64, device=b_norm.device)
        code = combine(code, ~torch.isfinite(r_norm), RESULTS.linear_nonfinite)
        code = combine(code, grows, RESULTS.neumann_diverged)
        steps = torch.full((), self.steps, dtype=torch.int64, device=b_norm.device)
        info = {"residual0": r0_norm / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm)),
                "lambda_max": lambda_max, "alpha_fix": 1.0 / lambda_max}
        return LinearSolution(v, steps, residual, code, num_hvp, info)
