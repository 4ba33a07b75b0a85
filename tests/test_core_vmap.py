"""Batches of tasks: ``vmap_hypergrad`` and a user's own ``torch.func.vmap`` equal a Python loop."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.testing import quadratic_problem
from tests.test_core_helpers import rel_err, ridge_tasks

T = 3
ESTIMATORS = {
    "itd": bl.ITD(),
    "fo": bl.FirstOrder(),
    "aid_cg": bl.AID(linear_solver=bl.CG(max_steps=6)),
    "aid_neumann": bl.AID(linear_solver=bl.Neumann(steps=10, alpha=0.2)),
}


@pytest.fixture(scope="module")
def tasks():
    problems, train, val, lr = ridge_tasks(T, n_samples=20, dim=4)
    gen = torch.Generator().manual_seed(0)
    xs = {"log_lam": 0.3 * torch.randn(T, 4, generator=gen, dtype=torch.float64)}
    ys = {"w": 0.1 * torch.randn(T, 4, generator=gen, dtype=torch.float64)}
    return problems[0].problem, train, val, xs, ys, bl.GradientDescent(lr=lr, steps=15)


def _task(tree_or_batch, i):
    if isinstance(tree_or_batch, dict):
        return {k: v[i] for k, v in tree_or_batch.items()}
    return tuple(t[i] for t in tree_or_batch)


def _loop(problem, xs, ys, train, val, inner, estimator, shared: bool):
    out = []
    for i in range(T):
        x = _task(xs, 0) if shared else _task(xs, i)
        y = _task(ys, 0) if shared else _task(ys, i)
        out.append(bl.hypergrad(problem, x, y, inner=inner, estimator=estimator, inner_batch=_task(train, i),
                                outer_batch=_task(val, i)))
    return out


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("in_dims", [(0, 0, 0, 0), (None, None, 0, 0)], ids=["all", "meta"])
def test_vmap_hypergrad_equals_a_loop_over_tasks(tasks, name, in_dims):
    problem, train, val, xs, ys, inner = tasks
    estimator = ESTIMATORS[name]
    shared = in_dims[0] is None
    x, y = (_task(xs, 0), _task(ys, 0)) if shared else (xs, ys)
    hg = bl.vmap_hypergrad(problem, x, y, inner=inner, estimator=estimator, inner_batch=train, outer_batch=val,
                           in_dims=in_dims)
    loop = _loop(problem, xs, ys, train, val, inner, estimator, shared)
    assert hg.result is bl.RESULTS.successful and hg.task_results == [bl.RESULTS.successful] * T
    for i, one in enumerate(loop):
        assert rel_err(_task(hg.value, i), one.value) < 1e-12
        assert rel_err(_task(hg.params, i), one.params) < 1e-12
        assert abs(hg.outer_value[i].item() - one.outer_value.item()) < 1e-12
        for key in ("inner_steps", "linear_steps"):
            assert hg.stats[key][i].item() == one.stats[key]
        if one.adjoint is not None:
            assert rel_err(_task(hg.adjoint, i), one.adjoint) < 1e-12
    assert (hg.adjoint is None) == (loop[0].adjoint is None)
    assert tuple(hg.stats) == bl.STATS_KEYS
    assert hg.stats["num_hvp"] == loop[0].stats["num_hvp"] and hg.stats["num_grad"] == loop[0].stats["num_grad"]


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_a_users_own_vmap_around_hypergrad(tasks, name):
    problem, train, val, xs, ys, inner = tasks
    estimator = ESTIMATORS[name]

    def one(x, y, bi, bo):
        hg = bl.hypergrad(problem, {"log_lam": x}, {"w": y}, inner=inner, estimator=estimator,
                          inner_batch=bi, outer_batch=bo)
        assert isinstance(hg.result, torch.Tensor)  # a status per task, not a RESULTS member
        return hg.value["log_lam"], hg.result

    values, codes = torch.func.vmap(one)(xs["log_lam"], ys["w"], train, val)
    assert codes.dtype == torch.int64 and codes.tolist() == [0] * T
    loop = _loop(problem, xs, ys, train, val, inner, estimator, shared=False)
    for i in range(T):
        assert rel_err(values[i], loop[i].value["log_lam"]) < 1e-12


def test_a_users_own_vmap_returns_failure_codes_without_raising(tasks):
    problem, train, val, xs, ys, _ = tasks
    big = (train[0] * torch.tensor([1.0, 10.0, 1.0], dtype=torch.float64)[:, None, None], train[1])

    def one(bi, bo):
        hg = bl.hypergrad(problem, _task(xs, 0), _task(ys, 0), inner=bl.GradientDescent(lr=0.3, steps=30),
                          estimator=bl.ITD(), inner_batch=bi, outer_batch=bo)
        return hg.result

    codes = torch.func.vmap(one)(big, val)
    assert [bl.RESULTS.from_code(c) for c in codes] == [bl.RESULTS.successful, bl.RESULTS.inner_diverged,
                                                          bl.RESULTS.successful]


def test_vmap_hypergrad_reports_the_failing_task(tasks):
    problem, train, val, xs, ys, _ = tasks
    scale = torch.tensor([1.0, 1.0, 10.0], dtype=torch.float64)[:, None, None]
    big = (train[0] * scale, train[1])  # task 2's inner Hessian is 100x larger: lr 0.3 diverges
    kw = dict(inner=bl.GradientDescent(lr=0.3, steps=30), estimator=bl.AID(linear_solver=bl.CG(max_steps=4)),
              inner_batch=big, outer_batch=val, in_dims=(None, None, 0, 0))
    with pytest.raises(bl.BilevelError, match=r"^vmap_hypergrad\(estimator=.*\(task 2 of 3; 1 failed\): "
                                              r"inner_diverged: .*Fix") as info:
        bl.vmap_hypergrad(problem, _task(xs, 0), _task(ys, 0), **kw)
    assert info.value.result is bl.RESULTS.inner_diverged
    hg = bl.vmap_hypergrad(problem, _task(xs, 0), _task(ys, 0), throw=False, **kw)
    assert hg.result is bl.RESULTS.inner_diverged
    assert hg.task_results == [bl.RESULTS.successful, bl.RESULTS.successful, bl.RESULTS.inner_diverged]
    assert torch.isfinite(hg.value["log_lam"][:2]).all()


def test_vmap_hypergrad_with_no_batches_and_default_in_dims():
    # The quadratic problem takes no data: inputs that are None are shared, not an error.
    q = quadratic_problem(4, 2, seed=1, condition=4.0)
    xs = {"x": torch.randn(T, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))}
    ys = {"y": torch.zeros(T, 4, dtype=torch.float64)}
    hg = bl.vmap_hypergrad(q.problem, xs, ys, inner=bl.GradientDescent(lr=0.4, steps=60),
                           estimator=bl.AID(linear_solver=bl.CG(max_steps=5)))
    for i in range(T):
        assert rel_err(hg.value["x"][i], q.hypergrad({"x": xs["x"][i]})["x"]) < 1e-8


def test_vmap_hypergrad_chunked_equals_unchunked(tasks):
    problem, train, val, xs, ys, inner = tasks
    kw = dict(inner=inner, estimator=bl.ITD(), inner_batch=train, outer_batch=val)
    whole = bl.vmap_hypergrad(problem, xs, ys, **kw)
    chunked = bl.vmap_hypergrad(problem, xs, ys, chunk_size=2, **kw)
    assert rel_err(chunked.value, whole.value) < 1e-14


def test_vmap_hypergrad_adjoint_warm_start_round_trip(tasks):
    # Each task has its own adjoint; passing hg.adjoint back must work for shared hparams too.
    problem, train, val, xs, ys, inner = tasks
    est = bl.AID(linear_solver=bl.CG(max_steps=6))
    kw = dict(inner=inner, estimator=est, inner_batch=train, outer_batch=val, in_dims=(None, None, 0, 0))
    first = bl.vmap_hypergrad(problem, _task(xs, 0), _task(ys, 0), **kw)
    again = bl.vmap_hypergrad(problem, _task(xs, 0), _task(ys, 0), adjoint0=first.adjoint, **kw)
    assert (again.stats["linear_steps"] < first.stats["linear_steps"]).all()
    assert rel_err(again.value, first.value) < 1e-10


def test_vmap_hypergrad_params_warm_start_with_a_learned_init():
    # MAML-like: init(x) is shared, the warm start params0 is per task (in_dims=(None, 0, 0, 0)).
    problems, train, val, lr = ridge_tasks(T, n_samples=20, dim=4)
    problem = bl.BilevelProblem(inner=problems[0].problem.inner, outer=problems[0].problem.outer,
                                init=lambda x: {"w": x["w0"]})
    x = {"log_lam": torch.zeros(4, dtype=torch.float64), "w0": torch.zeros(4, dtype=torch.float64)}
    kw = dict(inner=bl.GradientDescent(lr=lr, steps=10), estimator=bl.ITD(), inner_batch=train, outer_batch=val)
    first = bl.vmap_hypergrad(problem, x, in_dims=(None, None, 0, 0), **kw)
    assert first.value["w0"].abs().sum() > 0  # ITD differentiates through the learned start
    warm = bl.vmap_hypergrad(problem, x, first.params, in_dims=(None, 0, 0, 0), **kw)
    for i in range(T):
        one = bl.hypergrad(problem, x, _task(first.params, i), inner_batch=_task(train, i),
                           outer_batch=_task(val, i), **{k: kw[k] for k in ("inner", "estimator")})
        assert rel_err(_task(warm.params, i), one.params) < 1e-12
        assert rel_err(_task(warm.value, i), one.value) < 1e-12
    assert warm.value["w0"].abs().sum() == 0  # a given params0 is a constant start
    with pytest.raises(ValueError, match=r"^vmap_hypergrad\(\.\.\.\): params0\['w'\] has shape \(3,\)"):
        bl.vmap_hypergrad(problem, x, {"w": first.params["w"][:, :3]}, in_dims=(None, 0, 0, 0), **kw)
