"""Compiled units: pure functions of tensors, run through :func:`torch.compile`, usable under ``torch.func``.

A :class:`Unit` is a pure function ``fn(*tensors) -> tuple[Tensor, ...]`` plus the
options it is compiled with. :func:`run` executes it:

* with no ``torch.func`` transform active, directly through its compiled form;
* under ``grad``/``vjp``/``vmap``, through :class:`_Function`, a
  :class:`torch.autograd.Function` whose ``forward`` runs the compiled unit,
  whose ``backward`` is another unit (the ``vjp`` of this one) and whose ``vmap``
  rule is another unit (``vmap`` of this one). ``torch.func`` peels one transform
  per level before it calls these rules, so every compiled call happens with no
  transform active, which is the one situation :func:`torch.compile` supports
  (PyTorch issue #128711); the transforms themselves are traced *inside* the
  compiled function, as ``torch.func.vmap`` / ``torch.func.vjp`` calls.

Each distinct unit (function, options, stack of transforms) is compiled once,
into its own code object, so that dynamo's per-code-object cache and recompile
limit see only that unit's shapes. A unit that cannot be compiled (dynamo cannot
trace it, no working C++ compiler, ...) is run eagerly from then on, after one
warning that names it and says why.
"""

from __future__ import annotations

import collections
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.func import vjp, vmap

from .. import _runner
from . import _backend, _fallback
from ._fallback import describe, is_compiler_failure, warn_once

#: ``("vmap", in_dims, randomness)`` or ``("vjp", in_mask, out_mask)``.
Transform = tuple
_FAILED = object()
_failed_groups: set[Hashable] = set()
_broken_backends: set[str] = set()
_CACHE_SIZE = 256
_cache: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
_interned: dict[Hashable, int] = {}
#: ``(unit name, transforms, seconds)`` of every compilation so far (what the benchmark reports per unit).
compile_log: list[tuple[str, tuple, float]] = []
_counter = [0]


@dataclass(frozen=True)
class Options:
    """How units are compiled: :func:`torch.compile`'s ``backend``, ``mode`` and ``dynamic``."""

    backend: str = "inductor"
    mode: str | None = None
    dynamic: bool = False


@dataclass(frozen=True)
class Unit:
    """``fn(*tensors) -> tuple of tensors``, identified by ``key`` (which must determine ``fn``).

    ``name`` says what the unit is, for warnings (e.g. ``"10 inner steps of g=ridge_inner"``).
    Units of one ``group`` (one problem) fall back to eager together: when one of them
    cannot be compiled, the others run eagerly too (``group_name`` names the group).
    ``transforms`` are applied to ``fn`` in order (the first is innermost). A unit with an
    ``alternative`` (the loop unit, whose alternative is chunks of inner steps) has no eager form
    (torch's ``scan`` compiles even when called eagerly): where it cannot be compiled, :func:`run` raises
    :class:`UseAlternative` and the caller runs the alternative (which then compiles, or falls back
    to eager, on its own); its group stays compiled, and :func:`is_failed` tells later calls.
    """

    key: Hashable
    fn: Callable[..., tuple[Tensor, ...]] = field(compare=False)
    name: str = field(default="", compare=False)
    group: Hashable = field(default=None, compare=False)
    group_name: str = field(default="", compare=False)
    options: Options = Options()
    transforms: tuple[Transform, ...] = ()
    alternative: bool = field(default=False, compare=False)

    def vmapped(self, in_dims: tuple[int | None, ...], randomness: str) -> "Unit":
        return replace(self, transforms=self.transforms + (("vmap", in_dims, randomness),))

    def vjp(self, in_mask: tuple[bool, ...], out_mask: tuple[bool, ...]) -> "Unit":
        return replace(self, transforms=self.transforms + (("vjp", in_mask, out_mask),))

    def build(self) -> Callable[..., tuple[Tensor, ...]]:
        """The eager function: ``fn`` under its transforms."""
        fn = self.fn
        for t in self.transforms:
            fn = vmap(fn, in_dims=t[1], randomness=t[2]) if t[0] == "vmap" else _vjp_of(fn, t[1], t[2])
        return fn


