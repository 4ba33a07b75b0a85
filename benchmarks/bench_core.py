"""Core benchmarks: ``bl.hypergrad`` against hand-written torch.func, on the ridge problem.

Setup (issue 2): :func:`bilevel.testing.ridge_problem` with ``n = 1000`` samples and
``d`` in {200, 2000} per-feature log-regularisation weights, float32, one thread;
100 gradient-descent steps of size ``1 / lambda_max``, then 10 CG iterations or a
10-term Neumann series for AID, 10 taped steps for ``ITD(truncate=10)``. Each
estimator is paired with a reference in :mod:`benchmarks._reference` doing exactly the
same arithmetic by hand.

* ``time_hypergrad`` / ``time_reference``: asv's own timings of the two calls.
* ``track_ratio``: library time / reference time, best of :data:`REPEAT` runs
  interleaved inside the benchmark (one number that load on the machine affects
  less than two separate timings). Target: at most 1.10 at ``d = 2000``.
* ``track_rel_error`` / ``track_rel_error_float32``: relative error of the
  estimate against the closed-form hypergradient, computed in float64 and in float32.
* ``track_num_hvp`` / ``track_num_grad``: the cost counters the library reports.

``docs/performance.md`` has the latest numbers and ``python -m benchmarks.run_core``
prints the same measurements without asv.
"""

from __future__ import annotations

import torch

from ._reference import ESTIMATORS, exact_solution, library_call, make_case, reference_call, rel_error, time_ratio

DIMS = (200, 2000)
#: Interleaved runs per ratio measurement (best of).
REPEAT = 7


class CoreRidge:
    """``bl.hypergrad`` vs. hand-written torch.func, per estimator and dimension."""

    params = (list(DIMS), list(ESTIMATORS))
    param_names = ("dim", "estimator")
    timeout = 600.0
    number = 1
    repeat = (3, 10, 20.0)

    def setup_cache(self) -> dict[int, tuple[float, torch.Tensor]]:
        # The step size (1 / lambda_max) and the closed-form hypergradient, in float64: ~2 s at d = 2000.
        torch.set_num_threads(1)
        return {dim: exact_solution(dim) for dim in DIMS}

    def setup(self, solutions, dim: int, estimator: str) -> None:
        torch.set_num_threads(1)
        self.case = make_case(dim, torch.float32, solutions[dim])
        self.library = library_call(estimator, self.case)
        self.reference = reference_call(estimator, self.case)
        self.library()  # the first torch.func call in a process loads decompositions: seconds, not
        self.reference()  # what is measured (asv --quick times a single call)

    def time_hypergrad(self, solutions, dim: int, estimator: str) -> None:
        self.library()

    def time_reference(self, solutions, dim: int, estimator: str) -> None:
        self.reference()

    def track_ratio(self, solutions, dim: int, estimator: str) -> float:
        return time_ratio(estimator, self.case, REPEAT)[2]

    track_ratio.unit = "library time / reference time"

    def track_rel_error(self, solutions, dim: int, estimator: str) -> float:
        case64 = make_case(dim, torch.float64, solutions[dim])
        return rel_error(library_call(estimator, case64)().value["log_lam"], case64.exact)

    track_rel_error.unit = "relative error (float64)"

    def track_rel_error_float32(self, solutions, dim: int, estimator: str) -> float:
        return rel_error(self.library().value["log_lam"], self.case.exact)

    track_rel_error_float32.unit = "relative error (float32)"

    def track_num_hvp(self, solutions, dim: int, estimator: str) -> int:
        return self.library().stats["num_hvp"]

    track_num_hvp.unit = "Hessian-vector products"

    def track_num_grad(self, solutions, dim: int, estimator: str) -> int:
        return self.library().stats["num_grad"]

    track_num_grad.unit = "gradient evaluations"
