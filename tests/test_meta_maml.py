"""MAML and its estimator variants (FO-MAML, iMAML, ES-MAML, Reptile) against closed forms, float64.

On a linear model with the MSE loss the inner problem of a task is the quadratic
L_S(w) = ||X_S w - y_S||^2 / K with Hessian H_S = 2 X_S^T X_S / K, so every meta-gradient has a
closed form that we derive by hand below.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel.meta import MAML, Tasks

D = torch.float64


def linear_tasks(tasks: int = 4, shots: int = 6, queries: int = 7, dim: int = 3, seed: int = 0) -> Tasks:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(tasks, dim, 1, generator=gen, dtype=D)
    sx = torch.randn(tasks, shots, dim, generator=gen, dtype=D)
    qx = torch.randn(tasks, queries, dim, generator=gen, dtype=D)
    noise = lambda x: 0.1 * torch.randn(x.shape[:2] + (1,), generator=gen, dtype=D)
    return Tasks(sx, sx @ w + noise(sx), qx, qx @ w + noise(qx))


def linear_net(dim: int = 3) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(dim, 1, bias=False).double()


def grad_mse(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of ||x w - y||^2 / n with respect to the column w."""
    return 2.0 / x.shape[0] * x.T @ (x @ w - y)


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T @ x


def per_task(tasks: Tasks):
    for t in range(tasks.support_x.shape[0]):
        yield tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]


def test_maml_one_step_equals_hand_derived_second_order_gradient() -> None:
    alpha, tasks, net = 0.05, linear_tasks(), linear_net()
    maml = MAML(net, inner=bl.GradientDescent(lr=alpha, steps=1))
    theta = maml.init_hparams()
    mg = maml.meta_gradient(theta, tasks)
    w, expected = theta["weight"].T, []
    for sx, sy, qx, qy in per_task(tasks):
        adapted = w - alpha * grad_mse(w, sx, sy)
        expected.append((torch.eye(3, dtype=D) - alpha * hessian(sx)) @ grad_mse(adapted, qx, qy))
    torch.testing.assert_close(mg.value["weight"], torch.stack(expected).mean(0).T, rtol=1e-12, atol=1e-12)
    assert mg.hypergrad.value["weight"].shape == (4, 1, 3)  # per-task values are kept


def test_fomaml_drops_the_hessian_term() -> None:
    alpha, tasks, net = 0.05, linear_tasks(), linear_net()
    fomaml = MAML(net, inner=bl.GradientDescent(lr=alpha, steps=1), estimator=bl.FirstOrder())
    theta = fomaml.init_hparams()
    w = theta["weight"].T
    expected = [grad_mse(w - alpha * grad_mse(w, sx, sy), qx, qy) for sx, sy, qx, qy in per_task(tasks)]
    torch.testing.assert_close(fomaml.meta_gradient(theta, tasks).value["weight"],
                               torch.stack(expected).mean(0).T, rtol=1e-12, atol=1e-12)


def test_maml_three_steps_matches_unrolled_closed_form_and_finite_differences() -> None:
    alpha, steps, tasks, net = 0.05, 3, linear_tasks(), linear_net()
    maml = MAML(net, inner=bl.GradientDescent(lr=alpha, steps=steps))
    theta = maml.init_hparams()
    mg = maml.meta_gradient(theta, tasks)
    w, expected = theta["weight"].T, []
    for sx, sy, qx, qy in per_task(tasks):
        y = w
        for _ in range(steps):
            y = y - alpha * grad_mse(y, sx, sy)
        jac = torch.linalg.matrix_power(torch.eye(3, dtype=D) - alpha * hessian(sx), steps)
        expected.append(jac @ grad_mse(y, qx, qy))  # the Jacobian is symmetric
    torch.testing.assert_close(mg.value["weight"], torch.stack(expected).mean(0).T, rtol=1e-11, atol=1e-12)

    def meta_loss(weight: torch.Tensor) -> float:
        adapted = maml.adapt({"weight": weight}, tasks)
        return float(maml.losses({"weight": weight}, adapted, tasks).mean())

    eps, fd = 1e-6, torch.zeros(1, 3, dtype=D)
    for i in range(3):
        e = torch.zeros(1, 3, dtype=D)
        e[0, i] = eps
        fd[0, i] = (meta_loss(theta["weight"] + e) - meta_loss(theta["weight"] - e)) / (2 * eps)
    torch.testing.assert_close(mg.value["weight"], fd, rtol=1e-6, atol=1e-8)


