"""Task batching, bad inputs, BatchNorm under vmap, evaluation, the figure and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel._cli import main
from bilevel.datasets import Sinusoid
from bilevel.meta import MAML, TaskPool, Tasks, evaluate, results_table, sinusoid_figure, split


def mlp(out: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, out))


def test_task_pool_draws_distinct_points_and_refuses_too_many_shots() -> None:
    x = torch.arange(40.0).reshape(4, 10, 1)
    pool = TaskPool(x, 2 * x, shots=3, queries=5)
    batch = pool.sample(6, seed=0)
    assert batch.support_x.shape == (6, 3, 1) and batch.query_y.shape == (6, 5, 1)
    both = torch.cat([batch.support_x, batch.query_x], dim=1)[..., 0]
    assert all(len(set(row.tolist())) == 8 for row in both)  # distinct points within a task
    assert all(len({int(v) // 10 for v in row.tolist()}) == 1 for row in both)  # from one task
    assert torch.equal(batch.support_y, 2 * batch.support_x)
    assert torch.equal(pool.sample(6, seed=0).query_x, batch.query_x)
    with pytest.raises(ValueError, match="each task holds only 10 points"):
        TaskPool(x, x, shots=11)
    with pytest.raises(ValueError, match="each task holds only 10 points"):
        TaskPool(x, x, shots=6, queries=5)
    with pytest.raises(ValueError, match="int >= 1"):
        pool.sample(0, seed=0)


def test_split_rejects_malformed_meta_batches() -> None:
    good = Sinusoid(shots=4).sample(3, seed=0)
    (sx, sy), (qx, qy) = split(good)
    assert sx.shape == (3, 4, 1)
    with pytest.raises(TypeError, match="lack the tensors"):
        split((sx, sy))
    with pytest.raises(ValueError, match="0 tasks"):
        split(Tasks(sx[:0], sy[:0], qx[:0], qy[:0]))
    with pytest.raises(ValueError, match="number of tasks"):
        split(Tasks(sx, sy[:2], qx, qy))
    with pytest.raises(ValueError, match="number of points"):
        split(Tasks(sx, sy[:, :3], qx, qy))


def test_model_output_that_does_not_match_the_targets_is_a_clear_error() -> None:
    maml = MAML(mlp(out=3))
    with pytest.raises(ValueError, match=r"predictions of shape \(4, 3\) for targets of shape \(4, 1\)"):
        maml.meta_gradient(maml.init_hparams(), Sinusoid(shots=4).sample(2, seed=0))


def test_batchnorm_runs_under_vmap_with_batch_statistics_and_the_module_is_untouched() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    maml = MAML(net, inner=bl.GradientDescent(lr=0.01, steps=2))
    tasks = Sinusoid(shots=6).sample(4, seed=0)
    mg = maml.meta_gradient(maml.init_hparams(), tasks)
    assert sorted(mg.value) == sorted(k for k, _ in net.named_parameters())
    for key, value in net.state_dict().items():  # running statistics and weights unchanged
        assert torch.equal(value, before[key]), key
    assert net[1].track_running_stats  # the user's module is not converted
    # batch statistics: task 0 alone gives task 0's row of the vmapped result
    one = Tasks(*(t[:1] for t in tasks[:4]))
    torch.testing.assert_close(maml.meta_gradient(maml.init_hparams(), one).value["1.weight"],
                               mg.hypergrad.value["1.weight"][0], rtol=1e-5, atol=1e-6)


def test_evaluate_statistics_and_zero_steps_is_the_start() -> None:
    maml = MAML(mlp())
    theta, tasks = maml.init_hparams(), Sinusoid(shots=5, queries=20).sample(50, seed=1)
    ev = evaluate(maml, theta, tasks, steps=(0, 1, 3))
    assert ev.losses.shape == (3, 50)
    pre = ((torch.func.functional_call(maml.model, theta, (tasks.query_x,)) - tasks.query_y) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(ev.losses[0], pre)
    row = ev.losses[1].double()
    assert ev.ci95(1) == pytest.approx(1.96 * float(row.std()) / math.sqrt(50))
    table = results_table({"maml": ev}, steps=(1, 3))
    assert table.splitlines()[0] == "| method | 1 step | 3 steps |"
    assert f"{ev.mean(3):.3f} ± {ev.ci95(3):.3f}" in table
    with pytest.raises(ValueError, match="step counts"):
        evaluate(maml, theta, tasks, steps=(-1,))


def test_sinusoid_figure_is_a_png(tmp_path) -> None:
    maml = MAML(mlp())
    sinusoid_figure(maml, maml.init_hparams(), Sinusoid(shots=5).sample(2, seed=0), tmp_path / "fig.png", panels=1)
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_meta_train_command_writes_every_output_and_resumes(tmp_path, capsys) -> None:
    args = ["meta-train", "--method", "metasgd", "--task", "sinusoid-freq", "--iterations", "4", "--meta-batch", "3",
            "--val-every", "2", "--checkpoint-every", "2", "--eval-tasks", "8", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    for name in ("checkpoint.pt", "metrics.csv", "figure.png", "results.md", "results.json"):
        assert (tmp_path / name).exists(), name
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["iterations"] == 4 and set(summary["mse"]) == {"0", "1", "5", "10"}
    assert "metasgd (4 it.)" in capsys.readouterr().out
    assert main([*args[:6], "6", *args[7:]]) == 0  # resumes from iteration 4
    assert json.loads((tmp_path / "results.json").read_text())["iterations"] == 6
    with pytest.raises(SystemExit) as exit_info:  # another configuration in the same folder
        main([*args[:6], "6", *args[7:], "--outer-lr", "0.01"])
    assert exit_info.value.code == 2
    assert "different configuration" in capsys.readouterr().err


def test_meta_train_command_usage_errors(tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["meta-train", "--shots", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["meta-train", "--meta-batch", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["meta-train", "--method", "protonet"])
