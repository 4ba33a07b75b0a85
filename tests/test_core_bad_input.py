"""Every bad input and every failure status: a clear error naming the call, the value and the fix.

Structural mistakes (wrong types, shapes, options) raise ``TypeError``/``ValueError`` at once,
whatever ``throw`` says: there is nothing to return. Numerical failures set ``hg.result``; with
``throw=True`` (the default) they raise :class:`bilevel.BilevelError` carrying the status and the
estimate, and with ``throw=False`` they return it.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import bilevel as bl
from bilevel.testing import quadratic_problem, ridge_problem
from tests.test_core_helpers import rel_err, ridge_tasks

ESTIMATORS = [bl.ITD(), bl.FirstOrder(), bl.AID(linear_solver=bl.CG(max_steps=10))]
EST_IDS = ["itd", "fo", "aid"]


@pytest.fixture(scope="module")
def quad():
    q = quadratic_problem(5, 3, seed=0, condition=10.0)  # eigenvalues of A in [1, 10]
    return q, q.hparams(), q.params0()


def call(q, x=None, y0=None, *, problem=None, estimator=None, inner=None, **kw):
    return bl.hypergrad(problem or q.problem, x, y0, inner=inner or bl.GradientDescent(lr=0.1, steps=5),
                        estimator=estimator or bl.AID(linear_solver=bl.CG(max_steps=10)), **kw)


def expect_status(fn, status: bl.RESULTS, *fragments: str) -> bl.Hypergrad:
    """``fn(throw)`` raises BilevelError(status) whose message holds ``fragments``; with throw=False it returns."""
    with pytest.raises(bl.BilevelError) as info:
        fn(True)
    err = info.value
    assert err.result is status
    text = str(err)
    assert text.startswith("hypergrad(estimator=") or text.startswith("vmap_hypergrad(estimator=")
    assert status.name in text and "Fix:" in text and "throw=False" in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert isinstance(err.hypergrad, bl.Hypergrad) and err.hypergrad.result is status
    hg = fn(False)
    assert hg.result is status
    assert set(hg.stats) == set(bl.STATS_KEYS)
    return hg


# ---------------------------------------------------------------------------------------------- objective outputs

BAD_OUTPUTS = {
    "vector": (lambda y: y["y"] * 1.0, ValueError, r"returned shape \(5,\); expected a scalar tensor.*Fix: reduce"),
    "float": (lambda y: 1.0, TypeError, r"returned float; expected a scalar tensor.*Fix"),
    "none": (lambda y: None, TypeError, r"returned NoneType; expected a scalar tensor.*Fix"),
    "int": (lambda y: (y["y"] ** 2).sum().long(), TypeError, r"returned dtype torch.int64; expected a floating.*Fix"),
}


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=EST_IDS)
@pytest.mark.parametrize("which", ["inner", "outer"])
@pytest.mark.parametrize("bad", list(BAD_OUTPUTS))
def test_objective_returning_a_non_scalar_or_non_tensor(quad, estimator, which, bad):
    q, x, y0 = quad
    out, exc, pattern = BAD_OUTPUTS[bad]

    def broken(hparams, params, batch):
        return out(params)

    problem = bl.BilevelProblem(inner=broken if which == "inner" else q.inner,
                                outer=broken if which == "outer" else q.outer)
    for throw in (True, False):  # a structural error raises whatever throw says
        with pytest.raises(exc, match=rf"^hypergrad\(\.\.\.\): {which} objective .*broken {pattern}"):
            call(q, x, y0, problem=problem, estimator=estimator, throw=throw)


# ---------------------------------------------------------------------------------------------- trees

BAD_TREES = {
    "list": (lambda t: [t], TypeError, r" is a list; expected a dict\[str, Tensor\].*Fix"),
    "tensor": (lambda t: t, TypeError, r" is a Tensor; expected a dict\[str, Tensor\].*Fix"),
    "empty": (lambda t: {}, ValueError, r" is an empty dict; expected at least one tensor.*Fix"),
    "int": (lambda t: {"k": t.long()}, TypeError, r"\['k'\] has dtype torch.int64; expected a floating dtype.*Fix"),
    "bool": (lambda t: {"k": t > 0}, TypeError, r"\['k'\] has dtype torch.bool; expected a floating dtype.*Fix"),
    "numpy": (lambda t: {"k": t.numpy()}, TypeError, r"\['k'\] is a ndarray; expected a tensor.*Fix"),
    "float": (lambda t: {"k": 0.5}, TypeError, r"\['k'\] is a float; expected a tensor.*Fix"),
}


@pytest.mark.parametrize("bad", list(BAD_TREES))
@pytest.mark.parametrize("which", ["hparams", "params0", "adjoint0"])
def test_trees_must_be_dicts_of_floating_tensors(quad, which, bad):
    q, x, y0 = quad
    make, exc, pattern = BAD_TREES[bad]
    args = {"x": x, "y0": y0, "adjoint0": None}
    args[{"hparams": "x", "params0": "y0", "adjoint0": "adjoint0"}[which]] = make(torch.ones(5, dtype=torch.float64))
    with pytest.raises(exc, match=rf"^hypergrad\(\.\.\.\): {which}{pattern}"):
        call(q, args["x"], args["y0"], adjoint0=args["adjoint0"], throw=False)


def test_init_must_return_a_params_dict(quad):
    q, x, _ = quad
    problem = bl.BilevelProblem(inner=q.inner, outer=q.outer, init=lambda h: h["x"])
    with pytest.raises(TypeError, match=r"^hypergrad\(\.\.\.\): init\(hparams\) is a Tensor; expected a dict"):
        call(q, x, None, problem=problem, estimator=bl.ITD())


@pytest.mark.parametrize("params0, exc, pattern", [
    ({"y": torch.zeros(4, dtype=torch.float64)}, ValueError,
     r"params0\['y'\] has shape \(4,\) but init\(hparams\)\['y'\] has shape \(5,\)\. Fix"),
    ({"y": torch.zeros(5, dtype=torch.float32)}, TypeError,
     r"params0\['y'\] has dtype torch.float32 but init\(hparams\)\['y'\] has dtype torch.float64\. Fix"),
    ({"z": torch.zeros(5, dtype=torch.float64)}, ValueError,
     r"params0 has keys \['z'\] but init\(hparams\) has keys \['y'\]\. Fix"),
], ids=["shape", "dtype", "keys"])
def test_params0_must_match_what_init_returns(params0, exc, pattern):
    q = quadratic_problem(5, 3, seed=0, learned_init=True)
    with pytest.raises(exc, match=rf"^hypergrad\(\.\.\.\): {pattern}"):
        call(q, q.hparams(), params0, estimator=bl.ITD())


@pytest.mark.parametrize("adjoint0, exc, pattern", [
    ({"y": torch.zeros(4, dtype=torch.float64)}, ValueError,
     r"adjoint0\['y'\] has shape \(4,\) but params0\['y'\] has shape \(5,\)\. Fix"),
    ({"y": torch.zeros(5, dtype=torch.float32)}, TypeError,
     r"adjoint0\['y'\] has dtype torch.float32 but params0\['y'\] has dtype torch.float64\. Fix"),
    ({"z": torch.zeros(5, dtype=torch.float64)}, ValueError, r"adjoint0 has keys \['z'\] but params0 has keys"),
], ids=["shape", "dtype", "keys"])
@pytest.mark.parametrize("solver", [bl.CG(), bl.Neumann()], ids=["cg", "neumann"])
def test_adjoint0_must_match_the_inner_parameters(quad, adjoint0, exc, pattern, solver):
    q, x, y0 = quad
    with pytest.raises(exc, match=rf"^hypergrad\(\.\.\.\): {pattern}"):
        call(q, x, y0, estimator=bl.AID(linear_solver=solver), adjoint0=adjoint0)


def test_adjoint0_must_match_init_when_there_is_no_params0():
    q = quadratic_problem(5, 3, seed=0, learned_init=True)
    with pytest.raises(ValueError, match=r"^vmap_hypergrad\(\.\.\.\): adjoint0\['y'\] has shape \(4,\) but "
                                         r"init\(hparams\)\['y'\] has shape \(5,\)"):
        bl.vmap_hypergrad(q.problem, {"x": torch.zeros(2, 3, dtype=torch.float64)},
                          adjoint0={"y": torch.zeros(2, 4, dtype=torch.float64)}, inner=bl.GradientDescent(lr=0.1),
                          estimator=bl.ITD(), in_dims=(0, None, None, None))


def test_params0_none_without_init(quad):
    q, x, _ = quad
    with pytest.raises(ValueError, match=r"^hypergrad\(\.\.\.\): params0 is None and the problem has no init\. Fix"):
        call(q, x, None)


def test_wrong_argument_kinds(quad):
    q, x, y0 = quad
    with pytest.raises(TypeError, match=r"^hypergrad\(\.\.\.\): problem is a function; expected bl\.BilevelProblem"):
        bl.hypergrad(lambda x, y, b: 0.0, x, y0, inner=bl.GradientDescent(lr=0.1), estimator=bl.ITD())
    with pytest.raises(TypeError, match=r"^hypergrad\(\.\.\.\): inner=.* is not an inner solver\. Fix"):
        call(q, x, y0, inner=bl.CG())
    with pytest.raises(TypeError, match=r"^hypergrad\(\.\.\.\): estimator=.* is not an estimator\. Fix"):
        call(q, x, y0, estimator=bl.CG())
    with pytest.raises(TypeError, match=r"^BilevelProblem\(outer=3\): expected a callable"):
        bl.BilevelProblem(inner=q.inner, outer=3)
    with pytest.raises(TypeError, match=r"^BilevelProblem\(init=.*\): expected None or a callable"):
        bl.BilevelProblem(inner=q.inner, outer=q.outer, init={"y": 1})


# ---------------------------------------------------------------------------------------------- batches the objectives reject

class TaskDataError(Exception):
    """The user's own exception type: it must reach the user unchanged, with our note."""


