"""The runner :class:`bilevel.Compiled` installs: each primitive of the estimators as a compiled unit.

The primitives are the ones every estimator is written in (see :mod:`bilevel._runner`):

* ``loop_run`` — a run of inner steps, split into units of ``chunk`` steps, or (``loop`` set)
  one unit that runs every step in a compiled loop (torch's ``scan``, see :class:`_LoopBody`);
* ``hvp_yy`` — a Hessian-vector product (a unit per product);
* ``cross_vjp`` and ``outer_grads`` — the mixed second derivative and the outer gradients;
* a linear solve (all its iterations and HVPs in one unit), for estimators with a
  ``linear_solver`` (AID, IMAML), through :class:`CompiledLinearSolver`.

A unit's inputs are the tensor leaves of the primitive's arguments; everything else
(the problem, the solver, the HVP mode, the structure of the trees) is static and
goes into the unit's key, so that equal problems share compiled code and a second
call with the same shapes does not recompile.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import _runner
from .._batch import Sampler, batch_at, is_stochastic
from .._problem import BilevelProblem
from .._result import LinearSolution
from ..inner._base import AbstractInnerSolver, LoopState, loop_run
from ..linear._base import AbstractLinearSolver, IterativeLinearSolver, MatVec
from ._trees import merge, rebuild, split, static_key, template_of, tensors_of
from ._fallback import warn_once
from ._unit import Options, Unit, UseAlternative, intern, is_failed, plain_call, run

_structures: dict[Hashable, Any] = {}  # output template of each unit learnt by an eager call


class Prepared:
    """``fn(*args)`` as a compiled unit, its static analysis done once: call it with arguments of
    the same structure (same problem, same tree structures, new tensors)."""

    def __init__(self, runner: "Runner", kind: Hashable, name: str, fn: Callable[..., Any], args: tuple,
                 like: Any = None, problem: Any = None, alternative: bool = False) -> None:
        _, spec, statics = split(args)
        key = intern((kind, runner.options, spec, runner.key_of(statics)))
        if like is None:
            if key not in _structures:  # one eager call learns the output structure (and its static leaves)
                with _runner.installed(None):
                    _structures[key] = template_of(fn(*args))
            self.template = _structures[key]
        else:
            self.template = template_of(like)

        def unit_fn(*leaves: Tensor) -> tuple[Tensor, ...]:
            out = fn(*merge(leaves, spec, statics))
            return tuple(v for v in tree_flatten(out)[0] if isinstance(v, Tensor))

        group = None if problem is None else runner.key_of(problem)
        self.unit = Unit(key, unit_fn, name=name, options=runner.options, group=group,
                         group_name="" if problem is None else _problem_name(problem), alternative=alternative)

    def __call__(self, *args: Any) -> Any:
        out = run(self.unit, tuple(tensors_of(args, [])))
        return rebuild(self.template, iter(out))


class Runner:
    """Executes the primitives as compiled units (installed by :class:`bilevel.Compiled` for one call)."""

    def __init__(self, chunk: int | None, options: Options, loop: str | None = None) -> None:
        self.chunk = chunk          # inner steps per unit; None: the whole run of steps
        self.loop = loop            # the whole run as one compiled loop where it can be (else chunks):
        #                             "loop" warns when it cannot be compiled, "auto" takes chunks silently
        self.options = options
        self._keys: dict[int, tuple[Any, Hashable]] = {}
        self._scalars: dict[tuple, Tensor] = {}

    def key_of(self, obj: Any) -> Hashable:
        """:func:`static_key`, remembered per object (the object is kept alive, so its id stays its own);
        tuples (fresh at every call) are keyed element by element."""
        if type(obj) is tuple:
            return (tuple, tuple(self.key_of(o) for o in obj))
        if obj is None or isinstance(obj, (str, int, float, bool)):
            return (type(obj), obj)  # the type too: True == 1, but they compute differently
        hit = self._keys.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        key = static_key(obj)
        if len(self._keys) > 256:
            self._keys.clear()
        self._keys[id(obj)] = (obj, key)
        return key

    def scalar(self, value: Any, like: Tensor) -> Tensor:
        """A 0-dim tensor holding ``value`` on ``like``'s device (made once, reused: it is never modified)."""
        key = (value, type(value), like.device)
        t = self._scalars.get(key)
        if t is None:
            t = self._scalars[key] = torch.tensor(value, device=like.device)
        return t

    # -- the generic unit --------------------------------------------------------------------
    def call(self, kind: Hashable, name: str, fn: Callable[..., Any], args: tuple, like: Any = None,
             problem: Any = None) -> Any:
        """``fn(*args)`` as a compiled unit. The output has the structure of ``like`` when given;
        otherwise it is learnt from one eager call the first time (its non-tensor leaves, such
        as operation counts, are static and kept from that call)."""
        return Prepared(self, kind, name, fn, args, like, problem)(*args)

    # -- the primitives ------------------------------------------------------------------------
    def loop_run(self, solver: AbstractInnerSolver, loop: LoopState, grad_fn: Callable,
                 start: int, stop: int) -> LoopState | None:
        parts = getattr(grad_fn, "parts", None)
        if parts is None or stop <= start:
            return None
        problem, hparams, batch = parts
        size = stop - start if self.chunk is None else self.chunk
        like = next(iter(loop.solver[0].values()))
        stochastic = is_stochastic(batch)
        if self.loop and not stochastic and _scan is not None:
            ran = self._loop_unit(solver, loop, problem, hparams, batch, start, stop, like)
            if ran is not None:
                return ran
        prepared: dict[tuple, Prepared] = {}
        pos = start
        while pos < stop:
            n = min(size, stop - pos)
            batches = tuple(batch_at(batch, j) for j in range(pos, pos + n)) if stochastic else (batch,)
            args = (problem, loop, hparams, batches, self.scalar(pos - 1, like), self.scalar(pos == 0, like))
            shape = (n, split(batches)[1]) if stochastic else n  # a sampler may change the batch structure
            unit = prepared.get(shape)
            if unit is None:
                body = _ChunkBody(solver, n, stochastic)
                unit = prepared[shape] = Prepared(self, ("inner", body), f"{n} inner step(s) of "
                                                  f"g={_name(problem.inner)}", body, args, like=loop, problem=problem)
            loop = unit(*args)
            pos += n
        return loop

    def _loop_unit(self, solver: AbstractInnerSolver, loop: LoopState, problem: BilevelProblem, hparams: dict,
                   batch: Any, start: int, stop: int, like: Tensor) -> LoopState | None:
        """Steps ``start .. stop-1`` as one unit that runs them in a compiled loop (:class:`_LoopBody`);
        ``None`` where that cannot be: under a ``torch.func`` transform or with gradients to record
        (torch's ``scan`` is neither batched nor differentiated there), a solver state that is not
        all tensors, or a loop that failed to compile before (the caller then runs chunks)."""
        if not all(isinstance(v, Tensor) for v in tree_flatten(loop)[0]):
            return None
        args = (problem, loop, hparams, batch, self.scalar(start - 1, like), self.scalar(start == 0, like))
        if not plain_call(tuple(tensors_of(args, []))):
            return None
        body = _LoopBody(solver, stop - start)
        prepared = Prepared(self, ("loop", body), f"the {stop - start}-step inner loop of g={_name(problem.inner)}",
                            body, args, like=loop, problem=problem, alternative=True)
        return self.try_loop_unit(prepared, args, f"Running chunks of {self.chunk} inner steps instead")

    def try_loop_unit(self, prepared: Prepared, args: tuple, instead: str) -> Any | None:
        """``prepared(*args)``, a unit with compiled loops (traced under
        :func:`bilevel._runner.scanned_loops`), or ``None`` where it does not compile (now or
        before): the caller then does ``instead``, which a one-time warning names under
        ``granularity="loop"`` (``"auto"`` takes the alternative silently)."""
        if is_failed(prepared.unit):
            return None
        try:
            with _runner.scanned_loops():
                return prepared(*args)
        except UseAlternative as why:
            if self.loop == "loop" and not why.told:
                warn_once(("unit", prepared.unit.key), f"bl.Compiled: could not compile {prepared.unit.name}: "
                          f"{why.reason} {instead} from now on.")
            return None

    def hvp_yy(self, problem: BilevelProblem, hparams: dict, params: dict, batch: Any, mode: str) -> MatVec:
        return _MatVec(self, problem, hparams, params, batch, mode)

    def linear_loop(self, solver: AbstractLinearSolver, matvec: "_MatVec", b: dict,
                    x0: dict | None) -> LinearSolution | None:
        """The whole linear solve as one unit whose iterations run in a compiled loop
        (:class:`_LinearLoopBody`); ``None`` where that cannot be (the caller then applies the
        operator as a unit per product): a solver without fixed iterations
        (:class:`~bilevel.linear._base.IterativeLinearSolver`) or one that overrides its ``solve``,
        a call under a ``torch.func`` transform or with gradients to record, or a loop that
        failed to compile before."""
        if (_scan is None or not isinstance(solver, IterativeLinearSolver) or solver.iterations < 1
                or type(solver).solve is not IterativeLinearSolver.solve):  # a subclass's own solve runs as written
            return None
        args = (matvec.problem, matvec.hparams, matvec.params, matvec.batch, matvec.mode, b, x0)
        if not plain_call(tuple(tensors_of(args, []))):
            return None
        body = _LinearLoopBody(solver)
        prepared = Prepared(self, ("linear-loop", body), f"the {solver.iterations}-iteration loop of {solver!r} "
                            f"on the HVP of g={_name(matvec.problem.inner)}", body, args, problem=matvec.problem,
                            alternative=True)
        out = self.try_loop_unit(prepared, args, "Applying the operator as one unit per product instead")
        return None if out is None else LinearSolution(*out)

    def linear_solve(self, solver: AbstractLinearSolver, matvec: "_MatVec", b: dict,
                     x0: dict | None) -> LinearSolution:
        parts = (matvec.problem, matvec.hparams, matvec.params, matvec.batch, matvec.mode)
        out = self.call(("linear", solver), f"the linear solve {solver!r} of g={_name(matvec.problem.inner)}",
                        _solve_body, (solver, *parts, b, x0), problem=matvec.problem)
        return LinearSolution(*out)


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _problem_name(problem: Any) -> str:
    if not isinstance(problem, BilevelProblem):
        return _name(problem)
    return f"g={_name(problem.inner)}, f={_name(problem.outer)}"


