"""Few-shot classification: the functional conv net, BatchNorm under vmap, every learner's meta-step on
random images, vmapped meta-gradients against a per-task autograd loop, and a real-Omniglot smoke test."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from bilevel.datasets import Omniglot
from bilevel.meta import cross_entropy
from bilevel.meta.convnet import ConvNet
import bilevel as bl
from bilevel.meta.omniglot_cli import plot, read_curve, time_to
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
    # iMAML's 5 CG steps need not reach rtol 0.1 on random images (status recorded, estimate kept).
    mg = learner.meta_gradient(theta, tasks, throw=method != "imaml")
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
    (["--method", "reptile", "--shots", "1", "--val-acc-every", "0"], "--val-acc-every 0"),
    (["--shots", "1", "--eval-queries", "20"], "shots + queries <= 20"),
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


def _flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def _unflat(vec: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def _inner_loop(net, theta, sx, sy, alpha: float, steps: int, prox: float = 0.0) -> dict[str, torch.Tensor]:
    """Plain gradient descent on the support loss (+ prox/2 ||y - theta||^2), detached."""
    y = {k: v.detach().clone() for k, v in theta.items()}
    for _ in range(steps):
        y = {k: v.requires_grad_(True) for k, v in y.items()}
        loss = cross_entropy(net(y, sx), sy) + 0.5 * prox * sum(((y[k] - theta[k]) ** 2).sum() for k in y)
        grads = torch.autograd.grad(loss, list(y.values()))
        y = {k: (v - alpha * g).detach() for (k, v), g in zip(y.items(), grads)}
    return y


def test_reptile_meta_gradient_is_mean_of_theta_minus_adapted() -> None:
    alpha, steps = 0.2, 3
    learner, theta = make_learner("reptile", WAYS, hidden=3, inner_lr=alpha, inner_steps=steps,
                                  dtype=torch.float64, seed=7)
    tasks = family(dtype=torch.float64).sample(3, seed=8)
    mg = learner.meta_gradient(theta, tasks)
    expected = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(3):
        y = _inner_loop(learner.model, theta, tasks.support_x[t], tasks.support_y[t], alpha, steps)
        for k in theta:
            expected[k] += (theta[k] - y[k]) / 3
    for k in theta:
        torch.testing.assert_close(mg.value[k], expected[k], rtol=1e-8, atol=1e-12, msg=k)


def test_imaml_meta_gradient_equals_dense_implicit_formula() -> None:
    """(I + H/lam)^{-1} grad f at the proximal inner solution, H the support-loss Hessian there."""
    alpha, steps, lam = 0.02, 4, 2.0
    learner, theta = make_learner("imaml", WAYS, hidden=2, inner_lr=alpha, inner_steps=steps, lam=lam,
                                  dtype=torch.float64, seed=9)
    assert learner.estimator.lam == lam and learner.inner.steps == steps
    exact = dataclasses.replace(learner, estimator=bl.IMAML(lam=lam, linear_solver=bl.Dense(), hvp="reverse"))
    tasks = family(dtype=torch.float64).sample(2, seed=10)
    mg = exact.meta_gradient(theta, tasks)
    net, expected = learner.model, torch.zeros_like(_flat(theta))
    for t in range(2):
        sx, sy, qx, qy = tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
        y = _inner_loop(net, theta, sx, sy, alpha, steps, prox=lam)
        hess = torch.autograd.functional.hessian(lambda v: cross_entropy(net(_unflat(v, y), sx), sy), _flat(y))
        yq = {k: v.clone().requires_grad_(True) for k, v in y.items()}
        gf = _flat(dict(zip(yq, torch.autograd.grad(cross_entropy(net(yq, qx), qy), list(yq.values())))))
        expected += torch.linalg.solve(torch.eye(len(gf), dtype=gf.dtype) + hess / lam, gf) / 2
    torch.testing.assert_close(_flat(mg.value), expected, rtol=1e-6, atol=1e-9)


def test_esj_meta_gradient_approaches_anil_with_many_directions() -> None:
    """ESJ on ANIL: exact direct term plus an ES estimate of J^T grad f; with many directions its
    meta-gradient lines up with ANIL's exact (ITD) one, and better than with few."""
    tasks = family(dtype=torch.float64).sample(2, seed=11)
    exact, theta = make_learner("anil", WAYS, hidden=3, inner_lr=0.3, inner_steps=2, dtype=torch.float64, seed=12)
    a = _flat(exact.meta_gradient(theta, tasks).value)

    def cosine(directions: int) -> float:
        esj, _ = make_learner("esj", WAYS, hidden=3, inner_lr=0.3, inner_steps=2, dtype=torch.float64, seed=12,
                              directions=directions, smoothing=1e-5)
        assert isinstance(esj.estimator, bl.ESJ) and esj.head == exact.head
        return float(torch.nn.functional.cosine_similarity(a, _flat(esj.meta_gradient(theta, tasks).value), dim=0))

    many, few = cosine(1000), cosine(10)
    assert many > 0.9 and few < many