def picky(hparams, params, batch):
    if not isinstance(batch, tuple):
        raise TaskDataError(f"expected (features, targets), got {type(batch).__name__}")
    return (params["y"] ** 2).sum()


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=EST_IDS)
@pytest.mark.parametrize("which", ["inner", "outer"])
def test_batch_rejected_by_the_objective_keeps_the_users_exception_with_a_note(quad, estimator, which):
    q, x, y0 = quad
    problem = bl.BilevelProblem(inner=picky if which == "inner" else q.inner,
                                outer=picky if which == "outer" else q.outer)
    batch = torch.zeros(7, 2)
    kwargs = {f"{which}_batch": batch}
    with pytest.raises(TaskDataError, match="expected \\(features, targets\\)") as info:
        call(q, x, y0, problem=problem, estimator=estimator, throw=False, **kwargs)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "hypergrad(...)" in notes and f"{which} objective picky" in notes
    assert "Tensor(shape=(7, 2), dtype=torch.float32)" in notes
    assert f"Fix: check that the batch passed as {which}_batch=" in notes


def test_exception_inside_init_gets_a_note(quad):
    q, x, _ = quad

    def init(h):
        raise TaskDataError("no head")

    problem = bl.BilevelProblem(inner=q.inner, outer=q.outer, init=init)
    with pytest.raises(TaskDataError) as info:
        call(q, x, None, problem=problem, estimator=bl.ITD())
    assert "init(hparams)" in " ".join(info.value.__notes__)


