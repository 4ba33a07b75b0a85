"""Memory-lean (checkpointed) ITD equals taped ITD: same hypergradient, same status and inner fields."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.testing import quadratic_problem, ridge_problem


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


@pytest.fixture(scope="module")
def ridge():
    r = ridge_problem(n_samples=30, dim=6, seed=1)
    x = {"log_lam": torch.linspace(-1.0, 0.5, 6, dtype=torch.float64)}
    return r, x, 1.0 / r.lipschitz(x)


def _w0():
    return {"w": torch.full((6,), 0.3, dtype=torch.float64)}  # not 0, where the penalty's gradient vanishes


def _pair(problem, x, params0, inner, checkpoint_every, truncate=None, **batches):
    taped = bl.hypergrad(problem, x, params0, inner=inner, estimator=bl.ITD(truncate=truncate), **batches)
    lean = bl.hypergrad(problem, x, params0, inner=inner,
                        estimator=bl.ITD(truncate=truncate, checkpoint_every=checkpoint_every), **batches)
    return taped, lean


@pytest.mark.parametrize("steps, every", [(1, 1), (7, 1), (7, 3), (7, 7), (30, 4), (30, 5), (30, "sqrt")])
def test_equals_taped_itd_on_a_nonlinear_response(ridge, steps, every):
    r, x, lr = ridge
    taped, lean = _pair(r.problem, x, _w0(), bl.GradientDescent(lr=lr, steps=steps), every,
                        inner_batch=r.train, outer_batch=r.val)
    assert rel(lean.value["log_lam"], taped.value["log_lam"]) < 1e-10
    assert torch.equal(lean.params["w"], taped.params["w"])
    assert lean.stats["num_hvp"] == taped.stats["num_hvp"] == steps
    assert lean.stats["num_grad"] == taped.stats["num_grad"] + steps  # one recomputation of every step


@pytest.mark.parametrize("every", [2, 6])
def test_momentum_and_learned_init_match_the_closed_form(every):
    q = quadratic_problem(5, 3, seed=4, learned_init=True, condition=3.0)
    x = q.hparams()
    inner = bl.GradientDescent(lr=0.3, steps=11)
    lean = bl.hypergrad(q.problem, x, inner=inner, estimator=bl.ITD(checkpoint_every=every))
    assert rel(lean.value["x"], q.unrolled_hypergrad(x, None, 0.3, 11)["x"]) < 1e-10
    momentum = bl.Momentum(lr=0.1, momentum=0.7, steps=12)
    taped, lean = _pair(q.problem, x, None, momentum, every)
    assert rel(lean.value["x"], taped.value["x"]) < 1e-10


@pytest.mark.parametrize("truncate, every", [(4, 2), (9, 3), (12, 5)])
def test_truncated_and_checkpointed(truncate, every):
    q = quadratic_problem(5, 3, seed=5, learned_init=True, condition=3.0)
    taped, lean = _pair(q.problem, q.hparams(), None, bl.Momentum(lr=0.1, momentum=0.5, steps=12), every,
                        truncate=truncate)
    assert rel(lean.value["x"], taped.value["x"]) < 1e-10


def test_tol_masking_freezes_the_same_iterates(ridge):
    r, x, lr = ridge
    inner = bl.GradientDescent(lr=lr, steps=60, tol=1e-3)
    taped, lean = _pair(r.problem, x, _w0(), inner, 7, inner_batch=r.train, outer_batch=r.val)
    assert 0 < taped.stats["inner_steps"] < 60  # the freeze happens inside a segment
    assert lean.stats["inner_steps"] == taped.stats["inner_steps"]
    assert lean.result is taped.result is bl.RESULTS.successful
    assert rel(lean.value["log_lam"], taped.value["log_lam"]) < 1e-10


def test_failure_status_matches_taped_itd(ridge):
    r, x, lr = ridge
    inner = bl.GradientDescent(lr=lr, steps=5, tol=1e-12)
    taped, lean = _pair(r.problem, x, _w0(), inner, 2, inner_batch=r.train, outer_batch=r.val, throw=False)
    assert lean.result is taped.result is bl.RESULTS.inner_max_steps


def test_vmap_over_tasks_equals_the_loop():
    q = quadratic_problem(5, 3, seed=6, learned_init=True, condition=3.0)

    def g(x, y, c):
        return 0.5 * y["y"] @ (q.A @ y["y"]) - y["y"] @ (q.B @ x["x"] + c)

    problem = bl.BilevelProblem(inner=g, outer=lambda x, y, t: 0.5 * ((y["y"] - t) ** 2).sum(),
                                init=lambda x: {"y": q.P @ x["x"]})
    x, inner, est = q.hparams(), bl.GradientDescent(lr=0.3, steps=9), bl.ITD(checkpoint_every=4)
    cs, ts = (torch.randn(3, 5, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (0, 1))
    batched = bl.vmap_hypergrad(problem, x, inner=inner, estimator=est, inner_batch=cs, outer_batch=ts,
                                in_dims=(None, None, 0, 0))
    for i in range(3):
        one = bl.hypergrad(problem, x, inner=inner, estimator=bl.ITD(), inner_batch=cs[i], outer_batch=ts[i])
        assert rel(batched.value["x"][i], one.value["x"]) < 1e-10


def test_samplers_are_replayed_and_iterables_refused(ridge):
    r, x, lr = ridge
    xs, ys = r.train

    def draw(step: int):
        idx = torch.randperm(30, generator=torch.Generator().manual_seed(step))[:10]
        return xs[idx], ys[idx]

    inner = bl.GradientDescent(lr=lr, steps=8)
    taped, lean = _pair(r.problem, x, _w0(), inner, 3, inner_batch=bl.Sampler(draw), outer_batch=r.val)
    assert rel(lean.value["log_lam"], taped.value["log_lam"]) < 1e-10
    stream = bl.Sampler.from_iterable(draw(k) for k in range(100))
    with pytest.raises(ValueError, match=r"from_iterable cannot replay.*Fix"):
        bl.hypergrad(r.problem, x, _w0(), inner=inner, estimator=bl.ITD(checkpoint_every=3),
                     inner_batch=stream, outer_batch=r.val)


@pytest.mark.parametrize("every", [0, -2, 2.5, True, "cbrt"])
def test_bad_interval_at_construction(every):
    with pytest.raises(ValueError, match=r"ITD\(checkpoint_every="):
        bl.ITD(checkpoint_every=every)


def test_interval_beyond_the_inner_steps_at_the_call():
    q = quadratic_problem(4, 2, seed=0)
    with pytest.raises(ValueError, match=r"checkpoint_every=6 is outside 1\.\.5.*Fix"):
        bl.hypergrad(q.problem, q.hparams(), q.params0(), inner=bl.GradientDescent(lr=0.1, steps=5),
                     estimator=bl.ITD(checkpoint_every=6))


def test_repr_and_value_semantics():
    assert repr(bl.ITD()) == "ITD(truncate=None)"
    assert repr(bl.ITD(truncate=3, checkpoint_every=2)) == "ITD(truncate=3, checkpoint_every=2)"
    assert bl.ITD(checkpoint_every="sqrt") == bl.ITD(checkpoint_every="sqrt") != bl.ITD()
