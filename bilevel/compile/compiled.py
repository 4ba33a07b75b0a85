"""``Compiled``: run any estimator's inner steps, HVPs and linear solves through ``torch.compile``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .. import _runner
from .._batch import is_stochastic
from .._problem import BilevelProblem
from .._tree import Batch, Params
from ..estimators._base import _KEEP_PARAMS, AbstractEstimator, Counts, Estimate
from ..inner._base import AbstractInnerSolver
from ..estimators import AID, IMAML, FirstOrder, Reptile
from ._primitives import CompiledLinearSolver, Prepared, Runner, _scan
from ._fallback import warn_once
from ._trees import tensors_of
from ._unit import Options, plain_call

Granularity = Literal["auto", "loop", "step", "chunk", "solve", "estimator"]
_GRANULARITIES = ("auto", "loop", "step", "chunk", "solve", "estimator")


@dataclass(frozen=True)
class Compiled(AbstractEstimator):
    r"""Run ``estimator`` through :func:`torch.compile`: the same hypergradient (up to
    floating-point reassociation), without eager PyTorch's per-operation overhead.

    Every estimator is written in a few primitives — a run of inner steps, a
    Hessian-vector product, a linear solve, the outer gradients. ``Compiled`` executes
    each primitive as a compiled *unit* and leaves the estimator's own logic as it is,
    so it composes with every estimator (``ITD``, ``FirstOrder``, ``AID``, ``IMAML``,
    ``ESJ``, ``Reptile``), with :func:`~bilevel.vmap_hypergrad` and the meta-learners,
    and with a user's own :func:`torch.func.vmap` / :func:`torch.func.grad` around
    :func:`~bilevel.hypergrad`: ``torch.func`` transforms are traced inside the compiled
    units (through a :class:`torch.autograd.Function` whose backward and vmap rules are
    compiled units too), so ITD differentiates through compiled inner steps.

    ``granularity`` chooses what one unit is (see the table in the docs, "Compiled
    execution", for compile and run times on the ridge benchmark and MAML):

    * ``"auto"`` (default): ``"estimator"`` when the inner solver runs at most ``chunk``
      steps on fixed batches (MAML-style: measured 2.6x and 5x faster than eager for 1 and
      5 steps, where ``"chunk"`` was slower than eager). With more steps, for ``AID``,
      ``IMAML``, ``FirstOrder`` and ``Reptile`` on fixed batches with no ``torch.func``
      transform around the call: the whole estimator as one unit whose inner steps and
      linear-solver iterations are compiled loops (torch's ``scan``; on the 100-step ridge
      benchmark the fastest to run and to compile of all the choices). Elsewhere, or where
      that unit does not compile: ``"loop"`` for the inner steps (which runs as ``"chunk"``
      where it cannot loop) with a unit per HVP of the linear solve.
    * ``"loop"``: the whole run of inner steps is one unit, a compiled loop over one step
      (torch's ``scan``): it compiles in about the time of one step whatever the number of
      steps, and pays one unit call per run. The linear solve (CG, Neumann) is likewise one
      unit, a compiled loop over one iteration (its HVP and vector updates): about 20 % faster
      per hypergradient on the ridge benchmark at ``d = 200``, for about 3 CPU s more compile
      time per shape, so where ``"auto"`` runs the primitives as units it applies the HVPs a
      unit each instead. Other primitives as in ``"chunk"``. Only where the run is called with no ``torch.func`` transform active
      and nothing to differentiate (AID, IMAML, FirstOrder, Reptile at top level, on fixed
      batches): under :func:`~bilevel.vmap_hypergrad`, ITD's differentiation through the
      steps, ESJ's directions or a :class:`~bilevel.Sampler` it runs as ``"chunk"`` (the
      linear solve: a unit per HVP, the solver's vector updates eager). torch does not store
      ``scan`` in its on-disk caches, so each new process compiles the loop again. On the
      100-step ridge solves it compiled faster than ``"chunk"`` (a new shape in 50-75 % of the
      CPU time) and ran as fast or faster (see the docs).
    * ``"chunk"``: ``chunk`` inner steps per unit, one Hessian-vector product
      per unit (the linear solver's own vector updates stay eager), the outer gradients and
      the mixed second derivative one unit each. Compile time does not grow with the
      number of inner steps or linear-solver iterations: every chunk reuses the first
      one's code, every product the first product's.
    * ``"step"``: as ``"chunk"`` with one inner step per unit. The cheapest to compile;
      the most calls.
    * ``"solve"``: the whole inner solve is one unit and the whole linear solve
      (iterations and products) another. Compile time grows with the number of steps.
    * ``"estimator"``: the whole estimator is one unit — fastest for a few inner steps
      (MAML-style), slow to compile for many. Needs fixed batches (with a
      :class:`~bilevel.Sampler` it runs as ``"solve"``).

    Units are cached per process by what they compute (problem, solver, options, tree
    structure): a second call with the same shapes does not recompile, and
    ``hg.stats["compile_s"]`` reports the seconds a call spent compiling. On CPU, a unit whose
    graph holds several matrix products (MAML's meta-gradient) is compiled with inductor's C++
    wrapper: one C++ compiler run for all its kernels (and one for the wrapper) instead of one
    per kernel, which more than halved MAML's compile time (see the docs, "Compile time and the
    cache"). Anything that
    cannot be compiled — objectives dynamo cannot trace (data-dependent Python control
    flow, ``.item()``, unsupported operations), a machine without a working C++
    compiler, an unsupported torch — runs eagerly after a one-time
    :class:`RuntimeWarning` that names the unit (and the user's function) and the reason.

    Args:
        estimator: the estimator to run, e.g. ``bl.AID(linear_solver=bl.CG(max_steps=10))``.
        granularity: ``"auto"`` (default), ``"loop"``, ``"chunk"``, ``"step"``, ``"solve"`` or
            ``"estimator"``.
        chunk: inner steps per unit for ``granularity="chunk"`` (default 10, and where
            ``"loop"`` runs as ``"chunk"``), and the most inner steps for which ``"auto"``
            compiles the whole estimator as one unit.
        hvp: Hessian-vector products on the compiled path: ``"reverse"`` (default;
            reverse-over-reverse, which measured faster compiled: see the docs) or
            ``"forward"`` (forward-over-reverse) override the estimator's ``hvp`` option;
            ``None`` keeps the estimator's own.
        backend, mode, dynamic: passed to :func:`torch.compile` (defaults ``"inductor"``,
            ``None``, ``False``: shapes are specialised, a new shape compiles anew).

    Example:
        >>> import bilevel as bl
        >>> estimator = bl.Compiled(bl.AID(linear_solver=bl.CG(max_steps=10)))
        >>> estimator.granularity, estimator.chunk, estimator.linear_solver
        ('auto', 10, CG(max_steps=10, rtol=1e-10, atol=0.0))

        Pass it wherever an estimator goes: ``bl.hypergrad(problem, x, y0, inner=...,
        estimator=estimator)``, :func:`~bilevel.vmap_hypergrad`, ``bl.meta.MAML(net,
        estimator=bl.Compiled(bl.ITD()))`` (a few inner steps: the whole estimator is one unit).

    Reference: J. Ansel et al., "PyTorch 2: faster machine learning through dynamic Python
    bytecode transformation and graph compilation", ASPLOS 2024.
    """

    estimator: AbstractEstimator
    granularity: Granularity = "auto"
    chunk: int = 10
    hvp: Literal["forward", "reverse"] | None = "reverse"
    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.estimator, AbstractEstimator) or isinstance(self.estimator, Compiled):
            raise TypeError(f"Compiled(estimator={self.estimator!r}): expected an estimator such as bl.ITD() or "
                            "bl.AID(...) (not an already compiled one).")
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"Compiled(granularity={self.granularity!r}): expected one of {_GRANULARITIES}.")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"Compiled(chunk={self.chunk!r}): the number of inner steps per compiled unit must "
                             "be a positive integer (e.g. chunk=10).")
        if self.hvp not in (None, "forward", "reverse"):
            raise ValueError(f"Compiled(hvp={self.hvp!r}): expected None (the estimator's own choice), 'forward' "
                             "(forward-over-reverse) or 'reverse' (reverse-over-reverse).")
        estimator = self.estimator
        if self.hvp is not None and hasattr(estimator, "hvp"):
            estimator = dataclasses.replace(estimator, hvp=self.hvp)
        options = Options(backend=self.backend, mode=self.mode, dynamic=self.dynamic)
        chunk = {"step": 1, "chunk": self.chunk, "auto": self.chunk, "loop": self.chunk}.get(self.granularity)
        runner = Runner(chunk, options, loop=self.granularity if self.granularity in ("auto", "loop") else None)
        staged = estimator
        solver = getattr(estimator, "linear_solver", None)
        # Where "auto" runs the primitives as units, a unit per HVP: the linear loop as a unit of its own ran
        # 20 % faster at d = 200 but added about 3 CPU s of compile time per shape (docs, "The linear solve as
        # one compiled loop"); "auto"'s unit of the whole estimator has both loops and costs less than either.
        if self.granularity in ("solve", "loop") and solver is not None and dataclasses.is_dataclass(estimator):
            staged = dataclasses.replace(estimator, linear_solver=CompiledLinearSolver(solver, runner))
        object.__setattr__(self, "_plain", estimator)    # the estimator with the compiled path's HVP mode
        object.__setattr__(self, "_staged", staged)      # ... and its linear solves as units
        object.__setattr__(self, "_runner", runner)

    def __getattr__(self, name: str) -> Any:
        # Status messages read estimator options (linear_solver, smoothing, ...): those of the wrapped one.
        if name.startswith("_") or name == "estimator":
            raise AttributeError(name)
        return getattr(self.estimator, name)

    def run(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
            inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
            adjoint0: Params | None) -> tuple[Estimate, Counts]:
        args = (problem, hparams, params0, inner, inner_batch, outer_batch, adjoint0)
        if not usable(self.backend, hparams):
            return self._plain.run(*args)
        fixed = not is_stochastic(inner_batch) and not is_stochastic(outer_batch)
        if self.granularity == "auto" and fixed and inner.steps <= self.chunk:
            return self._run_whole(*args)
        if (self.granularity == "auto" and fixed and isinstance(self._plain, _LOOPED_WHOLE)
                and (ran := self._run_whole(*args, looped=True)) is not None):
            return ran
        if self.granularity == "estimator":
            if fixed:
                return self._run_whole(*args)
            warn_once(("estimator-sampler", self), f"{self!r}: granularity='estimator' needs fixed batches, and "
                      "inner_batch is a bl.Sampler (drawn with Python code at every step); running with "
                      "granularity='solve' instead.")
        with _runner.installed(self._runner):
            return self._staged.run(*args)

    def _run_whole(self, problem, hparams, params0, inner, inner_batch, outer_batch, adjoint0, looped=False):
        """The whole estimator as one unit; ``looped``: with its inner steps and linear-solver
        iterations as compiled loops (``None`` where that cannot be: under a ``torch.func``
        transform, or a unit that did not compile; the caller then runs the primitives as units)."""
        estimator = self._plain

        def whole(problem, hparams, params0, inner, inner_batch, outer_batch, adjoint0):
            return estimator.run(problem, hparams, params0, inner, inner_batch, outer_batch, adjoint0)

        args = (problem, hparams, params0, inner, inner_batch, outer_batch, adjoint0)
        name = f"the whole estimator {estimator!r} on g={getattr(problem.inner, '__qualname__', problem.inner)}"
        if looped and (_scan is None or not plain_call(tuple(tensors_of(args, [])))):  # scan: torch 2.6 and later
            return None
        # One output structure for the eager call that learns it and the traced one (where
        # keep_params() is always True): the unit keeps the params, the caller drops them.
        token = _KEEP_PARAMS.set(True)
        try:
            if not looped:
                return self._runner.call(("estimator", estimator), name, whole, args, problem=problem)
            prepared = Prepared(self._runner, ("estimator-looped", estimator), f"{name}, its loops compiled as loops",
                                whole, args, problem=problem, alternative=True)
            return self._runner.try_loop_unit(prepared, args, "Running a unit per primitive instead")
        finally:
            _KEEP_PARAMS.reset(token)


#: Estimators that ``"auto"`` runs as one unit with compiled loops when the inner solver runs many steps:
#: those that do not differentiate through the inner steps or vmap inside (ITD, ESJ: torch's scan is
#: neither differentiated nor batched under the library's rules).
_LOOPED_WHOLE = (AID, IMAML, FirstOrder, Reptile)


#: The oldest torch whose dynamo traces torch.func transforms inside compiled code.
MIN_TORCH = (2, 4)


def usable(backend: str, hparams: Params) -> bool:
    """Whether compiled execution can work here; warns once (and says why) when it cannot."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < MIN_TORCH:
        warn_once(("torch", version), f"bl.Compiled: torch {torch.__version__} is older than "
                  f"{'.'.join(map(str, MIN_TORCH))}, whose torch.compile traces torch.func transforms; running "
                  "eagerly instead (same numbers, eager speed). Fix: upgrade torch.")
        return False
    try:
        from torch import _dynamo
        supported = _dynamo.is_dynamo_supported()
    except Exception:  # noqa: BLE001
        supported = False
    if not supported:
        warn_once(("dynamo",), "bl.Compiled: torch.compile does not support this Python/platform "
                  f"(torch {torch.__version__}); running eagerly instead (same numbers, eager speed).")
        return False
    on_cpu = next(iter(hparams.values())).device.type == "cpu"
    if backend == "inductor" and on_cpu:
        reason = _cpp_compiler_problem()
        if reason is not None:
            warn_once(("cxx", reason), f"bl.Compiled: torch.compile's inductor backend needs a working C++ "
                      f"compiler on CPU, and {reason}; running eagerly instead (same numbers, eager speed). Fix: "
                      "install g++ (or set CXX), or pass backend='aot_eager' (no C++; less speed-up).")
            return False
    return True


_cxx_checked: dict[tuple, str | None] = {}


def _cpp_compiler_problem() -> str | None:
    """``None`` if inductor finds a C++ compiler, else what went wrong (checked once per setting)."""
    from torch._inductor import config

    setting = tuple(config.cpp.cxx) if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    if setting not in _cxx_checked:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
            _cxx_checked[setting] = None
        except Exception as err:  # noqa: BLE001
            _cxx_checked[setting] = f"none was found ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})"
    return _cxx_checked[setting]