# ---------------------------------------------------------------------------------------------- inner-loop statuses

@pytest.mark.parametrize("estimator", ESTIMATORS, ids=EST_IDS)
def test_nan_in_the_inner_loop_reports_the_step(estimator):
    g = lambda x, y, b: 0.5 * ((y["w"] - x["c"] * b) ** 2).sum()  # noqa: E731
    f = lambda x, y, b: 0.5 * ((y["w"] - 1.0) ** 2).sum()  # noqa: E731
    problem = bl.BilevelProblem(inner=g, outer=f)
    batch = bl.Sampler(lambda k: torch.tensor(math.nan if k == 7 else 1.0, dtype=torch.float64))
    x, y0 = {"c": torch.ones(3, dtype=torch.float64)}, {"w": torch.zeros(3, dtype=torch.float64)}
    expect_status(lambda throw: bl.hypergrad(problem, x, y0, inner=bl.GradientDescent(lr=0.5, steps=20),
                                             estimator=estimator, inner_batch=batch, throw=throw),
                  bl.RESULTS.inner_nonfinite, "at step 7", "lr=0.5")


def test_overflow_in_the_inner_loop_reports_the_first_nonfinite_step(quad):
    q, x, y0 = quad
    lr, steps = 1e3, 60
    y, first_bad = y0["y"], None  # by hand: the first k whose loss or gradient at y_k is not finite
    for k in range(steps):
        gy = q.A @ y - q.B @ x["x"] - q.c
        if not (torch.isfinite(q.inner(x, {"y": y})) and torch.isfinite(gy.norm())):
            first_bad = k
            break
        y = y - lr * gy
    assert first_bad is not None
    for est in ESTIMATORS:
        hg = expect_status(lambda throw: call(q, x, y0, estimator=est, inner=bl.GradientDescent(lr=lr, steps=steps),
                                              throw=throw),
                           bl.RESULTS.inner_nonfinite, f"at step {first_bad} ")
        assert hg.stats["inner_steps"] == steps


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=EST_IDS)
@pytest.mark.parametrize("inner", [bl.GradientDescent(lr=0.25, steps=20), bl.Momentum(lr=0.4, momentum=0.8, steps=30)],
                         ids=["gd", "momentum"])
