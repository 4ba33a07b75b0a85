"""The frontier's search: cached evaluations, one CSV row each, and the staircase walk."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from .. import AID, Dense, GradientDescent, hypergrad
from ._common import CsvLog, rel_error
from ._hgrun import Setting, measure
from ._hyper import HyperCase


def cost(r: dict[str, Any]) -> int:
    """Oracle calls of an evaluation: gradients plus Hessian-vector products."""
    return r["num_grad"] + r["num_hvp"]


def dense_call(case: HyperCase, x, n: int, lr: float):
    """AID with an exact dense solve after ``n`` inner steps, and its wall time."""
    t0 = time.perf_counter()
    hg = hypergrad(case.problem, x, case.params0(), inner=GradientDescent(lr=lr, steps=n),
                   estimator=AID(linear_solver=Dense(), hvp="reverse"), inner_batch=case.train,
                   outer_batch=case.val, throw=False)
    return hg, time.perf_counter() - t0


class Search:
    """Evaluations with a cache, the staircase walk, and one CSV row per evaluation.

    ``study`` is the :class:`~bilevel.convergence.FrontierStudy` whose grids are searched.
    """

    def __init__(self, case: HyperCase, x, exact, lr: float, study: Any, log: CsvLog) -> None:
        self.case, self.x, self.exact, self.lr, self.study, self.log = case, x, exact, lr, study, log
        self.cache: dict[tuple, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []
        self._prox: dict[float, Any] = {}

    def prox_exact(self, lam: float):
        """The exact hypergradient of the damped problem iMAML converges to (one dense solve per lam)."""
        if lam not in self._prox:
            self._prox[lam] = self.case.hypergrad(self.x, damping=lam)
        return self._prox[lam]

    def warm_up(self) -> None:
        s = Setting(seed=self.study.seed)
        for name in ("ITD", "AID-CG", "AID-Neumann", "IMAML-CG", "ESJ"):
            measure(self.case, self.x, self.exact, name, 2, 2, self.lr, replace(s, esj_directions=2))

    def eval(self, name: str, n: int, k: int, lam: float = 0.0, q: int = 0) -> dict[str, Any]:
        key = (name, n, k, lam, q)
        if key not in self.cache:
            if name == "AID-Dense":
                hg, secs = dense_call(self.case, self.x, n, self.lr)
                row = dict(estimator=name, N=n, K=0, rel_error=rel_error(hg.value, self.exact), bias_floor=0.0,
                           seconds=secs, num_grad=int(hg.stats["num_grad"]), num_hvp=int(hg.stats["num_hvp"]),
                           status=hg.result.name)
            else:
                s = Setting(imaml_lam=lam or 1e-3, esj_directions=q or 1, seed=self.study.seed)
                prox = self.prox_exact(lam) if name == "IMAML-CG" else None
                row = measure(self.case, self.x, self.exact, name, n, k, self.lr, s, prox_exact=prox)
            row.update(lam=lam, Q=q)
            self.cache[key] = self.log.write(**row)
            self.rows.append(row)
        return self.cache[key]

    def cheapest(self, name: str, target: float) -> dict[str, Any] | None:
        st = self.study
        if name == "ITD":
            return next((r for n in st.n_grid if (r := self.eval(name, n, 0))["rel_error"] <= target), None)
        if name == "AID-Dense":  # the exact linear solve: only the inner steps matter, so take AID-CG's N
            cg = self.cheapest("AID-CG", target)
            r = self.eval(name, cg["N"], 0) if cg is not None else None
            return r if r is not None and r["rel_error"] <= target else None
        if name == "ESJ":
            n = st.n_grid[len(st.n_grid) // 2]
            hits = [r for q in st.esj_grid if (r := self.eval(name, n, 0, q=q))["rel_error"] <= target]
            return min(hits, key=cost, default=None)
        lams = st.imaml_lams if name == "IMAML-CG" else (0.0,)
        if name == "IMAML-CG":  # a proximal strength whose bias floor exceeds the target cannot reach it
            lams = tuple(lam for lam in lams if rel_error(self.prox_exact(lam), self.exact) <= 0.5 * target)
        hits = [h for lam in lams if (h := self._staircase(name, target, lam)) is not None]
        return min(hits, key=cost, default=None)

    def _staircase(self, name: str, target: float, lam: float) -> dict[str, Any] | None:
        ks, best, j = self.study.k_grid, None, len(self.study.k_grid) - 1
        for n in self.study.n_grid:
            if best is not None and n + 1 + ks[0] + 1 >= cost(best):
                break
            if self.eval(name, n, ks[j], lam)["rel_error"] > target:
                if best is not None and j == len(ks) - 1:
                    break
                continue
            while j > 0 and self.eval(name, n, ks[j - 1], lam)["rel_error"] <= target:
                j -= 1
            r = self.eval(name, n, ks[j], lam)
            if best is None or cost(r) < cost(best):
                best = r
        return best
