"""HPO benchmarks (issue 7): stocBiO against full-batch AID-CG on a9a, and hyper-cleaning outer steps.

* ``StocBiOA9A``: one hypergradient of the per-feature-regularised logistic regression on the
  whole a9a training file (32,561 rows, 123 features; validation = ``a9a.t``), at the exact
  inner solution for ``lam = 1e-2`` on every feature (so only the adjoint solve and the cross term
  are timed). Each method has one configuration per accuracy level, chosen so that both reach
  about the same relative error against the exact (dense) hypergradient: ``track_rel_error``
  records it (stocBiO: the mean over 5 seeds), ``time_hypergrad`` the time of one call.
  Skipped when the a9a files are absent (``$BILEVEL_DATA`` or ``../shared/data``).
* ``HypercleanStep``: one outer step (hypergradient + Adam update) of data hyper-cleaning with
  20,000 training examples of MNIST's shape (784 features, 10 classes; synthetic, so no data
  files are needed): the configurations of ``bilevel hpo --problem hyperclean-mnist``.

``docs/results.md`` ("Hyperparameter optimisation", "Performance (asv ``bench_hpo``)") quotes the numbers;
``python -m benchmarks.bench_hpo`` prints them without asv.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import bilevel as bl
from bilevel.problems import hyperclean_problem, logreg_problem
from bilevel.problems.experiments import Config, hyperclean_methods

#: (accuracy level, method) -> (linear solver, stocBiO batch size or None for the full batch).
A9A_CONFIGS = {
    ("coarse", "aid-cg"): (bl.CG(max_steps=3, rtol=0.0), None),
    ("coarse", "stocbio"): (bl.Neumann(steps=100, alpha=0.5), 500),
    ("fine", "aid-cg"): (bl.CG(max_steps=5, rtol=0.0), None),
    ("fine", "stocbio"): (bl.Neumann(steps=180, alpha=0.5), 500),
}
LAM = 1e-2


def _a9a_root() -> Path:
    return Path(os.environ.get("BILEVEL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "a9a"


class StocBiOA9A:
    """Hypergradient time at (about) equal accuracy: stocBiO vs full-batch AID-CG on a9a."""

    params = (["coarse", "fine"], ["aid-cg", "stocbio"])
    param_names = ("accuracy", "method")
    timeout = 600.0
    number = 1
    repeat = (3, 5, 60.0)

    def setup_cache(self):
        from bilevel.datasets.libsvm import labels_to_01, load_a9a
        torch.set_num_threads(1)
        root = _a9a_root()
        if not (root / "a9a").is_file():
            return None
        x, y = load_a9a(root, "train", dtype=torch.float64)
        xt, yt = load_a9a(root, "test", dtype=torch.float64)
        hpo = logreg_problem((x, labels_to_01(y)), (xt, labels_to_01(yt)))
        hparams = hpo.hparams(LAM)
        y_star = hpo.solve_inner(hparams)
        alpha = 1.0 / hpo.lipschitz(hparams)
        exact = bl.hypergrad(hpo.problem, hparams, y_star, inner=bl.GradientDescent(lr=alpha, steps=0),
                             estimator=bl.AID(bl.Dense(), hvp="reverse"), inner_batch=hpo.train,
                             outer_batch=hpo.val).value["log_lam"]
        return hpo, hparams, y_star, alpha, exact

    def setup(self, cache, accuracy: str, method: str) -> None:
        if cache is None:
            raise NotImplementedError("a9a data not found: set BILEVEL_DATA")  # asv skips the benchmark
        torch.set_num_threads(1)
        self.hpo, self.hparams, self.y_star, alpha, self.exact = cache
        solver, self.batch_size = A9A_CONFIGS[accuracy, method]
        if isinstance(solver, bl.Neumann):
            solver = bl.Neumann(steps=solver.steps, alpha=alpha)
        self.estimator = bl.AID(solver, hvp="reverse")
        self.inner = bl.GradientDescent(lr=alpha, steps=0)
        self.call(0)

    def call(self, seed: int) -> torch.Tensor:
        batch = (self.hpo.train if self.batch_size is None
                 else bl.Sampler.minibatches(self.hpo.train, self.batch_size, seed=seed))
        return bl.hypergrad(self.hpo.problem, self.hparams, self.y_star, inner=self.inner, estimator=self.estimator,
                            inner_batch=batch, outer_batch=self.hpo.val, throw=False).value["log_lam"]

    def time_hypergrad(self, cache, accuracy: str, method: str) -> None:
        self.call(1)

    def track_rel_error(self, cache, accuracy: str, method: str) -> float:
        seeds = range(5) if self.batch_size is not None else range(1)
        return sum(((self.call(s) - self.exact).norm() / self.exact.norm()).item() for s in seeds) / len(seeds)

    track_rel_error.unit = "relative error (mean over seeds)"


class HypercleanStep:
    """Seconds per outer step of hyper-cleaning, 20,000 training examples (MNIST-shaped, linear model)."""

    params = (["aid-cg", "aid-neumann", "stocbio", "itd"],)
    param_names = ("method",)
    timeout = 600.0
    number = 1
    repeat = (3, 5, 60.0)

    def setup(self, method: str) -> None:
        torch.set_num_threads(1)
        gen = torch.Generator().manual_seed(0)
        z = torch.rand(25000, 784, generator=gen) - 0.13
        t = torch.randint(0, 10, (25000,), generator=gen)
        self.hc = hyperclean_problem((z[:20000], t[:20000]), (z[20000:], t[20000:]))
        cfg = Config(inner_steps=10, linear_steps=10, batch_size=2000)
        self.method = hyperclean_methods(self.hc, [method], cfg)[0]
        self.x = {k: v.requires_grad_(True) for k, v in self.hc.hparams().items()}
        self.opt = torch.optim.Adam(list(self.x.values()), lr=0.1)
        self.y, self.adjoint, self.step = self.hc.params0(), None, 0
        self.time_outer_step(method)

    def time_outer_step(self, method: str) -> None:
        hg = bl.hypergrad(self.hc.problem, self.x, self.y, inner=self.method.inner, estimator=self.method.estimator,
                          inner_batch=self.method.inner_batch(self.step), outer_batch=self.hc.val,
                          adjoint0=self.adjoint, throw=False)
        self.x["weight_logits"].grad = hg.value["weight_logits"]
        self.opt.step()
        self.y, self.adjoint, self.step = hg.params, hg.adjoint, self.step + 1


if __name__ == "__main__":
    bench = StocBiOA9A()
    cache = bench.setup_cache()
    for accuracy, method in A9A_CONFIGS:
        if cache is None:
            print("a9a not found")
            break
        bench.setup(cache, accuracy, method)
        tic = time.perf_counter()
        bench.time_hypergrad(cache, accuracy, method)
        print(f"a9a {accuracy:6s} {method:8s} time {time.perf_counter() - tic:.3f} s  "
              f"rel. error {bench.track_rel_error(cache, accuracy, method):.3f}")
    for method in HypercleanStep.params[0]:
        step = HypercleanStep()
        step.setup(method)
        tic = time.perf_counter()
        for _ in range(3):
            step.time_outer_step(method)
        print(f"hyper-cleaning {method:12s} {(time.perf_counter() - tic) / 3:.2f} s per outer step")