def _vjp_of(fn: Callable, in_mask: tuple[bool, ...], out_mask: tuple[bool, ...]) -> Callable:
    """``(*inputs, *cotangents) -> grads of the selected outputs w.r.t. the selected inputs``."""
    n_in = len(in_mask)
    idx = [i for i, m in enumerate(in_mask) if m]
    oidx = [j for j, m in enumerate(out_mask) if m]

    def pulled(*args: Tensor) -> tuple[Tensor, ...]:
        inputs, cots = args[:n_in], args[n_in:]

        def restricted(*diff: Tensor) -> tuple[Tensor, ...]:
            full = list(inputs)
            for i, d in zip(idx, diff):
                full[i] = d
            out = fn(*full)
            return tuple(out[j] for j in oidx)

        _, pullback = vjp(restricted, *(inputs[i] for i in idx))
        return tuple(pullback(tuple(cots)))

    return pulled


def intern(key: Hashable) -> int:
    """A small integer standing for ``key`` (so that units hash and compare in O(1) per call)."""
    found = _interned.get(key)
    if found is None:
        found = _interned[key] = len(_interned)
    return found


def plain_call(leaves: tuple[Tensor, ...]) -> bool:
    """Whether :func:`run` would call a unit on ``leaves`` directly: no ``torch.func`` transform
    active and no gradient to record (else it goes through :class:`_Function`, whose backward and
    vmap rules transform the unit)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in leaves))


class UseAlternative(Exception):
    """Raised by :func:`run` for a unit with an ``alternative`` that cannot be compiled: ``reason``
    says why; ``told`` when a warning has said so already (its group or backend fell back to eager)."""

    def __init__(self, reason: str, told: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.told = reason, told


def is_failed(unit: Unit) -> bool:
    """Whether ``unit`` was tried and could not be compiled (it then runs eagerly, or its alternative)."""
    return _cache.get(unit) is _FAILED


def run(unit: Unit, leaves: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Execute ``unit`` on ``leaves``, compiled, under whatever transforms are active.

    ``grad``/``vjp`` and ``vmap`` (nested in any order) are supported; under forward-mode
    transforms (``jvp``, ``jacfwd``) and ``functionalize`` the unit runs eagerly after a
    one-time warning.
    """
    if plain_call(leaves):
        return _execute(unit, leaves)
    if torch._C._functorch.peek_interpreter_stack() is None:  # a gradient to record
        return _Function.apply(unit, *leaves)
    kinds = {i.key() for i in retrieve_all_functorch_interpreters()}
    unsupported = kinds - {TransformType.Grad, TransformType.Vmap}
    if unsupported:
        names = ", ".join(sorted(k.name.lower() for k in unsupported))
        warn_once(("transform", names), f"bl.Compiled: compiled units do not run under torch.func "
                  f"transform(s) {names} (forward-mode AD or functionalize); running {unit.name} and the "
                  "like eagerly there (same numbers, eager speed). grad, vjp and vmap are supported.")
        return eager(unit, leaves)
    return _Function.apply(unit, *leaves)


class _Function(torch.autograd.Function):
    """The bridge between ``torch.func`` transforms and compiled units (see the module docstring)."""

    @staticmethod
    def forward(unit: Unit, *leaves: Tensor) -> tuple[Tensor, ...]:
        return _fresh_outputs(_execute(unit, leaves), leaves)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        unit, *leaves = inputs
        ctx.unit = unit
        ctx.save_for_backward(*leaves)
        ctx.mark_non_differentiable(*(o for o in output if not o.is_floating_point()))
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *cots: Tensor | None) -> tuple[Tensor | None, ...]:
        leaves = ctx.saved_tensors
        in_mask = tuple(bool(n) and t.is_floating_point() for n, t in zip(ctx.needs_input_grad[1:], leaves))
        out_mask = tuple(c is not None for c in cots)
        if not any(in_mask) or not any(out_mask):
            return (None,) * (1 + len(leaves))
        grads = iter(run(ctx.unit.vjp(in_mask, out_mask), (*leaves, *(c for c in cots if c is not None))))
        return (None, *(next(grads) if m else None for m in in_mask))

    @staticmethod
    def vmap(info: Any, in_dims: tuple, unit: Unit, *leaves: Tensor) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        out = _fresh_outputs(run(unit.vmapped(tuple(in_dims[1:]), info.randomness), leaves), leaves)
        return out, (0,) * len(out)


