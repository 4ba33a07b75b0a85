"""``bl.Compiled``: compiled execution gives the eager numbers, caches, composes with vmap, and falls back.

Compilation is slow, so the problems are tiny and module-scoped (one problem object per dtype:
the compiled units are cached per process by what they compute, and every test after the first
reuses them). The default tests use dynamo's ``"eager"`` backend where the point is the
machinery (tracing, caching, transforms, fallbacks); the tests marked ``slow`` compile every
estimator with inductor (C++ code generation) and compare with eager at 1e-5 relative in
float32 and 1e-10 in float64. Each compilation is paid once: an estimator goes through
inductor (which traces with dynamo too) in one test, not again through dynamo alone, and the
no-recompile check rides on those compilations.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import bilevel as bl
from bilevel import _runner
from bilevel.compile import _backend, _unit, compiled
from bilevel.testing import quadratic_problem, ridge_problem

STEPS, CHUNK = 4, 2
ESTIMATORS = {
    "ITD": bl.ITD(),
    "ITD(truncate)": bl.ITD(truncate=2),
    "ITD(checkpoint)": bl.ITD(checkpoint_every=2),
    "FirstOrder": bl.FirstOrder(),
    "AID-CG": bl.AID(linear_solver=bl.CG(max_steps=3)),
    "AID-Neumann": bl.AID(linear_solver=bl.Neumann(steps=3, alpha=0.1)),
    "AID-Dense": bl.AID(linear_solver=bl.Dense()),  # its operator is applied under vmap
    "IMAML": bl.IMAML(lam=1.0, linear_solver=bl.CG(max_steps=3)),
    "ESJ": bl.ESJ(directions=2, smoothing=1e-3, seed=0),
    "Reptile": bl.Reptile(),
}
#: Estimators that differentiate through (or need) the learned start run from init(x); the others from params0.
FROM_INIT = {"ITD", "IMAML", "Reptile", "ESJ"}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel(a: dict, b: dict) -> float:
    num = sum(float(torch.linalg.vector_norm((a[k] - b[k]).double()) ** 2) for k in b) ** 0.5
    den = sum(float(torch.linalg.vector_norm(b[k].double()) ** 2) for k in b) ** 0.5
    return num / max(den, 1e-300)


@pytest.fixture(scope="module")
def problems():
    return {dtype: quadratic_problem(dim_y=3, dim_x=2, seed=0, learned_init=True, dtype=dtype)
            for dtype in (torch.float64, torch.float32)}


def call(q, name, estimator, **kw):
    params0 = None if name in FROM_INIT else q.params0()
    return bl.hypergrad(q.problem, q.hparams(), params0, inner=bl.GradientDescent(lr=0.1, steps=STEPS),
                        estimator=estimator, throw=False, **kw)


def check_same(q, name, backend, granularity="chunk", dtype=torch.float64):
    eager = call(q, name, ESTIMATORS[name])
    fast = call(q, name, bl.Compiled(ESTIMATORS[name], granularity=granularity, chunk=CHUNK, backend=backend))
    assert fast.result is eager.result
    assert rel(fast.value, eager.value) <= TOL[dtype]
    assert rel(fast.params, eager.params) <= TOL[dtype]
    for key in ("inner_steps", "linear_steps", "num_grad", "num_hvp"):
        assert fast.stats[key] == eager.stats[key]
    assert tuple(fast.stats) == bl.STATS_KEYS
    return fast


# --------------------------------------------------------------------------- same numbers

#: A representative few for the everyday run (taped ITD, AID with its HVPs, the first-order pair);
#: the ``slow`` inductor test below covers every estimator (inductor traces with dynamo too).
EVERYDAY = ("ITD", "AID-CG", "FirstOrder", "Reptile")


@pytest.mark.parametrize("name", EVERYDAY)
def test_representative_estimators_match_eager_through_dynamo(problems, name):
    check_same(problems[torch.float64], name, backend="eager")


@pytest.mark.parametrize("granularity, name", [
    ("step", "AID-CG"), ("estimator", "FirstOrder"),
    pytest.param("solve", "AID-CG", marks=pytest.mark.slow), pytest.param("solve", "ITD", marks=pytest.mark.slow),
    pytest.param("estimator", "ITD", marks=pytest.mark.slow), pytest.param("estimator", "AID-CG", marks=pytest.mark.slow),
])
def test_every_granularity_matches_eager(problems, granularity, name):
    check_same(problems[torch.float64], name, backend="eager", granularity=granularity)


def test_auto_granularity_runs_the_whole_estimator_as_one_unit_unrolled_or_with_compiled_loops(problems, monkeypatch):
    # A few inner steps: one unit, the steps unrolled (MAML-style). Many steps: one unit whose inner
    # steps and linear-solver iterations are compiled loops, for the estimators that neither
    # differentiate through the steps nor vmap inside; ITD and ESJ get a unit per primitive.
    whole = []
    run_whole = compiled.Compiled._run_whole

    def spy(self, *args, looped=False):
        out = run_whole(self, *args, looped=looped)
        whole.append((looped, out is not None))
        return out
    monkeypatch.setattr(compiled.Compiled, "_run_whole", spy)
    q = problems[torch.float64]
    for name in ("FirstOrder", "AID-CG", "ITD"):
        whole.clear()
        eager = call(q, name, ESTIMATORS[name])
        few = call(q, name, bl.Compiled(ESTIMATORS[name], chunk=STEPS, backend="eager"))
        assert whole == [(False, True)]  # STEPS <= chunk: the whole estimator, unrolled
        many = call(q, name, bl.Compiled(ESTIMATORS[name], chunk=CHUNK, backend="eager"))
        assert whole == [(False, True)] + ([(True, True)] if name != "ITD" else [])
        assert rel(few.value, eager.value) <= 1e-12 and rel(many.value, eager.value) <= 1e-12
        assert many.result is eager.result and many.stats["num_hvp"] == eager.stats["num_hvp"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_matches_eager_with_inductor(problems, name, dtype):
    first = check_same(problems[dtype], name, backend="inductor", dtype=dtype)
    second = check_same(problems[dtype], name, backend="inductor", dtype=dtype)
    assert second.stats["compile_s"] == 0.0  # same shapes and options: served from the cache
    assert rel(second.value, first.value) <= TOL[dtype]


def test_large_matrix_vector_products_go_to_blas_with_the_same_numbers():
    from bilevel.compile._backend import BLAS_MV_ENTRIES, _mv
    gen = torch.Generator().manual_seed(0)
    for rows in (3, BLAS_MV_ENTRIES // 64):
        a, x = torch.randn(rows, 64, generator=gen, dtype=torch.float64), torch.randn(64, generator=gen, dtype=torch.float64)
        assert torch.allclose(_mv(a, x), a @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_inductor_with_blas_matrix_vector_products_matches_eager(monkeypatch):
    # Every matrix-vector product goes to BLAS (the threshold lowered to one entry), so a small
    # problem exercises the path a large one takes (about 1 M entries and up), with batches, in float32.
    monkeypatch.setattr(_backend, "BLAS_MV_ENTRIES", 1)  # read when a unit is traced; these shapes are new here
    r = ridge_problem(n_samples=24, dim=6, seed=1, dtype=torch.float32)
    inner = bl.GradientDescent(lr=0.2, steps=STEPS)
    plain = bl.FirstOrder()  # its chunks hold both products of a gradient step, X w and X^T r
    kw = dict(inner=inner, inner_batch=r.train, outer_batch=r.val, throw=False)
    eager = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=plain, **kw)
    fast = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=bl.Compiled(plain, chunk=CHUNK), **kw)
    assert rel(fast.value, eager.value) <= 1e-5 and rel(fast.params, eager.params) <= 1e-5


def test_library_products_count_matrix_results_and_large_matrix_vector_products(monkeypatch):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(a, b, m, v):
        return a @ b, torch.nn.functional.linear(a, b), m @ v, torch.mm(a, b.T).sum()

    gen = torch.Generator().manual_seed(0)
    a, b, m, v = (torch.randn(*s, generator=gen) for s in ((3, 4), (4, 4), (5, 4), (4,)))
    torch.compile(fn, backend=capture, fullgraph=True)(a, b, m, v)  # (no dynamo.reset: it drops compile_s's clock)
    assert _backend.library_products(graphs[0]) == 3  # the matrix-vector product is inductor's own loop
    monkeypatch.setattr(_backend, "BLAS_MV_ENTRIES", 20)  # ... unless its matrix is large
    assert _backend.library_products(graphs[0]) == 4
    assert _backend.wants_cpp_wrapper(graphs[0], [a, b, m, v])
    monkeypatch.setattr(_backend, "CPP_WRAPPER_MIN_PRODUCTS", 5)
    assert not _backend.wants_cpp_wrapper(graphs[0], [a, b, m, v])


def test_decomposition_table_has_a_stable_cache_key_that_follows_the_blas_threshold(monkeypatch):
    # torch's FX-graph cache pickles the compile options into its key; a plain copy of inductor's
    # table (which holds C++ functions) could not be pickled, and every unit bypassed the cache.
    from torch._inductor.codecache import FxGraphCachePickler

    pickler = FxGraphCachePickler(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()))
    table = _backend._decompositions()
    assert table[torch.ops.aten.mv.default] is _backend._mv
    assert table[torch.ops.aten.pow.Tensor_Scalar] is _backend._pow_scalar
    key = pickler.get_hash(table)
    assert pickler.get_hash(_backend._decompositions()) == key
    monkeypatch.setattr(_backend, "BLAS_MV_ENTRIES", 7)
    assert pickler.get_hash(table) != key
    monkeypatch.undo()
    monkeypatch.delitem(_backend._REPLACEMENTS, torch.ops.aten.pow.Tensor_Scalar)  # a replacement fewer
    assert pickler.get_hash(table) != key
    with _backend._keyed():
        assert torch.compiler.config.cache_key_tag.endswith(_backend._digest()[:16])


def test_cache_digest_needs_no_installed_source(monkeypatch):
    # Installed without its .py files (bytecode only), the digest falls back to the replacements'
    # bytecode instead of failing every compilation (which would run everything eagerly).
    import inspect

    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    source = _backend._replacements_source()
    assert len(_backend._digest()) == 64
    assert all(fn.__code__.co_code.hex() in source for fn in (_backend._mv, _backend._pow_scalar))


def test_a_recompiled_unit_comes_from_torchs_disk_caches(fresh_compile_state):
    # The same unit compiled again (after the library forgot it: as in a new process) is loaded from
    # torch's on-disk caches: the AOT-autograd cache hits and nothing bypasses the FX-graph cache.
    from torch._dynamo.utils import counters

    r = ridge_problem(n_samples=19, dim=5, seed=4)
    kw = dict(inner=bl.GradientDescent(lr=0.2, steps=STEPS), inner_batch=r.train, outer_batch=r.val, throw=False)
    est = bl.Compiled(bl.FirstOrder(), granularity="chunk", chunk=CHUNK)  # torch caches no scan (the loop units)
    first = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=est, **kw)
    _unit.clear()
    counters.clear()
    again = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=est, **kw)
    assert counters["aot_autograd"]["autograd_cache_hit"] >= 1
    assert counters["aot_autograd"]["autograd_cache_bypass"] == 0
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0
    assert rel(again.value, first.value) == 0.0


def test_cpp_wrapper_options_keep_only_what_this_torch_knows(monkeypatch):
    # The two-run build of the C++ wrapper is an inductor option of recent torch; an option this torch
    # lacks would make compile_fx fail (and every unit fall back to eager), so it is dropped.
    from torch._inductor import config

    options = _backend.cpp_wrapper_options()
    assert options["cpp_wrapper"] is True
    assert options.get("cpp_wrapper_build_separate") is (True if hasattr(config, "cpp_wrapper_build_separate") else None)
    monkeypatch.setattr(_backend, "CPP_WRAPPER_OPTIONS", {"cpp_wrapper": True, "no_such_inductor_option": 1})
    assert _backend.cpp_wrapper_options() == {"cpp_wrapper": True}


def test_a_unit_with_many_products_compiles_with_the_cpp_wrapper_and_matches_eager(monkeypatch):
    # Every matrix-vector product of the ridge problem goes to BLAS (threshold lowered to one entry), so
    # the whole-estimator unit of ITD holds several library products and is compiled by inductor's C++
    # wrapper; its hypergradient must be the eager one, in float32, and the chunked units of a small
    # problem (no library product) keep the Python wrapper.
    chosen = []
    decide = _backend.wants_cpp_wrapper

    def spy(gm, example_inputs):
        chosen.append(decide(gm, example_inputs))
        return chosen[-1]

    monkeypatch.setattr(_backend, "wants_cpp_wrapper", spy)
    monkeypatch.setattr(_backend, "BLAS_MV_ENTRIES", 1)
    r = ridge_problem(n_samples=24, dim=7, seed=2, dtype=torch.float32)
    kw = dict(inner=bl.GradientDescent(lr=0.2, steps=STEPS), inner_batch=r.train, outer_batch=r.val, throw=False)
    eager = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=bl.ITD(), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # compiled, not a fallback to eager
        fast = bl.hypergrad(r.problem, r.hparams(), r.params0(),
                            estimator=bl.Compiled(bl.ITD(), granularity="estimator"), **kw)
    assert chosen == [True] and fast.stats["compile_s"] > 0
    assert rel(fast.value, eager.value) <= TOL[torch.float32] and rel(fast.params, eager.params) <= TOL[torch.float32]
    monkeypatch.setattr(_backend, "BLAS_MV_ENTRIES", 1 << 20)
    chosen.clear()
    check_same(quadratic_problem(dim_y=4, dim_x=2, seed=3, learned_init=True), "FirstOrder", backend="inductor")
    assert chosen and not any(chosen)


@pytest.mark.parametrize("name", ["AID-CG", pytest.param("IMAML", marks=pytest.mark.slow)])
def test_second_call_with_an_equal_problem_does_not_recompile(problems, name):
    # q.problem is a new BilevelProblem (with a new init lambda) at every access, and IMAML rebuilds
    # its proximal objective at every call: equal problems must still share the compiled units.
    q = problems[torch.float64]
    call(q, name, bl.Compiled(ESTIMATORS[name], chunk=CHUNK, backend="eager"))
    again = call(q, name, bl.Compiled(ESTIMATORS[name], chunk=CHUNK, backend="eager"))
    assert again.stats["compile_s"] == 0.0


def test_a_new_shape_compiles_anew():
    q = quadratic_problem(dim_y=2, dim_x=2, seed=3, learned_init=False)
    estimator = bl.Compiled(bl.FirstOrder(), chunk=CHUNK, backend="eager")
    inner = bl.GradientDescent(lr=0.1, steps=STEPS)
    bl.hypergrad(q.problem, q.hparams(), q.params0(), inner=inner, estimator=estimator)
    q2 = quadratic_problem(dim_y=5, dim_x=2, seed=3, learned_init=False)
    other = bl.hypergrad(q2.problem, q2.hparams(), q2.params0(), inner=inner, estimator=estimator)
    assert other.stats["compile_s"] > 0
    ref = bl.hypergrad(q2.problem, q2.hparams(), q2.params0(), inner=inner, estimator=bl.FirstOrder())
    assert rel(other.value, ref.value) <= 1e-12


def test_hvp_mode_override_keeps_the_numbers(problems):
    q = problems[torch.float64]
    eager = call(q, "AID-CG", ESTIMATORS["AID-CG"])
    for mode in ("forward", "reverse"):
        fast = call(q, "AID-CG", bl.Compiled(ESTIMATORS["AID-CG"], chunk=CHUNK, hvp=mode, backend="eager"))
        assert rel(fast.value, eager.value) <= 1e-10


def test_aid_default_hvp_mode_is_chosen_by_device(problems):
    from bilevel.estimators._base import resolve_hvp
    assert bl.AID().hvp == "auto"
    assert resolve_hvp("auto", torch.zeros(1)) == "reverse"  # measured faster on CPU
    assert resolve_hvp("auto", torch.zeros(1, device="meta")) == "forward"  # elsewhere: the design's default
    assert resolve_hvp("forward", torch.zeros(1)) == "forward" and resolve_hvp("reverse", None) == "reverse"
    q = problems[torch.float64]
    cg = bl.CG(max_steps=3)
    auto, rev, fwd = (call(q, "AID-CG", bl.AID(linear_solver=cg, hvp=m)) for m in ("auto", "reverse", "forward"))
    assert all(torch.equal(auto.value[k], rev.value[k]) for k in rev.value)  # the same products, bit for bit
    assert rel(fwd.value, rev.value) <= 1e-10


@pytest.mark.parametrize("granularity", ["chunk", "loop", "auto"])
def test_status_and_first_bad_step_survive_chunking(granularity):
    # lr far above 2 / L: the iterates grow ~250x per step and overflow after dozens of steps, in a late
    # chunk (or pass of the compiled loop).
    q = quadratic_problem(dim_y=3, dim_x=2, seed=0, condition=10.0)
    inner = bl.GradientDescent(lr=25.0, steps=80)

    def message(estimator):
        with pytest.raises(bl.BilevelError) as err:
            bl.hypergrad(q.problem, q.hparams(), q.params0(), inner=inner, estimator=estimator)
        assert err.value.result is bl.RESULTS.inner_nonfinite
        return str(err.value).split("at step ")[1].split()[0]

    eager = message(bl.FirstOrder())
    assert int(eager) > 16
    assert message(bl.Compiled(bl.FirstOrder(), granularity=granularity, chunk=CHUNK, backend="eager")) == eager


@pytest.mark.parametrize("granularity", ["chunk", "loop"])
@pytest.mark.parametrize("estimator", [bl.FirstOrder(), pytest.param(bl.AID(linear_solver=bl.Neumann(
    steps=3, alpha=0.1)), marks=pytest.mark.slow)], ids=["FirstOrder", "AID-Neumann"])
def test_tolerance_masking_and_sampler_batches_match_eager(estimator, granularity):
    # With a sampler the loop granularity runs chunks (a batch per step is drawn in Python).
    r = ridge_problem(n_samples=40, dim=4, seed=2)

    def draw(step):
        rows = torch.randperm(40, generator=torch.Generator().manual_seed(step))[:10]
        return tuple(t[rows] for t in r.train)

    sampler = bl.Sampler(draw)
    inner = bl.GradientDescent(lr=0.2, steps=6, tol=1e-3)
    kw = dict(inner=inner, inner_batch=sampler, outer_batch=r.val, throw=False)
    eager = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=estimator, **kw)
    fast = bl.hypergrad(r.problem, r.hparams(), r.params0(), **kw,
                        estimator=bl.Compiled(estimator, granularity=granularity, chunk=CHUNK, backend="eager"))
    assert fast.result is eager.result and fast.stats["inner_steps"] == eager.stats["inner_steps"]
    assert rel(fast.value, eager.value) <= 1e-12


def _spy_on_loops(monkeypatch) -> list[int]:
    """The number of steps of every inner run that went through a compiled loop unit."""
    from bilevel.compile._primitives import Runner
    ran, loop_unit = [], Runner._loop_unit

    def spy(self, solver, loop, problem, hparams, batch, start, stop, like):
        out = loop_unit(self, solver, loop, problem, hparams, batch, start, stop, like)
        if out is not None:
            ran.append(stop - start)
        return out
    monkeypatch.setattr(Runner, "_loop_unit", spy)
    return ran


@pytest.mark.parametrize("granularity", ["loop", "auto"])
@pytest.mark.parametrize("tol", [None, 3e-2], ids=["fixed-steps", "tolerance"])
def test_the_inner_solve_runs_as_one_compiled_loop(monkeypatch, tol, granularity):
    # Fixed batches, no transform: the whole inner run is one unit (torch's scan over one step; "auto":
    # the same loop inside the unit of the whole estimator), with the eager numbers, statuses and
    # counts, stopping on the tolerance where one is set.
    bodies = _spy_on_loops(monkeypatch)
    whole = _spy_on_whole_units(monkeypatch)
    r = ridge_problem(n_samples=30, dim=4, seed=5)
    inner = bl.GradientDescent(lr=0.2, steps=7, tol=tol)
    kw = dict(inner=inner, inner_batch=r.train, outer_batch=r.val, throw=False)
    estimator = bl.AID(linear_solver=bl.CG(max_steps=3))
    eager = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=estimator, **kw)
    fast = bl.hypergrad(r.problem, r.hparams(), r.params0(), **kw,
                        estimator=bl.Compiled(estimator, granularity=granularity, chunk=CHUNK, backend="eager"))
    assert (bodies, whole) == (([7], []) if granularity == "loop" else ([], [True]))
    assert fast.result is eager.result
    for key in ("inner_steps", "linear_steps", "num_grad", "num_hvp"):
        assert fast.stats[key] == eager.stats[key]
    assert float(fast.outer_value) == pytest.approx(float(eager.outer_value), rel=1e-12)
    if tol is not None:
        assert eager.stats["inner_steps"] < 7  # the tolerance stopped it early
    assert rel(fast.value, eager.value) <= 1e-12 and rel(fast.params, eager.params) <= 1e-12


def _two_ridge_tasks():
    """``(problem, x, y, keywords)`` of ``vmap_hypergrad`` over two ridge tasks."""
    tasks = [ridge_problem(n_samples=20, dim=3, seed=s) for s in range(2)]
    stack = lambda parts: tuple(torch.stack(ts) for ts in zip(*parts))  # noqa: E731
    kw = dict(inner=bl.GradientDescent(lr=0.2, steps=STEPS), inner_batch=stack([t.train for t in tasks]),
              outer_batch=stack([t.val for t in tasks]))
    x = {k: torch.stack([t.hparams()[k] for t in tasks]) for k in tasks[0].hparams()}
    y = {k: torch.stack([t.params0()[k] for t in tasks]) for k in tasks[0].params0()}
    return tasks[0].problem, x, y, kw


def _ridge_start(hparams):
    return {"w": 0.1 * hparams["log_lam"]}


def _spy_on_whole_units(monkeypatch) -> list[bool]:
    """For every unit of the whole estimator that was tried: whether its loops were compiled as loops."""
    tried, run_whole = [], compiled.Compiled._run_whole

    def spy(self, *args, looped=False):
        tried.append(looped)
        return run_whole(self, *args, looped=looped)
    monkeypatch.setattr(compiled.Compiled, "_run_whole", spy)
    return tried


def _spy_on_linear_loops(monkeypatch) -> list[str]:
    """The solver of every linear solve that went through a compiled loop unit."""
    from bilevel.compile._primitives import Runner
    ran, linear_loop = [], Runner.linear_loop

    def spy(self, solver, matvec, b, x0):
        out = linear_loop(self, solver, matvec, b, x0)
        if out is not None:
            ran.append(type(solver).__name__)
        return out
    monkeypatch.setattr(Runner, "linear_loop", spy)
    return ran


@pytest.mark.parametrize("granularity", ["loop", "auto"])
@pytest.mark.parametrize("solver", [bl.CG(max_steps=6, rtol=1e-6), bl.CG(max_steps=2), bl.Neumann(steps=4, alpha=0.1),
                                    bl.Neumann(steps=4, alpha=30.0)],
                         ids=["cg-converges", "cg-max-steps", "neumann", "neumann-diverges"])
def test_the_linear_solve_runs_as_one_compiled_loop(monkeypatch, solver, granularity):
    # The linear solver's iterations (each an HVP and the vector updates) in one compiled loop: a unit
    # of its own ("loop"), or inside the one unit of the whole estimator with the inner steps as a
    # compiled loop too ("auto"). The eager numbers, statuses (CG freezing its iterate at the
    # tolerance, Neumann's divergence and its estimate of the largest eigenvalue), counts, and a
    # warm start from the previous adjoint.
    import dataclasses
    linear = _spy_on_linear_loops(monkeypatch)
    whole = _spy_on_whole_units(monkeypatch)
    r = ridge_problem(n_samples=30, dim=4, seed=5)
    problem = dataclasses.replace(r.problem, init=_ridge_start)  # iMAML's proximal centre
    kw = dict(inner=bl.GradientDescent(lr=0.2, steps=7), inner_batch=r.train, outer_batch=r.val, throw=False)
    steps = []
    for estimator in (bl.AID(linear_solver=solver), bl.IMAML(lam=2.0, linear_solver=solver)):
        fast_estimator = bl.Compiled(estimator, granularity=granularity, chunk=CHUNK, backend="eager")
        adjoint0 = None
        for _ in range(2):  # the second call warm-starts the solve
            eager = bl.hypergrad(problem, r.hparams(), r.params0(), estimator=estimator, adjoint0=adjoint0, **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                fast = bl.hypergrad(problem, r.hparams(), r.params0(), estimator=fast_estimator, adjoint0=adjoint0, **kw)
            assert fast.result is eager.result
            for key in ("linear_steps", "num_hvp", "residual"):
                assert fast.stats[key] == pytest.approx(eager.stats[key], rel=1e-12)
            assert rel(fast.value, eager.value) <= 1e-12 and rel(fast.adjoint, eager.adjoint) <= 1e-12
            adjoint0 = eager.adjoint
            steps.append(int(eager.stats["linear_steps"]))
    assert (linear, whole) == (([type(solver).__name__] * 4, []) if granularity == "loop" else ([], [True] * 4))
    if isinstance(solver, bl.CG) and solver.max_steps > 2:
        assert 0 in steps and any(0 < n < solver.max_steps for n in steps)  # the tolerance froze the iterate
    if isinstance(solver, bl.Neumann) and solver.alpha > 1:
        assert eager.result is bl.RESULTS.neumann_diverged
        kw["throw"] = True  # the error's estimate of the largest eigenvalue and a safe alpha: the eager ones
        with pytest.raises(bl.BilevelError) as eager_error:
            bl.hypergrad(problem, r.hparams(), r.params0(), estimator=estimator, **kw)
        with pytest.raises(bl.BilevelError) as fast_error:
            bl.hypergrad(problem, r.hparams(), r.params0(), estimator=fast_estimator, **kw)
        told = [str(e.value).split("neumann_diverged: ", 1)[1] for e in (eager_error, fast_error)]
        assert "largest eigenvalue" in told[0] and told[1] == told[0]


def test_the_linear_loop_is_not_used_under_transforms_and_falls_back_to_a_unit_per_product(monkeypatch):
    # Under vmap torch's scan is not usable: a unit per HVP, silently. A linear loop that fails to
    # compile: one warning, the eager numbers, a unit per product. "auto" does not loop the linear solve.
    from bilevel.compile import _primitives
    linear = _spy_on_linear_loops(monkeypatch)
    problem, x, y, kw = _two_ridge_tasks()
    estimator = bl.AID(linear_solver=bl.CG(max_steps=3))
    eager = bl.vmap_hypergrad(problem, x, y, estimator=estimator, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = bl.vmap_hypergrad(problem, x, y, **kw,
                                 estimator=bl.Compiled(estimator, granularity="loop", chunk=CHUNK, backend="eager"))
    assert rel(fast.value, eager.value) <= 1e-12 and linear == []

    scan = _primitives._scan

    def no_linear_scan(body, init, xs):  # the inner loop compiles; the linear loop cannot be traced
        if torch.compiler.is_compiling() and len(init) == 5:  # CG's carry: x, r, p, rs, steps
            torch._dynamo.graph_break()
        return scan(body, init, xs)
    monkeypatch.setattr(_primitives, "_scan", no_linear_scan)
    r = ridge_problem(n_samples=23, dim=3, seed=7)
    kw = dict(inner=bl.GradientDescent(lr=0.2, steps=STEPS), inner_batch=r.train, outer_batch=r.val)
    eager = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=estimator, **kw)
    for granularity in ("loop", "auto"):
        fast_estimator = bl.Compiled(estimator, granularity=granularity, chunk=CHUNK, backend="eager")
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            first = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=fast_estimator, **kw)
            again = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=fast_estimator, **kw)
        messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
        expected = [m for m in messages if re.search(r"could not compile the 3-iteration loop of CG\(max_steps=3.*"
                                                     r"on the HVP of g=ridge_inner.*one unit per product instead", m)]
        assert len(expected) == len(messages) == (granularity == "loop"), messages
        assert first.stats["num_hvp"] == eager.stats["num_hvp"]
        assert rel(first.value, eager.value) <= 1e-12 and rel(again.value, eager.value) <= 1e-12
    assert linear == []
    monkeypatch.setattr(_primitives, "_scan", scan)

    class LoudCG(bl.CG):  # a solver whose own solve differs from start / iterate / finish runs as written
        def solve(self, matvec, b, x0=None):
            called.append(1)
            return super().solve(matvec, b, x0)
    called = []
    bl.hypergrad(r.problem, r.hparams(), r.params0(), **kw,
                 estimator=bl.Compiled(bl.AID(linear_solver=LoudCG(max_steps=3)), granularity="loop", backend="eager"))
    assert called == [1] and linear == []
    bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=bl.Compiled(estimator, chunk=CHUNK, backend="eager"),
                 **kw)
    assert linear == []  # "auto": a unit per HVP (the inner run is a compiled loop)


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", [("AID-CG", torch.float32), ("AID-CG", torch.float64),
                                         ("FirstOrder", torch.float32)])
def test_loop_granularity_with_inductor_matches_eager(problems, monkeypatch, fresh_compile_state, name, dtype):
    # Inductor compiles the loop unit with its C++ wrapper (the loop runs in C++, not in Python);
    # the numbers, statuses and counts are the eager ones, and a second call compiles nothing.
    bodies = _spy_on_loops(monkeypatch)
    decide, loops = _backend.wants_cpp_wrapper, []

    def spy(gm, example_inputs):
        chosen = decide(gm, example_inputs)
        if _backend.has_loop(gm):
            loops.append(chosen)
        return chosen
    monkeypatch.setattr(_backend, "wants_cpp_wrapper", spy)
    first = check_same(problems[dtype], name, backend="inductor", granularity="loop", dtype=dtype)
    second = check_same(problems[dtype], name, backend="inductor", granularity="loop", dtype=dtype)
    # (in float64 dynamo may restart its analysis once after calling the backend: two decisions, both C++)
    assert bodies == [STEPS, STEPS] and loops and all(loops)
    assert first.stats["compile_s"] > 0 and second.stats["compile_s"] == 0.0


def test_auto_without_torchs_scan_runs_a_unit_per_primitive(monkeypatch):
    # A torch older than 2.6 has no scan: "auto" does not try the unit with compiled loops.
    from bilevel.compile import _primitives
    monkeypatch.setattr(compiled, "_scan", None)
    monkeypatch.setattr(_primitives, "_scan", None)
    prepared, make = [], compiled.Prepared
    monkeypatch.setattr(compiled, "Prepared", lambda runner, kind, *a, **kw: prepared.append(kind[0]) or
                        make(runner, kind, *a, **kw))
    whole = _spy_on_whole_units(monkeypatch)
    r = ridge_problem(n_samples=30, dim=4, seed=5)
    kw = dict(inner=bl.GradientDescent(lr=0.2, steps=7), inner_batch=r.train, outer_batch=r.val)
    eager = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=bl.AID(), **kw)
    fast = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=bl.Compiled(bl.AID(), chunk=CHUNK, backend="eager"),
                        **kw)
    assert whole == [True] and prepared == []  # declined before making the unit
    assert rel(fast.value, eager.value) <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", [("AID-CG", torch.float32), ("AID-Neumann", torch.float64),
                                         ("FirstOrder", torch.float32)])
def test_auto_with_inductor_runs_the_whole_estimator_with_compiled_loops(problems, monkeypatch, fresh_compile_state,
                                                                        name, dtype):
    # Many inner steps under "auto": one unit for the whole estimator, its inner steps and linear-solver
    # iterations compiled as loops (C++ wrapper); the eager numbers, and a second call compiles nothing.
    whole = _spy_on_whole_units(monkeypatch)
    first = check_same(problems[dtype], name, backend="inductor", granularity="auto", dtype=dtype)
    second = check_same(problems[dtype], name, backend="inductor", granularity="auto", dtype=dtype)
    assert whole == [True, True]
    assert first.stats["compile_s"] > 0 and second.stats["compile_s"] == 0.0


def test_a_loop_torch_cannot_trace_runs_as_chunks_silently_under_auto(problems, monkeypatch):
    # torch 2.13's scan cannot trace a tensor property (here P.T in the problem's init, iMAML's proximal
    # centre) of a tensor the objective reaches through a closure, inside the gradient of the step
    # ("Expected FakeTensor"): "auto" then runs the inner solve in chunks, with the eager numbers and
    # no warning.
    loops = _spy_on_loops(monkeypatch)
    q = problems[torch.float64]
    eager = call(q, "IMAML", ESTIMATORS["IMAML"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = call(q, "IMAML", bl.Compiled(ESTIMATORS["IMAML"], chunk=CHUNK, backend="eager"))
    assert loops == [] and fast.result is eager.result
    assert rel(fast.value, eager.value) <= 1e-12 and rel(fast.params, eager.params) <= 1e-12


def test_loop_granularity_runs_chunks_under_transforms_and_where_the_loop_does_not_compile(monkeypatch):
    # Under vmap (and ITD's grad) torch's scan is not usable: chunks, silently. A loop that fails to
    # compile: one warning naming it, the eager numbers, and chunks from then on.
    from bilevel.compile import _primitives
    problem, x, y, kw = _two_ridge_tasks()
    loops = _spy_on_loops(monkeypatch)
    for estimator in (bl.FirstOrder(), bl.ITD()):
        eager = bl.vmap_hypergrad(problem, x, y, estimator=estimator, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fast = bl.vmap_hypergrad(problem, x, y, **kw,
                                     estimator=bl.Compiled(estimator, granularity="loop", chunk=CHUNK, backend="eager"))
        assert rel(fast.value, eager.value) <= 1e-12
    assert loops == []

    scan = _primitives._scan

    def uncompilable_scan(body, init, xs):  # eager it runs; dynamo cannot trace it (with fullgraph)
        if torch.compiler.is_compiling():
            torch._dynamo.graph_break()
        return scan(body, init, xs)
    monkeypatch.setattr(_primitives, "_scan", uncompilable_scan)
    r = ridge_problem(n_samples=21, dim=3, seed=6)
    kw = dict(inner=bl.GradientDescent(lr=0.2, steps=STEPS), inner_batch=r.train, outer_batch=r.val)
    eager = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=bl.FirstOrder(), **kw)
    estimator = bl.Compiled(bl.FirstOrder(), granularity="loop", chunk=CHUNK, backend="eager")
    with pytest.warns(RuntimeWarning, match=r"could not compile the 4-step inner loop of g=ridge_inner.*Running "
                                            r"chunks of \d+ inner steps instead"):
        first = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=estimator, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = bl.hypergrad(r.problem, r.hparams(), r.params0(), estimator=estimator, **kw)
    assert rel(first.value, eager.value) <= 1e-12 and rel(again.value, eager.value) <= 1e-12


# --------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("name", ["AID-CG", pytest.param("ITD", marks=pytest.mark.slow),
                                  pytest.param("ESJ", marks=pytest.mark.slow)])
def test_vmap_hypergrad_and_a_users_vmap_match_eager(name):
    tasks, dim = 3, 4
    rs = [ridge_problem(n_samples=20, dim=dim, seed=s) for s in range(tasks)]
    train = tuple(torch.stack([r.train[i] for r in rs]) for i in range(2))
    val = tuple(torch.stack([r.val[i] for r in rs]) for i in range(2))
    problem, inner = rs[0].problem, bl.GradientDescent(lr=0.1, steps=STEPS)
    x = {"log_lam": torch.zeros(dim, dtype=torch.float64)}
    y = {"w": torch.zeros(tasks, dim, dtype=torch.float64)}
    kw = dict(inner=inner, inner_batch=train, outer_batch=val, in_dims=(None, 0, 0, 0), throw=False)
    eager = bl.vmap_hypergrad(problem, x, y, estimator=ESTIMATORS[name], **kw)
    compiled = bl.Compiled(ESTIMATORS[name], chunk=CHUNK, backend="eager")
    fast = bl.vmap_hypergrad(problem, x, y, estimator=compiled, **kw)
    assert fast.task_results == eager.task_results
    assert rel(fast.value, eager.value) <= 1e-10

    def one(yt, tr, va, estimator):  # a user's own vmap, batched like the call above (shares its units)
        return bl.hypergrad(problem, x, yt, inner=inner, estimator=estimator, inner_batch=tr, outer_batch=va,
                            throw=False).value

    ys = {"w": 0.1 * torch.arange(tasks * dim, dtype=torch.float64).reshape(tasks, dim)}
    mine = torch.func.vmap(lambda a, b, c: one(a, b, c, bl.Compiled(ESTIMATORS[name], chunk=CHUNK,
                                                                    backend="eager")))(ys, train, val)
    ref = torch.func.vmap(lambda a, b, c: one(a, b, c, ESTIMATORS[name]))(ys, train, val)
    assert rel(mine, ref) <= 1e-10


@pytest.mark.parametrize("granularity", ["chunk", pytest.param("estimator", marks=pytest.mark.slow)])
def test_maml_meta_gradient_matches_eager(granularity):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    from bilevel.datasets import Sinusoid
    tasks = Sinusoid(shots=5).sample(4, seed=0)
    inner = bl.GradientDescent(lr=0.01, steps=2)
    eager = bl.meta.MAML(net, inner=inner)
    theta = eager.init_hparams()
    compiled = bl.Compiled(bl.ITD(), granularity=granularity, backend="eager")
    fast = bl.meta.MAML(net, inner=inner, estimator=compiled)
    assert rel(fast.meta_gradient(theta, tasks).value, eager.meta_gradient(theta, tasks).value) <= 1e-6
    # the same compiled unit serves a caller that wants the adapted parameters
    mine, ref = (m.meta_gradient(theta, tasks, return_params=True) for m in (fast, eager))
    assert rel(mine.hypergrad.params, ref.hypergrad.params) <= 1e-6 and rel(mine.value, ref.value) <= 1e-6


@pytest.mark.parametrize("first", [False, True])
def test_whole_estimator_unit_serves_both_return_params(problems, first):
    # The unit's output structure is learnt once (an eager call) and reused by the traced call:
    # it must not depend on whether this caller wants the inner solution (regression: a
    # return_params=False caller made ITD leave the params out of the learnt structure only).
    q = problems[torch.float64]
    inner = bl.GradientDescent(lr=0.1, steps=STEPS)
    estimator = bl.Compiled(bl.ITD(), granularity="estimator", backend="eager")
    for keep in (first, not first):
        kw = dict(inner=inner, return_params=keep)
        mine = bl.hypergrad(q.problem, q.hparams(), None, estimator=estimator, **kw)
        ref = bl.hypergrad(q.problem, q.hparams(), None, estimator=bl.ITD(), **kw)
        assert rel(mine.value, ref.value) <= 1e-10
        assert (mine.params is None) == (not keep)
        if keep:
            assert rel(mine.params, ref.params) <= 1e-10


def test_forward_mode_over_a_compiled_call_runs_eagerly_with_a_warning(problems):
    q = problems[torch.float64]
    inner = bl.GradientDescent(lr=0.1, steps=STEPS)

    def phi(x, estimator):
        return bl.hypergrad(q.problem, {"x": x}, q.params0(), inner=inner, estimator=estimator).value["x"]

    x, v = q.hparams()["x"], torch.ones(2, dtype=torch.float64)
    ref = torch.func.jvp(lambda x: phi(x, bl.FirstOrder()), (x,), (v,))[1]
    with pytest.warns(RuntimeWarning, match="do not run under torch.func transform.*jvp"):
        out = torch.func.jvp(lambda x: phi(x, bl.Compiled(bl.FirstOrder(), chunk=CHUNK, backend="eager")),
                             (x,), (v,))[1]
    assert torch.allclose(out, ref, rtol=1e-12)


# --------------------------------------------------------------------------- fallbacks

def branchy_inner(hparams, params, batch):
    y = params["y"]
    if (y.sum() > 0).item():  # data-dependent Python control flow: dynamo cannot compile it
        return 0.5 * ((y - hparams["x"].sum()) ** 2).sum()
    return 0.5 * ((y - hparams["x"].mean()) ** 2).sum()


def plain_outer(hparams, params, batch):
    return ((params["y"] - 1.0) ** 2).sum()


@pytest.mark.parametrize("granularity", ["auto", "loop", "chunk"])
def test_an_uncompilable_objective_warns_once_naming_it_and_runs_eagerly(granularity, fresh_compile_state):
    problem = bl.BilevelProblem(inner=branchy_inner, outer=plain_outer)
    x, y = {"x": torch.tensor([0.3, -0.1], dtype=torch.float64)}, {"y": torch.ones(3, dtype=torch.float64)}
    inner = bl.GradientDescent(lr=0.3, steps=STEPS)
    plain = bl.AID(linear_solver=bl.CG(max_steps=3))
    ref = bl.hypergrad(problem, x, y, inner=inner, estimator=plain)
    estimator = bl.Compiled(plain, granularity=granularity, chunk=CHUNK, backend="eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = bl.hypergrad(problem, x, y, inner=inner, estimator=estimator)
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    eager = [m for m in messages if re.search(r"could not compile .*g=branchy_inner.*Running the problem with "
                                              r"g=branchy_inner, f=plain_outer eagerly", m)]
    # the loop (under "auto" and "loop") fails first and its chunks are tried: only "loop", asked for
    # explicitly, says so; the chunks fail too, and the problem goes eager with one warning
    loop = [m for m in messages if re.search(r"could not compile the 4-step inner loop of g=branchy_inner.*"
                                             r"Running chunks of 2 inner steps instead", m)]
    assert len(eager) == 1 and len(loop) == (granularity == "loop") and len(messages) == 1 + len(loop), messages
    assert rel(out.value, ref.value) <= 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one-time: the second call is silent
        again = bl.hypergrad(problem, x, y, inner=inner, estimator=estimator)
    assert rel(again.value, ref.value) <= 1e-12


def test_an_error_in_the_users_objective_is_raised_not_swallowed():
    def broken(hparams, params, batch):
        return (params["y"] @ torch.ones(7, dtype=torch.float64))  # shape mismatch: a bug, not a compile issue

    problem = bl.BilevelProblem(inner=broken, outer=plain_outer)
    with pytest.raises(RuntimeError, match="inner objective"):
        bl.hypergrad(problem, {"x": torch.zeros(2, dtype=torch.float64)}, {"y": torch.ones(3, dtype=torch.float64)},
                     inner=bl.GradientDescent(lr=0.1, steps=STEPS),
                     estimator=bl.Compiled(bl.FirstOrder(), chunk=CHUNK, backend="eager"))


@pytest.fixture
def fresh_compile_state():
    _unit.clear()
    compiled._cxx_checked.clear()
    yield
    _unit.clear()
    compiled._cxx_checked.clear()


def _eager_and_fast(problems, estimator_kw):
    q = problems[torch.float64]
    ref = call(q, "FirstOrder", ESTIMATORS["FirstOrder"])
    out = call(q, "FirstOrder", bl.Compiled(ESTIMATORS["FirstOrder"], chunk=CHUNK, **estimator_kw))
    assert rel(out.value, ref.value) <= 1e-12
    assert out.stats["compile_s"] == 0.0
    return out


def test_no_cpp_compiler_falls_back_with_one_warning(problems, fresh_compile_state, monkeypatch):
    from torch._inductor import config
    # config.patch, not monkeypatch: torch's config reads an option set back by setattr as missing
    with config.patch({"cpp.cxx": ("/nonexistent/bin/g++-missing",)}):
        with pytest.warns(RuntimeWarning, match="needs a working C\\+\\+ compiler"):
            _eager_and_fast(problems, {})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _eager_and_fast(problems, {})


def test_torch_compile_failing_falls_back_with_one_warning(problems, fresh_compile_state, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("simulated: torch.compile is unavailable")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(RuntimeWarning, match="torch.compile is not usable here.*simulated"):
        _eager_and_fast(problems, {"backend": "eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _eager_and_fast(problems, {"backend": "eager"})


def test_an_unsupported_torch_falls_back_with_one_warning(problems, fresh_compile_state, monkeypatch):
    monkeypatch.setattr(compiled, "MIN_TORCH", (99, 0))
    with pytest.warns(RuntimeWarning, match="older than 99.0"):
        _eager_and_fast(problems, {"backend": "eager"})


def test_eager_path_reports_zero_compile_time(problems):
    hg = call(problems[torch.float64], "AID-CG", ESTIMATORS["AID-CG"])
    assert hg.stats["compile_s"] == 0.0 and "compile_s" in bl.STATS_KEYS
    assert _runner.current() is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity="block"), "granularity='block'"),
    (dict(chunk=0), "chunk=0"),
    (dict(hvp="sideways"), "hvp='sideways'"),
])
def test_bad_options_name_the_call_and_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bl.Compiled(bl.ITD(), **kwargs)


def test_compiled_of_compiled_is_refused():
    with pytest.raises(TypeError, match="not an already compiled one"):
        bl.Compiled(bl.Compiled(bl.ITD()))


def test_a_hessian_vector_product_of_a_squared_loss_does_not_recompute_the_residual(monkeypatch):
    # The second derivative of r ** 2 is 2 r ** 0: a constant, but inductor read r to make it, which
    # kept the forward product X w (a read of X) alive in every compiled HVP (_backend._pow_scalar).
    from torch._inductor.utils import run_and_get_code
    from torch.func import grad, vjp

    from torch._functorch import config as functorch_config
    from torch._inductor import config

    monkeypatch.setattr(_backend, "BLAS_MV_ENTRIES", 1)  # every matrix-vector product a BLAS call, to count
    X, t = torch.randn(30, 5, dtype=torch.float64), torch.randn(30, dtype=torch.float64)

    def hvp(w, v):
        return vjp(grad(lambda w: 0.5 * ((X @ w - t) ** 2).mean()), w)[1](v)[0]

    w, v = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    fn = torch.compile(hvp, backend=_backend.inductor_backend(_unit.Options()), fullgraph=True)
    torch._dynamo.reset()
    try:  # the code generated now, not a cached one
        with config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            out, code = run_and_get_code(fn, w, v)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(out, X.T @ (X @ v) / 30, rtol=1e-12, atol=0)
    assert sum(len(re.findall(r"\bmm\(", c)) for c in code) == 2  # X v and X^T (X v); no X w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
def test_power_zero_is_one_for_every_floating_base_and_left_to_inductor_otherwise(dtype):
    base = torch.tensor([0.0, -2.5, float("nan"), float("inf"), -float("inf")], dtype=dtype)
    for exponent in (0, 0.0, False):
        out = _backend._pow_scalar(base, exponent)
        assert out.dtype == torch.pow(base, exponent).dtype and torch.equal(out, torch.pow(base, exponent))
    assert _backend._pow_scalar(base, 2) is NotImplemented
    assert _backend._pow_scalar(torch.arange(3), 0) is NotImplemented  # an integer base: inductor's own
