"""``bilevel compare``: every estimator on a problem with an exact hypergradient, in one table."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

import bilevel as bl

from ._cli import UsageError, finite_float, nonnegative_int, positive_int
from ._tree import Params
from .testing import quadratic_problem, ridge_problem

PROBLEMS = ("ridge", "quadratic")
MAX_DIM = 5000          # the exact reference solves a dim x dim system (and takes its eigenvalues)
DENSE_MAX_DIM = 1000    # AID-Dense materialises the dim x dim Hessian
MAX_STEPS = 10_000      # cap on the automatic step counts
_EXACT = ("ITD", "AID-CG", "AID-Neumann", "AID-Dense")   # converge to the exact hypergradient


@dataclass(frozen=True)
class Row:
    """One estimator's line of the table."""

    name: str
    estimator: str
    rel_error: float
    inner_steps: int
    linear_steps: int
    num_hvp: int
    num_grad: int
    wall_time_s: float
    status: str


@dataclass
class Comparison:
    """What :func:`compare` measured: a setup description, one row per estimator, and notes."""

    setup: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    tolerance: float = 1e-6

    def failures(self) -> list[str]:
        """Why the run fails ``--check``: an estimator that errored, failed, or (if consistent) is inaccurate."""
        bad = []
        for row in self.rows:
            if row.status != "successful":
                bad.append(f"{row.name}: status {row.status}")
            elif row.name in _EXACT and not row.rel_error <= self.tolerance:
                bad.append(f"{row.name}: relative error {row.rel_error:.2e} > {self.tolerance:.0e}")
        return bad

    def table(self) -> str:
        head = ("estimator", "rel. error", "inner", "linear", "HVPs", "grads", "time [ms]", "status")
        lines = [(r.name, f"{r.rel_error:.2e}", str(r.inner_steps), str(r.linear_steps), str(r.num_hvp),
                  str(r.num_grad), f"{1e3 * r.wall_time_s:.1f}", r.status) for r in self.rows]
        width = [max(len(c) for c in col) for col in zip(head, *lines)]

        def fmt(cells: tuple[str, ...]) -> str:  # text columns left-aligned, numbers right-aligned
            return "  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, width))).rstrip()
        return "\n".join([fmt(head), fmt(tuple("-" * w for w in width)), *map(fmt, lines)])

    def report(self) -> str:
        """The setup lines, the table, each estimator's exact configuration, and the notes."""
        width = max((len(r.name) for r in self.rows), default=0)
        configs = [f"  {r.name.ljust(width)}  {r.estimator}" for r in self.rows]
        notes = [f"note: {n}" for n in self.notes]
        return "\n".join([*self.setup, "", self.table(), "", "configurations:", *configs, "", *notes])


@dataclass(frozen=True)
class _Case:
    problem: bl.BilevelProblem
    hparams: Params
    params0: Params
    inner_batch: Any
    outer_batch: Any
    exact: Params            # the exact hypergradient, in float64
    lipschitz: float         # largest eigenvalue of the inner Hessian
    mu: float                # smallest eigenvalue of the inner Hessian
    setup: str
    x_only_in_inner: bool    # f depends on x only through y(x): FirstOrder returns 0


