"""Falling back to eager: what failed, in one line, and one warning per cause."""

from __future__ import annotations

import warnings
from collections.abc import Hashable

_warned: set[Hashable] = set()


def is_compiler_failure(err: BaseException) -> bool:
    """Whether the C++ toolchain failed (rather than dynamo failing to trace the user's code)."""
    seen = 0
    while err is not None and seen < 8:
        if type(err).__name__ in ("CppCompileError", "InvalidCxxCompiler"):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def describe(err: BaseException) -> str:
    """One line: the exception type, the first line of its message and the user frame it names."""
    text = str(err).strip().splitlines()
    head = next((line.strip() for line in text if line.strip()), "")
    reason = f"{type(err).__name__}: {head}"[:300]
    frame = _user_frame(err)
    return f"{reason}{f' (at {frame})' if frame else ''}."


def _user_frame(err: BaseException) -> str | None:
    """The innermost frame of the user's code (outside torch and bilevel) that dynamo reports."""
    stack = getattr(err, "real_stack", None) or []
    for frame in reversed(list(stack)):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and "/bilevel/" not in path:
            return f"{frame.name} in {path}:{frame.lineno}"
    return None


def warn_once(key: Hashable, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def clear() -> None:
    """Forget which warnings were given (the tests use this)."""
    _warned.clear()
