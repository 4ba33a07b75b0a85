"""Eager AID-CG with forward-over-reverse against reverse-over-reverse HVPs: one markdown table.

    python -m benchmarks.run_hvp [--repeat 9] [--out docs/performance.md]

What ``hvp="auto"`` (AID's default) is chosen from. For each problem, one ``bl.hypergrad``
with ``bl.AID(linear_solver=bl.CG(max_steps=10), hvp=MODE)`` after 100 gradient steps, and one
Hessian-vector product as AID forms it (``hvp_yy(...)`` at the inner start, applied once:
building the operator included), both modes, interleaved best-of-``repeat`` CPU time of the
timing thread (``time.thread_time``), float32, one thread. Problems: the ridge benchmark of
:mod:`benchmarks._reference` at ``d`` = 200 and 2000 (``n = 1000``), and a small MLP regression
(20-64-64-1, tanh, ``n = 500``) whose hyperparameters are per-layer log weight-decay factors.

With ``--out FILE`` the table replaces what lies between ``<!-- run_hvp:begin -->`` and
``<!-- run_hvp:end -->`` in FILE.
"""

from __future__ import annotations

import sys
import time

import torch

import bilevel as bl

from ._timing import best_of, markdown_table, publish, runner_parser

BEGIN, END = "<!-- run_hvp:begin -->", "<!-- run_hvp:end -->"
MODES = ("forward", "reverse")


def ridge(dim: int) -> tuple:
    from ._reference import exact_solution, make_case
    case = make_case(dim, torch.float32, exact_solution(dim))
    return case.ridge.problem, case.hparams, case.params0, case.ridge.train, case.ridge.val, case.lr


def mlp(width: int = 64, n: int = 500, features: int = 20) -> tuple:
    """A tanh MLP regression; hyperparameters: log weight decay of each weight matrix."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(2 * n, features, generator=gen)
    targets = torch.sin(inputs @ torch.randn(features, generator=gen))
    train, val = (inputs[:n], targets[:n]), (inputs[n:], targets[n:])
    shapes = {"w1": (features, width), "b1": (width,), "w2": (width, width), "b2": (width,), "w3": (width, 1)}
    params0 = {k: 0.1 * torch.randn(*s, generator=gen) for k, s in shapes.items()}

    def net(p, x):
        h = torch.tanh(x @ p["w1"] + p["b1"])
        h = torch.tanh(h @ p["w2"] + p["b2"])
        return (h @ p["w3"]).squeeze(-1)

    def inner(x, p, batch):
        decay = sum(torch.exp(x[k]) * (p[k] ** 2).sum() for k in ("w1", "w2", "w3"))
        return ((net(p, batch[0]) - batch[1]) ** 2).mean() + decay

    def outer(x, p, batch):
        return ((net(p, batch[0]) - batch[1]) ** 2).mean()

    hparams = {k: torch.full((), -4.0) for k in ("w1", "w2", "w3")}
    return bl.BilevelProblem(inner=inner, outer=outer), hparams, params0, train, val, 0.1


PROBLEMS = {"ridge d=200": lambda: ridge(200), "ridge d=2000": lambda: ridge(2000), "MLP 20-64-64-1": mlp}


def measure(name: str, repeat: int) -> dict:
    from bilevel.estimators._base import hvp_yy
    problem, x, y0, train, val, lr = PROBLEMS[name]()
    inner = bl.GradientDescent(lr=lr, steps=100)
    calls, products = {}, {}
    v = {k: torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for k, t in y0.items()}
    for mode in MODES:
        estimator = bl.AID(linear_solver=bl.CG(max_steps=10), hvp=mode)
        calls[mode] = (lambda e=estimator: bl.hypergrad(problem, x, y0, inner=inner, estimator=e,
                                                        inner_batch=train, outer_batch=val, throw=False))
        products[f"hvp {mode}"] = lambda m=mode: hvp_yy(problem, x, y0, train, m)(v)
    a, b = calls["forward"](), calls["reverse"]()
    diff = max(float((a.value[k] - b.value[k]).norm() / b.value[k].norm()) for k in b.value)
    best = best_of({**calls, **products}, repeat, clock=time.thread_time)
    return dict(problem=name, rel_diff=diff, status=b.result.name, **{k: s * 1e3 for k, s in best.items()})


def table(rows: list[dict]) -> str:
    header = ["problem", "AID-CG, forward (ms)", "AID-CG, reverse (ms)", "forward / reverse", "one HVP, forward (ms)",
              "one HVP, reverse (ms)", "rel. diff. of the hypergradients (f32)"]
    return markdown_table(header, [[r["problem"], f"{r['forward']:.1f}", f"{r['reverse']:.1f}",
                                    f"**{r['forward'] / r['reverse']:.2f}**", f"{r['hvp forward']:.2f}",
                                    f"{r['hvp reverse']:.2f}", f"{r['rel_diff']:.1e}"] for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = runner_parser("benchmarks.run_hvp", __doc__, repeat=9)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = []
    for name in args.problems:
        rows.append(measure(name, args.repeat))
        print(f"  {name}: forward {rows[-1]['forward']:.1f} ms, reverse {rows[-1]['reverse']:.1f} ms",
              file=sys.stderr, flush=True)
    publish("benchmarks.run_hvp", argv, table(rows), started, f"one thread, best of {args.repeat}, thread clock",
            args.out, BEGIN, END)


if __name__ == "__main__":
    main()