def _float64(obj: Any) -> Any:
    """A copy of a frozen dataclass of tensors (or tuples of them) in float64."""
    def cast(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v.double()
        return tuple(cast(t) for t in v) if isinstance(v, tuple) else v
    return replace(obj, **{f.name: cast(getattr(obj, f.name)) for f in fields(obj)})


def _case(problem: str, dim: int, samples: int, seed: int, dtype: torch.dtype, log_lam: float) -> _Case:
    name = str(dtype).removeprefix("torch.")
    if problem == "ridge":
        r = ridge_problem(n_samples=samples, dim=dim, seed=seed, dtype=dtype)
        r64 = _float64(r)
        x64 = r64.hparams(log_lam)
        setup = (f"problem: ridge regression, {samples} training + {samples} validation samples, "
                 f"{dim} features, one log-penalty per feature at log(lambda) = {log_lam:g}; {name}, seed {seed}")
        mu = torch.linalg.eigvalsh(r64.hessian(x64))[0].item()
        return _Case(r.problem, r.hparams(log_lam), r.params0(), r.train, r.val, r64.hypergrad(x64),
                     r64.lipschitz(x64), mu, setup, x_only_in_inner=True)
    condition = 10.0
    q = quadratic_problem(dim_y=dim, dim_x=dim, seed=seed, condition=condition, dtype=dtype)
    q64 = _float64(q)
    setup = (f"problem: random quadratic, y in R^{dim}, x in R^{dim}, inner Hessian eigenvalues in "
             f"[1, {condition:g}]; {name}, seed {seed}")
    return _Case(q.problem, q.hparams(seed), q.params0(seed), None, None, q64.hypergrad(q64.hparams(seed)),
                 condition, 1.0, setup, x_only_in_inner=False)


def _steps_for(rate: float, eps: float) -> int:
    """Iterations of a method contracting by ``rate`` per step to reach ``eps``."""
    if rate <= 0:
        return 1
    return max(1, min(MAX_STEPS, math.ceil(math.log(eps) / math.log(rate))))


def _rel_error(value: Params, exact: Params) -> float:
    err = sum(float(((value[k].double() - exact[k]) ** 2).sum()) for k in exact)
    ref = sum(float((exact[k] ** 2).sum()) for k in exact)
    return math.sqrt(err / ref) if ref > 0 else math.sqrt(err)


def compare(problem: str = "ridge", dim: int = 200, samples: int = 1000, seed: int = 0,
            dtype: torch.dtype = torch.float64, steps: int | None = None, linear_steps: int | None = None,
            log_lam: float = 0.0) -> Comparison:
    r"""Run every estimator that applies to ``problem`` and measure it against the exact hypergradient.

    The inner solver is gradient descent with step :math:`1/L` (``L`` from the
    problem's largest inner Hessian eigenvalue) and, unless ``steps`` is given,
    enough steps (at least 10) for an error of ``1e-10`` (``1e-6`` in float32) given the
    condition number :math:`\kappa = L/\mu`: :math:`N = \lceil \log\varepsilon /
    \log(1 - 1/\kappa) \rceil`. Neumann uses ``alpha = 1/L`` and as many terms; CG
    uses the Chebyshev bound :math:`\lceil \log(\varepsilon/2) /
    \log\frac{\sqrt\kappa - 1}{\sqrt\kappa + 1} \rceil` (at most ``dim + 2``).

    Example:
        >>> from bilevel._compare import compare
        >>> result = compare(dim=5, samples=30)
        >>> [row.name for row in result.rows][:3]
        ['ITD', 'ITD(truncate=8)', 'FirstOrder']
        >>> result.failures()  # every estimator succeeded; ITD and AID are within 1e-6
        []
    """
    if problem not in PROBLEMS:
        raise UsageError(f"unknown problem {problem!r}; choose one of {', '.join(PROBLEMS)}")
    case = _case(problem, dim, samples, seed, dtype, log_lam)
    eps = 1e-10 if dtype == torch.float64 else 1e-6
    kappa = case.lipschitz / case.mu
    lr = 1.0 / case.lipschitz
    n = steps or max(10, _steps_for(1 - 1 / kappa, eps))  # ITD needs >= 2 steps to see x even when kappa = 1
    root = math.sqrt(kappa)
    k_cg = linear_steps or min(dim + 2, _steps_for((root - 1) / (root + 1), eps / 2))
    k_neumann = linear_steps or _steps_for(1 - 1 / kappa, eps)
    truncate = max(1, n // 4)
    inner = bl.GradientDescent(lr=lr, steps=n)
    setup = [case.setup,
             f"inner: GradientDescent(lr=1/L={lr:.4g}, steps={n}) from 0; L = {case.lipschitz:.4g}, "
             f"mu = {case.mu:.4g} (condition {kappa:.3g}); reference: the exact implicit hypergradient "
             "(float64)"]
    candidates: list[tuple[str, Any]] = [
        ("ITD", bl.ITD()),
        (f"ITD(truncate={truncate})", bl.ITD(truncate=truncate)),
        ("FirstOrder", bl.FirstOrder()),
        ("AID-CG", bl.AID(linear_solver=bl.CG(max_steps=k_cg, rtol=eps))),
        ("AID-Neumann", bl.AID(linear_solver=bl.Neumann(steps=k_neumann, alpha=lr))),
    ]
    notes = [f"ITD(truncate={truncate}) differentiates through the last {truncate} of {n} inner steps only "
             f"(Shaban et al. 2019): at a converged inner solution it equals AID with "
             f"Neumann(steps={truncate}, alpha=lr), so it is biased unless truncate is large."]
    if dim <= DENSE_MAX_DIM:
        candidates.append(("AID-Dense", bl.AID(linear_solver=bl.Dense())))
    else:
        notes.append(f"AID-Dense skipped: dim = {dim} > {DENSE_MAX_DIM} (it materialises the dim x dim Hessian).")
    if case.x_only_in_inner:
        notes.append("FirstOrder keeps only grad_x f + J_init^T grad_y f: here x reaches f only through y(x) "
                     "and the start is not learned, so its estimate is 0 (relative error 1). It is a "
                     "meta-learning estimator (FO-MAML), not one for hyperparameters inside g.")
    if hasattr(bl, "ESJ"):
        esj = bl.ESJ(seed=seed)
        candidates.append(("ESJ", esj))
        p = sum(v.numel() for v in case.hparams.values())
        notes.append(f"ESJ estimates the response Jacobian from {esj.directions} random directions in "
                     f"{p} dimensions: expect a relative error near sqrt((p+1)/Q) = "
                     f"{math.sqrt((p + 1) / esj.directions):.2g}, not an exact value.")
    learned = [name for name in ("IMAML", "Reptile") if hasattr(bl, name)]
    if learned:
        notes.append(f"{' and '.join(learned)} skipped: they differentiate through a learned inner start "
                     "init(x) (meta-learning); this problem has none.")
    missing = [name for name in ("ESJ", "IMAML", "Reptile") if not hasattr(bl, name)]
    if missing:
        notes.append(f"not in this version of bilevel: {', '.join(missing)}.")

    _warm_up(case)
    rows = [_run(name, est, case, inner) for name, est in candidates]
    return Comparison(setup, rows, notes, tolerance=1e-6 if dtype == torch.float64 else 1e-3)


def _warm_up(case: _Case) -> None:
    """One untimed tiny call, so that one-off set-up costs of torch.func land in no row."""
    bl.hypergrad(case.problem, case.hparams, case.params0, inner=bl.GradientDescent(lr=1e-3, steps=1),
                 estimator=bl.AID(linear_solver=bl.CG(max_steps=1)), inner_batch=case.inner_batch,
                 outer_batch=case.outer_batch, throw=False)


def _run(name: str, estimator: Any, case: _Case, inner: Any) -> Row:
    try:
        hg = bl.hypergrad(case.problem, case.hparams, case.params0, inner=inner, estimator=estimator,
                          inner_batch=case.inner_batch, outer_batch=case.outer_batch, throw=False)
    except Exception as err:  # a crash is reported in the table, not hidden; --check fails on it
        text = str(err).splitlines()[0] if str(err) else ""
        return Row(name, repr(estimator), math.nan, 0, 0, 0, 0, 0.0, f"error: {type(err).__name__}: {text}")
    s = hg.stats
    return Row(name, repr(estimator), _rel_error(hg.value, case.exact), int(s["inner_steps"]),
               int(s["linear_steps"]), int(s["num_hvp"]), int(s["num_grad"]), float(s["wall_time_s"]),
               hg.result.name)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bilevel compare``."""
    p = subparsers.add_parser(
        "compare", help="every estimator against the exact hypergradient of a built-in problem",
        description="Run every hypergradient estimator that applies to a built-in problem with a "
                    "closed-form hypergradient and print, for each: relative error, inner steps, linear "
                    "steps, Hessian-vector products, gradients, wall time and status.")
    p.add_argument("--problem", choices=PROBLEMS, default="ridge",
                   help="ridge: per-feature ridge penalties on synthetic regression (default); "
                        "quadratic: a random quadratic bilevel problem")
    p.add_argument("--dim", type=positive_int, default=200, help="features (ridge) or variables (default 200)")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="training samples, and as many validation samples (ridge only; default 1000)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the data and of ESJ's directions (default 0)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="default float64")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="inner gradient steps (default: enough for 1e-10 accuracy, 1e-6 in float32)")
    p.add_argument("--linear-steps", type=positive_int, default=None,
                   help="CG / Neumann iterations (default: enough for the same accuracy)")
    p.add_argument("--log-lam", type=finite_float(30.0), default=None,
                   help="log of the ridge penalty where the hypergradient is taken (ridge only; default 0)")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 unless every estimator succeeds and ITD and every AID reach "
                        "the exact hypergradient (1e-6, or 1e-3 in float32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``bilevel compare``: print the setup, the table and the notes; return the exit status."""
    if args.dim > MAX_DIM:
        raise UsageError(f"argument --dim: {args.dim} is too large; the exact reference solves a dim x dim "
                         f"system, so use --dim <= {MAX_DIM}")
    if args.problem != "ridge":
        for flag, value in (("--samples", args.samples), ("--log-lam", args.log_lam)):
            if value is not None:
                raise UsageError(f"argument {flag}: applies to --problem ridge only, not --problem {args.problem}")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    result = compare(args.problem, args.dim, args.samples or 1000, args.seed, dtype, args.steps,
                     args.linear_steps, 0.0 if args.log_lam is None else args.log_lam)
    print(result.report())
    if args.check:
        failures = result.failures()
        if failures:
            print("check FAILED: " + "; ".join(failures))
            return 1
        print(f"check passed: every estimator succeeded; ITD and AID within {result.tolerance:.0e} of the exact "
              "hypergradient")
    return 0
