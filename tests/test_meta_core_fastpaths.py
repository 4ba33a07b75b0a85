"""The core's fast paths for the MAML meta-step (issue 4) report exactly what the plain checks report.

``loop_run`` forms the per-step squared gradient norm with one norm per leaf when ``tol`` is None
and finds the first NaN/inf step with ``v - v != 0``; ``vmap_hypergrad`` checks the values once
after its ``vmap`` with ``v * 0`` sums. Each is compared with the straightforward check it
replaces (``tree_dot``, ``torch.isfinite`` step by step, ``torch.isfinite`` per task). ITD's
stacked scalars (``Estimate.packed``) are compared with the same estimate returned field by field.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
import bilevel.estimators.itd as itd
from bilevel._tree import tree_dot
from bilevel.datasets import Sinusoid
from bilevel.inner._base import _first_bad, _sq_norm

SPECIAL = st.sampled_from([0.0, 1.5, -2.0, 1e300, math.inf, -math.inf, math.nan])


def first_bad_by_hand(bad: int, start: int, losses: list[float], sq_norms: list[float]) -> int:
    if bad >= 0:
        return bad
    for k, (loss, sq) in enumerate(zip(losses, sq_norms)):
        if not (math.isfinite(loss) and math.isfinite(sq)):
            return start + k
    return -1


@settings(deadline=None, max_examples=200)
@given(st.lists(st.tuples(SPECIAL, SPECIAL), min_size=1, max_size=6), st.integers(0, 5),
       st.sampled_from([-1, 0, 3]))
def test_first_bad_step_equals_a_per_step_isfinite_check(pairs, start, bad) -> None:
    losses = [torch.tensor(a, dtype=torch.float64) for a, _ in pairs]
    sq_norms = [torch.tensor(b, dtype=torch.float64) for _, b in pairs]
    got = _first_bad(torch.tensor(bad), start, losses, sq_norms)
    assert got.dtype == torch.int64 and got.dim() == 0
    assert int(got) == first_bad_by_hand(bad, start, [a for a, _ in pairs], [b for _, b in pairs])


def test_first_bad_step_in_float32_with_mixed_dtypes() -> None:
    losses = [torch.tensor(1.0, dtype=torch.float32), torch.tensor(math.inf, dtype=torch.float32)]
    sq_norms = [torch.tensor(3e38, dtype=torch.float32), torch.tensor(1.0, dtype=torch.float64)]
    assert int(_first_bad(torch.tensor(-1), 4, losses, sq_norms)) == 5


def test_squared_norm_equals_the_dot_product_and_overflows_like_it() -> None:
    gen = torch.Generator().manual_seed(0)
    grad = {"a": torch.randn(4, 3, generator=gen, dtype=torch.float64),
            "b": torch.randn(5, generator=gen, dtype=torch.float64)}
    torch.testing.assert_close(_sq_norm(grad), tree_dot(grad, grad))
    torch.testing.assert_close(_sq_norm({"a": grad["a"]}), tree_dot({"a": grad["a"]}, {"a": grad["a"]}))
    for value, finite in ((1e30, False), (1e18, True), (math.nan, False), (math.inf, False)):
        big = {"a": torch.full((3,), value, dtype=torch.float32), "b": torch.ones(2, dtype=torch.float32)}
        assert bool(torch.isfinite(_sq_norm(big))) is finite
        assert bool(torch.isfinite(tree_dot(big, big))) is finite


def test_nan_at_a_given_step_is_reported_at_that_step_with_one_or_many_steps() -> None:
    g = lambda x, y, b: 0.5 * ((y["w"] - x["c"] * b) ** 2).sum()  # noqa: E731
    f = lambda x, y, b: 0.5 * ((y["w"] - 1.0) ** 2).sum()  # noqa: E731
    problem = bl.BilevelProblem(inner=g, outer=f)
    x, y0 = {"c": torch.ones(3, dtype=torch.float64)}, {"w": torch.zeros(3, dtype=torch.float64)}
    for steps, at in ((1, 0), (6, 0), (6, 3), (6, 5)):
        batch = bl.Sampler(lambda k, at=at: torch.tensor(math.nan if k == at else 1.0, dtype=torch.float64))
        hg = bl.hypergrad(problem, x, y0, inner=bl.GradientDescent(lr=0.5, steps=steps), estimator=bl.ITD(),
                          inner_batch=batch, throw=False)
        assert hg.result is bl.RESULTS.inner_nonfinite
        with pytest.raises(bl.BilevelError, match=f"at step {at} "):
            bl.hypergrad(problem, x, y0, inner=bl.GradientDescent(lr=0.5, steps=steps), estimator=bl.ITD(),
                         inner_batch=batch)


def test_vmap_hypergrad_flags_exactly_the_tasks_with_a_nonfinite_value() -> None:
    # f = ||y - t|| has no gradient where the inner solution y = c hits the target t exactly.
    problem = bl.BilevelProblem(inner=lambda x, y, b: 0.5 * ((y["w"] - x["c"]) ** 2).sum(),
                                outer=lambda x, y, b: torch.sqrt(((y["w"] - b) ** 2).sum()),
                                init=lambda x: {"w": torch.zeros_like(x["c"])})
    c = torch.tensor([1.0, 2.0], dtype=torch.float64)
    targets = torch.stack([c * 0.3, c, c * 2.0, c])  # tasks 1 and 3: y_N = c (lr = 1) is the target
    hg = bl.vmap_hypergrad(problem, {"c": c}, inner=bl.GradientDescent(lr=1.0, steps=1), estimator=bl.ITD(),
                           outer_batch=targets, in_dims=(None, None, None, 0), throw=False)
    by_hand = [bool(torch.isfinite(hg.value["c"][t]).all()) for t in range(4)]
    assert by_hand == [True, False, True, False]
    assert [r is bl.RESULTS.nonfinite_hypergradient for r in hg.task_results] == [False, True, False, True]
    assert [r is bl.RESULTS.successful for r in hg.task_results] == [True, False, True, False]
    assert hg.result is bl.RESULTS.nonfinite_hypergradient
    with pytest.raises(bl.BilevelError, match=r"\(task 1 of 4; 2 failed\): nonfinite_hypergradient"):
        bl.vmap_hypergrad(problem, {"c": c}, inner=bl.GradientDescent(lr=1.0, steps=1), estimator=bl.ITD(),
                          outer_batch=targets, in_dims=(None, None, None, 0))
    # an earlier failure of the same task is kept (first failure wins), as inside the vmap before
    hg = bl.vmap_hypergrad(problem, {"c": c * math.nan}, inner=bl.GradientDescent(lr=1.0, steps=1),
                           estimator=bl.ITD(), outer_batch=targets, in_dims=(None, None, None, 0), throw=False)
    assert all(r is bl.RESULTS.inner_nonfinite for r in hg.task_results)


@pytest.mark.parametrize("lr", [0.05, 30.0, 1e20])  # succeeds; diverges; NaN at step 1
@pytest.mark.parametrize("tol", [None, 1e-3])
def test_itd_packed_scalars_report_what_the_unpacked_fields_report(monkeypatch, lr, tol) -> None:
    # ITD stacks its scalar diagnostics into Estimate.packed (pack_scalars); with packing switched
    # off it returns them field by field. Values, statistics, statuses and messages must agree.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    maml = bl.meta.MAML(net, inner=bl.GradientDescent(lr=lr, steps=4, tol=tol))
    theta = maml.init_hparams()
    tasks = Sinusoid(shots=5).sample(3, seed=0)

    def run():
        try:
            return maml.meta_gradient(theta, tasks, return_params=True).hypergrad, None
        except bl.BilevelError as err:
            return err.hypergrad, str(err)

    packed, packed_message = run()
    monkeypatch.setattr(itd, "pack_scalars", lambda *args: None)
    plain, plain_message = run()
    assert packed_message == plain_message
    assert (packed_message is None) == (lr < 1 and tol is None)  # tol=1e-3 is not reached in 4 steps
    assert packed.task_results == plain.task_results
    same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # noqa: E731 - bitwise, NaN = NaN
    for key in ("inner_steps", "linear_steps", "residual"):
        same(packed.stats[key], plain.stats[key])
    for key in plain.value:
        same(packed.value[key], plain.value[key])
        same(packed.params[key], plain.params[key])
    same(packed.outer_value, plain.outer_value)


@pytest.mark.parametrize("estimator", [bl.ITD(), bl.ITD(truncate=1), bl.FirstOrder(), bl.AID(linear_solver=bl.CG(max_steps=5)),
                                       bl.IMAML(lam=2.0, linear_solver=bl.CG(max_steps=5))])
@pytest.mark.parametrize("pack", [True, False])
def test_return_params_false_changes_nothing_but_the_params(monkeypatch, estimator, pack) -> None:
    # return_params=False keeps the adapted parameters inside the transforms (ITD) or drops them after
    # the vmap (the others): every other output, status and statistic is bit-for-bit the same.
    if not pack:
        monkeypatch.setattr(itd, "pack_scalars", lambda *args: None)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    maml = bl.meta.MAML(net, inner=bl.GradientDescent(lr=0.05, steps=3), estimator=estimator)
    theta = maml.init_hparams()
    tasks = Sinusoid(shots=5).sample(3, seed=0)
    with_params = maml.meta_gradient(theta, tasks, return_params=True, throw=False)
    without = maml.meta_gradient(theta, tasks, throw=False)
    assert without.hypergrad.params is None and sorted(with_params.hypergrad.params) == sorted(theta)
    same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)  # noqa: E731 - bitwise
    for key in theta:
        same(without.value[key], with_params.value[key])
    same(without.loss, with_params.loss)
    assert without.hypergrad.task_results == with_params.hypergrad.task_results
    for key in ("inner_steps", "linear_steps", "residual", "num_grad", "num_hvp"):
        a, b = without.hypergrad.stats[key], with_params.hypergrad.stats[key]
        same(a, b) if isinstance(a, torch.Tensor) else (a == b or pytest.fail(key))
    # the single-task call too
    problem, batch = maml.problem, (tasks.support_x[0], tasks.support_y[0])
    kw = dict(inner=maml.inner, estimator=estimator, inner_batch=batch, outer_batch=(tasks.query_x[0], tasks.query_y[0]),
              throw=False)
    one, none = bl.hypergrad(problem, theta, **kw), bl.hypergrad(problem, theta, **kw, return_params=False)
    assert none.params is None and sorted(one.params) == sorted(theta)
    for key in theta:
        same(none.value[key], one.value[key])
    assert none.result is one.result
