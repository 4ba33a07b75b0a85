"""Property tests: random well-conditioned quadratic problems drawn by hypothesis.

Each example draws the dimensions, the seed of the random matrices and the condition number
of the inner Hessian. The profiles (examples per property) are set in ``tests/conftest.py``:
``HYPOTHESIS_PROFILE=ci`` runs more of them.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import bilevel as bl
from bilevel.testing import quadratic_problem
from tests.test_core_helpers import rel_err


@st.composite
def quadratics(draw, learned_init: bool = False):
    q = quadratic_problem(dim_y=draw(st.integers(1, 6)), dim_x=draw(st.integers(1, 4)),
                          seed=draw(st.integers(0, 2 ** 16)), condition=draw(st.floats(1.0, 20.0)),
                          learned_init=learned_init)
    return q, q.hparams(draw(st.integers(0, 100))), q.params0(draw(st.integers(0, 100)))


def _lambda_max(q) -> float:
    return torch.linalg.eigvalsh(q.A)[-1].item()


# a step size in (0, 2 / lambda_max): any of them makes gradient descent contract
step_fraction = st.floats(0.05, 1.9)


@given(quadratics(), step_fraction, st.integers(0, 25))
def test_itd_is_the_gradient_of_the_unrolled_map(problem, fraction, steps):
    q, x, y0 = problem
    lr = fraction / _lambda_max(q)
    hg = bl.hypergrad(q.problem, x, y0, inner=bl.GradientDescent(lr=lr, steps=steps), estimator=bl.ITD(), throw=False)
    assert hg.result in (bl.RESULTS.successful, bl.RESULTS.inner_diverged)  # a quadratic g may be negative
    assert rel_err(hg.value, q.unrolled_hypergrad(x, y0, lr, steps)) < 1e-10


@given(quadratics(learned_init=True), step_fraction, st.integers(0, 25))
def test_itd_with_learned_init_and_first_order(problem, fraction, steps):
    q, x, _ = problem
    lr = fraction / _lambda_max(q)
    inner = bl.GradientDescent(lr=lr, steps=steps)
    itd = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.ITD(), throw=False)
    assert rel_err(itd.value, q.unrolled_hypergrad(x, None, lr, steps)) < 1e-10
    fo = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.FirstOrder(), throw=False)
    y_n = q.unrolled(x, None, lr, steps)["y"]
    assert rel_err(fo.value["x"], q.rho * x["x"] + q.e + q.P.T @ (y_n - q.t)) < 1e-10


@given(quadratics(), step_fraction, st.integers(1, 20))
def test_itd_from_the_optimum_equals_aid_neumann(problem, fraction, k):
    q, x, _ = problem
    lr = fraction / _lambda_max(q)
    y_star = q.solution(x)
    inner = bl.GradientDescent(lr=lr, steps=k)
    itd = bl.hypergrad(q.problem, x, y_star, inner=inner, estimator=bl.ITD(), throw=False)
    aid = bl.hypergrad(q.problem, x, y_star, inner=inner, throw=False,
                       estimator=bl.AID(linear_solver=bl.Neumann(steps=k, alpha=lr), hvp="reverse"))
    assert aid.result is bl.RESULTS.successful
    assert rel_err(itd.value, aid.value) < 1e-9


@given(quadratics())
def test_aid_cg_and_dense_at_the_solution_equal_the_implicit_gradient(problem):
    q, x, _ = problem
    n = q.A.shape[0]
    inner = bl.GradientDescent(lr=0.5 / _lambda_max(q), steps=0)  # start at y*: the linear algebra alone
    exact = q.hypergrad(x)
    cg = bl.hypergrad(q.problem, x, q.solution(x), inner=inner,
                      estimator=bl.AID(linear_solver=bl.CG(max_steps=3 * n + 5, rtol=1e-12), hvp="reverse"))
    dense = bl.hypergrad(q.problem, x, q.solution(x), inner=inner, estimator=bl.AID(linear_solver=bl.Dense()))
    assert rel_err(cg.value, exact) < 1e-8
    assert rel_err(dense.value, exact) < 1e-10


@given(quadratics(), st.integers(2, 4))
def test_vmap_over_random_hparams_equals_a_loop(problem, tasks):
    q, x, y0 = problem
    gen = torch.Generator().manual_seed(tasks)
    xs = {"x": x["x"] + torch.randn(tasks, *x["x"].shape, generator=gen, dtype=torch.float64)}
    ys = {"y": y0["y"].expand(tasks, -1).clone()}
    inner = bl.GradientDescent(lr=1.0 / _lambda_max(q), steps=8)
    for est in (bl.ITD(), bl.AID(linear_solver=bl.CG(max_steps=4), hvp="reverse")):
        hg = bl.vmap_hypergrad(q.problem, xs, ys, inner=inner, estimator=est, throw=False)
        for i in range(tasks):
            one = bl.hypergrad(q.problem, {"x": xs["x"][i]}, {"y": ys["y"][i]}, inner=inner, estimator=est,
                               throw=False)
            assert rel_err(hg.value["x"][i], one.value["x"]) < 1e-12
            assert hg.task_results[i] is one.result
