"""IMAML against the closed form of the proximally regularised quadratic problem."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import bilevel as bl
from bilevel.testing import quadratic_problem

# Inner Hessians below have eigenvalues in [1, 3]: lr = 1/(3 + lam) contracts by (2/(3 + lam)) per step.
INNER = bl.GradientDescent(lr=0.25, steps=80)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-8) -> bool:
    return bool(torch.linalg.vector_norm(a - b) <= rtol * torch.linalg.vector_norm(b))


@pytest.mark.parametrize("lam", [0.3, 10.0])
@pytest.mark.parametrize("linear_solver", [bl.CG(max_steps=8), bl.Dense()], ids=["cg", "dense"])
def test_matches_closed_form_with_learned_init(lam, linear_solver):
    q = quadratic_problem(6, 3, seed=3, learned_init=True, condition=3.0)
    x = q.hparams()
    inner = bl.GradientDescent(lr=1.0 / (3.0 + lam), steps=80)
    hg = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.IMAML(lam=lam, linear_solver=linear_solver))
    assert hg.result is bl.RESULTS.successful
    assert close(hg.params["y"], q.imaml_solution(x, lam)["y"], 1e-10)
    assert close(hg.value["x"], q.imaml_hypergrad(x, lam)["x"])
    assert hg.adjoint is not None and hg.stats["num_hvp"] >= 1


def test_neumann_on_the_damped_operator():
    q = quadratic_problem(5, 2, seed=4, learned_init=True, condition=3.0)
    x, lam = q.hparams(), 2.0
    # Richardson on A + lam I (eigenvalues in [3, 5]) contracts by 1/4 per step with alpha = 1/4.
    est = bl.IMAML(lam=lam, linear_solver=bl.Neumann(steps=30, alpha=0.25))
    hg = bl.hypergrad(q.problem, x, inner=INNER, estimator=est)
    assert close(hg.value["x"], q.imaml_hypergrad(x, lam)["x"])


def test_hparams_only_through_init_give_the_closed_form_not_zeros():
    """Regression: implicit estimators must see the learned start (iMAML through plain AID returns zeros)."""
    q = quadratic_problem(6, 3, seed=5, learned_init=True, condition=3.0)
    q = dataclasses.replace(q, B=torch.zeros_like(q.B), rho=0.0, e=torch.zeros_like(q.e))  # x only in init
    x, lam = q.hparams(), 1.5
    hg = bl.hypergrad(q.problem, x, inner=INNER, estimator=bl.IMAML(lam=lam, linear_solver=bl.CG(max_steps=8)))
    expected = q.imaml_hypergrad(x, lam)["x"]
    assert torch.linalg.vector_norm(expected) > 0.1
    assert close(hg.value["x"], expected)
    # The DESIGN formula J_init^T (I + H/lam)^{-1} grad_y f holds exactly here.
    gy = hg.params["y"] - q.t
    eye = torch.eye(6, dtype=torch.float64)
    assert close(hg.value["x"], q.P.T @ torch.linalg.solve(eye + q.A / lam, gy))
    aid = bl.hypergrad(q.problem, x, inner=INNER, estimator=bl.AID(), throw=False)
    assert aid.result is bl.RESULTS.zero_hypergradient


def test_warm_start_keeps_the_prox_centre_at_init():
    q = quadratic_problem(6, 3, seed=6, learned_init=True, condition=3.0)
    x, lam = q.hparams(), 1.0
    est = bl.IMAML(lam=lam, linear_solver=bl.CG(max_steps=8))
    hg = bl.hypergrad(q.problem, x, q.params0(), inner=INNER, estimator=est)
    assert close(hg.value["x"], q.imaml_hypergrad(x, lam)["x"])


def test_reverse_hvp_and_adjoint_warm_start():
    q = quadratic_problem(8, 3, seed=7, learned_init=True, condition=3.0)
    x, lam = q.hparams(), 0.5
    inner = bl.GradientDescent(lr=1 / 3.5, steps=80)
    fwd = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.IMAML(lam=lam, linear_solver=bl.CG(max_steps=10),
                                                                      hvp="forward"))
    rev = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.IMAML(lam=lam, linear_solver=bl.CG(max_steps=10),
                                                                      hvp="reverse"))
    auto = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.IMAML(lam=lam, linear_solver=bl.CG(max_steps=10)))
    assert bl.IMAML().hvp == "auto"  # like AID: reverse-over-reverse on CPU, forward elsewhere
    assert close(rev.value["x"], fwd.value["x"], 1e-10)
    assert close(auto.value["x"], q.imaml_hypergrad(x, lam)["x"])
    warm = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.IMAML(lam=lam, linear_solver=bl.CG(max_steps=10)),
                        adjoint0=fwd.adjoint)
    assert warm.stats["linear_steps"] < fwd.stats["linear_steps"]
    assert close(warm.value["x"], q.imaml_hypergrad(x, lam)["x"])


def test_linear_solver_budget_too_small_is_reported():
    q = quadratic_problem(8, 3, seed=8, learned_init=True, condition=100.0)
    est = bl.IMAML(lam=0.1, linear_solver=bl.CG(max_steps=2))
    hg = bl.hypergrad(q.problem, q.hparams(), inner=bl.GradientDescent(lr=0.005, steps=5), estimator=est,
                      throw=False)
    assert hg.result is bl.RESULTS.linear_max_steps


def _task_problem(q):
    def g(x, y, c):
        return 0.5 * y["y"] @ (q.A @ y["y"]) - y["y"] @ (q.B @ x["x"] + c)

    def f(x, y, t):
        return 0.5 * ((y["y"] - t) ** 2).sum()

    return bl.BilevelProblem(inner=g, outer=f, init=lambda x: {"y": q.P @ x["x"]})


def test_vmap_over_tasks_equals_the_loop():
    q = quadratic_problem(5, 3, seed=9, learned_init=True, condition=3.0)
    problem, x = _task_problem(q), q.hparams()
    gen = torch.Generator().manual_seed(0)
    cs, ts = (torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    est = bl.IMAML(lam=2.0, linear_solver=bl.CG(max_steps=10))
    batched = bl.vmap_hypergrad(problem, x, inner=INNER, estimator=est, inner_batch=cs, outer_batch=ts,
                                in_dims=(None, None, 0, 0))
    for i in range(4):
        one = bl.hypergrad(problem, x, inner=INNER, estimator=est, inner_batch=cs[i], outer_batch=ts[i])
        assert close(batched.value["x"][i], one.value["x"], 1e-12)


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_lam(lam):
    with pytest.raises(ValueError, match=r"IMAML\(lam="):
        bl.IMAML(lam=lam)


def test_bad_options_and_missing_init():
    with pytest.raises(TypeError, match="linear_solver"):
        bl.IMAML(lam=1.0, linear_solver="cg")
    with pytest.raises(ValueError, match="hvp"):
        bl.IMAML(lam=1.0, hvp="sideways")
    q = quadratic_problem(4, 2, seed=0)
    with pytest.raises(ValueError, match=r"IMAML.*no init.*Fix"):
        bl.hypergrad(q.problem, q.hparams(), q.params0(), inner=INNER, estimator=bl.IMAML(lam=1.0))


def test_value_semantics():
    est = bl.IMAML(lam=2.0, linear_solver=bl.CG(max_steps=5))
    assert est == bl.IMAML(lam=2.0, linear_solver=bl.CG(max_steps=5))
    assert hash(est) == hash(bl.IMAML(lam=2.0, linear_solver=bl.CG(max_steps=5)))
    assert repr(est) == "IMAML(lam=2.0, linear_solver=CG(max_steps=5, rtol=1e-10, atol=0.0), hvp='auto')"


def test_nonconvex_mlp_matches_the_dense_implicit_gradient_and_long_itd():
    """On a small tanh network (non-convex inner loss) IMAML is lam (H + lam I)^{-1} grad_y f at y_N
    (dense float64), and ITD through many steps of the proximal problem converges to the same vector,
    so the sign of the implicit term and the proximal centre are right beyond quadratics."""
    from torch.func import functional_call, grad, hessian

    from bilevel.estimators.imaml import proximal_problem

    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
    theta = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in net.named_parameters()}
    sx, qx = (torch.linspace(-2, 2, n, dtype=torch.float64)[:, None] for n in (5, 7))
    sy, qy = torch.sin(2 * sx), torch.sin(2 * qx)

    def mse(params, x, y):
        return ((functional_call(net, params, (x,)) - y) ** 2).mean()

    problem = bl.BilevelProblem(inner=lambda x, y, b: mse(y, *b), outer=lambda x, y, b: mse(y, *b),
                                init=lambda x: dict(x))
    lam, inner = 4.0, bl.GradientDescent(lr=0.1, steps=500)
    hg = bl.hypergrad(problem, theta, inner=inner, estimator=bl.IMAML(lam=lam, linear_solver=bl.CG(max_steps=60)),
                      inner_batch=(sx, sy), outer_batch=(qx, qy))
    keys = list(theta)
    flat = lambda t: torch.cat([t[k].reshape(-1) for k in keys])  # noqa: E731
    sizes = [theta[k].numel() for k in keys]
    unflat = lambda v: {k: c.reshape(theta[k].shape) for k, c in zip(keys, v.split(sizes))}  # noqa: E731
    y = flat(hg.params)
    prox = proximal_problem(problem, lam)
    g_lam = lambda v: prox.inner_value(theta, unflat(v), (sx, sy))  # noqa: E731
    assert torch.linalg.vector_norm(grad(g_lam)(y)) < 1e-9  # y_N is the proximal minimiser
    dense = lam * torch.linalg.solve(hessian(g_lam)(y), grad(lambda v: mse(unflat(v), qx, qy))(y))
    assert close(flat(hg.value), dense, 1e-8)
    itd = bl.hypergrad(prox, theta, inner=inner, estimator=bl.ITD(), inner_batch=(sx, sy), outer_batch=(qx, qy))
    assert close(flat(itd.value), dense, 1e-6)
    assert torch.linalg.vector_norm(dense) > 1e-3  # not a vacuous comparison
