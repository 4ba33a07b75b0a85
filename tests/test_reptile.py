"""Reptile against its formula J_init^T (init(x) - y_N)."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.testing import quadratic_problem

INNER = bl.GradientDescent(lr=0.2, steps=7)


def test_matches_the_formula_with_a_linear_init():
    q = quadratic_problem(5, 3, seed=2, learned_init=True, condition=3.0)
    x = q.hparams()
    hg = bl.hypergrad(q.problem, x, inner=INNER, estimator=bl.Reptile())
    y_n = q.unrolled(x, None, INNER.lr, INNER.steps)["y"]
    assert torch.allclose(hg.value["x"], q.P.T @ (q.P @ x["x"] - y_n), rtol=1e-12, atol=1e-14)
    assert torch.allclose(hg.params["y"], y_n, rtol=1e-12, atol=1e-14)
    assert torch.allclose(hg.outer_value, q.outer(x, {"y": y_n}))
    assert hg.stats["num_grad"] == INNER.steps and hg.stats["num_hvp"] == 0


def _identity_problem():
    g = lambda x, y, b: 0.5 * ((y["w"] - b) ** 2).sum() + 0.5 * (x["s"] * y["w"] ** 2).sum()
    f = lambda x, y, b: 0.5 * ((y["w"] - b) ** 2).sum()
    return bl.BilevelProblem(inner=g, outer=f, init=lambda x: {"w": x["w"]})


def test_identity_init_is_x_minus_y_and_hparams_outside_init_get_nothing():
    problem = _identity_problem()
    x = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), "s": torch.tensor(0.3, dtype=torch.float64)}
    b = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    one = bl.hypergrad(problem, x, inner=bl.GradientDescent(lr=0.1, steps=1), estimator=bl.Reptile(),
                       inner_batch=b, outer_batch=b)
    grad_g = (x["w"] - b) + x["s"] * x["w"]
    assert torch.allclose(one.value["w"], 0.1 * grad_g)  # one step: eta * grad_y g at the start
    assert torch.equal(one.value["s"], torch.zeros(()))  # a direction for init only, not a gradient of f
    many = bl.hypergrad(problem, x, inner=bl.Momentum(lr=0.1, momentum=0.5, steps=6), estimator=bl.Reptile(),
                        inner_batch=b, outer_batch=b)
    assert torch.allclose(many.value["w"], x["w"] - many.params["w"], rtol=1e-12)


def test_warm_start_moves_from_params0_but_points_from_init():
    q = quadratic_problem(5, 3, seed=3, learned_init=True, condition=3.0)
    x, y0 = q.hparams(), q.params0()
    hg = bl.hypergrad(q.problem, x, y0, inner=INNER, estimator=bl.Reptile())
    y_n = q.unrolled(x, y0, INNER.lr, INNER.steps)["y"]
    assert torch.allclose(hg.value["x"], q.P.T @ (q.P @ x["x"] - y_n), rtol=1e-12, atol=1e-14)


def test_vmap_over_tasks_equals_the_loop():
    problem = _identity_problem()
    x = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), "s": torch.tensor(0.3, dtype=torch.float64)}
    bs = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batched = bl.vmap_hypergrad(problem, x, inner=INNER, estimator=bl.Reptile(), inner_batch=bs, outer_batch=bs,
                                in_dims=(None, None, 0, 0))
    for i in range(4):
        one = bl.hypergrad(problem, x, inner=INNER, estimator=bl.Reptile(), inner_batch=bs[i], outer_batch=bs[i])
        assert torch.allclose(batched.value["w"][i], one.value["w"], rtol=1e-12, atol=1e-15)


def test_needs_init():
    q = quadratic_problem(4, 2, seed=0)
    with pytest.raises(ValueError, match=r"Reptile\(\).*no init.*Fix"):
        bl.hypergrad(q.problem, q.hparams(), q.params0(), inner=INNER, estimator=bl.Reptile())
    assert bl.Reptile() == bl.Reptile() and repr(bl.Reptile()) == "Reptile()"
