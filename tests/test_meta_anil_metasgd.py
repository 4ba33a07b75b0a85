"""ANIL (only the head adapts) and Meta-SGD (learned per-weight step sizes) against closed forms, float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel.meta import ANIL, LearnedSGD, MetaSGD, Tasks

from test_meta_maml import D, grad_mse, hessian, linear_net, linear_tasks, per_task


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def sinusoid_tasks(n: int = 3) -> Tasks:
    return bl.datasets.Sinusoid(shots=5, dtype=D).sample(n, seed=7)


def finite_difference(learner, theta, tasks, key, index, eps=1e-6) -> float:
    def meta_loss(delta: float) -> float:
        x = {k: v.clone() for k, v in theta.items()}
        x[key].view(-1)[index] += delta
        return float(learner.losses(x, learner.adapt(x, tasks), tasks).mean())
    return (meta_loss(eps) - meta_loss(-eps)) / (2 * eps)


def test_anil_adapts_only_the_head_and_the_body_stays_put() -> None:
    anil = ANIL(small_mlp(), inner=bl.GradientDescent(lr=0.1, steps=3))
    theta = anil.init_hparams()
    assert anil.head_names(theta) == ("4.weight", "4.bias")
    adapted = anil.adapt(theta, sinusoid_tasks())
    assert sorted(adapted) == ["4.bias", "4.weight"]
    assert not torch.equal(adapted["4.weight"][0], theta["4.weight"])  # the head moved
    mg = anil.meta_gradient(theta, sinusoid_tasks(), return_params=True)
    assert sorted(mg.value) == sorted(theta)  # body and head init are both meta-learned
    assert sorted(mg.hypergrad.params) == ["4.bias", "4.weight"]
    assert anil.meta_gradient(theta, sinusoid_tasks()).hypergrad.params is None  # not asked for


@pytest.mark.parametrize("key,index", [("0.weight", 2), ("2.bias", 4), ("4.weight", 1), ("4.bias", 0)])
def test_anil_meta_gradient_matches_finite_differences(key: str, index: int) -> None:
    anil = ANIL(small_mlp(), inner=bl.GradientDescent(lr=0.1, steps=3))
    theta, tasks = anil.init_hparams(), sinusoid_tasks()
    got = anil.meta_gradient(theta, tasks).value[key].reshape(-1)[index]
    assert float(got) == pytest.approx(finite_difference(anil, theta, tasks, key, index), rel=1e-6, abs=1e-9)


def test_anil_head_selection_and_errors() -> None:
    net = small_mlp()
    assert ANIL(net, head="2").head_names(ANIL(net).init_hparams()) == ("2.weight", "2.bias")
    with pytest.raises(ValueError, match="no parameter matches"):
        ANIL(net, head=("fc",)).init_hparams()
    with pytest.raises(ValueError, match="every parameter"):
        ANIL(nn.Linear(2, 1)).init_hparams()
    with pytest.raises(ValueError, match="head cannot be found"):
        ANIL(lambda p, x: x @ p["w"])


def test_meta_sgd_one_step_gradient_for_weights_and_step_sizes() -> None:
    tasks, msgd = linear_tasks(), MetaSGD(linear_net(), init_lr=0.05)
    theta = msgd.init_hparams()
    gen = torch.Generator().manual_seed(0)
    theta["lr.weight"] = 0.02 + 0.06 * torch.rand(1, 3, generator=gen, dtype=D)  # distinct step sizes
    mg = msgd.meta_gradient(theta, tasks)
    w, a = theta["weight"].T, theta["lr.weight"].T
    g_w, g_a = [], []
    for sx, sy, qx, qy in per_task(tasks):
        inner_grad = grad_mse(w, sx, sy)
        outer_grad = grad_mse(w - a * inner_grad, qx, qy)
        g_w.append((torch.eye(3, dtype=D) - hessian(sx) * a.T) @ outer_grad)  # (I - H diag(a)) grad
        g_a.append(-inner_grad * outer_grad)
    torch.testing.assert_close(mg.value["weight"], torch.stack(g_w).mean(0).T, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(mg.value["lr.weight"], torch.stack(g_a).mean(0).T, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("key,index", [("lr.0.weight", 3), ("lr.4.bias", 0), ("2.weight", 7)])
def test_meta_sgd_two_steps_matches_finite_differences(key: str, index: int) -> None:
    msgd = MetaSGD(small_mlp(), inner=LearnedSGD(steps=2), init_lr=0.05)
    theta, tasks = msgd.init_hparams(), sinusoid_tasks()
    got = msgd.meta_gradient(theta, tasks).value[key].reshape(-1)[index]
    assert float(got) == pytest.approx(finite_difference(msgd, theta, tasks, key, index), rel=1e-6, abs=1e-9)


def test_meta_sgd_with_a_uniform_step_size_is_maml_and_first_order_leaves_alpha_alone() -> None:
    tasks = sinusoid_tasks()
    msgd, maml = MetaSGD(small_mlp(), init_lr=0.05), bl.meta.MAML(small_mlp(), inner=bl.GradientDescent(lr=0.05, steps=1))
    theta = maml.init_hparams()
    got = msgd.meta_gradient(msgd.init_hparams(), tasks).value
    for key, value in maml.meta_gradient(theta, tasks).value.items():
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-14)
    first = MetaSGD(small_mlp(), init_lr=0.05, estimator=bl.FirstOrder()).meta_gradient(msgd.init_hparams(), tasks)
    assert all(torch.count_nonzero(v) == 0 for k, v in first.value.items() if k.startswith("lr."))
    assert msgd.step_sizes(msgd.init_hparams()).keys() == theta.keys()


def test_learned_sgd_needs_a_step_size_per_weight() -> None:
    with pytest.raises(ValueError, match="'lr.w'.*is missing"):
        LearnedSGD().init({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="has shape"):
        LearnedSGD().init({"w": torch.zeros(2), "lr.w": torch.zeros(3)})
    with pytest.raises(TypeError, match="LearnedSGD"):
        MetaSGD(small_mlp(), inner=bl.GradientDescent(lr=0.1))
    clash = nn.Module()
    clash.lr = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="already start with the step-size prefix"):
        MetaSGD(lambda p, x: x, ).init_hparams({"lr.weight": torch.zeros(1)})
