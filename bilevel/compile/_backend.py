"""Inductor as :class:`bilevel.Compiled` uses it: BLAS for large matrix-vector products, ``x ** 0``
as a constant (no forward product kept alive in a Hessian-vector product), and the C++ wrapper for
graphs of many library products (fewer C++ compiler runs, less compile time)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._unit import Options


def inductor_backend(opts: Options) -> Callable:
    """Inductor, with large matrix-vector products left to BLAS (see :func:`_mv`), ``x ** 0`` as a
    constant (see :func:`_pow_scalar`), and with its C++ wrapper for CPU graphs that call many
    library products (see :func:`wants_cpp_wrapper` and :data:`CPP_WRAPPER_OPTIONS`).

    Torch's on-disk caches (inductor's FX-graph cache and the AOT-autograd cache) stay on: the
    decomposition table enters their keys as a digest of what it changes (:class:`_DecompTable`,
    :func:`_keyed`), so a second process with the same graphs loads the compiled code instead of
    compiling it.
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(opts.mode, opts.dynamic) if opts.mode else {}

    def inductor(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        chosen = {**patches, **cpp_wrapper_options()} if wants_cpp_wrapper(gm, example_inputs) else patches
        with _keyed():
            return compile_fx(gm, example_inputs, config_patches=chosen, decompositions=_decompositions())

    return inductor


#: A CPU graph with at least this many library products (see :func:`library_products`) is compiled
#: with inductor's C++ wrapper (``cpp_wrapper=True``): one C++ compiler run for all the graph's
#: kernels (and one for its wrapper) instead of one per generated kernel.
CPP_WRAPPER_MIN_PRODUCTS = 4
#: Inductor's options for those graphs: its C++ wrapper, built in two compiler runs, the kernels at
#: ``-O3`` and the wrapper (the code that calls the kernels and the library products) at ``-O1``
#: (``cpp_wrapper_build_separate``). Measured on the MAML meta-gradient with 5 inner steps (35
#: kernels): about 3.5 CPU seconds less per shape than one run of everything at ``-O3``, at the
#: same run time (docs, "Compile time and the cache").
CPP_WRAPPER_OPTIONS = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}


def cpp_wrapper_options() -> dict:
    """:data:`CPP_WRAPPER_OPTIONS` that this torch's inductor knows (older ones lack the two-run build)."""
    from torch._inductor import config

    return {k: v for k, v in CPP_WRAPPER_OPTIONS.items() if hasattr(config, k)}
_PRODUCTS = frozenset({"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv", "mv", "einsum",
                       "tensordot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                       "conv_transpose3d", "convolution"})


def library_products(gm: torch.fx.GraphModule) -> int:
    """How many matrix products in dynamo's graph ``gm`` inductor leaves to a library (BLAS, oneDNN):
    products with a matrix result (``linear``, ``mm``, ``bmm``, convolutions, ...), and matrix-vector
    products whose matrix has at least :data:`BLAS_MV_ENTRIES` entries (smaller ones are inductor's
    own fused loops, see :func:`_mv`).

    Each such call ends a fused kernel, so it counts the C++ kernels inductor generates
    (about one more than the products, with their backward, which dynamo's graph holds only
    implicitly inside ``torch.func`` transforms, in proportion)."""
    count = 0
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name.strip("_") not in _PRODUCTS:
            continue
        out = node.meta.get("example_value")
        if not isinstance(out, Tensor):
            continue
        sizes = [_static_numel(a.meta.get("example_value")) for a in node.args if isinstance(a, torch.fx.Node)]
        if out.dim() >= 2 or max(sizes, default=0) >= BLAS_MV_ENTRIES:
            count += 1
    return count


def _static_numel(value: Any) -> int:
    if not isinstance(value, Tensor):
        return 0
    try:
        return int(value.numel())
    except (TypeError, ValueError):  # a symbolic size (dynamic=True): count it as large
        return BLAS_MV_ENTRIES


def wants_cpp_wrapper(gm: torch.fx.GraphModule, example_inputs: list) -> bool:
    """Whether to compile ``gm`` with inductor's C++ wrapper: on CPU, when it has at least
    :data:`CPP_WRAPPER_MIN_PRODUCTS` library products, or a compiled loop (:func:`has_loop`).

    On CPU, inductor's default Python wrapper builds every fused kernel with its own C++
    compiler run, which costs about 0.6 CPU seconds here even for a tiny kernel (loading the
    precompiled header, linking); the C++ wrapper compiles all the graph's kernels in one run
    (and its wrapper in a second, see :data:`CPP_WRAPPER_OPTIONS`), which costs more for a graph
    of one or two kernels (about 2 s against 0.9 s: the ridge units at d = 200) and much less for
    many (the MAML meta-gradient with 5 inner steps: about 35 kernels, 7 s in one run at ``-O3``
    against 23 s). The library products split the fused kernels, so their number tells the two
    cases apart before anything is compiled."""
    on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, Tensor))
    return on_cpu and (library_products(gm) >= CPP_WRAPPER_MIN_PRODUCTS or has_loop(gm))


def has_loop(gm: torch.fx.GraphModule) -> bool:
    """Whether dynamo's graph ``gm`` holds a compiled loop (torch's ``scan`` or ``while_loop``, the
    ``"loop"`` granularity's unit). Such a unit is compiled with the C++ wrapper whatever its products:
    the Python wrapper runs the loop in Python, an iteration at a time, and builds the loop body's
    kernels in compiler runs of their own. Measured on the ridge loop unit (AID-CG, 100 inner steps,
    one thread, fresh processes, a slower machine than the other measurements here): the first call
    compiled in 14.8–15.3 CPU s against 16.7–17.2 at ``d = 200`` and 17.0–17.5 against 19.3–20.5 at
    ``d = 2000``, and ran in 15.8–16.1 ms against 18.5–18.8 at ``d = 200`` (``d = 2000``: within
    noise)."""
    return any(node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)
               and node.target.name() in ("scan", "while_loop") for node in gm.graph.nodes)