@dataclass(frozen=True)
class _ChunkBody:
    """``n`` inner steps from ``loop``, as :func:`loop_run` runs them from step ``pos``.

    The unit runs steps ``1..n`` of :func:`loop_run` (so one compiled unit serves every
    chunk) and puts back what depends on the true start ``pos``: the index of the first
    NaN/inf step (``offset = pos - 1``) and the loss at the start (``first``: ``pos == 0``).
    """

    solver: AbstractInnerSolver
    n: int
    stochastic: bool

    def __call__(self, problem: BilevelProblem, loop: LoopState, hparams: dict, batches: tuple, offset: Tensor,
                 first: Tensor) -> LoopState:
        batch = Sampler(lambda k: batches[k - 1]) if self.stochastic else batches[0]
        grad_fn, losses = _recording_grad_fn(problem, hparams, batch)
        out = loop_run(self.solver, loop, grad_fn, 1, 1 + self.n)
        new_bad = (loop.bad_step < 0) & (out.bad_step >= 0)
        bad = torch.where(new_bad, out.bad_step + offset, out.bad_step)
        return out._replace(bad_step=bad, loss0=torch.where(first, losses[0], loop.loss0))


def _recording_grad_fn(problem: BilevelProblem, hparams: dict, batch: Any) -> tuple[Callable, list[Tensor]]:
    """The ``grad_fn`` of :func:`loop_run` for ``g(x, ., batch)`` (drawn at each step from a
    :class:`Sampler`), and the list into which it records each step's loss."""
    value_and_grad = grad_and_value(lambda y, b: problem.inner_value(hparams, y, b))
    losses: list[Tensor] = []

    def grad_fn(y: dict, k: int) -> tuple[dict, Tensor]:
        g, loss = value_and_grad(y, batch_at(batch, k))
        losses.append(loss)
        return g, loss

    return grad_fn, losses


