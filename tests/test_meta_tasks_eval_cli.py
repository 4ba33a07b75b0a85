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
from bilevel.meta import MAML, Evaluation, TaskPool, Tasks, evaluate, results_table, sinusoid_figure, split


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
    with pytest.raises(ValueError, match="at least one support and one query point; got 0 support"):
        split(Tasks(sx[:, :0], sy[:, :0], qx, qy))
    with pytest.raises(ValueError, match="got 4 support and 0 query points"):
        evaluate(MAML(mlp()), MAML(mlp()).init_hparams(), Tasks(sx, sy, qx[:, :0], qy[:, :0]))


def test_model_output_that_does_not_match_the_targets_is_a_clear_error() -> None:
    maml = MAML(mlp(out=3))
    with pytest.raises(ValueError, match=r"predictions of shape \(4, 3\) for targets of shape \(4, 1\)"):
        maml.meta_gradient(maml.init_hparams(), Sinusoid(shots=4).sample(2, seed=0))
    with pytest.raises(ValueError, match=r"predictions of shape \(4, 3\) for targets of shape \(4, 1\)"):
        evaluate(maml, maml.init_hparams(), Sinusoid(shots=4).sample(2, seed=0))


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


def linear_tasks(xs: list[float]) -> Tasks:
    """One task per support input ``x`` (three copies of the point), target ``y = x``, query at 1."""
    sx = torch.tensor(xs, dtype=torch.float64)[:, None, None].expand(-1, 3, 1).clone()
    qx = torch.ones(len(xs), 2, 1, dtype=torch.float64)
    return Tasks(sx, sx.clone(), qx, qx.clone())


def test_evaluation_counts_diverged_tasks_and_never_prints_nan() -> None:
    # y = w x with mse: the support Hessian is 2 x^2, so gradient descent of step a from w = 0 gives
    # w_n = 1 - (1 - 2 a x^2)^n; with a = 0.1 it converges for x = 1 and x = 2 (2 a x^2 < 2) and
    # diverges for x = 3 (|1 - 1.8| < 1 is fine, but x = 4: |1 - 3.2| > 1).
    maml = MAML(lambda p, x: x * p["w"], inner=bl.GradientDescent(lr=0.1, steps=1))
    theta = {"w": torch.zeros((), dtype=torch.float64)}
    xs = [1.0, 2.0, 4.0]
    ev = evaluate(maml, theta, linear_tasks(xs), steps=(0, 1, 3))
    query = {n: [(1 - (1 - 0.2 * x * x) ** n - 1) ** 2 for x in xs] for n in (0, 1, 3)}
    torch.testing.assert_close(ev.losses, torch.tensor([query[0], query[1], query[3]], dtype=torch.float64))
    assert ev.support_path.shape == (4, 3)
    assert [ev.num_diverged(n) for n in (0, 1, 3)] == [0, 1, 1]
    assert ev.diverged(3).tolist() == [False, False, True]
    assert ev.mean(3) == pytest.approx(sum(query[3][:2]) / 2)  # over the tasks that did not diverge
    assert ev.median(3) == pytest.approx(sorted(query[3])[1])  # over all tasks
    assert ev.cell(3).endswith("(1 diverged)") and "nan" not in ev.cell(3)
    assert ev.summary(3)["diverged"] == 1 and ev.summary(3)["tasks"] == 3
    with pytest.raises(ValueError, match="5 steps were not evaluated"):
        ev.mean(5)


def test_a_rise_of_the_support_loss_counts_even_if_it_comes_back_down() -> None:
    losses = torch.tensor([[1.0, 1.0], [0.5, 0.4], [0.2, 0.3]])
    path = torch.tensor([[2.0, 2.0], [1.0, 9.0], [0.5, 8.0], [0.4, 1.0], [0.3, 0.5], [0.2, 0.4]])
    ev = Evaluation((0, 1, 5), losses, path)
    assert ev.diverged(0).tolist() == [False, False]
    assert ev.diverged(1).tolist() == [False, True]
    assert ev.diverged(5).tolist() == [False, True]  # the loss rose at step 1, fell below the start later
    assert ev.cell(5) == "0.200 (1 task) (1 diverged)"


