"""Instructions per MAML meta-step, library against the hand-written reference, under callgrind.

    OMP_NUM_THREADS=1 nice -n 5 python -m benchmarks.callgrind_meta [--steps 1 5] [--calls 5] [--warmup 2]

Time ratios on a shared, loaded machine move by +-0.1 from run to run; the number of instructions
a call executes does not depend on the load. For each ``N`` in ``--steps`` this runs a worker
process (``python -m benchmarks.callgrind_meta --worker N``) under
``valgrind --tool=callgrind --instr-atstart=no`` (needs ``valgrind`` on the PATH, x86-64 Linux).
The worker builds the three calls of :func:`benchmarks.bench_meta.make_setup` (MAML sinusoid,
meta-batch 25, 10-shot, 1-40-40-1 ReLU, float32, one thread), switches instrumentation on, makes
``--warmup`` calls of each, then for each implementation zeroes the counters, makes ``--calls``
calls (GC off, collected before) and dumps the counters with a label. Only these steady-state
phases are counted: the import of torch and the set-up run uninstrumented, and the warm-up is
discarded. The driver reads the labelled dumps and prints, per ``N``, millions of instructions
(``Ir``) per call of ``library``, ``reference`` (``vmap(grad)``) and ``reference_fused``
(``grad(vmap)``), and ``library / min(reference, reference_fused)`` — the ratio the issue's
1.10 target is about, measured in instructions instead of time.

The counters are driven from Python through Valgrind client requests: a 30-byte x86-64 function
(the ``rol``/``xchg`` preamble of ``valgrind.h``, which does nothing outside Valgrind) is put in an
executable page and called through :mod:`ctypes`, so no C compiler or Valgrind header is needed.
Under callgrind each call costs about 100 times its native time: ``--calls 5`` takes about a
minute per ``N`` (most of it starting Python under Valgrind). The dumps are kept in ``--out``
(default a temporary folder) for ``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

IMPLEMENTATIONS = ("library", "reference", "reference_fused")

# unsigned long request(unsigned long *args): the client-request sequence of valgrind.h (amd64).
_CODE = bytes([
    0x48, 0x89, 0xF8,        # mov  rax, rdi        ; rax = &args[0]
    0x31, 0xD2,              # xor  edx, edx        ; default result 0
    0x48, 0xC1, 0xC7, 0x03,  # rol  rdi, 3          ; the special-instruction preamble
    0x48, 0xC1, 0xC7, 0x0D,  # rol  rdi, 13
    0x48, 0xC1, 0xC7, 0x3D,  # rol  rdi, 61
    0x48, 0xC1, 0xC7, 0x33,  # rol  rdi, 51         ; (3 + 13 + 61 + 51 = 128: rdi unchanged)
    0x48, 0x87, 0xDB,        # xchg rbx, rbx        ; rdx = client_request(rax)
    0x48, 0x89, 0xD0,        # mov  rax, rdx
    0xC3,                    # ret
])
_BASE = (ord("C") << 24) | (ord("T") << 16)  # VG_USERREQ_TOOL_BASE('C', 'T'), callgrind.h
DUMP_STATS_AT, ZERO_STATS, START_INSTRUMENTATION = _BASE + 3, _BASE + 1, _BASE + 4
_ARGS = ctypes.c_ulong * 6  # the request and its five arguments (made once: a ctypes type costs a class)


class ClientRequests:
    """Callgrind's client requests from Python (no-ops when not running under Valgrind)."""

    def __init__(self) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise SystemExit(f"callgrind_meta: client requests are written for x86-64, not {platform.machine()}")
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._fn = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.POINTER(ctypes.c_ulong))(address)
        self._keep: list[object] = []

    def __call__(self, request: int, arg1: int = 0) -> int:
        args = _ARGS(request, arg1, 0, 0, 0, 0)
        return self._fn(args)

    def dump(self, label: str) -> None:
        text = ctypes.create_string_buffer(label.encode())
        self._keep.append(text)
        self(DUMP_STATS_AT, ctypes.addressof(text))


def worker(steps: int, calls: int, warmup: int) -> None:
    """Run inside callgrind: warm up, then one zeroed-and-dumped phase per implementation."""
    import torch

    from .bench_meta import make_setup

    torch.set_num_threads(1)
    fns = make_setup(steps)
    cg = ClientRequests()
    cg(START_INSTRUMENTATION)
    for _ in range(warmup):
        for name in IMPLEMENTATIONS:
            fns[name]()
    gc.disable()
    for name in IMPLEMENTATIONS:
        gc.collect()
        fn = fns[name]
        cg(ZERO_STATS)
        for _ in range(calls):
            fn()
        cg.dump(f"{name} N={steps} calls={calls}")


def read_dumps(folder: str) -> dict[str, int]:
    """``{label: Ir}`` from the callgrind dumps in ``folder`` that a worker labelled."""
    found = {}
    for path in glob.glob(os.path.join(folder, "callgrind.out*")):
        with open(path, errors="replace") as fh:
            text = fh.read()
        label = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if label and total:
            found[label.group(1).strip()] = int(total.group(1))
    return found


def measure(steps: int, calls: int, warmup: int, out: str) -> dict[str, float]:
    """Millions of instructions per call of each implementation at ``steps`` inner steps."""
    folder = os.path.join(out, f"N{steps}")
    os.makedirs(folder, exist_ok=True)
    for old in glob.glob(os.path.join(folder, "callgrind.out*")):
        os.remove(old)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}  # fixed hashing: repeatable counts
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={os.path.join(folder, 'callgrind.out.%p')}",
               sys.executable, "-m", "benchmarks.callgrind_meta", "--worker", str(steps),
               "--calls", str(calls), "--warmup", str(warmup)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"callgrind_meta: the worker for N={steps} failed ({done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    dumps = read_dumps(folder)
    per_call = {}
    for name in IMPLEMENTATIONS:
        label = f"{name} N={steps} calls={calls}"
        if label not in dumps:
            raise SystemExit(f"callgrind_meta: no dump labelled {label!r} in {folder}; found {sorted(dumps)}")
        per_call[name] = dumps[label] / calls / 1e6
    return per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5], help="inner steps N (default 1 5)")
    parser.add_argument("--calls", type=int, default=5, help="counted calls per implementation (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted calls of each first (default 2)")
    parser.add_argument("--out", default=None, help="folder for the callgrind dumps (default: temporary)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.calls, args.warmup)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("callgrind_meta: valgrind is not on the PATH (apt-get install valgrind)")
    out = args.out or tempfile.mkdtemp(prefix="callgrind_meta_")
    print(f"callgrind instructions (Ir) per meta-gradient, mean of {args.calls} calls after {args.warmup} "
          f"warm-up calls; dumps in {out}\n")
    print("| N | library (M Ir) | reference vmap(grad) (M Ir) | reference grad(vmap) (M Ir) "
          "| library / best reference |")
    print("|---|---|---|---|---|")
    for steps in args.steps:
        r = measure(steps, args.calls, args.warmup, out)
        best = min(r["reference"], r["reference_fused"])
        print(f"| {steps} | {r['library']:.2f} | {r['reference']:.2f} | {r['reference_fused']:.2f} "
              f"| {r['library'] / best:.3f} |", flush=True)


if __name__ == "__main__":
    main()