#: Matrices with at least this many entries go to BLAS in a matrix-vector product (see :func:`_mv`).
BLAS_MV_ENTRIES = 1 << 20


def _mv(matrix: Tensor, vector: Tensor) -> Tensor:
    """``aten.mv`` for inductor: BLAS (as a one-column ``mm``) for a large matrix, else inductor's own
    multiply-and-sum loop, which it fuses with its neighbours.

    Measured on the ridge benchmark (one thread, float32): for a 1000 x 200 matrix the fused loop
    matched BLAS; for 1000 x 2000 it took about twice as long per gradient step.
    """
    size = matrix.numel()
    if isinstance(size, int) and size >= BLAS_MV_ENTRIES:
        return torch.ops.aten.mm.default(matrix, vector.unsqueeze(1)).squeeze(1)
    from torch._decomp.decompositions import mv
    return mv(matrix, vector)


def _pow_scalar(base: Tensor, exponent: Any) -> Tensor:
    """``aten.pow.Tensor_Scalar`` for inductor: ``x ** 0`` of a floating ``x`` as a constant 1, which
    it is for every ``x`` (NaN and inf included), so the graph no longer depends on ``x``.

    Autograd's derivative of ``r ** 2`` is ``2 r ** 1`` and its second derivative ``2 r ** 0``, so
    every Hessian-vector product of a squared loss holds ``r ** 0`` of the residual ``r = X w - y``.
    Inductor's own lowering also emits a constant, but only after reading ``r``, which keeps the
    product ``X w`` (a read of ``X``) alive in a graph that needs only ``X v`` and ``X^T (X v)``:
    measured on the ridge HVP at ``d = 2000``, three matrix-vector products per HVP instead of two.
    Other exponents and integer bases are left to inductor (``NotImplemented``)."""
    if (isinstance(exponent, (int, float)) and exponent == 0
            and (base.is_floating_point() or base.is_complex())):
        return torch.ones_like(base)
    return NotImplemented


def _keyed() -> contextlib.AbstractContextManager:
    """``torch.compiler.config.cache_key_tag`` with :func:`_digest` appended, for one compilation.

    The AOT-autograd cache keys its entries on dynamo's graph and the compile options but not on
    the decompositions passed to inductor (which shape the graph it caches); the tag is in its
    key (and in the FX-graph cache's), so entries compiled with other replacements
    (:data:`_REPLACEMENTS`) are not reused. A tag the user set is kept in front of ours. A torch
    without the tag gets the AOT-autograd cache turned off for the compilation instead."""
    from torch._functorch import config as functorch_config

    compiler_config = getattr(torch.compiler, "config", None)
    if compiler_config is not None and hasattr(compiler_config, "cache_key_tag"):
        tag = compiler_config.cache_key_tag
        ours = f"bilevel-decomp-{_digest()[:16]}"
        return compiler_config.patch(cache_key_tag=f"{tag}|{ours}" if tag else ours)
    if hasattr(functorch_config, "enable_autograd_cache"):
        return functorch_config.patch(enable_autograd_cache=False)
    return contextlib.nullcontext()


class _DecompTable(dict):
    """Inductor's decomposition table with :func:`_mv` for ``aten.mv`` and :func:`_pow_scalar` for
    ``aten.pow.Tensor_Scalar``, pickled (as torch's cache keys pickle the compile options) as the
    digest of what it changes.

    Inductor's own table holds C++ functions that cannot be pickled, so a plain copy of it put
    every compilation past torch's FX-graph cache ("Cannot produce stable cache key"): each new
    process compiled every unit anew. The digest keeps the keys stable across processes and
    changes whenever :data:`_REPLACEMENTS` or :data:`BLAS_MV_ENTRIES` does (inductor's own table
    changes only with torch, whose version is in the keys already).
    """

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return _decompositions_for, (_digest(),)


def _decompositions_for(digest: str) -> dict:
    """The table a pickled :class:`_DecompTable` stands for (``digest``: :func:`_digest`)."""
    return _decompositions()


def _digest() -> str:
    """What the table changes, as a hex digest: the replaced operators with the sources of their
    replacements (:data:`_REPLACEMENTS`), and the current :data:`BLAS_MV_ENTRIES` (read at every
    compilation, as :func:`_mv` reads it)."""
    import hashlib

    return hashlib.sha256(f"{_replacements_source()}\n{BLAS_MV_ENTRIES}".encode()).hexdigest()


def _replacements_source() -> str:
    """The replaced operators and the sources of their replacements, or the replacements' bytecode
    and constants where the source is not installed."""
    import inspect

    parts = []
    for op, fn in _REPLACEMENTS.items():
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            source = f"{fn.__code__.co_code.hex()} {fn.__code__.co_consts!r}"
        parts.append(f"{op}: {source}")
    return "\n".join(parts)


#: What the library changes in inductor's decomposition table.
_REPLACEMENTS: dict[Any, Callable] = {
    torch.ops.aten.mv.default: _mv,
    torch.ops.aten.pow.Tensor_Scalar: _pow_scalar,
}


@functools.cache
def _decompositions() -> _DecompTable:
    from torch._inductor.decomposition import select_decomp_table

    table = _DecompTable(select_decomp_table())
    table.update(_REPLACEMENTS)
    return table