def _fresh_outputs(out: tuple[Tensor, ...], leaves: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """An input returned as-is cannot also be saved for backward by an outer transform: copy it."""
    ids = {id(t) for t in leaves}
    return tuple(o.clone() if id(o) in ids else o for o in out)


def _execute(unit: Unit, leaves: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Run the compiled form of ``unit`` (compiling it on first use); eagerly if it cannot be compiled."""
    cache_key = unit
    compiled = _cache.get(cache_key)
    if compiled is None:
        compiled = _compile(unit)
        _cache[cache_key] = compiled
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    if compiled is _FAILED or unit.group in _failed_groups or unit.options.backend in _broken_backends:
        if unit.alternative:
            raise UseAlternative("it could not be compiled before", told=compiled is not _FAILED)
        return eager(unit, leaves)
    try:
        before = _runner.compile_clock()
        out = compiled(*leaves)
        if (spent := _runner.compile_clock() - before) > 0:
            compile_log.append((unit.name, unit.transforms, spent))
        return out
    except Exception as err:  # noqa: BLE001 - any failure to compile falls back to the eager unit
        if unit.alternative:  # the alternative raises a genuine error in the user's code, or compiles
            _cache[cache_key] = _FAILED
            raise UseAlternative(describe(err)) from err
        out = eager(unit, leaves)  # a genuine error in the user's code raises here, with its notes
        _cache[cache_key] = _FAILED
        if is_compiler_failure(err):
            _broken_backends.add(unit.options.backend)
            warn_once(("backend", unit.options.backend),
                      f"bl.Compiled: torch.compile's {unit.options.backend!r} backend failed to build "
                      f"{unit.name} ({describe(err)}), so it has no working C++ compiler here. Running every "
                      "compiled unit eagerly from now on (same numbers, eager speed). Fix: install g++ (or set "
                      "CXX), or pass backend='aot_eager'.")
        else:
            if unit.group is not None:
                _failed_groups.add(unit.group)
            what = f"the problem with {unit.group_name}" if unit.group is not None else "it"
            warn_once(("unit", unit.group if unit.group is not None else unit.key),
                      f"bl.Compiled: could not compile {unit.name}: {describe(err)} Running {what} eagerly "
                      "from now on (same numbers, eager speed). Fix: keep data-dependent Python control flow "
                      "(if on tensor values, .item()) out of the objectives, e.g. with torch.where.")
        return out


def eager(unit: Unit, leaves: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The unit run eagerly (no runner installed, so the primitives inside run as written)."""
    with _runner.installed(None):
        return tuple(unit.build()(*leaves))


def _compile(unit: Unit) -> Any:
    _runner.watch_compiles()
    fn = unit.build()
    _counter[0] += 1
    name = f"bilevel_unit_{_counter[0]}"

    def call(*args: Tensor) -> tuple[Tensor, ...]:
        return tuple(fn(*args))

    # A fresh code object per unit: dynamo caches compiled graphs (and counts recompiles) per code object.
    code = call.__code__.replace(co_name=name, co_qualname=name)
    fresh = types.FunctionType(code, call.__globals__, name, None, call.__closure__)
    opts = unit.options
    try:
        backend, mode = (_backend.inductor_backend(opts), None) if opts.backend == "inductor" else (opts.backend, opts.mode)
        return torch.compile(fresh, fullgraph=True, dynamic=opts.dynamic, backend=backend, mode=mode,
                             options={"guard_filter_fn": _guard_filter})
    except Exception as err:  # noqa: BLE001 - e.g. an unknown backend, or an unsupported Python / torch
        warn_once(("compile", opts), f"bl.Compiled: torch.compile is not usable here ({describe(err)}). "
                  "Running eagerly instead (same numbers, eager speed).")
        return _FAILED


def _guard_filter(entries: Any) -> list[bool]:
    """Keep dynamo's guards except those on the unit's own closure (the problem, the solver, the tree
    structures: the unit's key already fixes them for this compiled function) and on torch's and
    bilevel's modules. Tensor guards (shapes, dtypes, strides) are kept wherever the tensor comes from,
    and so are guards on the global state (grad mode, functorch levels) and on the user's globals."""
    return [e.guard_type in _TENSOR_GUARDS or not e.name.startswith(_FIXED) for e in entries]


_TENSOR_GUARDS = ("TENSOR_MATCH", "NO_TENSOR_ALIASING", "DIMENSION_DYNAMIC_MARKING_GUARD")
#: Sources that cannot change under a compiled unit: its closure, and torch's and bilevel's own modules
#: (the user's modules and globals keep their guards).
_FIXED = ("fn.", "fn[", "L['fn']", "G['__import_torch", "G['__import_bilevel", "__import__('torch')")


def clear() -> None:
    """Forget every compiled unit and warning (the tests use this; dynamo's own caches remain)."""
    _cache.clear()
    _fallback.clear()
    _failed_groups.clear()
    _broken_backends.clear()