try:  # torch's scan (a loop compiled once, whatever its length); torch 2.6 and later
    from torch._higher_order_ops.scan import scan as _scan
except ImportError:  # pragma: no cover - older torch: chunks instead
    _scan = None


@dataclass(frozen=True)
class _LoopBody:
    """``n`` inner steps from ``loop``, as :func:`loop_run` runs them from step ``pos``, in one
    compiled loop: torch's ``scan`` over one step, whose body is traced and compiled once, so the
    unit compiles in the time of one step whatever ``n`` is (the unrolled units of ``"solve"``
    grow with ``n``, and ``"chunk"`` calls a unit every ``chunk`` steps).

    Each pass runs step 1 of :func:`loop_run` on the carry (the loop state's tensors) and emits
    that step's loss and whether it was NaN/inf; the index of the first such step (numbered from
    ``pos``: ``offset = pos - 1``) and the loss at the start (``first``: ``pos == 0``) are put
    back afterwards, as :class:`_ChunkBody` does (:func:`scan_loop` gives the carry fresh tensors:
    ``loop_start``'s shared zero would alias it).
    """

    solver: AbstractInnerSolver
    n: int

    def __call__(self, problem: BilevelProblem, loop: LoopState, hparams: dict, batch: Any, offset: Tensor,
                 first: Tensor) -> LoopState:
        def one_step(state: LoopState) -> tuple[LoopState, tuple[Tensor, Tensor]]:
            grad_fn, losses = _recording_grad_fn(problem, hparams, batch)
            out = loop_run(self.solver, state._replace(bad_step=torch.full_like(state.bad_step, -1)), grad_fn, 1, 2)
            return out._replace(bad_step=state.bad_step), (losses[0].clone(), out.bad_step >= 0)

        out, (losses, bad) = scan_loop(one_step, loop, self.n)
        first_bad = torch.argmax(bad.to(torch.uint8)) + offset + 1  # argmax: the first maximum
        new_bad = torch.where((loop.bad_step < 0) & bad.any(), first_bad, loop.bad_step)
        return out._replace(bad_step=new_bad, loss0=torch.where(first, losses[0], loop.loss0))


