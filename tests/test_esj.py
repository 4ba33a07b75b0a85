"""ESJ: exact identities for fixed directions, unbiasedness and 1/sqrt(Q) error over seeds, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

import bilevel as bl
from bilevel.testing import quadratic_problem, ridge_problem

N = 2  # y_N is affine in x for any N on a quadratic: a short loop keeps the seed studies fast
INNER = bl.GradientDescent(lr=0.2, steps=N)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def fixed_direction_value(est: bl.ESJ, x, gx: torch.Tensor, itd: torch.Tensor) -> torch.Tensor:
    r"""``gx + (c/Q) U^T U (itd - gx)``: what ESJ returns for its own directions when y_N is affine."""
    u = est.draw(x)
    c = u.shape[1] if est.distribution == "sphere" else 1
    return gx + c * u.T @ (u @ (itd - gx)) / est.directions


@pytest.fixture(scope="module")
def quad():
    q = quadratic_problem(5, 3, seed=11, learned_init=True, condition=3.0)
    x = q.hparams()
    exact = q.unrolled_hypergrad(x, None, INNER.lr, N)["x"]
    gx = q.rho * x["x"] + q.e
    return q, x, exact, gx


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_fixed_directions_give_the_exact_projection_on_an_affine_map(quad, distribution, antithetic):
    q, x, exact, gx = quad
    est = bl.ESJ(directions=6, smoothing=1e-3, seed=3, antithetic=antithetic, distribution=distribution)
    hg = bl.hypergrad(q.problem, x, inner=INNER, estimator=est)
    assert rel(hg.value["x"], fixed_direction_value(est, x, gx, exact)) < 1e-9
    assert torch.allclose(hg.params["y"], q.unrolled(x, None, INNER.lr, N)["y"], rtol=1e-12, atol=0)
    solves = (2 if antithetic else 1) * 6 + 1
    assert hg.stats["num_grad"] == solves * N + 1 and hg.stats["num_hvp"] == 0


def _normalised_errors(q, x, exact, distribution, directions, seeds):
    """Per-seed estimates and the expected squared error (p + 1)|w|^2 / Q (Gaussian) or (p - 1)|w|^2 / Q (sphere)."""
    values = torch.stack([bl.hypergrad(q.problem, x, inner=INNER, estimator=bl.ESJ(
        directions=directions, seed=s, distribution=distribution)).value["x"] for s in seeds])
    w = exact - (q.rho * x["x"] + q.e)
    p = w.numel()
    mse = (p + 1 if distribution == "gaussian" else p - 1) * (w @ w) / directions
    return values, mse, w


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
def test_unbiased_over_seeds_and_error_falls_like_one_over_sqrt_q(quad, distribution):
    q, x, exact, _ = quad
    seeds = range(120)
    small, mse_small, w = _normalised_errors(q, x, exact, distribution, 4, seeds)
    large, mse_large, _ = _normalised_errors(q, x, exact, distribution, 64, seeds)
    # Unbiased: the mean of 120 x 64 i.i.d. terms c u u^T w. Per coordinate the single-term variance is
    # |w|^2 + w_i^2 (Gaussian) or p(|w|^2 + 2 w_i^2)/(p + 2) - w_i^2 (sphere); allow 4.5 standard errors.
    p, n_terms = w.numel(), len(seeds) * 64
    var = (w @ w + w ** 2) if distribution == "gaussian" else p * (w @ w + 2 * w ** 2) / (p + 2) - w ** 2
    assert torch.all((large.mean(0) - exact).abs() <= 4.5 * torch.sqrt(var / n_terms))
    # E|g_hat - g|^2 = mse exactly (not a bound): the ratios concentrate at 1 (simulated standard
    # deviation of the ratio for 120 seeds: <= 0.15), so [0.5, 1.6] is a > 3 sigma band on each side.
    ratio_small = ((small - exact) ** 2).sum(1).mean() / mse_small
    ratio_large = ((large - exact) ** 2).sum(1).mean() / mse_large
    assert 0.5 < ratio_small < 1.6 and 0.5 < ratio_large < 1.6
    slope = math.log((((small - exact) ** 2).sum(1).mean() / ((large - exact) ** 2).sum(1).mean()).item()) / 2
    assert abs(slope / math.log(16) - 0.5) < 0.1  # RMS error ~ Q^(-1/2)


def test_same_seed_same_numbers_and_generators_advance(quad):
    q, x, _, _ = quad
    run = lambda est: bl.hypergrad(q.problem, x, inner=INNER, estimator=est).value["x"]
    first = run(bl.ESJ(directions=5, seed=7))
    assert torch.equal(first, run(bl.ESJ(directions=5, seed=7)))
    assert not torch.equal(first, run(bl.ESJ(directions=5, seed=8)))
    gen = torch.Generator().manual_seed(7)
    est = bl.ESJ(directions=5, seed=gen)
    assert torch.equal(run(est), first)  # a generator seeded alike draws the same first directions
    assert not torch.equal(run(est), first)  # ... and then advances
    u = bl.ESJ(directions=5, seed=7).draw(x)
    assert torch.equal(u, torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64))


def test_float32_directions_follow_hparams():
    q = quadratic_problem(4, 2, seed=1, learned_init=True, dtype=torch.float32)
    x = q.hparams()
    est = bl.ESJ(directions=3, smoothing=1e-2)
    assert est.draw(x).dtype == torch.float32
    assert bl.hypergrad(q.problem, x, inner=INNER, estimator=est).value["x"].dtype == torch.float32
    sphere = bl.ESJ(directions=3, distribution="sphere").draw(x)
    assert torch.allclose(sphere.norm(dim=1), torch.ones(3))


def test_antithetic_bias_is_second_order_on_a_nonlinear_response():
    r = ridge_problem(n_samples=20, dim=3, seed=2)
    x = {"log_lam": torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64)}
    inner = bl.GradientDescent(lr=1.0 / r.lipschitz(x), steps=15)
    batches = dict(inner=inner, inner_batch=r.train, outer_batch=r.val)
    itd = bl.hypergrad(r.problem, x, r.params0(), estimator=bl.ITD(), **batches).value["log_lam"]

    def error(mu, antithetic):
        est = bl.ESJ(directions=4, smoothing=mu, seed=0, antithetic=antithetic)
        value = bl.hypergrad(r.problem, x, r.params0(), estimator=est, **batches).value["log_lam"]
        return rel(value, fixed_direction_value(est, x, torch.zeros(3, dtype=torch.float64), itd))

    one_sided = error(1e-2, False) / error(1e-3, False)
    central = error(1e-2, True) / error(1e-3, True)
    assert 5 < one_sided < 20 and 50 < central < 200  # O(mu) against O(mu^2)


def _task_problem(q):
    def g(x, y, c):
        return 0.5 * y["y"] @ (q.A @ y["y"]) - y["y"] @ (q.B @ x["x"] + c)

    def f(x, y, t):
        return 0.5 * ((y["y"] - t) ** 2).sum() + 0.5 * (x["x"] ** 2).sum()

    return bl.BilevelProblem(inner=g, outer=f, init=lambda x: {"y": q.P @ x["x"]})


def test_vmap_over_tasks_equals_the_loop(quad):
    q, x, _, _ = quad
    problem = _task_problem(q)
    gen = torch.Generator().manual_seed(1)
    cs, ts = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    est = bl.ESJ(directions=4, seed=2)
    batched = bl.vmap_hypergrad(problem, x, inner=INNER, estimator=est, inner_batch=cs, outer_batch=ts,
                                in_dims=(None, None, 0, 0))
    for i in range(3):
        one = bl.hypergrad(problem, x, inner=INNER, estimator=est, inner_batch=cs[i], outer_batch=ts[i])
        assert rel(batched.value["x"][i], one.value["x"]) < 1e-12


def test_stochastic_esj_uses_one_draw_per_step_for_all_solves(quad):
    q, x, _, _ = quad
    problem = _task_problem(q)
    calls: list[int] = []

    def draw(step: int) -> torch.Tensor:
        calls.append(step)
        return torch.randn(5, generator=torch.Generator().manual_seed(100 + step), dtype=torch.float64)

    t = torch.zeros(5, dtype=torch.float64)
    inner = bl.GradientDescent(lr=0.2, steps=4)
    est = bl.ESJ(directions=5, seed=4)
    hg = bl.hypergrad(problem, x, inner=inner, estimator=est, inner_batch=bl.Sampler(draw), outer_batch=t)
    assert calls == [0, 1, 2, 3]  # Q + 1 solves, one batch per step
    itd = bl.hypergrad(problem, x, inner=inner, estimator=bl.ITD(), inner_batch=bl.Sampler(draw), outer_batch=t)
    # the same draws make y_N affine in x, so the fixed-direction identity holds exactly
    assert rel(hg.value["x"], fixed_direction_value(est, x, x["x"], itd.value["x"])) < 1e-9
    stream = (draw(k) for k in range(10**6))
    calls.clear()
    bl.hypergrad(problem, x, inner=inner, estimator=est, inner_batch=bl.Sampler.from_iterable(stream), outer_batch=t)
    assert calls == [0, 1, 2, 3]


def test_nonfinite_perturbed_solve_names_the_direction():
    # g = e^a y^2 / 2 with lr = 1.9 converges at a = 0 but blows up once 1.9 e^(a + mu u) > 2.
    problem = bl.BilevelProblem(inner=lambda x, y, b: 0.5 * torch.exp(x["a"]) * y["y"] ** 2,
                                outer=lambda x, y, b: y["y"] ** 2)
    x, y0 = {"a": torch.tensor(0.0, dtype=torch.float64)}, {"y": torch.tensor(1.0, dtype=torch.float64)}
    inner = bl.GradientDescent(lr=1.9, steps=200)
    est = bl.ESJ(directions=8, smoothing=3.0, seed=0)
    u = est.draw(x)[:, 0]
    curvature, y, finite = torch.exp(3.0 * u), torch.ones_like(u), torch.ones_like(u, dtype=torch.bool)
    for _ in range(200):  # the same iteration, all directions at once
        finite &= torch.isfinite(0.5 * curvature * y ** 2) & torch.isfinite(curvature * y)
        y = y - 1.9 * curvature * y
    blown = (~finite).tolist()
    assert any(blown) and not all(blown)
    hg = bl.hypergrad(problem, x, y0, inner=inner, estimator=est, throw=False)
    assert hg.result is bl.RESULTS.esj_nonfinite
    with pytest.raises(bl.BilevelError, match=rf"esj_nonfinite.*direction {blown.index(True)} .*mu=3\.0"):
        bl.hypergrad(problem, x, y0, inner=inner, estimator=est)


@pytest.mark.parametrize("kwargs, error", [
    (dict(directions=0), ValueError), (dict(directions=-3), ValueError), (dict(directions=2.5), ValueError),
    (dict(directions=True), ValueError), (dict(smoothing=0.0), ValueError), (dict(smoothing=-1e-3), ValueError),
    (dict(smoothing=float("nan")), ValueError), (dict(smoothing=float("inf")), ValueError),
    (dict(seed="zero"), TypeError), (dict(seed=1.5), TypeError), (dict(antithetic=1), TypeError),
    (dict(distribution="uniform"), ValueError),
])
def test_bad_options(kwargs, error):
    with pytest.raises(error, match=rf"ESJ\({next(iter(kwargs))}="):
        bl.ESJ(**kwargs)


def test_value_semantics():
    assert bl.ESJ(directions=16, smoothing=1e-3, seed=0) == bl.ESJ()
    assert repr(bl.ESJ(antithetic=True)) == ("ESJ(directions=16, smoothing=0.001, seed=0, antithetic=True, "
                                             "distribution='gaussian')")