def test_time_to_and_plot(tmp_path) -> None:
    runs = []
    for name, accs in (("a", [0.2, 0.91, 0.96]), ("b", [0.3, 0.5, 0.8])):
        run = tmp_path / name
        run.mkdir()
        lines = ["iteration,train_s,cpu_s,val_acc,val_ci95"]
        lines += [f"{50 * i},{10.0 * i},{9.0 * i},{acc},0.01" for i, acc in enumerate(accs)]
        (run / "curve.csv").write_text("\n".join(lines) + "\n")
        (run / "results.json").write_text(json.dumps({"method": name}))
        runs.append(run)
    rows = read_curve(runs[0] / "curve.csv")
    assert time_to(rows, 0.9) == (10.0, 50) and time_to(rows, 0.95) == (20.0, 100) and time_to(rows, 0.97) is None
    paths = plot(runs, tmp_path / "fig" / "omni", title="t")
    assert [p.name for p in paths] == ["omni_seconds.png", "omni_cpu_seconds.png", "omni_iterations.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError, match="no curve.csv"):
        plot([tmp_path], tmp_path / "x")


def test_cli_omniglot_writes_curve_and_resumes(tmp_path) -> None:
    from bilevel._cli import main

    data = data_dir("omniglot")
    out = tmp_path / "run"
    argv = ["meta-train", "--task", "omniglot", "--method", "shared-ridge", "--ways", "3", "--shots", "1",
            "--queries", "2", "--meta-batch", "2", "--val-acc-every", "2", "--val-episodes", "3",
            "--eval-tasks", "4", "--eval-queries", "2", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main([*argv, "--iterations", "3"]) == 0
    rows = read_curve(out / "curve.csv")
    assert [r["iteration"] for r in rows] == [0, 2, 3]
    assert all(0 <= r["val_acc"] <= 1 for r in rows) and rows[-1]["train_s"] > 0
    assert main([*argv, "--iterations", "5"]) == 0  # resumes at 3: one more point at 4, then 5
    summary = json.loads((out / "results.json").read_text())
    assert [r["iteration"] for r in read_curve(out / "curve.csv")] == [0, 2, 3, 4, 5]
    assert summary["iterations"] == 5 and 0 <= summary["accuracy"]["mean"] <= 1
    # the recorded command reproduces the run whatever started it (here main() from Python)
    assert summary["command"].startswith("bilevel meta-train --task omniglot --method shared-ridge")
    assert all(f" {w} " in summary["command"] + " " for w in ("--ways 3", "--queries 2", "--iterations 5", f"--out {out}"))
    assert f"`{summary['command']}`" in (out / "results.md").read_text()


def test_cli_reports_a_failed_solve_without_a_traceback(tmp_path, capsys) -> None:
    from bilevel._cli import main

    data = data_dir("omniglot")
    argv = ["meta-train", "--task", "omniglot", "--method", "maml", "--inner-steps", "3", "--inner-lr", "1000",
            "--ways", "3", "--shots", "1", "--queries", "2", "--meta-batch", "2", "--val-acc-every", "2",
            "--val-episodes", "2", "--eval-tasks", "2", "--eval-queries", "2", "--iterations", "2",
            "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "\nbilevel meta-train: error: " in err and "inner_diverged" in err
    assert "lower the inner step size (lr=1000" in err and "--drop-failed-tasks" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("extra,lr,steps", [([], 1.0, 30), (["--inner-lr", "0.5", "--inner-steps", "4"], 0.5, 4)])
def test_cli_shared_softmax_head_step_is_in_units_of_one_over_L(tmp_path, extra, lr, steps) -> None:
    from bilevel._cli import main

    out = tmp_path / "run"
    argv = ["meta-train", "--task", "omniglot", "--method", "shared-softmax", "--ways", "3", "--shots", "1",
            "--queries", "2", "--meta-batch", "2", "--val-acc-every", "2", "--val-episodes", "2", "--eval-tasks", "2",
            "--eval-queries", "2", "--iterations", "2", "--data", str(data_dir("omniglot")), "--out", str(out),
            "--no-progress", *extra]
    assert main(argv) == 0
    learner = (out / "results.md").read_text()
    assert f"GradientDescent(lr={lr}, steps={steps}" in learner and "scaled_step=True" in learner
    assert json.loads((out / "results.json").read_text())["iterations"] == 2


def test_make_learner_shared_softmax_defaults() -> None:
    learner, _ = make_learner("shared-softmax", WAYS, hidden=4)
    assert learner.inner == bl.GradientDescent(lr=1.0, steps=30) and learner.head.scaled_step
    assert make_learner("maml", WAYS, hidden=4)[0].inner.lr == 0.4  # the others keep Finn et al.'s 0.4