@dataclass(frozen=True)
class _LinearLoopBody:
    """A linear solve of ``∇²_yy g v = b``, called under :func:`bilevel._runner.scanned_loops`:
    traced, the solver's iterations become one compiled loop (see :func:`scanned`; each
    iteration's HVP is made inside the loop); called eagerly (only to learn the output
    structure, once per unit) it runs the solver's own loop."""

    solver: IterativeLinearSolver

    def __call__(self, problem, hparams, params, batch, mode, b, x0):
        from ..estimators._base import hvp_yy
        sol = self.solver.solve(hvp_yy(problem, hparams, params, batch, mode), b, x0)
        return sol.value, sol.steps, sol.residual, sol.code, sol.num_hvp, sol.info


def scan_loop(step: Callable[[Any], tuple[Any, Any]], carry: Any, n: int) -> tuple[Any, Any]:
    """``carry, y_k = step(carry)`` for ``k < n`` as torch's ``scan`` over one ``step`` (traced and
    compiled once, whatever ``n``): ``(last carry, ys stacked along a new first dimension)``.
    ``carry`` is a tree of tensors that ``step`` maps to a tree of the same structure, dtypes and
    shapes. The carry goes in and out as fresh tensors (``scan`` refuses a carry that aliases its
    inputs or itself)."""
    tensors, spec = tree_flatten(carry)

    def one(flat: list[Tensor], _: Tensor) -> tuple[list[Tensor], Any]:
        new, ys = step(tree_unflatten(flat, spec))
        return [t.clone() for t in tree_flatten(new)[0]], ys

    tensors, ys = _scan(one, [t.clone() for t in tensors], torch.zeros(n, device=tensors[0].device))
    return tree_unflatten(tensors, spec), ys


