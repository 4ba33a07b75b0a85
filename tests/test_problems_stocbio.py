"""Stochastic AID (stocBiO): who draws which batch, exactness with full batches, unbiasedness, convergence."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from bilevel.linear._base import SampledOperator
from bilevel.problems import logreg_problem


def _tiny_logreg(n=240, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 120, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    y = (torch.rand(n + 120, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ w)).double()
    return logreg_problem((x[:n], y[:n]), (x[n:], y[n:]))


class Recorder:
    """A full-batch sampler that logs which draws were requested."""

    def __init__(self, batch):
        self.batch, self.calls = batch, []

    def __call__(self, step):
        self.calls.append(step)
        return self.batch


@pytest.mark.parametrize("linear, expected", [
    (bl.Neumann(steps=4, alpha=0.5), [3, 4, 5, 6]),   # K-1 = 3 HVPs, one draw each, then the cross term
    (bl.CG(max_steps=5, rtol=1e-12), [3, 4]),         # one draw for the fixed operator, then the cross term
    (bl.Dense(), [3, 4]),
])
def test_aid_draw_schedule(linear, expected):
    hpo = _tiny_logreg()
    rec = Recorder(hpo.train)
    bl.hypergrad(hpo.problem, hpo.hparams(1e-2), hpo.params0(), inner=bl.GradientDescent(lr=0.5, steps=3),
                 estimator=bl.AID(linear, hvp="reverse"), inner_batch=bl.Sampler(rec), outer_batch=hpo.val,
                 throw=False)
    assert rec.calls == [0, 1, 2] + expected


def test_draw_schedule_with_tol_and_warm_adjoint():
    hpo = _tiny_logreg()
    rec = Recorder(hpo.train)
    adjoint = {"w": torch.zeros(5, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    bl.hypergrad(hpo.problem, hpo.hparams(1e-2), hpo.params0(), inner=bl.GradientDescent(lr=0.5, steps=3, tol=0.0),
                 estimator=bl.AID(bl.Neumann(steps=3, alpha=0.5)), inner_batch=bl.Sampler(rec),
                 outer_batch=hpo.val, adjoint0=adjoint, throw=False)
    # draw 3 for the final convergence check; the warm start's residual is one more HVP (draws 3, 4, 5).
    assert rec.calls == [0, 1, 2, 3, 3, 4, 5, 6]


def test_outer_sampler_is_drawn_once_at_step_zero():
    hpo = _tiny_logreg()
    rec = Recorder(hpo.val)
    fixed = bl.hypergrad(hpo.problem, hpo.hparams(1e-2), hpo.params0(), inner=bl.GradientDescent(lr=0.5, steps=5),
                         estimator=bl.AID(bl.CG(max_steps=6)), inner_batch=hpo.train, outer_batch=hpo.val, throw=False)
    drawn = bl.hypergrad(hpo.problem, hpo.hparams(1e-2), hpo.params0(), inner=bl.GradientDescent(lr=0.5, steps=5),
                         estimator=bl.AID(bl.CG(max_steps=6)), inner_batch=hpo.train, outer_batch=bl.Sampler(rec),
                         throw=False)
    assert rec.calls == [0]
    assert torch.equal(fixed.value["log_lam"], drawn.value["log_lam"])


@pytest.mark.parametrize("hvp", ["forward", "reverse"])
@pytest.mark.parametrize("warm", [False, True])
def test_stocbio_with_full_batch_sampler_equals_aid_neumann_exactly(hvp, warm):
    hpo = _tiny_logreg()
    x, y0 = hpo.hparams(1e-2), hpo.params0()
    adjoint = {"w": torch.full((5,), 0.1, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    kwargs = dict(inner=bl.GradientDescent(lr=0.5, steps=20), estimator=bl.AID(bl.Neumann(steps=8, alpha=0.5), hvp=hvp),
                  outer_batch=hpo.val, adjoint0=adjoint if warm else None)
    full = bl.hypergrad(hpo.problem, x, y0, inner_batch=hpo.train, **kwargs)
    sampled = bl.hypergrad(hpo.problem, x, y0, inner_batch=bl.Sampler(lambda k: hpo.train), **kwargs)
    assert torch.equal(full.value["log_lam"], sampled.value["log_lam"])
    assert torch.equal(full.adjoint["w"], sampled.adjoint["w"])
    assert sampled.result is bl.RESULTS.successful


def _stocbio_at_optimum(hpo, y_star, batch_size, seed):
    sampler = bl.Sampler.minibatches(hpo.train, batch_size, seed=seed)
    return bl.hypergrad(hpo.problem, hpo.hparams(1e-2), y_star, inner=bl.GradientDescent(lr=0.5, steps=0),
                        estimator=bl.AID(bl.Neumann(steps=6, alpha=0.5), hvp="reverse"), inner_batch=sampler,
                        outer_batch=hpo.val).value["log_lam"]


def test_stocbio_is_unbiased_and_converges_as_the_batch_grows():
    hpo = _tiny_logreg()
    y_star = hpo.solve_inner(hpo.hparams(1e-2))
    full = bl.hypergrad(hpo.problem, hpo.hparams(1e-2), y_star, inner=bl.GradientDescent(lr=0.5, steps=0),
                        estimator=bl.AID(bl.Neumann(steps=6, alpha=0.5), hvp="reverse"), inner_batch=hpo.train,
                        outer_batch=hpo.val).value["log_lam"]
    errors = {}
    for batch_size in (12, 48, 192):
        draws = torch.stack([_stocbio_at_optimum(hpo, y_star, batch_size, seed) for seed in range(40)])
        errors[batch_size] = ((draws - full).norm(dim=1) ** 2).mean().sqrt().item()
        # Independent Hessian draws per term: the mean estimate is the full-batch series (unbiased).
        stderr = draws.std(dim=0) / math.sqrt(len(draws))
        assert ((draws.mean(0) - full).abs() <= 4.5 * stderr + 1e-12).all(), batch_size
    assert errors[12] > errors[48] > errors[192]
    assert errors[192] < 0.5 * errors[12]


def test_sampled_operator_still_reports_a_diverging_neumann_series():
    a = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    b = {"v": torch.ones(2, dtype=torch.float64)}
    op = SampledOperator(lambda: (lambda v: {"v": a @ v["v"]}))
    assert bl.Neumann(steps=20, alpha=0.9).solve(op, b).code.item() == bl.RESULTS.neumann_diverged.code
    assert bl.Neumann(steps=20, alpha=0.4).solve(op, b).code.item() == 0


def test_minibatch_sampler_is_seeded_by_seed_and_step():
    data = (torch.arange(50.0).reshape(25, 2), torch.arange(25))
    a = bl.Sampler.minibatches(data, 7, seed=3)
    x0, t0, i0 = a(0)
    assert x0.shape == (7, 2) and len(set(i0.tolist())) == 7 and torch.equal(t0, i0)
    assert torch.equal(a(0)[2], i0)                                   # same (seed, step), same rows
    assert torch.equal(bl.Sampler.minibatches(data, 7, seed=3)(0)[2], i0)
    assert not torch.equal(a(1)[2], i0)
    assert not torch.equal(bl.Sampler.minibatches(data, 7, seed=4)(0)[2], i0)
    with pytest.raises(ValueError, match=r"batch_size must be an int in 1..25"):
        bl.Sampler.minibatches(data, 26)
    with pytest.raises(ValueError, match=r"\[25, 24\] rows"):
        bl.Sampler.minibatches((data[0], data[1][:24]), 5)
    with pytest.raises(TypeError, match="seed must be an int"):
        bl.Sampler.minibatches(data, 5, seed=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("estimator", [bl.ITD(), bl.ITD(truncate=2), bl.FirstOrder(), bl.ESJ(directions=3)])
def test_itd_and_esj_draw_one_batch_per_inner_step(estimator):
    hpo = _tiny_logreg()
    rec = Recorder(hpo.train)
    hg = bl.hypergrad(hpo.problem, hpo.hparams(1e-2), hpo.params0(), inner=bl.GradientDescent(lr=0.5, steps=4),
                      estimator=estimator, inner_batch=bl.Sampler(rec), outer_batch=hpo.val)
    assert rec.calls == [0, 1, 2, 3]                      # ESJ: the Q + 1 solves share each step's draw
    full = bl.hypergrad(hpo.problem, hpo.hparams(1e-2), hpo.params0(), inner=bl.GradientDescent(lr=0.5, steps=4),
                        estimator=estimator, inner_batch=hpo.train, outer_batch=hpo.val)
    assert torch.allclose(hg.value["log_lam"], full.value["log_lam"], rtol=1e-12, atol=1e-15)
