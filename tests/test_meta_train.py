"""The meta-training loop: exact resume, atomic and validated checkpoints, budgets, metrics."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel.datasets import Sinusoid
from bilevel.meta import MAML, CheckpointError, Trainer, load_checkpoint, save_checkpoint
from bilevel.meta import checkpoint as checkpoint_module


def learner(estimator=None) -> MAML:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    return MAML(net, estimator=estimator or bl.ITD())


def trainer(**kw) -> Trainer:
    options = dict(iterations=8, meta_batch=3, val_every=2, val_tasks=4, checkpoint_every=4, progress=False,
                   outer_lr=1e-2, seed=3)
    return Trainer(**{**options, **kw})


class Killed(Exception):
    pass


def kill_at(iteration: int):
    def callback(step, hparams, mg):
        if step == iteration:
            raise Killed
    return callback


@pytest.mark.parametrize("estimator", [bl.ITD(), bl.ESJ(directions=3, smoothing=1e-2, seed=5)], ids=["ITD", "ESJ"])
def test_killed_and_resumed_run_ends_with_identical_parameters(tmp_path, estimator) -> None:
    family = Sinusoid(shots=5)
    straight = trainer().run(learner(estimator), family, tmp_path / "straight")
    with pytest.raises(Killed):  # dies between the checkpoints at 4 and 8
        trainer().run(learner(estimator), family, tmp_path / "resumed", callback=kill_at(6))
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["iteration"] == 4
    resumed = trainer().run(learner(estimator), family, tmp_path / "resumed")
    assert resumed.iteration == straight.iteration == 8
    for key, value in straight.hparams.items():
        assert torch.equal(value, resumed.hparams[key]), key
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in straight.history]
    with open(tmp_path / "resumed" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["iteration"]) for r in rows] == [2, 4, 6, 8]


def test_resume_extends_a_finished_run_and_a_done_run_is_a_no_op(tmp_path) -> None:
    family = Sinusoid(shots=5)
    full = trainer().run(learner(), family, tmp_path / "full")
    trainer(iterations=4).run(learner(), family, tmp_path / "parts")
    extended = trainer().run(learner(), family, tmp_path / "parts")
    for key, value in full.hparams.items():
        assert torch.equal(value, extended.hparams[key])
    again = trainer().run(learner(), family, tmp_path / "parts")
    assert again.stopped == "done" and again.iteration == 8


def test_checkpoint_from_a_different_configuration_is_refused(tmp_path) -> None:
    family = Sinusoid(shots=5)
    trainer(iterations=2).run(learner(), family, tmp_path)
    with pytest.raises(CheckpointError, match="meta_batch: 3 in the checkpoint, 4 now"):
        trainer(meta_batch=4).run(learner(), family, tmp_path)
    with pytest.raises(CheckpointError, match="family"):
        trainer().run(learner(), Sinusoid(shots=6), tmp_path)
    fresh = trainer(iterations=2, meta_batch=4).run(learner(), family, tmp_path, resume=False)
    assert fresh.iteration == 2


def test_a_checkpoint_from_before_on_failure_existed_resumes_as_raise(tmp_path) -> None:
    family = Sinusoid(shots=5)
    trainer(iterations=2).run(learner(), family, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    del state["config"]["on_failure"]  # as written before the option existed
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert trainer(iterations=3).run(learner(), family, tmp_path).iteration == 3
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match="on_failure: 'raise' in the checkpoint, 'drop' now"):
        trainer(iterations=3, on_failure="drop").run(learner(), family, tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-a-checkpoint"])
def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, damage) -> None:
    trainer(iterations=2).run(learner(), Sinusoid(shots=5), tmp_path)
    path = tmp_path / "checkpoint.pt"
    if damage == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="checkpoint"):
        trainer().run(learner(), Sinusoid(shots=5), tmp_path)


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"iteration": 1})
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"iteration": 2})
    assert path.read_bytes() == before
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_time_budget_stops_and_checkpoints(tmp_path) -> None:
    out = trainer(iterations=10**6, minutes=1e-9).run(learner(), Sinusoid(shots=5), tmp_path)
    assert out.stopped == "minutes" and out.iteration == 1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["iteration"] == 1
    assert len(out.history) == 1


def test_training_reduces_the_validation_loss_without_an_out_folder() -> None:
    out = trainer(iterations=60, val_every=30, meta_batch=10).run(learner(), Sinusoid(shots=10), None)
    assert out.history[-1]["val_loss"] < out.history[0]["val_loss"]


def test_bad_trainer_options() -> None:
    with pytest.raises(ValueError, match="meta-batch size must be an int >= 1"):
        Trainer(meta_batch=0)
    with pytest.raises(ValueError, match="iterations"):
        Trainer(iterations=-1)
    with pytest.raises(ValueError, match="minutes"):
        Trainer(minutes=0)
    with pytest.raises(ValueError, match="optimizer"):
        Trainer(optimizer="lbfgs")


class FixedTasks:
    """A 'family' that always returns the same meta-batch: tasks 2 and 3 have inputs 10x larger,
    so a step size stable for tasks 0 and 1 makes their inner loop diverge."""

    def __init__(self) -> None:
        from test_meta_maml import linear_tasks
        t = linear_tasks(tasks=4)
        scale = torch.tensor([1.0, 1.0, 10.0, 10.0], dtype=torch.float64)[:, None, None]
        self.tasks = bl.meta.Tasks(t.support_x * scale, t.support_y * scale, t.query_x, t.query_y)

    def sample(self, num_tasks, seed):
        return self.tasks

    def __repr__(self) -> str:
        return "FixedTasks()"


def test_failed_tasks_stop_training_or_are_dropped_and_counted() -> None:
    from test_meta_maml import linear_net
    maml = MAML(linear_net(), inner=bl.GradientDescent(lr=0.2, steps=3))
    with pytest.raises(bl.BilevelError, match="inner_diverged"):
        trainer(iterations=2).run(maml, FixedTasks(), None)
    out = trainer(iterations=2, on_failure="drop").run(maml, FixedTasks(), None)
    assert [row["dropped_tasks"] for row in out.history] == [4]  # 2 failed tasks in each of 2 steps
    fresh = MAML(linear_net(), inner=bl.GradientDescent(lr=0.2, steps=3))
    good = bl.meta.Tasks(*(t[:2] for t in FixedTasks().tasks))
    w = fresh.init_hparams()["weight"]
    adam = torch.optim.Adam([w], lr=1e-2)
    for _ in range(2):  # the same two steps on tasks 0 and 1 alone
        w.grad = fresh.meta_gradient({"weight": w}, good).value["weight"]
        adam.step()
    torch.testing.assert_close(out.hparams["weight"], w)