def scanned(step: Callable[[Any], Any], carry: Any, n: int) -> Any:
    """``carry = step(carry)``, ``n`` times, as one compiled loop (:func:`scan_loop`)."""
    def with_y(c: Any) -> tuple[Any, Tensor]:
        new = step(c)
        return new, tree_flatten(new)[0][-1].new_zeros(())  # scan wants an output per pass

    return scan_loop(with_y, carry, n)[0]


def scanned_steps(solver: AbstractInnerSolver, loop: LoopState, grad_fn: Callable, start: int,
                  stop: int) -> LoopState | None:
    """Inner steps ``start .. stop-1`` as one compiled loop (:class:`_LoopBody`), traced inside a
    unit under :func:`bilevel._runner.scanned_loops`; ``None`` (the steps as written) where the
    batches are drawn per step or the solver state is not all tensors."""
    parts = getattr(grad_fn, "parts", None)
    if parts is None or is_stochastic(parts[2]) or not all(isinstance(v, Tensor) for v in tree_flatten(loop)[0]):
        return None
    problem, hparams, batch = parts
    device = loop.steps.device
    offset = torch.full((), start - 1, dtype=torch.int64, device=device)
    first = torch.full((), start == 0, dtype=torch.bool, device=device)
    return _LoopBody(solver, stop - start)(problem, loop, hparams, batch, offset, first)


class _MatVec:
    """``v -> ∇²_yy g v`` at fixed ``(x, y, batch)``, one compiled unit per product; a
    :class:`CompiledLinearSolver` compiles a whole solve from its parts instead."""

    def __init__(self, runner: Runner, problem: BilevelProblem, hparams: dict, params: dict, batch: Any,
                 mode: str) -> None:
        self.runner, self.problem, self.hparams, self.params, self.batch, self.mode = (
            runner, problem, hparams, params, batch, mode)
        self._unit: Prepared | None = None

    def __call__(self, v: dict) -> dict:
        args = (self.problem, self.hparams, self.params, self.batch, self.mode, v)
        if self._unit is None:  # every product of this operator has the structure of the first
            self._unit = Prepared(self.runner, ("hvp", self.mode), f"the HVP of g={_name(self.problem.inner)}",
                                  _hvp_body, args, like=v, problem=self.problem)
        return self._unit(*args)


def _hvp_body(problem, hparams, params, batch, mode, v):
    from ..estimators._base import hvp_yy
    return hvp_yy(problem, hparams, params, batch, mode)(v)


def _solve_body(solver, problem, hparams, params, batch, mode, b, x0):
    from ..estimators._base import hvp_yy
    sol = solver.solve(hvp_yy(problem, hparams, params, batch, mode), b, x0)
    return sol.value, sol.steps, sol.residual, sol.code, sol.num_hvp, sol.info


@dataclass(frozen=True)
class CompiledLinearSolver(AbstractLinearSolver):
    """A linear solver whose whole solve (iterations and HVPs) runs as one compiled unit when
    its operator is a Hessian-vector product of the inner objective: unrolled (``"solve"``) or,
    under ``"loop"``, its iterations in a compiled loop where they can be (else a unit per
    product); with any other operator as written."""

    solver: AbstractLinearSolver
    runner: Runner = field(compare=False, repr=False)

    @property
    def resamples_operator(self) -> bool:  # type: ignore[override]
        return self.solver.resamples_operator

    def solve(self, matvec: MatVec, b: dict, x0: dict | None = None) -> LinearSolution:
        if not isinstance(matvec, _MatVec):
            return self.solver.solve(matvec, b, x0)
        if self.runner.loop:  # granularity "loop": the iterations in a compiled loop, where they can be
            ran = self.runner.linear_loop(self.solver, matvec, b, x0)
            return self.solver.solve(matvec, b, x0) if ran is None else ran
        return self.runner.linear_solve(self.solver, matvec, b, x0)

    def __repr__(self) -> str:
        return repr(self.solver)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.solver, name)