def test_vmapped_meta_batch_equals_per_task_autograd_loop_on_an_mlp() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    tasks = bl.datasets.Sinusoid(shots=5, dtype=D).sample(5, seed=3)
    alpha, steps = 0.02, 2
    maml = MAML(net, inner=bl.GradientDescent(lr=alpha, steps=steps))
    theta = maml.init_hparams()
    mg = maml.meta_gradient(theta, tasks)
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    total = 0.0
    for sx, sy, qx, qy in per_task(tasks):
        params = dict(leaves)
        for _ in range(steps):
            loss = ((torch.func.functional_call(net, params, (sx,)) - sy) ** 2).mean()
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {k: v - alpha * g for (k, v), g in zip(params.items(), grads)}
        total = total + ((torch.func.functional_call(net, params, (qx,)) - qy) ** 2).mean()
    expected = torch.autograd.grad(total / 5, list(leaves.values()))
    for (key, value), ref in zip(mg.value.items(), expected):
        torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12, msg=key)
    for t in range(5):  # one task at a time gives that task's row of the vmapped result
        one = Tasks(*(x[t:t + 1] for x in tasks[:4]))
        torch.testing.assert_close(maml.meta_gradient(theta, one).value["0.weight"],
                                   mg.hypergrad.value["0.weight"][t], rtol=1e-12, atol=1e-13)


def test_imaml_on_a_linear_model_equals_the_implicit_closed_form() -> None:
    alpha, lam, tasks, net = 0.1, 2.0, linear_tasks(), linear_net()
    imaml = MAML(net, inner=bl.GradientDescent(lr=alpha, steps=150),
                 estimator=bl.IMAML(lam=lam, linear_solver=bl.CG(max_steps=10, rtol=1e-12)))
    theta = imaml.init_hparams()
    mg = imaml.meta_gradient(theta, tasks)
    w, eye, expected = theta["weight"].T, torch.eye(3, dtype=D), []
    for sx, sy, qx, qy in per_task(tasks):
        h = hessian(sx)
        y_star = torch.linalg.solve(h + lam * eye, 2.0 / sx.shape[0] * sx.T @ sy + lam * w)  # prox optimum
        expected.append(torch.linalg.solve(eye + h / lam, grad_mse(y_star, qx, qy)))
    torch.testing.assert_close(mg.value["weight"], torch.stack(expected).mean(0).T, rtol=1e-8, atol=1e-10)


def test_reptile_direction_is_init_minus_adapted_weights() -> None:
    alpha, tasks, net = 0.05, linear_tasks(), linear_net()
    reptile = MAML(net, inner=bl.GradientDescent(lr=alpha, steps=4), estimator=bl.Reptile())
    theta = reptile.init_hparams()
    adapted = reptile.adapt(theta, tasks)
    torch.testing.assert_close(reptile.meta_gradient(theta, tasks).value["weight"],
                               (theta["weight"] - adapted["weight"]).mean(0), rtol=1e-12, atol=1e-14)


def test_esj_maml_is_unbiased_for_an_affine_inner_map() -> None:
    alpha, tasks, net = 0.05, linear_tasks(tasks=2), linear_net()
    exact = MAML(net, inner=bl.GradientDescent(lr=alpha, steps=1))
    es = MAML(net, inner=bl.GradientDescent(lr=alpha, steps=1),
              estimator=bl.ESJ(directions=4000, smoothing=1e-3, seed=0, distribution="sphere"))
    theta = exact.init_hparams()
    got, want = es.meta_gradient(theta, tasks).value["weight"], exact.meta_gradient(theta, tasks).value["weight"]
    assert torch.linalg.norm(got - want) < 0.15 * torch.linalg.norm(want)


def test_aid_cannot_see_a_learned_start_and_says_so() -> None:
    maml = MAML(linear_net(), estimator=bl.AID())
    with pytest.raises(bl.BilevelError, match="zero_hypergradient"):
        maml.meta_gradient(maml.init_hparams(), linear_tasks())


def test_functional_forward_and_init_hparams_from_params() -> None:
    forward = lambda p, x: x @ p["w"]
    maml = MAML(forward, inner=bl.GradientDescent(lr=0.05, steps=1))
    with pytest.raises(TypeError, match="plain function"):
        maml.init_hparams()
    theta = maml.init_hparams({"w": torch.zeros(3, 1, dtype=D)})
    module = MAML(linear_net(), inner=bl.GradientDescent(lr=0.05, steps=1))
    torch.testing.assert_close(maml.meta_gradient(theta, linear_tasks()).value["w"],
                               module.meta_gradient({"weight": torch.zeros(1, 3, dtype=D)},
                                                    linear_tasks()).value["weight"].T)
