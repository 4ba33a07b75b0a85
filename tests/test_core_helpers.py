"""Reference computations shared by the core tests, and tests that the references are right.

Everything here is written from the formulas, independently of ``bilevel``'s loop and
estimators: a plain unrolled heavy-ball loop, central finite differences, and a small
non-quadratic problem (regularised logistic regression) for checks that a quadratic
cannot make (second derivatives that vary with ``y`` and ``x``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad

import bilevel as bl
from bilevel.testing import quadratic_problem, ridge_problem

Params = dict[str, Tensor]


def rel_err(a: Params | Tensor, b: Params | Tensor) -> float:
    """``||a - b|| / max(||b||, tiny)`` over all leaves."""
    if isinstance(a, dict):
        a = torch.cat([a[k].reshape(-1) for k in sorted(a)])
        b = torch.cat([b[k].reshape(-1) for k in sorted(b)])
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def reference_unroll(inner, x: Params, y0: Params, lr: float, steps: int, momentum: float = 0.0,
                     batch=None) -> Params:
    r"""Heavy ball by hand: :math:`v_{k+1} = \beta v_k - \eta \nabla_y g`, :math:`y_{k+1} = y_k + v_{k+1}`."""
    y = dict(y0)
    v = {k: torch.zeros_like(t) for k, t in y.items()}
    g_y = grad(inner, argnums=1)
    for _ in range(steps):
        gy = g_y(x, y, batch)
        v = {k: momentum * v[k] - lr * gy[k] for k in y}
        y = {k: y[k] + v[k] for k in y}
    return y


def central_fd(fn, x: Params, eps: float = 1e-6) -> Params:
    """Central finite differences of the scalar ``fn(x)`` in every coordinate of every leaf."""
    out = {}
    for key, value in x.items():
        flat = torch.zeros(value.numel(), dtype=value.dtype)
        for i in range(value.numel()):
            step = torch.zeros(value.numel(), dtype=value.dtype)
            step[i] = eps
            plus = {**x, key: value + step.reshape(value.shape)}
            minus = {**x, key: value - step.reshape(value.shape)}
            flat[i] = (fn(plus) - fn(minus)) / (2 * eps)
        out[key] = flat.reshape(value.shape)
    return out


# A non-quadratic problem: L2-regularised logistic regression with per-feature log-weights,
# validation logistic loss plus a term that makes the outer objective depend on x directly.
def logistic_data(n: int = 24, dim: int = 3, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(2, n, dim, generator=gen, dtype=dtype)
    w = torch.randn(dim, generator=gen, dtype=dtype)
    labels = torch.sign(xs @ w + 0.5 * torch.randn(2, n, generator=gen, dtype=dtype))
    return (xs[0], labels[0]), (xs[1], labels[1])


def logistic_inner(x: Params, y: Params, batch) -> Tensor:
    feats, labels = batch
    margin = labels * (feats @ y["w"] + y["b"])
    return torch.nn.functional.softplus(-margin).mean() + 0.5 * (torch.exp(x["log_lam"]) * y["w"] ** 2).sum()


def logistic_outer(x: Params, y: Params, batch) -> Tensor:
    feats, labels = batch
    margin = labels * (feats @ y["w"] + y["b"])
    return torch.nn.functional.softplus(-margin).mean() + 0.01 * (x["log_lam"] ** 2).sum()


def logistic_problem(dim: int = 3, seed: int = 0, dtype=torch.float64):
    """``(problem, hparams, params0, train, val)`` for the logistic bilevel problem."""
    train, val = logistic_data(dim=dim, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 7)
    x = {"log_lam": 0.3 * torch.randn(dim, generator=gen, dtype=dtype)}
    y0 = {"w": 0.1 * torch.randn(dim, generator=gen, dtype=dtype), "b": torch.zeros((), dtype=dtype)}
    return bl.BilevelProblem(inner=logistic_inner, outer=logistic_outer), x, y0, train, val


def ridge_tasks(num_tasks: int = 3, n_samples: int = 20, dim: int = 4, dtype=torch.float64):
    """``num_tasks`` ridge problems stacked along a leading task dimension, and a safe GD step."""
    tasks = [ridge_problem(n_samples=n_samples, dim=dim, seed=s, dtype=dtype) for s in range(num_tasks)]
    train = tuple(torch.stack([t.train[i] for t in tasks]) for i in range(2))
    val = tuple(torch.stack([t.val[i] for t in tasks]) for i in range(2))
    lr = 1.0 / max(t.lipschitz(t.hparams()) for t in tasks)
    return tasks, train, val, lr


# ---------------------------------------------------------------------------------------------
# The references themselves are checked against closed forms before anything relies on them.

def test_reference_unroll_matches_closed_form_unroll():
    q = quadratic_problem(4, 2, seed=3)
    x, y0 = q.hparams(), q.params0()
    assert rel_err(reference_unroll(q.inner, x, y0, 0.1, 13), q.unrolled(x, y0, 0.1, 13)) < 1e-13


def test_reference_unroll_with_momentum_matches_hand_recursion():
    q = quadratic_problem(3, 2, seed=1)
    x, y0 = q.hparams(), q.params0()
    y, v = y0["y"], torch.zeros(3, dtype=torch.float64)
    for _ in range(9):
        v = 0.7 * v - 0.05 * (q.A @ y - q.B @ x["x"] - q.c)
        y = y + v
    assert rel_err(reference_unroll(q.inner, x, y0, 0.05, 9, momentum=0.7)["y"], y) < 1e-13


def test_central_fd_matches_gradient_of_known_function():
    a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    fn = lambda p: 0.5 * p["u"] @ a @ p["u"] + torch.sin(p["s"]).sum()  # noqa: E731
    point = {"u": torch.tensor([0.3, -1.2], dtype=torch.float64), "s": torch.tensor([0.7], dtype=torch.float64)}
    fd = central_fd(fn, point)
    assert rel_err(fd["u"], a @ point["u"]) < 1e-8
    assert rel_err(fd["s"], torch.cos(point["s"])) < 1e-8
