"""One hypergradient call of a named estimator on a :class:`HyperCase`, measured.

Shared by the estimator study and the frontier: the estimator names, how each is built from
the inner step count ``N`` and the linear-solver step count ``K``, and a row of measurements
(relative error against the exact hypergradient, wall time, gradient and HVP counts, status).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .. import CG, ESJ, IMAML, ITD, AID, GradientDescent, Neumann, hypergrad
from .._tree import Params
from ._common import rel_error
from ._hyper import HyperCase

#: Estimator names, in plot order. CG runs exactly K steps (rtol=0), so its status is
#: ``linear_max_steps`` by design unless the residual reaches exactly zero.
ESTIMATORS = ("ITD", "AID-CG", "AID-Neumann", "IMAML-CG", "ESJ")
STYLE = {"ITD": ("C0", "o"), "AID-CG": ("C1", "s"), "AID-Neumann": ("C2", "^"),
         "IMAML-CG": ("C3", "D"), "ESJ": ("C4", "v")}


@dataclass(frozen=True)
class Setting:
    """How the estimators are configured beyond ``N`` and ``K``.

    ``hvp="reverse"``: on CPU, reverse-over-reverse HVPs (one pullback per linear solve) measured
    10-20x faster than the forward-over-reverse default on the ridge problem (d=300), so wall-time
    comparisons between AID and ITD would otherwise measure an HVP implementation, not the estimator.
    """

    imaml_lam: float = 1e-3
    esj_directions: int = 64
    esj_smoothing: float = 1e-3
    seed: int | torch.Generator = 0
    hvp: str = "reverse"


def make_estimator(name: str, k: int, lr: float, s: Setting):
    """The estimator ``name`` with ``k`` linear-solver steps (ignored by ITD and ESJ)."""
    if name == "ITD":
        return ITD()
    if name == "AID-CG":
        return AID(linear_solver=CG(max_steps=k, rtol=0.0), hvp=s.hvp)
    if name == "AID-Neumann":
        return AID(linear_solver=Neumann(steps=k, alpha=lr), hvp=s.hvp)
    if name == "IMAML-CG":
        return IMAML(lam=s.imaml_lam, linear_solver=CG(max_steps=k, rtol=0.0), hvp=s.hvp)
    if name == "ESJ":
        return ESJ(directions=s.esj_directions, smoothing=s.esj_smoothing, seed=s.seed)
    raise ValueError(f"make_estimator: unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}.")


def describe(name: str, n: int, k: int, s: Setting) -> str:
    """A short human-readable setting, e.g. ``N=64, K=8``."""
    if name == "ITD":
        return f"N={n}"
    if name == "ESJ":
        return f"N={n}, Q={s.esj_directions}"
    if name == "AID-Dense":
        return f"N={n}, dense solve"
    extra = f", lam={s.imaml_lam:g}" if name == "IMAML-CG" else ""
    return f"N={n}, K={k}{extra}"


def measure(case: HyperCase, hparams: Params, exact: Params, name: str, n: int, k: int, lr: float,
            s: Setting, params0: Params | None = None, prox_exact: Params | None = None) -> dict[str, Any]:
    """Run ``name`` once with ``N = n`` inner GD steps of size ``lr`` and ``K = k``; measure it.

    ``params0`` defaults to the zero start. ``prox_exact`` (for IMAML) is the exact hypergradient
    of the damped problem iMAML converges to; its distance to ``exact`` is the bias floor.
    """
    problem = case.prox_problem() if name == "IMAML-CG" else case.problem
    start = case.params0() if params0 is None else params0
    estimator = make_estimator(name, k, lr, s)
    t0 = time.perf_counter()
    hg = hypergrad(problem, hparams, start, inner=GradientDescent(lr=lr, steps=n), estimator=estimator,
                   inner_batch=case.train, outer_batch=case.val, throw=False)
    seconds = time.perf_counter() - t0
    floor = rel_error(prox_exact, exact) if (name == "IMAML-CG" and prox_exact is not None) else 0.0
    return dict(estimator=name, N=n, K=k if name not in ("ITD", "ESJ") else 0,
                rel_error=rel_error(hg.value, exact), bias_floor=floor, seconds=seconds,
                num_grad=int(hg.stats["num_grad"]), num_hvp=int(hg.stats["num_hvp"]), status=hg.result.name)


def warm_up(case: HyperCase, hparams: Params, lr: float, s: Setting) -> None:
    """One tiny call of every estimator, so that first-call overheads do not land in a measurement."""
    exact = case.hypergrad(hparams)
    for name in ESTIMATORS:
        measure(case, hparams, exact, name, 2, 2, lr, s)
