"""How the primitives execute: eagerly, unless a :class:`bilevel.Compiled` call installs a runner.

The estimators are written once, in terms of a few primitives: a run of inner
steps (:func:`bilevel.inner._base.loop_run`) and a Hessian-vector product
(:func:`bilevel.estimators._base.hvp_yy`). Each primitive asks :func:`current`
whether a runner is installed; on the eager path the answer is ``None`` (one
context-variable read) and the primitive runs as written. :class:`bilevel.Compiled`
installs a runner for the duration of one call, which executes the primitive
through :func:`torch.compile` instead. While :mod:`torch._dynamo` traces a
primitive, :func:`current` answers ``None``, so the traced code is the eager code.

This module imports nothing from :mod:`torch._dynamo`: eager users never pay for it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch

_ACTIVE: ContextVar[Any] = ContextVar("bilevel_runner", default=None)
_scan_loops = False
_compile_seconds = 0.0
_compile_started: list[float] = []
_callbacks_installed = False


def current() -> Any:
    """The installed runner, or ``None`` (always ``None`` while dynamo traces)."""
    if torch.compiler.is_compiling():
        return None
    return _ACTIVE.get()


@contextlib.contextmanager
def installed(runner: Any) -> Iterator[None]:
    """Install ``runner`` (``None`` to run eagerly) for the duration of the block."""
    token = _ACTIVE.set(runner)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def scanning() -> bool:
    """Whether the code being traced runs its loops (inner steps, linear-solver iterations) as
    compiled loops, torch's ``scan`` over one step: only while dynamo traces a unit called
    under :func:`scanned_loops` (read at trace time; an eager call runs the loops as written)."""
    return _scan_loops and torch.compiler.is_compiling()


@contextlib.contextmanager
def scanned_loops() -> Iterator[None]:
    """Let the units called in the block trace their loops as compiled loops (see :func:`scanning`)."""
    global _scan_loops
    before, _scan_loops = _scan_loops, True
    try:
        yield
    finally:
        _scan_loops = before


def compile_clock() -> float:
    """Seconds spent in :func:`torch.compile` compilations so far in this process (a monotone
    clock: the difference over a call is what the call paid). ``0.0`` until the first
    :class:`bilevel.Compiled` call registers the dynamo callbacks."""
    return _compile_seconds


def watch_compiles() -> None:
    """Register dynamo start/end callbacks that add every compilation's duration to
    :func:`compile_clock` (once per process)."""
    global _callbacks_installed
    if _callbacks_installed:
        return
    from torch._dynamo.callback import callback_handler

    def start(*_: Any) -> None:
        _compile_started.append(time.perf_counter())

    def end(*_: Any) -> None:
        global _compile_seconds
        if _compile_started:
            _compile_seconds += time.perf_counter() - _compile_started.pop()

    callback_handler.register_start_callback(start)
    callback_handler.register_end_callback(end)
    _callbacks_installed = True


def compilable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a primitive that :class:`bilevel.Compiled` runs as one compiled unit (eager otherwise).

    The primitive must be a pure function of its arguments: tensors (in any nesting of
    dicts and tuples) are the unit's inputs, everything else is static.
    """

    @functools.wraps(fn)
    def primitive(*args: Any, **kwargs: Any) -> Any:
        runner = current()
        if runner is None:
            return fn(*args, **kwargs)
        problem = args[0] if args else None
        return runner.call(("primitive", fn), f"{fn.__name__} of g={_name(args)}",
                           lambda a, kw: fn(*a, **kw), (args, kwargs), problem=problem)

    return primitive


def _name(args: tuple) -> str:
    problem = args[0] if args else None
    inner = getattr(problem, "inner", problem)
    return getattr(inner, "__qualname__", None) or type(inner).__name__