def test_growing_inner_loss_is_inner_diverged(quad, estimator, inner):
    q, x, y0 = quad  # lambda_max = 10: GD needs lr < 2 / 10, heavy ball lr < 2 (1 + 0.8) / 10
    hg = expect_status(lambda throw: call(q, x, y0, estimator=estimator, inner=inner, throw=throw),
                       bl.RESULTS.inner_diverged, "the inner loss grew from", f"lr={inner.lr}")
    assert math.isfinite(hg.value["x"].sum().item())


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=EST_IDS)
@pytest.mark.parametrize("inner", [bl.GradientDescent(lr=0.1, steps=5, tol=1e-6),
                                   bl.Momentum(lr=0.05, momentum=0.5, steps=5, tol=1e-6)], ids=["gd", "momentum"])
def test_tolerance_not_reached_is_inner_max_steps(quad, estimator, inner):
    q, x, y0 = quad
    hg = expect_status(lambda throw: call(q, x, y0, estimator=estimator, inner=inner, throw=throw),
                       bl.RESULTS.inner_max_steps, "stopped at steps=5", "> tol=1e-06", "raise steps")
    assert hg.stats["inner_steps"] == 5


def test_tolerance_reached_is_not_an_error(quad):
    q, x, y0 = quad
    hg = call(q, x, y0, inner=bl.GradientDescent(lr=0.15, steps=300, tol=1e-8))
    assert hg.result is bl.RESULTS.successful and hg.stats["inner_steps"] < 300


# ---------------------------------------------------------------------------------------------- linear-solve statuses

def test_cg_stopping_above_tolerance_is_linear_max_steps(quad):
    q, x, y0 = quad
    est = bl.AID(linear_solver=bl.CG(max_steps=2))
    hg = expect_status(lambda throw: call(q, x, y0, estimator=est, inner=bl.GradientDescent(lr=0.15, steps=100),
                                          throw=throw),
                       bl.RESULTS.linear_max_steps, "CG(max_steps=2", "stopped at max_steps=2", "raise max_steps")
    assert hg.stats["linear_steps"] == 2 and hg.stats["residual"] > 1e-10


