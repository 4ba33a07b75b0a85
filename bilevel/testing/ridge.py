"""Ridge regression with one log-regularisation weight per feature."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._problem import BilevelProblem
from .._tree import Params

RidgeBatch = tuple[Tensor, Tensor]


def ridge_inner(hparams: Params, params: Params, batch: RidgeBatch) -> Tensor:
    r""":math:`g = \frac{1}{2n}\|X w - y\|^2 + \frac12 \sum_i e^{\lambda_i} w_i^2` on the training batch."""
    x, y = batch
    w = params["w"]
    return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (torch.exp(hparams["log_lam"]) * w ** 2).sum()


def ridge_outer(hparams: Params, params: Params, batch: RidgeBatch) -> Tensor:
    r""":math:`f = \frac{1}{2m}\|X_{val} w - y_{val}\|^2` on the validation batch."""
    x, y = batch
    return 0.5 * ((x @ params["w"] - y) ** 2).mean()


@dataclass(frozen=True)
class RidgeBilevel:
    r"""Per-feature ridge hyperparameters: :math:`x = \lambda \in \mathbb{R}^d` (log-weights),

    .. math::

        w^*(\lambda) = H^{-1} X^\top y / n, \qquad H = X^\top X / n + \operatorname{diag}(e^\lambda),\\
        \nabla\Phi(\lambda) = -\, e^\lambda \odot w^* \odot H^{-1} \nabla_w f(w^*).

    The training data is the inner batch and the validation data the outer
    batch, so tasks stack along a leading dimension for ``vmap``.
    """

    train: RidgeBatch
    val: RidgeBatch

    @property
    def problem(self) -> BilevelProblem:
        return BilevelProblem(inner=ridge_inner, outer=ridge_outer)

    @property
    def dim(self) -> int:
        return self.train[0].shape[-1]

    def hparams(self, value: float = 0.0) -> Params:
        return {"log_lam": torch.full((self.dim,), value, dtype=self.train[0].dtype)}

    def params0(self) -> Params:
        return {"w": torch.zeros(self.dim, dtype=self.train[0].dtype)}

    def hessian(self, hparams: Params) -> Tensor:
        x = self.train[0]
        return x.T @ x / x.shape[0] + torch.diag(torch.exp(hparams["log_lam"]))

    def solution(self, hparams: Params) -> Params:
        x, y = self.train
        return {"w": torch.linalg.solve(self.hessian(hparams), x.T @ y / x.shape[0])}

    def outer_value(self, hparams: Params) -> Tensor:
        return ridge_outer(hparams, self.solution(hparams), self.val)

    def hypergrad(self, hparams: Params) -> Params:
        w = self.solution(hparams)["w"]
        xv, yv = self.val
        grad_w = xv.T @ (xv @ w - yv) / xv.shape[0]
        v = torch.linalg.solve(self.hessian(hparams), grad_w)
        return {"log_lam": -torch.exp(hparams["log_lam"]) * w * v}

    def lipschitz(self, hparams: Params) -> float:
        """Largest eigenvalue of the inner Hessian (a safe GD step is ``1 / lipschitz``)."""
        return torch.linalg.eigvalsh(self.hessian(hparams))[-1].item()


def ridge_problem(n_samples: int = 200, dim: int = 20, *, n_val: int | None = None, noise: float = 0.5,
                  seed: int = 0, dtype: torch.dtype = torch.float64) -> RidgeBilevel:
    r"""A synthetic ridge problem: Gaussian features, a sparse true weight vector, Gaussian noise.

    Example:
        >>> from bilevel.testing import ridge_problem
        >>> r = ridge_problem(n_samples=100, dim=10, seed=0)
        >>> r.hypergrad(r.hparams())["log_lam"].shape
        torch.Size([10])
    """
    if n_samples < 1 or dim < 1:
        raise ValueError(f"ridge_problem(n_samples={n_samples}, dim={dim}): sizes must be positive.")
    n_val = n_samples if n_val is None else n_val
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(dim, generator=gen, dtype=dtype) * (torch.rand(dim, generator=gen, dtype=dtype) < 0.3)
    def draw(n: int) -> RidgeBatch:
        x = torch.randn(n, dim, generator=gen, dtype=dtype)
        return x, x @ w_true + noise * torch.randn(n, generator=gen, dtype=dtype)
    return RidgeBilevel(train=draw(n_samples), val=draw(n_val))
