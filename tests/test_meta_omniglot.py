"""Few-shot classification: the functional conv net, BatchNorm under vmap, every learner's meta-step on
random images, vmapped meta-gradients against a per-task autograd loop, and a real-Omniglot smoke test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from bilevel.datasets import Omniglot
from bilevel.meta import cross_entropy
from bilevel.meta.convnet import ConvNet
from bilevel.meta.omniglot import METHODS, EpisodeFamily, FewShotAccuracy, accuracy, evaluate_accuracy, make_learner

from tests._data import data_dir

WAYS = 3
IMAGES = torch.rand(12, 20, 28, 28, generator=torch.Generator().manual_seed(0))


def family(one_hot: bool = False, dtype: torch.dtype = torch.float32) -> EpisodeFamily:
    return EpisodeFamily(IMAGES.to(dtype), ways=WAYS, shots=1, queries=2, one_hot=one_hot)


@pytest.mark.parametrize("pool, features", [("max", 16), ("stride", 64)])
def test_convnet_shapes_and_module_agree(pool: str, features: int) -> None:
    spec = ConvNet(ways=5, hidden=16, pool=pool)
    params = spec.init(seed=1, dtype=torch.float64)
    x = torch.rand(7, 1, 28, 28, dtype=torch.float64)
    assert spec.features == features
    assert spec(params, x).shape == (7, 5)
    assert ConvNet(ways=None, hidden=16, pool=pool)(params, x).shape == (7, features)
    module = spec.module().double()
    assert {k: v.shape for k, v in module.named_parameters()} == {k: v.shape for k, v in params.items()}
    torch.testing.assert_close(functional_call(module, params, (x,)), spec(params, x))


def test_convnet_rejects_bad_options_and_inputs() -> None:
    with pytest.raises(ValueError, match="pool='avg'"):
        ConvNet(pool="avg")
    with pytest.raises(ValueError, match="ways=1"):
        ConvNet(ways=1)
    spec = ConvNet(hidden=4)
    with pytest.raises(ValueError, match=r"\(2, 3, 1, 28, 28\)"):
        spec(spec.init(), torch.rand(2, 3, 1, 28, 28))


def test_batchnorm_under_vmap_is_per_task() -> None:
    spec = ConvNet(ways=4, hidden=6)
    params = spec.init(seed=2, dtype=torch.float64)
    x = torch.rand(5, 9, 1, 28, 28, dtype=torch.float64)
    x[2] *= 3.0  # a task with other statistics
    mapped = vmap(spec, in_dims=(None, 0))(params, x)
    looped = torch.stack([spec(params, x[t]) for t in range(5)])
    torch.testing.assert_close(mapped, looped)
    pooled = spec(params, x.flatten(0, 1)).view(5, 9, 4)  # statistics over all tasks at once: different
    assert (pooled - looped).abs().max() > 1e-3
    # The first block's normalised activations have zero mean per task and channel.
    h = F.conv2d(x[2], params["block0.conv.weight"], params["block0.conv.bias"], padding=1)
    z = F.batch_norm(h, None, None, None, None, training=True)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(6, dtype=torch.float64))


def test_accuracy_and_ci() -> None:
    pred = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    labels = torch.tensor([[0, 1], [0, 0]])
    torch.testing.assert_close(accuracy(pred, labels), torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(accuracy(pred, F.one_hot(labels, 2).float()), accuracy(pred, labels))
    result = FewShotAccuracy(torch.tensor([0.5, 1.0, 0.0, 0.5], dtype=torch.float64))
    assert result.mean == 0.5
    assert result.ci95 == pytest.approx(1.96 * (1 / 6) ** 0.5 / 2)
    with pytest.raises(ValueError, match="do not match"):
        accuracy(pred, labels[:, :1])


@pytest.mark.parametrize("method", METHODS)
def test_meta_step_on_random_images(method: str) -> None:
    learner, theta = make_learner(method, WAYS, hidden=4, inner_lr=0.1, seed=3)
    tasks = family(one_hot=method == "shared-ridge").sample(4, seed=4)
    mg = learner.meta_gradient(theta, tasks)
    assert set(mg.value) == set(theta)
    for k, v in mg.value.items():
        assert v.shape == theta[k].shape and torch.isfinite(v).all(), k
    assert torch.isfinite(mg.loss) and mg.hypergrad.value["block0.conv.weight"].shape[0] == 4
    assert sum(float(v.abs().sum()) for v in mg.value.values()) > 0


def _loop_meta_gradient(method: str, learner, theta, tasks, alpha: float) -> dict[str, torch.Tensor]:
    """The mean per-task meta-gradient by plain autograd, one task at a time (no vmap, no estimator)."""
    total = {k: torch.zeros_like(v) for k, v in theta.items()}
    net = learner.model
    for t in range(tasks.support_x.shape[0]):
        x = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
        sx, sy, qx, qy = tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
        if method == "shared-ridge":
            head = learner.head.solve(net(x, sx), sy)
            loss = ((learner.head.predict(head, net(x, qx)) - qy) ** 2).mean()
        else:
            names = ["head.weight", "head.bias"] if method == "anil" else list(x)
            inner_loss = cross_entropy(net(x, sx), sy)
            grads = torch.autograd.grad(inner_loss, [x[k] for k in names], create_graph=method != "fomaml")
            y = dict(x)
            for k, g in zip(names, grads):
                y[k] = x[k] - alpha * g
            if method == "fomaml":
                y = {k: v.detach().requires_grad_(True) for k, v in y.items()}
            loss = cross_entropy(net(y, qx), qy)
            if method == "fomaml":
                x = y
        for k, g in zip(x, torch.autograd.grad(loss, list(x.values()), allow_unused=True)):
            total[k] += torch.zeros_like(total[k]) if g is None else g
    return {k: v / tasks.support_x.shape[0] for k, v in total.items()}


@pytest.mark.parametrize("method", ["maml", "fomaml", "anil", "shared-ridge"])
def test_vmapped_meta_gradient_equals_per_task_loop(method: str) -> None:
    alpha = 0.3
    learner, theta = make_learner(method, WAYS, hidden=3, inner_lr=alpha, dtype=torch.float64, seed=5)
    tasks = family(one_hot=method == "shared-ridge", dtype=torch.float64).sample(3, seed=6)
    mg = learner.meta_gradient(theta, tasks)
    expected = _loop_meta_gradient(method, learner, theta, tasks, alpha)
    for k in theta:
        torch.testing.assert_close(mg.value[k], expected[k], rtol=1e-7, atol=1e-10, msg=k)


def test_evaluate_accuracy_is_seeded_and_counts_episodes() -> None:
    learner, theta = make_learner("anil", WAYS, hidden=4)
    first = evaluate_accuracy(learner, theta, family(), episodes=7, chunk=3)
    again = evaluate_accuracy(learner, theta, family(), episodes=7, chunk=3)
    assert first.per_task.shape == (7,) and ((first.per_task >= 0) & (first.per_task <= 1)).all()
    torch.testing.assert_close(first.per_task, again.per_task)
    with pytest.raises(ValueError, match="episodes=0"):
        evaluate_accuracy(learner, theta, family(), episodes=0)


def test_real_omniglot_meta_step(tmp_path) -> None:
    data = Omniglot(data_dir("omniglot"), "maml-test", cache_dir=tmp_path / "cache")
    fam = EpisodeFamily(data, ways=5, shots=1, queries=3)
    tasks = fam.sample(2, seed=0)
    assert tasks.support_x.shape == (2, 5, 1, 28, 28) and tasks.query_y.shape == (2, 15)
    learner, theta = make_learner("maml", 5, hidden=8)
    mg = learner.meta_gradient(theta, tasks)
    assert all(torch.isfinite(v).all() for v in mg.value.values())
    assert 0.0 <= evaluate_accuracy(learner, theta, fam, episodes=4, chunk=2).mean <= 1.0


@pytest.mark.parametrize("argv, message", [
    (["--method", "reptile"], "not available on Omniglot"),
    (["--shots", "10"], "shots \\+ queries <= 20"),
    (["--ways", "1", "--shots", "1"], "ways >= 2"),
    (["--shots", "1"], "--data /no/such/folder"),
])
def test_cli_omniglot_rejects_bad_options_before_loading(argv: list[str], message: str, capsys) -> None:
    from bilevel._cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["meta-train", "--task", "omniglot", "--data", "/no/such/folder", *argv])
    assert exit_info.value.code == 2
    assert message.replace("\\", "") in capsys.readouterr().err