def test_neumann_with_alpha_too_large_suggests_a_safe_alpha(quad):
    q, x, y0 = quad
    lambda_max = torch.linalg.eigvalsh(q.A)[-1].item()
    y0 = q.solution(x)  # the linear solve is what is tested here
    inner = bl.GradientDescent(lr=0.15, steps=1)
    est = bl.AID(linear_solver=bl.Neumann(steps=20, alpha=0.3))  # 0.3 > 2 / 10
    with pytest.raises(bl.BilevelError) as info:
        call(q, x, y0, estimator=est, inner=inner)
    text = str(info.value)
    assert info.value.result is bl.RESULTS.neumann_diverged
    assert "Neumann(steps=20, alpha=0.3)" in text and "Fix: use alpha <=" in text
    estimate = float(re.search(r"largest eigenvalue ~ ([0-9.e+-]+)", text).group(1))
    assert 0.5 * lambda_max < estimate <= lambda_max * 1.01
    safe = float(re.search(r"alpha <= ([0-9.e+-]+)", text).group(1))
    assert 0 < safe < 2 / lambda_max
    hg = call(q, x, y0, estimator=bl.AID(linear_solver=bl.Neumann(steps=200, alpha=safe), hvp="reverse"), inner=inner)
    assert hg.result is bl.RESULTS.successful and rel_err(hg.value, q.hypergrad(x)) < 1e-6
    expect_status(lambda throw: call(q, x, y0, estimator=est, inner=inner, throw=throw), bl.RESULTS.neumann_diverged)


def test_neumann_truncation_alone_is_not_an_error(quad):
    q, x, y0 = quad
    hg = call(q, x, y0, estimator=bl.AID(linear_solver=bl.Neumann(steps=3, alpha=0.05)))
    assert hg.result is bl.RESULTS.successful and hg.stats["residual"] > 0.1


def test_neumann_warm_started_at_the_solution_is_not_divergence():
    # Rounding noise around an exact warm start (residual ~ 1e-16) must not read as a growing series.
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
        a = (basis * torch.linspace(1, 4, 6, dtype=torch.float64)) @ basis.T
        b = {"v": torch.randn(6, generator=gen, dtype=torch.float64)}
        exact = {"v": torch.linalg.solve(a, b["v"])}
        sol = bl.Neumann(steps=10, alpha=0.2).solve(lambda v: {"v": a @ v["v"]}, b, exact)
        assert sol.code.item() == 0, (seed, sol.info)


@pytest.mark.parametrize("solver", [bl.CG(max_steps=4), bl.Neumann(steps=4, alpha=0.1), bl.Dense()],
                         ids=["cg", "neumann", "dense"])
def test_nonfinite_operator_is_linear_nonfinite(solver):
    b = {"v": torch.ones(3, dtype=torch.float64)}
    sol = solver.solve(lambda v: {"v": v["v"] * math.nan}, b)
    assert bl.RESULTS.from_code(sol.code) is bl.RESULTS.linear_nonfinite


def test_nonfinite_hypergradient_with_a_finite_inner_loop():
    # f = ||y|| has no gradient at the inner solution y = 0.
    problem = bl.BilevelProblem(inner=lambda x, y, b: 0.5 * ((y["w"] - x["c"] + 1.0) ** 2).sum(),
                                outer=lambda x, y, b: torch.sqrt((y["w"] ** 2).sum()))
    x, y0 = {"c": torch.ones(2, dtype=torch.float64)}, {"w": torch.zeros(2, dtype=torch.float64)}
    expect_status(lambda throw: bl.hypergrad(problem, x, y0, inner=bl.GradientDescent(lr=0.5, steps=3),
                                             estimator=bl.ITD(), throw=throw),
                  bl.RESULTS.nonfinite_hypergradient, "outer objective")


# ---------------------------------------------------------------------------------------------- learned start with AID

def test_aid_when_hparams_enter_only_through_init_is_zero_hypergradient():
    g = lambda x, y, b: 0.5 * ((y["w"] - 1.0) ** 2).sum()  # noqa: E731
    f = lambda x, y, b: (y["w"] ** 2).sum()  # noqa: E731
    problem = bl.BilevelProblem(inner=g, outer=f, init=lambda x: {"w": 2.0 * x["m"]})
    x = {"m": torch.randn(3, dtype=torch.float64)}
    inner = bl.GradientDescent(lr=0.1, steps=5)
    hg = expect_status(lambda throw: bl.hypergrad(problem, x, inner=inner, estimator=bl.AID(), throw=throw),
                       bl.RESULTS.zero_hypergradient, "only through init(hparams)", "bl.ITD()", "bl.IMAML(lam=...)")
    assert torch.equal(hg.value["m"], torch.zeros(3, dtype=torch.float64))
    # ITD sees the start: 5 steps contract the start by 0.9^5.
    itd = bl.hypergrad(problem, x, inner=inner, estimator=bl.ITD())
    y_n = 1.0 + 0.9 ** 5 * (2.0 * x["m"] - 1.0)
    assert rel_err(itd.value["m"], 2.0 * 0.9 ** 5 * 2.0 * y_n) < 1e-13


