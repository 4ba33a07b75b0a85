r"""Two hyperparameter problems with exact answers, for the estimator study and the frontier.

Both tune one L2 weight per feature, :math:`x = \log\lambda \in \mathbb R^d`:

.. math::

    g(x, w) = \ell(w; \text{train}) + \tfrac12 \textstyle\sum_i e^{x_i} w_i^2, \qquad
    f(x, w) = \ell(w; \text{val}),

with :math:`\ell` the mean squared error (ridge, :func:`bilevel.testing.ridge_problem`) or the
mean logistic loss (labels :math:`\pm 1`). Since :math:`\nabla^2_{xw} g = \operatorname{diag}(e^x \odot w)`,
the implicit function theorem gives the exact hypergradient

.. math::

    \nabla\Phi(x) = -\, e^x \odot w^* \odot H^{-1} \nabla_w f(x, w^*), \qquad H = \nabla^2_{ww} g(x, w^*),

computed here with a dense solve (and, for the logistic loss, Newton's method for :math:`w^*`).
``damping = rho`` adds :math:`\frac\rho2\|w\|^2` to :math:`g`: the problem iMAML solves when its
proximal centre is the zero start, so its own limit is known exactly too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._problem import BilevelProblem
from .._tree import Params
from ..testing import ridge_problem
from ..testing.ridge import ridge_inner, ridge_outer

Data = tuple[Tensor, Tensor]


def logistic_inner(hparams: Params, params: Params, batch: Data) -> Tensor:
    r""":math:`\frac1n \sum \log(1 + e^{-y_i x_i^\top w}) + \frac12 \sum_j e^{\lambda_j} w_j^2`."""
    x, y = batch
    w = params["w"]
    return F.softplus(-y * (x @ w)).mean() + 0.5 * (torch.exp(hparams["log_lam"]) * w ** 2).sum()


def logistic_outer(hparams: Params, params: Params, batch: Data) -> Tensor:
    x, y = batch
    return F.softplus(-y * (x @ params["w"])).mean()


@dataclass(frozen=True)
class HyperCase:
    """One per-feature-L2 problem (``loss`` is ``"ridge"`` or ``"logistic"``) and its exact answers."""

    name: str
    loss: str
    train: Data
    val: Data

    @property
    def dim(self) -> int:
        return self.train[0].shape[1]

    @property
    def problem(self) -> BilevelProblem:
        if self.loss == "ridge":
            return BilevelProblem(inner=ridge_inner, outer=ridge_outer)
        return BilevelProblem(inner=logistic_inner, outer=logistic_outer)

    def prox_problem(self) -> BilevelProblem:
        """The problem with ``init(x) = 0``: the proximal centre of ``bl.IMAML`` is the zero start."""
        zeros = torch.zeros(self.dim, dtype=self.train[0].dtype)
        p = self.problem
        return BilevelProblem(inner=p.inner, outer=p.outer, init=lambda x: {"w": zeros})

    def hparams(self, value: float) -> Params:
        return {"log_lam": torch.full((self.dim,), float(value), dtype=self.train[0].dtype)}

    def params0(self) -> Params:
        return {"w": torch.zeros(self.dim, dtype=self.train[0].dtype)}

    def lipschitz(self, hparams: Params) -> float:
        """An upper bound on the largest eigenvalue of the inner Hessian (GD step ``1/L`` is safe)."""
        x = self.train[0]
        data = torch.linalg.matrix_norm(x, ord=2).item() ** 2 / x.shape[0]
        return data * (1.0 if self.loss == "ridge" else 0.25) + torch.exp(hparams["log_lam"]).max().item()

    # ------------------------------------------------------------------ exact answers

    def _grad_hess(self, hparams: Params, w: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        x, y = self.train
        n = x.shape[0]
        lam = torch.exp(hparams["log_lam"]) + damping
        if self.loss == "ridge":
            return x.T @ (x @ w - y) / n + lam * w, x.T @ x / n + torch.diag(lam)
        z = y * (x @ w)
        s = torch.sigmoid(-z)
        grad = -x.T @ (y * s) / n + lam * w
        return grad, (x.T * (s * (1 - s))) @ x / n + torch.diag(lam)

    def solution(self, hparams: Params, damping: float = 0.0) -> Params:
        """:math:`w^*(x)`: one Newton step for ridge, Newton to machine precision for the logistic loss."""
        w = torch.zeros(self.dim, dtype=self.train[0].dtype)
        for _ in range(1 if self.loss == "ridge" else 60):
            grad, hess = self._grad_hess(hparams, w, damping)
            if self.loss != "ridge" and torch.linalg.vector_norm(grad) < 1e-14:
                break
            w = w - torch.linalg.solve(hess, grad)
        return {"w": w}

    def value(self, hparams: Params) -> float:
        """:math:`\\Phi(x) = f(x, w^*(x))`."""
        return self.problem.outer(hparams, self.solution(hparams), self.val).item()

    def hypergrad(self, hparams: Params, damping: float = 0.0) -> Params:
        """The exact :math:`\\nabla\\Phi(x)` (of the damped problem when ``damping > 0``)."""
        w = self.solution(hparams, damping)["w"]
        _, hess = self._grad_hess(hparams, w, damping)
        gw = torch.func.grad(lambda p: self.problem.outer(hparams, p, self.val))({"w": w})["w"]
        return {"log_lam": -torch.exp(hparams["log_lam"]) * w * torch.linalg.solve(hess, gw)}

    def condition(self, hparams: Params) -> float:
        """:math:`\\kappa = \\lambda_{\\max}/\\lambda_{\\min}` of the inner Hessian at :math:`w^*`."""
        w = self.solution(hparams)["w"]
        ev = torch.linalg.eigvalsh(self._grad_hess(hparams, w, 0.0)[1])
        return (ev[-1] / ev[0]).item()


def ridge_case(dim: int, n_samples: int, seed: int, dtype: torch.dtype = torch.float64) -> HyperCase:
    """The ridge problem of :func:`bilevel.testing.ridge_problem` (Gaussian features, sparse truth)."""
    r = ridge_problem(n_samples=n_samples, dim=dim, seed=seed, dtype=dtype)
    return HyperCase(f"ridge (d={dim}, n={n_samples})", "ridge", r.train, r.val)


def logistic_case(dim: int, n_samples: int, seed: int, dtype: torch.dtype = torch.float64) -> HyperCase:
    """Synthetic logistic regression: Gaussian features, a sparse true weight, 10% flipped labels."""
    gen = torch.Generator().manual_seed(seed + 7919)
    w_true = torch.randn(dim, generator=gen, dtype=dtype) * (torch.rand(dim, generator=gen, dtype=dtype) < 0.3)
    w_true = w_true * (3.0 / max(torch.linalg.vector_norm(w_true).item(), 1e-12))

    def draw(n: int) -> Data:
        x = torch.randn(n, dim, generator=gen, dtype=dtype)
        y = torch.sign(x @ w_true + 1e-12)
        flip = torch.rand(n, generator=gen, dtype=dtype) < 0.1
        return x, torch.where(flip, -y, y)
    return HyperCase(f"logistic (d={dim}, n={n_samples})", "logistic", draw(n_samples), draw(n_samples))


def a9a_case(root: str, n_train: int = 2000, dtype: torch.dtype = torch.float64) -> HyperCase:
    """a9a (UCI Adult, 123 binary features) from the folder ``root``: the first ``n_train``
    rows of the training file for the inner problem, of the test file for the outer one."""
    from ..datasets.libsvm import load_a9a  # only this option needs the reader

    def take(split: str) -> Data:
        x, y = load_a9a(root, split=split, dtype=dtype)
        return x[:n_train].contiguous(), y[:n_train].contiguous()
    return HyperCase(f"a9a (d=123, n={n_train})", "logistic", take("train"), take("test"))
