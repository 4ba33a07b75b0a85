"""Each estimator against its closed form, in float64 first, then float32.

The quadratic problem of :mod:`bilevel.testing` has :math:`y^*(x) = A^{-1}(Bx + c)`, an
exact implicit hypergradient and an exact unrolled (ITD) gradient; the ridge problem has
its own closed form; a logistic problem checks ITD against central finite differences
where second derivatives vary with the iterate.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from torch.func import functional_call

import bilevel as bl
from bilevel.testing import quadratic_problem, ridge_problem
from tests.test_core_helpers import central_fd, logistic_problem, reference_unroll, rel_err

# Eigenvalues of A lie in [1, 4]: lr = 0.4 contracts by 0.6 per step, 80 steps reach 1e-17.
COND, LR, CONVERGED = 4.0, 0.4, 80


def quad(seed: int = 0, **kw):
    q = quadratic_problem(5, 3, seed=seed, condition=COND, **kw)
    return q, q.hparams(seed), q.params0(seed)


def run(q, x, y0, estimator, inner=None, **kw):
    inner = inner or bl.GradientDescent(lr=LR, steps=CONVERGED)
    return bl.hypergrad(q.problem, x, y0, inner=inner, estimator=estimator, **kw)


# ---------------------------------------------------------------------------------------------- ITD

@pytest.mark.parametrize("steps", [1, 7, 30])
def test_itd_equals_unrolled_map_gradient(steps):
    q, x, y0 = quad(seed=1)
    hg = run(q, x, y0, bl.ITD(), bl.GradientDescent(lr=0.3, steps=steps))
    assert rel_err(hg.value, q.unrolled_hypergrad(x, y0, 0.3, steps)) < 1e-12
    assert rel_err(hg.params, q.unrolled(x, y0, 0.3, steps)) < 1e-12


def test_itd_with_learned_init_differentiates_through_the_start():
    q, x, _ = quad(seed=2, learned_init=True)
    hg = run(q, x, None, bl.ITD(), bl.GradientDescent(lr=0.2, steps=6))
    expected = q.unrolled_hypergrad(x, None, 0.2, 6)
    assert rel_err(hg.value, expected) < 1e-12
    # The start matters: the gradient with the start held constant is different.
    start = {"y": q.P @ x["x"]}
    assert rel_err(q.unrolled_hypergrad(x, start, 0.2, 6), expected) > 1e-3


@pytest.mark.parametrize("learned_init", [False, True])
@pytest.mark.parametrize("truncate", [1, 4])
def test_itd_truncated_equals_hand_derived_truncated_gradient(truncate, learned_init):
    # Shaban et al.: the first N - K steps (and so the start) are constants; the gradient of
    # y_N through the last K steps from y_{N-K} is eta * sum_{k<K} M^k B.
    q, x, y0 = quad(seed=3, learned_init=learned_init)
    y0 = None if learned_init else y0
    n, lr = 10, 0.25
    hg = run(q, x, y0, bl.ITD(truncate=truncate), bl.GradientDescent(lr=lr, steps=n))
    y_mid = q.unrolled(x, y0, lr, n - truncate)
    assert rel_err(hg.value, q.unrolled_hypergrad(x, y_mid, lr, truncate)) < 1e-12
    assert hg.stats["num_hvp"] == truncate
    full = run(q, x, y0, bl.ITD(), bl.GradientDescent(lr=lr, steps=n))
    assert rel_err(hg.value, full.value) > 1e-6  # truncation changes the answer here


def _fd_of_unrolled_objective(problem, x, y0, train, val, lr, steps, momentum=0.0):
    def phi(xx):
        y = reference_unroll(problem.inner, xx, y0, lr, steps, momentum=momentum, batch=train)
        return problem.outer(xx, y, val)
    return central_fd(phi, x)


def test_itd_matches_central_differences_on_a_nonquadratic_problem():
    problem, x, y0, train, val = logistic_problem()
    inner = bl.GradientDescent(lr=0.5, steps=15)
    hg = bl.hypergrad(problem, x, y0, inner=inner, estimator=bl.ITD(), inner_batch=train, outer_batch=val)
    assert rel_err(hg.value, _fd_of_unrolled_objective(problem, x, y0, train, val, 0.5, 15)) < 1e-7


def test_itd_through_momentum_matches_central_differences():
    problem, x, y0, train, val = logistic_problem(seed=1)
    inner = bl.Momentum(lr=0.3, momentum=0.6, steps=12)
    hg = bl.hypergrad(problem, x, y0, inner=inner, estimator=bl.ITD(), inner_batch=train, outer_batch=val)
    fd = _fd_of_unrolled_objective(problem, x, y0, train, val, 0.3, 12, momentum=0.6)
    assert rel_err(hg.value, fd) < 1e-7


def test_itd_through_momentum_on_quadratic_matches_analytic_jacobian_recursion():
    # y_{k+1} = y_k + v_{k+1}, v_{k+1} = beta v_k - eta (A y_k - B x - c): the Jacobians
    # J_y, J_v with respect to x follow the same linear recursion with source eta B.
    q, x, y0 = quad(seed=4)
    lr, beta, n = 0.2, 0.5, 9
    jy, jv = torch.zeros_like(q.B), torch.zeros_like(q.B)
    for _ in range(n):
        jv = beta * jv - lr * (q.A @ jy - q.B)
        jy = jy + jv
    y_n = reference_unroll(q.inner, x, y0, lr, n, momentum=beta)["y"]
    expected = q.rho * x["x"] + q.e + jy.T @ (y_n - q.t)
    hg = run(q, x, y0, bl.ITD(), bl.Momentum(lr=lr, momentum=beta, steps=n))
    assert rel_err(hg.value["x"], expected) < 1e-12


def test_itd_with_early_stopping_differentiates_the_steps_actually_taken():
    # With tol, finished iterates are frozen by masking: the gradient is the unrolled one for
    # exactly the steps applied.
    q, x, y0 = quad(seed=5)
    hg = run(q, x, y0, bl.ITD(), bl.GradientDescent(lr=LR, steps=200, tol=1e-6))
    taken = hg.stats["inner_steps"]
    assert 0 < taken < 200
    assert rel_err(hg.value, q.unrolled_hypergrad(x, y0, LR, taken)) < 1e-12
    assert hg.stats["num_grad"] == 200 + 1 + 1  # the fixed loop, the final check, the outer gradient


# ---------------------------------------------------------------------------------------------- AID

def test_aid_cg_to_tolerance_equals_implicit_gradient():
    q = quadratic_problem(8, 4, seed=6, condition=10.0)
    x, y0 = q.hparams(), q.params0()
    hg = bl.hypergrad(q.problem, x, y0, inner=bl.GradientDescent(lr=2 / 11, steps=200),
                      estimator=bl.AID(linear_solver=bl.CG(max_steps=30, rtol=1e-12)))
    assert hg.result is bl.RESULTS.successful
    assert rel_err(hg.value, q.hypergrad(x)) < 1e-8
    assert hg.stats["residual"] <= 1e-12
    # the returned adjoint solves A v = grad_y f at y_N
    assert rel_err(q.A @ hg.adjoint["y"], hg.params["y"] - q.t) < 1e-10


def test_aid_neumann_converges_to_implicit_gradient_as_steps_grow():
    q, x, y0 = quad(seed=7)
    exact = q.hypergrad(x)
    # (reverse-over-reverse HVPs: the same numbers, checked elsewhere, and cheaper per product on CPU)
    errors = [rel_err(run(q, x, y0, bl.AID(linear_solver=bl.Neumann(steps=k, alpha=1 / COND), hvp="reverse")).value,
                      exact)
              for k in (2, 8, 32, 128)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-9
    # the error of the truncated series decays like (1 - alpha * lambda_min)^K = 0.75^K
    assert errors[1] > 0.75 ** 8 * 1e-3


def test_aid_dense_equals_cg():
    q, x, y0 = quad(seed=8)
    dense = run(q, x, y0, bl.AID(linear_solver=bl.Dense()))
    cg = run(q, x, y0, bl.AID(linear_solver=bl.CG(max_steps=20)))
    assert rel_err(dense.value, cg.value) < 1e-11
    assert rel_err(dense.adjoint, cg.adjoint) < 1e-11
    assert dense.stats["num_hvp"] == 5 + 1  # one application per inner dimension, plus the cross term


@pytest.mark.parametrize("solver", [bl.CG(max_steps=10), bl.Neumann(steps=15, alpha=0.2), bl.Dense()],
                         ids=["cg", "neumann", "dense"])
def test_reverse_hvp_equals_forward_hvp(solver):
    problem, x, y0, train, val = logistic_problem(seed=2)
    kw = dict(inner=bl.GradientDescent(lr=0.5, steps=40), inner_batch=train, outer_batch=val)
    fwd = bl.hypergrad(problem, x, y0, estimator=bl.AID(linear_solver=solver, hvp="forward"), throw=False, **kw)
    rev = bl.hypergrad(problem, x, y0, estimator=bl.AID(linear_solver=solver, hvp="reverse"), throw=False, **kw)
    assert fwd.result is rev.result
    assert rel_err(fwd.value, rev.value) < 1e-12
    assert rel_err(fwd.adjoint, rev.adjoint) < 1e-12


def test_aid_warm_start_of_the_adjoint_saves_linear_steps():
    # A system CG needs many steps for; the adjoint at a nearby x is a good start.
    q = quadratic_problem(30, 3, seed=9, condition=100.0)
    x, y0 = q.hparams(), q.params0()
    inner = bl.GradientDescent(lr=0.02, steps=60)
    est = bl.AID(linear_solver=bl.CG(max_steps=80, rtol=1e-10), hvp="reverse")
    first = run(q, x, y0, est, inner)
    x_next = {"x": x["x"] + 1e-4}
    cold = run(q, x_next, first.params, est, inner)
    warm = run(q, x_next, first.params, est, inner, adjoint0=first.adjoint)
    assert cold.stats["linear_steps"] > 15
    assert warm.stats["linear_steps"] < cold.stats["linear_steps"] - 3
    assert warm.stats["num_hvp"] == cold.stats["num_hvp"] + 1  # the initial residual b - A v0
    assert rel_err(warm.value, cold.value) < 1e-8
    assert rel_err(q.A @ warm.adjoint["y"], warm.params["y"] - q.t) < 1e-9


def test_aid_warm_start_of_the_inner_solve_from_previous_params():
    q, x, y0 = quad(seed=10)
    inner = bl.GradientDescent(lr=LR, steps=15)
    est = bl.AID(linear_solver=bl.CG(max_steps=10))
    first = run(q, x, y0, est, inner)
    second = run(q, x, first.params, est, inner)  # 30 steps in all
    exact = q.hypergrad(x)
    assert rel_err(second.value, exact) < 1e-3 * rel_err(first.value, exact)
    assert rel_err(second.params, q.unrolled(x, y0, LR, 30)) < 1e-12


# ---------------------------------------------------------------------------------------------- FirstOrder

def test_first_order_without_init_is_the_partial_gradient():
    q, x, y0 = quad(seed=11)
    hg = run(q, x, y0, bl.FirstOrder(), bl.GradientDescent(lr=LR, steps=20))
    assert rel_err(hg.value["x"], q.rho * x["x"] + q.e) < 1e-14
    assert hg.stats["num_hvp"] == 0


def test_first_order_with_learned_init_adds_init_jacobian_transpose_times_grad_y():
    q, x, _ = quad(seed=12, learned_init=True)
    hg = run(q, x, None, bl.FirstOrder(), bl.GradientDescent(lr=LR, steps=20))
    y_n = q.unrolled(x, None, LR, 20)["y"]
    assert rel_err(hg.value["x"], q.rho * x["x"] + q.e + q.P.T @ (y_n - q.t)) < 1e-12


# ---------------------------------------------------------------------------------------------- ridge and nn.Module

def test_ridge_closed_form_for_aid_cg_and_converged_itd():
    r = ridge_problem(n_samples=40, dim=5, seed=1)
    x = r.hparams(-0.5)
    lr = 1.0 / r.lipschitz(x)
    kw = dict(inner=bl.GradientDescent(lr=lr, steps=300), inner_batch=r.train, outer_batch=r.val)
    aid = bl.hypergrad(r.problem, x, r.params0(), estimator=bl.AID(linear_solver=bl.CG(max_steps=20)), **kw)
    itd = bl.hypergrad(r.problem, x, r.params0(), estimator=bl.ITD(), **kw)
    exact = r.hypergrad(x)
    assert rel_err(aid.value, exact) < 1e-8
    assert rel_err(itd.value, exact) < 1e-6
    assert rel_err(aid.params, r.solution(x)) < 1e-10
    assert abs(aid.outer_value.item() - r.outer_value(x).item()) < 1e-10


def test_problem_written_with_an_nn_module_through_functional_call():
    r = ridge_problem(n_samples=40, dim=4, seed=2)
    model = torch.nn.Linear(4, 1, bias=False).double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    def inner(x, p, batch):
        feats, target = batch
        pred = functional_call(model, p, (feats,)).squeeze(-1)
        return 0.5 * ((pred - target) ** 2).mean() + 0.5 * (torch.exp(x["log_lam"]) * p["weight"][0] ** 2).sum()

    def outer(x, p, batch):
        feats, target = batch
        return 0.5 * ((functional_call(model, p, (feats,)).squeeze(-1) - target) ** 2).mean()

    x = r.hparams(0.0)
    params0 = dict(model.named_parameters())  # nn.Parameter leaves, requires_grad=True
    hg = bl.hypergrad(bl.BilevelProblem(inner=inner, outer=outer), x, params0,
                      inner=bl.GradientDescent(lr=1.0 / r.lipschitz(x), steps=200),
                      estimator=bl.AID(linear_solver=bl.CG(max_steps=20)), inner_batch=r.train, outer_batch=r.val)
    assert rel_err(hg.value, r.hypergrad(x)) < 1e-8
    assert rel_err(hg.params["weight"][0], r.solution(x)["w"]) < 1e-10
    for k, v in model.named_parameters():  # the module is untouched
        assert torch.equal(v, before[k]) and v.grad is None


# ---------------------------------------------------------------------------------------------- Sampler

@pytest.mark.parametrize("estimator", [bl.ITD(), bl.FirstOrder(), bl.AID(linear_solver=bl.CG(max_steps=10))],
                         ids=["itd", "fo", "aid"])
def test_constant_sampler_equals_fixed_batch(estimator):
    r = ridge_problem(n_samples=30, dim=3, seed=3)
    x = r.hparams()
    kw = dict(inner=bl.GradientDescent(lr=1.0 / r.lipschitz(x), steps=60), estimator=estimator, outer_batch=r.val)
    fixed = bl.hypergrad(r.problem, x, r.params0(), inner_batch=r.train, **kw)
    sampled = bl.hypergrad(r.problem, x, r.params0(), inner_batch=bl.Sampler(lambda k: r.train), **kw)
    assert rel_err(sampled.value, fixed.value) < 1e-13


# ---------------------------------------------------------------------------------------------- stats

ESTIMATORS = {
    "itd": (bl.ITD(), 0, 12),
    "itd_truncated": (bl.ITD(truncate=3), 0, 3),
    "fo": (bl.FirstOrder(), 0, 0),
    "aid_cg": (bl.AID(linear_solver=bl.CG(max_steps=9)), None, 9 + 1),
    "aid_neumann": (bl.AID(linear_solver=bl.Neumann(steps=7, alpha=0.2)), 7, 7),
    "aid_dense": (bl.AID(linear_solver=bl.Dense()), 1, 5 + 1),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_stats_have_exactly_the_fixed_vocabulary_with_sensible_values(name):
    estimator, linear_steps, num_hvp = ESTIMATORS[name]
    q, x, y0 = quad(seed=13)
    hg = run(q, x, y0, estimator, bl.GradientDescent(lr=LR, steps=12))
    assert hg.result is bl.RESULTS.successful
    assert tuple(hg.stats) == bl.STATS_KEYS
    assert hg.stats["inner_steps"] == 12
    assert hg.stats["num_grad"] == 12 + 1
    assert hg.stats["num_hvp"] == num_hvp
    assert isinstance(hg.stats["wall_time_s"], float) and hg.stats["wall_time_s"] > 0
    if linear_steps is None:  # CG: stops updating once converged, n = 5 in exact arithmetic
        assert 1 <= hg.stats["linear_steps"] <= 9
        assert hg.stats["residual"] <= 1e-10
    else:
        assert hg.stats["linear_steps"] == linear_steps
    if name.startswith("aid"):
        assert hg.adjoint is not None and hg.adjoint["y"].shape == (5,)
    else:
        assert hg.adjoint is None and hg.stats["residual"] == 0.0
    assert hg.outer_value.item() == pytest.approx(q.outer(x, hg.params).item(), rel=1e-14)


def test_stats_with_tolerance_count_steps_applied_and_the_final_check():
    q, x, y0 = quad(seed=14)
    hg = run(q, x, y0, bl.AID(linear_solver=bl.CG(max_steps=10)), bl.Momentum(lr=0.1, momentum=0.5, steps=150,
                                                                                  tol=1e-9))
    assert 0 < hg.stats["inner_steps"] < 150
    assert hg.stats["num_grad"] == 150 + 1 + 1


# ---------------------------------------------------------------------------------------------- float32, devices

F32_CASES = {
    "itd": bl.ITD(), "itd_truncated": bl.ITD(truncate=5), "fo": bl.FirstOrder(),
    "aid_cg": bl.AID(linear_solver=bl.CG(max_steps=10, rtol=1e-6)),
    "aid_neumann": bl.AID(linear_solver=bl.Neumann(steps=40, alpha=0.25)), "aid_dense": bl.AID(linear_solver=bl.Dense()),
}


@pytest.mark.parametrize("name", list(F32_CASES))
def test_float32_runs_of_every_estimator(name):
    q64, x64, y64 = quad(seed=15, learned_init=True)
    q32 = dataclasses.replace(q64, **{k: getattr(q64, k).float() for k in ("A", "B", "c", "t", "e", "P")})
    x32, y32 = {"x": x64["x"].float()}, {"y": y64["y"].float()}
    n = 60
    start = None if name == "fo" else y32  # FirstOrder with the learned start, the others from params0
    hg = run(q32, x32, start, F32_CASES[name], bl.GradientDescent(lr=LR, steps=n))
    start64 = None if start is None else y64
    if name == "itd":
        expected = q64.unrolled_hypergrad(x64, start64, LR, n)
    elif name == "itd_truncated":
        expected = q64.unrolled_hypergrad(x64, q64.unrolled(x64, start64, LR, n - 5), LR, 5)
    elif name == "fo":
        expected = {"x": q64.rho * x64["x"] + q64.e + q64.P.T @ (q64.unrolled(x64, None, LR, n)["y"] - q64.t)}
    else:
        expected = q64.hypergrad(x64)
    assert hg.result is bl.RESULTS.successful
    assert hg.value["x"].dtype == torch.float32 and hg.params["y"].dtype == torch.float32
    assert hg.outer_value.dtype == torch.float32
    assert rel_err(hg.value, expected) < 1e-4


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", [bl.ITD(), bl.FirstOrder(), bl.AID(linear_solver=bl.CG(max_steps=5, rtol=1e-5))],
                         ids=["itd", "fo", "aid"])
def test_outputs_follow_the_device_and_dtype_of_the_inputs(device, dtype, estimator):
    r = ridge_problem(n_samples=20, dim=3, seed=4, dtype=dtype)
    move = lambda t: t.to(device)  # noqa: E731
    x = {k: move(v) for k, v in r.hparams().items()}
    y0 = {k: move(v) for k, v in r.params0().items()}
    train, val = tuple(map(move, r.train)), tuple(map(move, r.val))
    hg = bl.hypergrad(r.problem, x, y0, inner=bl.GradientDescent(lr=0.3, steps=40), estimator=estimator,
                      inner_batch=train, outer_batch=val)
    tensors = [*hg.value.values(), *hg.params.values(), hg.outer_value, *(hg.adjoint or {}).values()]
    for t in tensors:
        assert t.dtype == dtype and t.device.type == device
    assert all(isinstance(hg.stats[k], (int, float)) for k in bl.STATS_KEYS)


# ---------------------------------------------------------------------------------------------- RESULTS

def test_results_from_code_round_trips_every_member():
    codes = [m.code for m in bl.RESULTS]
    assert len(set(codes)) == len(codes)
    for member in bl.RESULTS:
        assert bl.RESULTS.from_code(member.code) is member
        assert bl.RESULTS.from_code(torch.tensor(member.code)) is member
        assert isinstance(member.message({}), str)
    assert bl.RESULTS.from_code(0) is bl.RESULTS.successful


def test_results_from_code_rejects_unknown_codes():
    with pytest.raises(ValueError, match=r"RESULTS\.from_code\(99\).*valid codes"):
        bl.RESULTS.from_code(99)


def test_result_messages_fill_known_fields_and_mark_unknown_ones():
    text = bl.RESULTS.inner_max_steps.message({"inner_max": 7, "inner_grad_norm": torch.tensor(0.5)})
    assert "steps=7" in text and "0.5" in text and "tol=?" in text


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_hypergrad_inside_no_grad_contexts_gives_the_same_value(context):
    # Evaluation loops often run under no_grad; the estimators differentiate with torch.func regardless.
    q, x, y0 = quad(seed=16)
    for est in (bl.ITD(), bl.AID(linear_solver=bl.CG(max_steps=6))):
        expected = run(q, x, y0, est, bl.GradientDescent(lr=LR, steps=10)).value
        with context():
            got = run(q, x, y0, est, bl.GradientDescent(lr=LR, steps=10)).value
        assert rel_err(got, expected) < 1e-14


class _SquareNoJvp(torch.autograd.Function):
    """y -> y * y with a backward rule only: forward-mode AD cannot go through it."""

    @staticmethod
    def forward(y):
        return y * y

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_out):
        (y,) = ctx.saved_tensors
        return 2 * y * grad_out


def test_forward_hvp_falls_back_to_reverse_with_a_warning(monkeypatch):
    aid_module = importlib.import_module("bilevel.estimators.aid")
    monkeypatch.setattr(aid_module, "_warned", set())  # the warning is given once per process
    # g = 0.5 ||y - c||^2 + 0.5 ||y||^2, f = 0.5 ||y - 1||^2: y* = c / 2, dPhi/dc = (c/2 - 1) / 2.
    g = lambda x, y, b: 0.5 * _SquareNoJvp.apply(y["w"] - x["c"]).sum() + 0.5 * (y["w"] ** 2).sum()  # noqa: E731
    f = lambda x, y, b: 0.5 * ((y["w"] - 1.0) ** 2).sum()  # noqa: E731
    problem = bl.BilevelProblem(inner=g, outer=f)
    x, y0 = {"c": torch.tensor([0.4, -1.0], dtype=torch.float64)}, {"w": torch.zeros(2, dtype=torch.float64)}
    kw = dict(inner=bl.GradientDescent(lr=0.5, steps=40))
    with pytest.warns(RuntimeWarning, match=r"AID\(hvp='forward'\): an operator .* no forward-mode rule.*"
                                             r"Pass AID\(hvp='reverse'\)"):
        hg = bl.hypergrad(problem, x, y0, estimator=bl.AID(linear_solver=bl.CG(max_steps=3), hvp="forward"), **kw)
    assert rel_err(hg.value["c"], (x["c"] / 2 - 1) / 2) < 1e-12
    rev = bl.hypergrad(problem, x, y0, estimator=bl.AID(linear_solver=bl.CG(max_steps=3), hvp="reverse"), **kw)
    assert rel_err(rev.value, hg.value) < 1e-14