def test_aid_with_a_constant_start_and_an_init_is_not_flagged():
    q = quadratic_problem(4, 2, seed=3, learned_init=True)
    hg = bl.hypergrad(q.problem, q.hparams(), q.params0(), inner=bl.GradientDescent(lr=0.1, steps=200),
                      estimator=bl.AID())
    assert hg.result is bl.RESULTS.successful and rel_err(hg.value, q.hypergrad(q.hparams())) < 1e-8


# ---------------------------------------------------------------------------------------------- constructor options

@pytest.mark.parametrize("make, pattern", [
    (lambda: bl.GradientDescent(lr=0.0), r"^GradientDescent\(lr=0\.0\): the step size must be positive"),
    (lambda: bl.GradientDescent(lr=-1.0), r"^GradientDescent\(lr=-1\.0\)"),
    (lambda: bl.GradientDescent(lr=math.nan), r"^GradientDescent\(lr=nan\)"),
    (lambda: bl.GradientDescent(lr=0.1, steps=-1), r"^GradientDescent\(steps=-1\): steps must be a non-negative"),
    (lambda: bl.GradientDescent(lr=0.1, steps=2.5), r"^GradientDescent\(steps=2\.5\)"),
    (lambda: bl.GradientDescent(lr=0.1, steps=True), r"^GradientDescent\(steps=True\)"),
    (lambda: bl.GradientDescent(lr=0.1, tol=-1e-3), r"^GradientDescent\(tol=-0\.001\): tolerances must be non-neg"),
    (lambda: bl.GradientDescent(lr=0.1, tol=math.nan), r"^GradientDescent\(tol=nan\)"),
    (lambda: bl.Momentum(lr=0.1, momentum=1.0), r"^Momentum\(momentum=1\.0\): momentum must lie in \[0, 1\)"),
    (lambda: bl.Momentum(lr=0.1, momentum=-0.1), r"^Momentum\(momentum=-0\.1\)"),
    (lambda: bl.Momentum(lr=-0.1), r"^Momentum\(lr=-0\.1\)"),
    (lambda: bl.Momentum(lr=0.1, steps=-3), r"^Momentum\(steps=-3\)"),
    (lambda: bl.Momentum(lr=0.1, tol=-1.0), r"^Momentum\(tol=-1\.0\)"),
    (lambda: bl.CG(max_steps=0), r"^CG\(max_steps=0\): max_steps must be a positive integer"),
    (lambda: bl.CG(rtol=-1.0), r"^CG\(rtol=-1\.0\): tolerances must be non-negative"),
    (lambda: bl.CG(atol=-1e-9), r"^CG\(atol=-1e-09\): tolerances must be non-negative"),
    (lambda: bl.Neumann(steps=0), r"^Neumann\(steps=0\): steps must be a positive integer"),
    (lambda: bl.Neumann(alpha=0.0), r"^Neumann\(alpha=0\.0\): alpha must be positive"),
    (lambda: bl.Neumann(alpha=-0.5), r"^Neumann\(alpha=-0\.5\)"),
    (lambda: bl.ITD(truncate=0), r"^ITD\(truncate=0\): truncate must be a positive integer"),
    (lambda: bl.ITD(truncate=-2), r"^ITD\(truncate=-2\)"),
    (lambda: bl.ITD(truncate=2.5), r"^ITD\(truncate=2\.5\)"),
    (lambda: bl.ITD(truncate=True), r"^ITD\(truncate=True\)"),
    (lambda: bl.AID(linear_solver="cg"), r"^AID\(linear_solver='cg'\): expected a linear solver"),
    (lambda: bl.AID(hvp="fwd"), r"^AID\(hvp='fwd'\): hvp must be 'forward'"),
])
def test_invalid_constructor_options(make, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        make()


def test_truncate_larger_than_the_inner_steps(quad):
    q, x, y0 = quad
    with pytest.raises(ValueError, match=r"ITD\(truncate=8\).*truncate=8 exceeds the inner solver's steps=5\. Fix"):
        call(q, x, y0, estimator=bl.ITD(truncate=8))


@pytest.mark.parametrize("in_dims, pattern", [
    ((1, 0, 0, 0), r"^vmap_hypergrad\(in_dims=\(1, 0, 0, 0\)\): expected four entries"),
    ((0, 0), r"^vmap_hypergrad\(in_dims=\(0, 0\)\): expected four entries"),
    ((None, None, None, None), r"^vmap_hypergrad\(in_dims=.*\): no input carries a task dimension\. Fix"),
])
def test_vmap_hypergrad_in_dims(quad, in_dims, pattern):
    q, x, y0 = quad
    with pytest.raises(ValueError, match=pattern):
        bl.vmap_hypergrad(q.problem, x, y0, inner=bl.GradientDescent(lr=0.1), estimator=bl.ITD(), in_dims=in_dims)


# ---------------------------------------------------------------------------------------------- inputs are never modified

def _snapshot(*trees):
    return [(t, t.detach().clone(), t._version, t.requires_grad) for tree in trees for t in _leaves(tree)]


def _leaves(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _leaves(v)]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in _leaves(v)]
    return []


