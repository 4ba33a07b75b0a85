"""Exact identities between estimators (no closed form needed on one side)."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.testing import quadratic_problem
from tests.test_core_helpers import logistic_problem, rel_err


@pytest.mark.parametrize("k", [1, 3, 12])
def test_itd_from_the_optimum_equals_aid_with_neumann(k):
    # At y* the K gradient steps stay at y*, and the unrolled Jacobian is eta sum_{j<K} M^j B:
    # exactly the K-term Neumann series alpha sum_{j<K} (I - alpha A)^j applied by AID.
    q = quadratic_problem(6, 3, seed=k, condition=5.0)
    x = q.hparams()
    y_star = q.solution(x)
    inner = bl.GradientDescent(lr=0.15, steps=k)
    itd = bl.hypergrad(q.problem, x, y_star, inner=inner, estimator=bl.ITD())
    aid = bl.hypergrad(q.problem, x, y_star, inner=inner, estimator=bl.AID(linear_solver=bl.Neumann(steps=k, alpha=0.15)))
    assert rel_err(itd.value, aid.value) < 1e-12
    assert aid.stats["num_hvp"] == itd.stats["num_hvp"] == k


def test_itd_with_truncate_equal_to_steps_is_full_itd():
    q = quadratic_problem(4, 2, seed=1, learned_init=True)
    x = q.hparams()
    inner = bl.GradientDescent(lr=0.08, steps=6)
    full = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.ITD())
    trunc = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.ITD(truncate=6))
    assert rel_err(trunc.value, full.value) < 1e-14


def test_with_zero_inner_steps_itd_and_first_order_coincide():
    # y_N = init(x): both are grad_x f + J_init^T grad_y f.
    q = quadratic_problem(4, 3, seed=2, learned_init=True)
    x = q.hparams()
    inner = bl.GradientDescent(lr=0.1, steps=0)
    itd = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.ITD())
    fo = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.FirstOrder())
    assert rel_err(itd.value, fo.value) < 1e-14
    assert rel_err(itd.params, {"y": q.P @ x["x"]}) < 1e-14


def test_momentum_with_zero_momentum_is_gradient_descent_for_every_estimator():
    problem, x, y0, train, val = logistic_problem(seed=3)
    kw = dict(inner_batch=train, outer_batch=val)
    for est in (bl.ITD(), bl.FirstOrder(), bl.AID(linear_solver=bl.CG(max_steps=5))):
        gd = bl.hypergrad(problem, x, y0, inner=bl.GradientDescent(lr=0.4, steps=10), estimator=est, **kw)
        hb = bl.hypergrad(problem, x, y0, inner=bl.Momentum(lr=0.4, momentum=0.0, steps=10), estimator=est,
                          throw=False, **kw)
        assert rel_err(hb.value, gd.value) < 1e-14, est


def test_itd_converges_to_aid_as_inner_steps_grow():
    # Both tend to the implicit gradient; ITD's error decays geometrically with N.
    q = quadratic_problem(5, 2, seed=4, condition=4.0)
    x, y0 = q.hparams(), q.params0()
    aid = bl.hypergrad(q.problem, x, q.solution(x), inner=bl.GradientDescent(lr=0.4, steps=0),
                       estimator=bl.AID(linear_solver=bl.Dense()))
    assert rel_err(aid.value, q.hypergrad(x)) < 1e-12
    errors = [rel_err(bl.hypergrad(q.problem, x, y0, inner=bl.GradientDescent(lr=0.4, steps=n),
                                   estimator=bl.ITD()).value, aid.value) for n in (5, 20, 60)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-10


def test_aid_forward_and_reverse_agree_through_vmap_too():
    q = quadratic_problem(4, 2, seed=5)
    xs = {"x": torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    ys = {"y": torch.stack([q.solution({"x": xs["x"][i]})["y"] for i in range(3)])}
    common = dict(inner=bl.GradientDescent(lr=0.1, steps=2), in_dims=(0, 0, None, None))
    fwd = bl.vmap_hypergrad(q.problem, xs, ys, estimator=bl.AID(hvp="forward"), **common)
    rev = bl.vmap_hypergrad(q.problem, xs, ys, estimator=bl.AID(hvp="reverse"), **common)
    assert rel_err(fwd.value, rev.value) < 1e-12
    for i in range(3):
        assert rel_err(fwd.value["x"][i], q.hypergrad({"x": xs["x"][i]})["x"]) < 1e-9
