"""The runner :class:`bilevel.Compiled` installs: each primitive of the estimators as a compiled unit.

The primitives are the ones every estimator is written in (see :mod:`bilevel._runner`):

* ``loop_run`` — a run of inner steps, split into units of ``chunk`` steps;
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

import dataclasses
import types
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
from ..linear._base import AbstractLinearSolver, MatVec
from ._unit import Options, Unit, run

_TENSOR = object()  # marks where a tensor leaf sat among the static leaves
_structures: dict[Hashable, tuple[Any, tuple]] = {}


def static_key(obj: Any, depth: int = 0) -> Hashable:
    """A hashable key that determines what ``obj`` computes.

    Functions are keyed by their code, defaults and closure contents (so a closure rebuilt
    with equal contents, like iMAML's proximal objective, keys the same), tensors by identity
    (the compiled unit keeps the original alive), hashable values by value, anything else by
    identity.
    """
    if depth > 6:
        return ("id", id(obj))
    if isinstance(obj, Tensor):
        return ("tensor", id(obj))
    if isinstance(obj, types.FunctionType):
        cells = tuple(static_key(c.cell_contents, depth + 1) if _filled(c) else None for c in obj.__closure__ or ())
        return ("function", obj.__code__, id(obj.__globals__), static_key(obj.__defaults__, depth + 1), cells)
    if isinstance(obj, types.MethodType):
        return ("method", obj.__func__, static_key(obj.__self__, depth + 1))
    if isinstance(obj, BilevelProblem):
        return ("problem", *(static_key(f, depth + 1) for f in (obj.inner, obj.outer, obj.init)))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # field by field: tensors by identity
        return (type(obj), tuple(static_key(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)))
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(static_key(o, depth + 1) for o in obj))
    if isinstance(obj, dict):
        return (dict, tuple((k, static_key(v, depth + 1)) for k, v in obj.items()))
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return obj


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def split(tree: Any) -> tuple[list[Tensor], Any, tuple]:
    """``(tensor leaves, structure, leaves with tensors replaced by a marker)``."""
    leaves, spec = tree_flatten(tree)
    return [v for v in leaves if isinstance(v, Tensor)], spec, tuple(_TENSOR if isinstance(v, Tensor) else v
                                                                       for v in leaves)


def merge(tensors: Any, spec: Any, statics: tuple) -> Any:
    it = iter(tensors)
    return tree_unflatten([next(it) if s is _TENSOR else s for s in statics], spec)


class Runner:
    """Executes the primitives as compiled units (installed by :class:`bilevel.Compiled` for one call)."""

    def __init__(self, chunk: int | None, options: Options) -> None:
        self.chunk = chunk          # inner steps per unit; None: the whole run of steps
        self.options = options

    # -- the generic unit --------------------------------------------------------------------
    def call(self, kind: Hashable, name: str, fn: Callable[..., Any], args: tuple, like: Any = None,
             problem: BilevelProblem | None = None) -> Any:
        """``fn(*args)`` as a compiled unit. The output has the structure of ``like`` when given;
        otherwise it is learnt from one eager call the first time (its non-tensor leaves, such
        as operation counts, are static and kept from that call)."""
        tensors, spec, statics = split(args)
        key = (kind, self.options, spec, static_key(statics))
        if like is not None:
            _, out_spec, out_statics = split(like)
        elif key in _structures:
            out_spec, out_statics = _structures[key]
        else:
            with _runner.installed(None):
                out = fn(*args)
            _, out_spec, out_statics = split(out)
            _structures[key] = (out_spec, out_statics)

        def unit_fn(*leaves: Tensor) -> tuple[Tensor, ...]:
            out = fn(*merge(leaves, spec, statics))
            return tuple(v for v in tree_flatten(out)[0] if isinstance(v, Tensor))

        group = None if problem is None else static_key(problem)
        unit = Unit(key, unit_fn, name=name, options=self.options, group=group,
                    group_name="" if problem is None else _problem_name(problem))
        out = run(unit, tuple(tensors))
        return merge(out, out_spec, out_statics)

    # -- the primitives ------------------------------------------------------------------------
    def loop_run(self, solver: AbstractInnerSolver, loop: LoopState, grad_fn: Callable,
                 start: int, stop: int) -> LoopState | None:
        parts = getattr(grad_fn, "parts", None)
        if parts is None or stop <= start:
            return None
        problem, hparams, batch = parts
        size = stop - start if self.chunk is None else self.chunk
        like = next(iter(loop.solver[0].values()))
        pos = start
        while pos < stop:
            n = min(size, stop - pos)
            stochastic = is_stochastic(batch)
            batches = tuple(batch_at(batch, j) for j in range(pos, pos + n)) if stochastic else (batch,)
            offset = torch.tensor(pos - 1, dtype=torch.int64, device=like.device)
            first = torch.tensor(pos == 0, device=like.device)
            body = _ChunkBody(solver, n, stochastic)
            loop = self.call(("inner", body), f"{n} inner step(s) of g={_name(problem.inner)}", body,
                             (problem, loop, hparams, batches, offset, first), like=loop, problem=problem)
            pos += n
        return loop

    def hvp_yy(self, problem: BilevelProblem, hparams: dict, params: dict, batch: Any, mode: str) -> MatVec:
        return _MatVec(self, problem, hparams, params, batch, mode)

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

    def __call__(self, problem: BilevelProblem, loop: LoopState, hparams: dict, batches: tuple,
                  offset: Tensor, first: Tensor) -> LoopState:
        batch = Sampler(lambda k: batches[k - 1]) if self.stochastic else batches[0]
        value_and_grad = grad_and_value(lambda y, b: problem.inner_value(hparams, y, b))
        losses: list[Tensor] = []

        def grad_fn(y: dict, k: int) -> tuple[dict, Tensor]:
            g, loss = value_and_grad(y, batch_at(batch, k))
            losses.append(loss)
            return g, loss

        out = loop_run(self.solver, loop, grad_fn, 1, 1 + self.n)
        new_bad = (loop.bad_step < 0) & (out.bad_step >= 0)
        bad = torch.where(new_bad, out.bad_step + offset, out.bad_step)
        return out._replace(bad_step=bad, loss0=torch.where(first, losses[0], loop.loss0))


class _MatVec:
    """``v -> ∇²_yy g v`` at fixed ``(x, y, batch)``, one compiled unit per product; a
    :class:`CompiledLinearSolver` compiles a whole solve from its parts instead."""

    def __init__(self, runner: Runner, problem: BilevelProblem, hparams: dict, params: dict, batch: Any,
                 mode: str) -> None:
        self.runner, self.problem, self.hparams, self.params, self.batch, self.mode = (
            runner, problem, hparams, params, batch, mode)

    def __call__(self, v: dict) -> dict:
        return self.runner.call(("hvp", self.mode), f"the HVP of g={_name(self.problem.inner)}", _hvp_body,
                                (self.problem, self.hparams, self.params, self.batch, self.mode, v), like=v,
                                problem=self.problem)


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
    its operator is a Hessian-vector product of the inner objective; otherwise as written."""

    solver: AbstractLinearSolver
    runner: Runner = field(compare=False, repr=False)

    @property
    def resamples_operator(self) -> bool:  # type: ignore[override]
        return self.solver.resamples_operator

    def solve(self, matvec: MatVec, b: dict, x0: dict | None = None) -> LinearSolution:
        if not isinstance(matvec, _MatVec):
            return self.solver.solve(matvec, b, x0)
        return self.runner.linear_solve(self.solver, matvec, b, x0)

    def __repr__(self) -> str:
        return repr(self.solver)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.solver, name)