def _assert_untouched(snapshot):
    for tensor, copy, version, requires_grad in snapshot:
        assert tensor._version == version, "modified in place"
        assert torch.equal(tensor.detach(), copy)
        assert tensor.requires_grad == requires_grad and tensor.grad is None


@pytest.mark.parametrize("estimator", [*ESTIMATORS, bl.ITD(truncate=2), bl.AID(linear_solver=bl.Neumann(steps=5)),
                                       bl.AID(linear_solver=bl.Dense())],
                         ids=[*EST_IDS, "itd_trunc", "aid_neumann", "aid_dense"])
@pytest.mark.parametrize("kind", ["plain", "requires_grad", "parameter"])
def test_inputs_are_never_modified(estimator, kind):
    r = ridge_problem(n_samples=20, dim=3, seed=0)
    wrap = {"plain": lambda t: t.clone(), "requires_grad": lambda t: t.clone().requires_grad_(True),
            "parameter": lambda t: torch.nn.Parameter(t.clone())}[kind]
    x = {k: wrap(v + 0.1) for k, v in r.hparams().items()}
    y0 = {k: wrap(v + 0.2) for k, v in r.params0().items()}
    adjoint0 = {"w": wrap(torch.ones(3, dtype=torch.float64))}
    train, val = tuple(t.clone() for t in r.train), tuple(t.clone() for t in r.val)
    snap = _snapshot(x, y0, adjoint0, train, val)
    hg = bl.hypergrad(r.problem, x, y0, inner=bl.GradientDescent(lr=0.2, steps=6), estimator=estimator,
                      inner_batch=train, outer_batch=val, adjoint0=adjoint0, throw=False)
    _assert_untouched(snap)
    for t in [*hg.value.values(), *hg.params.values(), hg.outer_value]:
        assert not t.requires_grad  # results are plain tensors, detached from the caller's graph
    # ... and modifying the results does not reach the inputs
    for t in hg.params.values():
        t.add_(1.0)
    _assert_untouched(snap[:len(_leaves(x)) + len(_leaves(y0))])


def test_inputs_are_never_modified_by_vmap_hypergrad():
    tasks, train, val, lr = ridge_tasks(3)
    x = {k: v.clone().requires_grad_(True) for k, v in tasks[0].hparams().items()}
    y0 = {k: torch.nn.Parameter(v.clone()) for k, v in tasks[0].params0().items()}
    snap = _snapshot(x, y0, train, val)
    for est in ESTIMATORS:
        bl.vmap_hypergrad(tasks[0].problem, x, y0, inner=bl.GradientDescent(lr=lr, steps=5), estimator=est,
                          inner_batch=train, outer_batch=val, in_dims=(None, None, 0, 0))
    _assert_untouched(snap)