def test_nonfinite_losses_are_counted_and_all_diverged_is_said_in_words() -> None:
    nan, inf = math.nan, math.inf
    ev = Evaluation((0, 10), torch.tensor([[1.0, 2.0, 3.0], [nan, inf, 0.5]]))
    assert ev.num_diverged(10) == 2 and ev.mean(10) == 0.5 and math.isnan(ev.ci95(10))
    assert ev.median(10) == inf  # NaN counts as +inf
    every = Evaluation((0, 10), torch.tensor([[1.0, 2.0], [nan, nan]]), torch.tensor([[1.0, 1.0], [nan, 3.0]]))
    assert every.cell(10) == "all 2 diverged"
    assert every.summary(10)["mean"] is None and every.summary(10)["diverged"] == 2
    table = results_table({"a": ev, "b": every}, steps=(1, 10), median=True)
    assert "nan" not in table
    assert table.splitlines()[0] == "| method | 1 step | 10 steps | median, 1 step | median, 10 steps |"
    assert table.splitlines()[3] == "| b | — | all 2 diverged | — | inf |"


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
    # Meta-SGD is evaluated after the one step its step sizes were learned for (Li et al.'s protocol)
    assert summary["iterations"] == 4 and set(summary["mse"]) == {"0", "1"}
    assert set(summary["mse"]["1"]) == {"mean", "ci95", "median", "diverged", "tasks"}
    assert summary["mse"]["1"]["tasks"] == 8
    out = capsys.readouterr().out
    assert "metasgd (4 it.)" in out and "| — | — |" in out
    assert "learned step sizes" in (tmp_path / "results.md").read_text()
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


def test_recorded_command_reproduces_the_run_however_it_was_started(tmp_path, monkeypatch) -> None:
    """Regression: ``python -m bilevel.meta.cli ...`` was recorded as ``bilevel --task ...`` (no
    ``meta-train``), and a call from Python recorded whatever ``sys.argv`` held."""
    import argparse
    import shlex

    from bilevel._cli import build_parser
    from bilevel.meta import cli as meta_cli

    monkeypatch.setattr("sys.argv", ["/somewhere/pytest", "-q", "--unrelated"])
    args = ["--task", "sinusoid", "--method", "fomaml", "--iterations", "2", "--meta-batch", "2", "--val-every", "1",
            "--eval-tasks", "4", "--minutes", "5", "--drop-failed-tasks", "--no-progress", "--out", str(tmp_path)]
    assert meta_cli.main(args) == 0  # the python -m entry point, without "meta-train"
    command = json.loads((tmp_path / "results.json").read_text())["command"]
    assert command.startswith("bilevel meta-train ") and "unrelated" not in command
    assert f"Command: `{command}`" in (tmp_path / "results.md").read_text()

    def parsed(argv: list[str]) -> dict:
        return {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k not in ("func", "meta_train_parser")}

    words = shlex.split(command)
    assert words[0] == "bilevel"
    assert parsed(words[1:]) == parsed(["meta-train", *args])
    assert isinstance(build_parser().parse_args(words[1:]), argparse.Namespace)


def test_a_method_the_sinusoid_task_lacks_is_a_usage_error_before_any_work(tmp_path, capsys) -> None:
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        main(["meta-train", "--task", "sinusoid", "--method", "shared-softmax", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--method shared-softmax --task sinusoid" in err and "Traceback" not in err
    assert "maml|fomaml|reptile|anil|metasgd|imaml|esj|shared-ridge" in err and "--task omniglot" in err
    assert not out.exists()  # nothing was trained or written
    with pytest.raises(SystemExit) as exit_info:  # the python -m entry point reports it the same way
        from bilevel.meta import cli as meta_cli
        meta_cli.main(["--task", "sinusoid-freq", "--method", "shared-softmax", "--out", str(out)])
    assert exit_info.value.code == 2 and "--task sinusoid-freq" in capsys.readouterr().err
