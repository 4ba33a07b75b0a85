"""A random quadratic bilevel problem with closed-form solution and hypergradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._problem import BilevelProblem
from .._tree import Params


@dataclass(frozen=True)
class QuadraticBilevel:
    r"""The quadratic bilevel problem

    .. math::

        g(x, y) = \tfrac12 y^\top A y - y^\top (B x + c),\\
        f(x, y) = \tfrac12 \|y - t\|^2 + \tfrac{\rho}{2}\|x\|^2 + e^\top x,

    with :math:`A` symmetric positive definite, so :math:`y^*(x) = A^{-1}(Bx + c)` and

    .. math::

        \nabla\Phi(x) = \rho x + e + B^\top A^{-1} (y^*(x) - t).

    With ``learned_init=True`` the problem also has ``init(x) = P x`` (a learned
    inner start), which ITD, FirstOrder and the unrolled map see, and which is
    iMAML's proximal centre: :meth:`imaml_solution` and :meth:`imaml_hypergrad`
    are the closed forms for :math:`g_\lambda = g + \frac{\lambda}{2}\|y - Px\|^2`.

    Build one with :func:`quadratic_problem`. The problem's inner batch and
    outer batch are ``None``; its matrices are attributes, so tests can form
    any closed form they need.
    """

    A: Tensor
    B: Tensor
    c: Tensor
    t: Tensor
    e: Tensor
    P: Tensor
    rho: float
    learned_init: bool

    @property
    def problem(self) -> BilevelProblem:
        init = (lambda x: {"y": x["x"] @ self.P.T}) if self.learned_init else None
        return BilevelProblem(inner=self.inner, outer=self.outer, init=init)

    def inner(self, hparams: Params, params: Params, batch: object = None) -> Tensor:
        x, y = hparams["x"], params["y"]
        return 0.5 * y @ (self.A @ y) - y @ (self.B @ x + self.c)

    def outer(self, hparams: Params, params: Params, batch: object = None) -> Tensor:
        x, y = hparams["x"], params["y"]
        return 0.5 * ((y - self.t) ** 2).sum() + 0.5 * self.rho * (x ** 2).sum() + self.e @ x

    def hparams(self, seed: int = 0) -> Params:
        gen = torch.Generator().manual_seed(seed + 1)
        return {"x": torch.randn(self.B.shape[1], generator=gen, dtype=self.A.dtype)}

    def params0(self, seed: int = 0) -> Params:
        gen = torch.Generator().manual_seed(seed + 2)
        return {"y": torch.randn(self.A.shape[0], generator=gen, dtype=self.A.dtype)}

    def solution(self, hparams: Params) -> Params:
        """:math:`y^*(x) = A^{-1}(Bx + c)`."""
        return {"y": torch.linalg.solve(self.A, self.B @ hparams["x"] + self.c)}

    def hypergrad(self, hparams: Params) -> Params:
        r"""The exact :math:`\nabla\Phi(x)` (the implicit-function hypergradient)."""
        x = hparams["x"]
        y = self.solution(hparams)["y"]
        return {"x": self.rho * x + self.e + self.B.T @ torch.linalg.solve(self.A, y - self.t)}

    def unrolled(self, hparams: Params, params0: Params | None, lr: float, steps: int) -> Params:
        r"""The iterate :math:`y_N` of ``steps`` gradient steps of size ``lr`` from ``params0`` (or ``init(x)``)."""
        y = self._start(hparams, params0)
        for _ in range(steps):
            y = y - lr * (self.A @ y - self.B @ hparams["x"] - self.c)
        return {"y": y}

    def unrolled_hypergrad(self, hparams: Params, params0: Params | None, lr: float, steps: int) -> Params:
        r"""The exact ITD gradient of :math:`x \mapsto f(x, y_N(x))` for gradient descent.

        :math:`y_N = M^N y_0 + \sum_{k<N} M^k \eta (Bx + c)` with :math:`M = I - \eta A`, so
        :math:`\partial y_N/\partial x = M^N J_0 + \eta \sum_{k<N} M^k B` where
        :math:`J_0 = P` for a learned start and 0 otherwise.
        """
        n = self.A.shape[0]
        m = torch.eye(n, dtype=self.A.dtype) - lr * self.A
        power = torch.eye(n, dtype=self.A.dtype)
        jac = torch.zeros_like(self.B)
        for _ in range(steps):
            jac = jac + lr * power @ self.B
            power = m @ power
        if params0 is None and self.learned_init:
            jac = jac + power @ self.P
        x = hparams["x"]
        y = self.unrolled(hparams, params0, lr, steps)["y"]
        return {"x": self.rho * x + self.e + jac.T @ (y - self.t)}

    def imaml_solution(self, hparams: Params, lam: float) -> Params:
        r"""Minimiser of the iMAML inner problem :math:`g + \frac{\lambda}{2}\|y - Px\|^2`:
        :math:`y_\lambda^*(x) = (A + \lambda I)^{-1}(Bx + c + \lambda P x)`."""
        x = hparams["x"]
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype)
        return {"y": torch.linalg.solve(self.A + lam * eye, self.B @ x + self.c + lam * self.P @ x)}

    def imaml_hypergrad(self, hparams: Params, lam: float) -> Params:
        r"""The exact gradient of :math:`x \mapsto f(x, y_\lambda^*(x))` (what :class:`~bilevel.IMAML`
        estimates): :math:`\rho x + e + (B + \lambda P)^\top (A + \lambda I)^{-1} (y_\lambda^* - t)`."""
        x = hparams["x"]
        y = self.imaml_solution(hparams, lam)["y"]
        eye = torch.eye(self.A.shape[0], dtype=self.A.dtype)
        v = torch.linalg.solve(self.A + lam * eye, y - self.t)
        return {"x": self.rho * x + self.e + (self.B + lam * self.P).T @ v}

    def _start(self, hparams: Params, params0: Params | None) -> Tensor:
        if params0 is not None:
            return params0["y"]
        if not self.learned_init:
            raise ValueError("QuadraticBilevel: params0 is required when learned_init=False.")
        return self.P @ hparams["x"]


def quadratic_problem(dim_y: int = 5, dim_x: int = 3, *, seed: int = 0, condition: float = 10.0,
                      learned_init: bool = False, rho: float = 0.1,
                      dtype: torch.dtype = torch.float64) -> QuadraticBilevel:
    r"""A random :class:`QuadraticBilevel` whose inner Hessian has eigenvalues in ``[1, condition]``.

    Example:
        >>> import bilevel as bl
        >>> from bilevel.testing import quadratic_problem
        >>> q = quadratic_problem(dim_y=4, dim_x=2, seed=0)
        >>> x = q.hparams()
        >>> hg = bl.hypergrad(q.problem, x, q.params0(), inner=bl.GradientDescent(lr=0.1, steps=400),
        ...                   estimator=bl.AID(linear_solver=bl.CG(max_steps=10)))
        >>> bool(torch.allclose(hg.value["x"], q.hypergrad(x)["x"], rtol=1e-8))
        True
    """
    if dim_x < 1 or dim_y < 1:
        raise ValueError(f"quadratic_problem(dim_y={dim_y}, dim_x={dim_x}): dimensions must be positive.")
    if not condition >= 1:
        raise ValueError(f"quadratic_problem(condition={condition}): the condition number must be >= 1.")
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim_y, dim_y, generator=gen, dtype=dtype))
    eig = torch.logspace(0, torch.log10(torch.tensor(float(condition))).item(), dim_y, dtype=dtype)
    a = (q * eig) @ q.T
    a = 0.5 * (a + a.T)
    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)
    return QuadraticBilevel(A=a, B=rnd(dim_y, dim_x), c=rnd(dim_y), t=rnd(dim_y), e=rnd(dim_x),
                            P=rnd(dim_y, dim_x) / dim_x ** 0.5, rho=rho, learned_init=learned_init)
