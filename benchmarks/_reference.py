"""Hand-written torch.func references for the benchmarks, and the shared benchmark setup.

Each reference computes exactly what one estimator computes, written the way a
user would write it by hand with :mod:`torch.func` and nothing from ``bilevel``
but the objectives: the same number of inner gradient steps of the same size,
forward-over-reverse HVPs (``jvp`` of ``grad``), a plain fixed-iteration CG loop
(no masking, no status) and the Richardson form of the Neumann series. It does
no checking at all, which is what the library's overhead is measured against.

The problem is :func:`bilevel.testing.ridge_problem` (``n`` samples, ``d``
per-feature log-regularisation weights at ``log_lam = 0``), drawn in float64 and
cast, so the float32 and float64 runs see the same data and both are compared
with the same closed-form hypergradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad, jvp

import bilevel as bl
from bilevel.testing import ridge_problem
from bilevel.testing.ridge import RidgeBilevel, ridge_inner, ridge_outer

from ._timing import best_of  # noqa: F401 - re-exported: the benchmarks import it from here

Params = dict[str, Tensor]

#: Inner gradient steps and linear-solver iterations of the benchmark setup.
INNER_STEPS = 100
LINEAR_STEPS = 10
TRUNCATE = 10
N_SAMPLES = 1000
#: Estimator names, in table order.
ESTIMATORS = ("ITD", "ITD(truncate=10)", "FirstOrder", "AID+CG", "AID+Neumann")


class Case(NamedTuple):
    """One benchmark problem in one dtype: data, start, step size and the exact answer."""

    ridge: RidgeBilevel        # data in ``dtype``
    hparams: Params
    params0: Params
    lr: float                  # 1 / lambda_max of the inner Hessian (float64)
    exact: Tensor              # closed-form hypergradient, float64


def exact_solution(dim: int, seed: int = 0) -> tuple[float, Tensor]:
    """``(lr, exact hypergradient)`` in float64 (about two seconds at ``d = 2000``: cache it)."""
    ridge = ridge_problem(N_SAMPLES, dim, seed=seed, dtype=torch.float64)
    x = ridge.hparams()
    return 1.0 / ridge.lipschitz(x), ridge.hypergrad(x)["log_lam"]


def make_case(dim: int, dtype: torch.dtype, solution: tuple[float, Tensor] | None = None,
              seed: int = 0) -> Case:
    """The ridge case at dimension ``dim``; pass ``solution`` from :func:`exact_solution` to reuse it."""
    ridge64 = ridge_problem(N_SAMPLES, dim, seed=seed, dtype=torch.float64)
    lr, exact = exact_solution(dim, seed) if solution is None else solution
    cast = tuple(tuple(t.to(dtype) for t in batch) for batch in (ridge64.train, ridge64.val))
    ridge = RidgeBilevel(train=cast[0], val=cast[1])
    return Case(ridge, ridge.hparams(), ridge.params0(), lr, exact)


# --------------------------------------------------------------------------- the library side

def library_estimator(name: str, lr: float) -> bl.AbstractEstimator:
    """The estimator ``name``; AID with ``hvp="forward"``, the references' HVP mode, so that the
    library and the reference do the same arithmetic (AID's default, ``"auto"``, is reverse-over-
    reverse on CPU: docs/performance.md, "Hessian-vector products")."""
    return {
        "ITD": lambda: bl.ITD(),
        "ITD(truncate=10)": lambda: bl.ITD(truncate=TRUNCATE),
        "FirstOrder": lambda: bl.FirstOrder(),
        "AID+CG": lambda: bl.AID(linear_solver=bl.CG(max_steps=LINEAR_STEPS), hvp="forward"),
        "AID+Neumann": lambda: bl.AID(linear_solver=bl.Neumann(steps=LINEAR_STEPS, alpha=lr), hvp="forward"),
    }[name]()


def library_call(name: str, case: Case) -> Callable[[], bl.Hypergrad]:
    """A zero-argument call of ``bl.hypergrad`` for estimator ``name`` on ``case``.

    ``throw=False``: CG at ``rtol=1e-10`` ends at ``linear_max_steps`` in float32 after
    10 iterations, and the benchmark measures the estimate, not the error path.
    """
    return hypergrad_call(case, library_estimator(name, case.lr))


def hypergrad_call(case: Case, estimator: bl.AbstractEstimator) -> Callable[[], bl.Hypergrad]:
    """A zero-argument ``bl.hypergrad`` call of any ``estimator`` (e.g. a ``bl.Compiled`` one) on
    ``case``: :data:`INNER_STEPS` gradient steps of size ``case.lr``, ``throw=False``."""
    problem, train, val = case.ridge.problem, case.ridge.train, case.ridge.val
    inner = bl.GradientDescent(lr=case.lr, steps=INNER_STEPS)

    def call() -> bl.Hypergrad:
        return bl.hypergrad(problem, case.hparams, case.params0, inner=inner, estimator=estimator,
                            inner_batch=train, outer_batch=val, throw=False)
    return call


# --------------------------------------------------------------------------- the references

def _gd(x: Params, y: Params, batch, lr: float, steps: int) -> Params:
    grad_y = grad(ridge_inner, argnums=1)
    for _ in range(steps):
        g = grad_y(x, y, batch)
        y = {k: y[k] - lr * g[k] for k in y}
    return y


def _dot(a: Params, b: Params) -> Tensor:
    return sum(torch.vdot(a[k].reshape(-1), b[k].reshape(-1)) for k in a)


def reference_itd(x: Params, y0: Params, train, val, lr: float, steps: int,
                  truncate: int | None = None) -> Params:
    """Reverse mode through the last ``truncate`` (default: all) of ``steps`` GD steps."""
    taped = steps if truncate is None else truncate
    start = _gd(x, y0, train, lr, steps - taped)      # no tape: x is a plain tensor here

    def phi(x: Params) -> Tensor:
        return ridge_outer(x, _gd(x, start, train, lr, taped), val)
    return grad(phi)(x)


def reference_first_order(x: Params, y0: Params, train, val, lr: float, steps: int) -> Params:
    """``∇_x f(x, y_N)`` (the start ``y0`` is a constant)."""
    y = _gd(x, y0, train, lr, steps)
    return grad(ridge_outer, argnums=0)(x, y, val)


def _cg(matvec: Callable[[Params], Params], b: Params, iters: int) -> Params:
    v = {k: torch.zeros_like(t) for k, t in b.items()}
    r, p = b, b
    rs = _dot(r, r)
    for _ in range(iters):
        ap = matvec(p)
        alpha = rs / _dot(p, ap)
        v = {k: v[k] + alpha * p[k] for k in v}
        r = {k: r[k] - alpha * ap[k] for k in r}
        rs_new = _dot(r, r)
        p = {k: r[k] + (rs_new / rs) * p[k] for k in r}
        rs = rs_new
    return v


def _neumann(matvec: Callable[[Params], Params], b: Params, terms: int, alpha: float) -> Params:
    v = {k: alpha * t for k, t in b.items()}
    for _ in range(terms - 1):
        av = matvec(v)
        v = {k: v[k] + alpha * (b[k] - av[k]) for k in v}
    return v


def reference_aid(x: Params, y0: Params, train, val, lr: float, steps: int, solver: str,
                  linear_steps: int) -> Params:
    """``∇_x f - ∇²_xy g v`` with ``∇²_yy g v = ∇_y f`` by CG or Neumann, HVPs forward-over-reverse."""
    y = _gd(x, y0, train, lr, steps)
    gx, gy = grad(ridge_outer, argnums=(0, 1))(x, y, val)
    grad_y = grad(lambda w: ridge_inner(x, w, train))

    def hvp(v: Params) -> Params:
        return jvp(grad_y, (y,), (v,))[1]
    v = _cg(hvp, gy, linear_steps) if solver == "cg" else _neumann(hvp, gy, linear_steps, lr)
    grad_x = grad(ridge_inner, argnums=0)
    cross = jvp(lambda w: grad_x(x, w, train), (y,), (v,))[1]
    return {k: gx[k] - cross[k] for k in gx}


def reference_call(name: str, case: Case) -> Callable[[], Params]:
    """A zero-argument call of the hand-written reference for estimator ``name``."""
    x, y0, train, val, lr = case.hparams, case.params0, case.ridge.train, case.ridge.val, case.lr
    fns = {
        "ITD": lambda: reference_itd(x, y0, train, val, lr, INNER_STEPS),
        "ITD(truncate=10)": lambda: reference_itd(x, y0, train, val, lr, INNER_STEPS, TRUNCATE),
        "FirstOrder": lambda: reference_first_order(x, y0, train, val, lr, INNER_STEPS),
        "AID+CG": lambda: reference_aid(x, y0, train, val, lr, INNER_STEPS, "cg", LINEAR_STEPS),
        "AID+Neumann": lambda: reference_aid(x, y0, train, val, lr, INNER_STEPS, "neumann", LINEAR_STEPS),
    }
    return fns[name]


# --------------------------------------------------------------------------- measuring

def time_ratio(name: str, case: Case, repeat: int = 7) -> tuple[float, float, float]:
    """``(library seconds, reference seconds, ratio)``, best of ``repeat`` interleaved runs."""
    t = best_of({"lib": library_call(name, case), "ref": reference_call(name, case)}, repeat)
    return t["lib"], t["ref"], t["lib"] / t["ref"]


def rel_error(value: Tensor, exact: Tensor) -> float:
    """``||value - exact|| / ||exact||`` computed in float64."""
    value = value.to(torch.float64)
    return (torch.linalg.vector_norm(value - exact) / torch.linalg.vector_norm(exact)).item()
