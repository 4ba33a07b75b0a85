"""Convergence benchmarks: estimator x inner steps N x problem size, on the ridge problem.

The setting of study 3 (``bilevel convergence --study estimators``, docs/convergence.md): the
per-feature ridge problem of :func:`bilevel.testing.ridge_problem` with ``n = d / 2`` training
rows at ``lambda = 0.1`` for every feature (inner condition number about 60), float64, one
thread; N gradient-descent steps of size ``1 / L`` from zero, and K = N linear-solver steps
(CG with ``rtol=0``, Neumann with ``alpha = 1 / L``, reverse-over-reverse HVPs); iMAML with
``lam = 1e-3`` (proximal centre: the zero start); ESJ with 16 Gaussian directions.

* :class:`ConvergenceCost` — ``time_hypergrad`` (one ``bl.hypergrad`` call) and
  ``peakmem_hypergrad`` (peak resident memory of that call; asv measures the whole process).
* :class:`ConvergenceAccuracy` — ``track_rel_error`` (``||estimate - exact|| / ||exact||``
  against the closed form), ``track_num_hvp`` and ``track_num_grad`` (``Hypergrad.stats``).
  These numbers are deterministic, so ``setup_cache`` computes all of them in one process and
  the benchmarks only look them up: their processes never import torch.

torch and bilevel are imported inside the functions that need them, because asv starts one
process per (benchmark, parameters) and an import at module level would be paid 100 times.
``asv run --python=same --quick --bench bench_convergence`` runs every combination once (12 minutes
on the shared 2-core development machine at load average 8, 9 of them in the cost benchmarks'
torch imports).
"""

from __future__ import annotations

import math

DIMS = (100, 1000)
STEPS = (10, 100)
ESTIMATORS = ("ITD", "AID-CG", "AID-Neumann", "IMAML-CG", "ESJ")  # as bilevel.convergence._hgrun.ESTIMATORS
LAM = 0.1
PARAMS = (list(ESTIMATORS), list(STEPS), list(DIMS))
PARAM_NAMES = ("estimator", "N", "dim")


def _call(estimator: str, n: int, dim: int):
    """A zero-argument ``bl.hypergrad`` call for one combination, and the exact hypergradient."""
    import torch

    import bilevel as bl
    from bilevel.convergence._hgrun import Setting, make_estimator
    from bilevel.convergence._hyper import ridge_case

    torch.set_num_threads(1)
    case = ridge_case(dim, dim // 2, seed=0)
    x = case.hparams(math.log(LAM))
    lr = 1.0 / case.lipschitz(x)
    setting = Setting(imaml_lam=1e-3, esj_directions=16, esj_smoothing=1e-3, seed=0, hvp="reverse")
    problem = case.prox_problem() if estimator == "IMAML-CG" else case.problem
    est = make_estimator(estimator, n, lr, setting)
    inner = bl.GradientDescent(lr=lr, steps=n)

    def call() -> bl.Hypergrad:
        return bl.hypergrad(problem, x, case.params0(), inner=inner, estimator=est, inner_batch=case.train,
                            outer_batch=case.val, throw=False)
    return call, case.hypergrad(x)["log_lam"]


class ConvergenceCost:
    """Time and peak memory of one hypergradient per (estimator, N, d)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300.0
    number = 1
    repeat = (1, 5, 10.0)
    warmup_time = 0.5  # first calls pay torch.func tracing; asv --quick skips the warm-up

    def setup(self, estimator: str, n: int, dim: int) -> None:
        self.call, _ = _call(estimator, n, dim)

    def time_hypergrad(self, estimator: str, n: int, dim: int) -> None:
        self.call()

    def peakmem_hypergrad(self, estimator: str, n: int, dim: int) -> None:
        self.call()


class ConvergenceAccuracy:
    """Relative error and cost counters of one hypergradient per (estimator, N, d)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 600.0

    def setup_cache(self) -> dict[tuple[str, int, int], dict[str, float]]:
        import torch

        out = {}
        for estimator in ESTIMATORS:
            for n in STEPS:
                for dim in DIMS:
                    call, exact = _call(estimator, n, dim)
                    hg = call()
                    value = hg.value["log_lam"]
                    error = (torch.linalg.vector_norm(value - exact) / torch.linalg.vector_norm(exact)).item()
                    out[(estimator, n, dim)] = {"rel_error": error, "num_hvp": int(hg.stats["num_hvp"]),
                                                "num_grad": int(hg.stats["num_grad"])}
        return out

    def track_rel_error(self, cache, estimator: str, n: int, dim: int) -> float:
        return cache[(estimator, n, dim)]["rel_error"]

    track_rel_error.unit = "relative error"

    def track_num_hvp(self, cache, estimator: str, n: int, dim: int) -> int:
        return cache[(estimator, n, dim)]["num_hvp"]

    track_num_hvp.unit = "Hessian-vector products"

    def track_num_grad(self, cache, estimator: str, n: int, dim: int) -> int:
        return cache[(estimator, n, dim)]["num_grad"]

    track_num_grad.unit = "gradient evaluations"
