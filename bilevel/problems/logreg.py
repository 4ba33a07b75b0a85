"""Per-feature L2 regularisation of logistic regression, tuned on a validation split."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._problem import BilevelProblem
from .._tree import Params

#: ``(X, t)`` with ``t`` in {0, 1}; a :meth:`bilevel.Sampler.minibatches` draw ``(X, t, index)`` also works.
LogRegBatch = tuple[Tensor, ...]


def logistic_loss(params: Params, batch: LogRegBatch) -> Tensor:
    r"""Mean logistic loss :math:`\frac1n\sum_i \log(1 + e^{z_i}) - t_i z_i`, :math:`z = X w + b`."""
    x, t = batch[0], batch[1]
    z = x @ params["w"] + params["b"]
    return (F.softplus(z) - t * z).mean()


def logreg_inner(hparams: Params, params: Params, batch: LogRegBatch) -> Tensor:
    r""":math:`g = \text{logistic loss on the training batch} + \frac12 \sum_j e^{x_j} w_j^2` (bias unpenalised)."""
    return logistic_loss(params, batch) + 0.5 * (torch.exp(hparams["log_lam"]) * params["w"] ** 2).sum()


def logreg_outer(hparams: Params, params: Params, batch: LogRegBatch) -> Tensor:
    r""":math:`f = \text{logistic loss on the validation batch}`."""
    return logistic_loss(params, batch)


@dataclass(frozen=True)
class LogRegHPO:
    r"""Hyperparameter optimisation of per-feature L2 weights of logistic regression:

    .. math::

        \min_{x \in \mathbb R^d} \; \ell_{val}(w^*(x)), \qquad
        w^*(x) = \arg\min_{w, b} \; \ell_{train}(w, b) + \tfrac12 \sum_j e^{x_j} w_j^2,

    with :math:`\ell` the mean logistic loss. ``hparams = {"log_lam": (d,)}``,
    ``params = {"w": (d,), "b": ()}``; the training data is the inner batch
    and the validation data the outer batch. The inner problem is strongly
    convex, so AID applies; :meth:`solve_inner` solves it to high accuracy with
    SciPy's L-BFGS-B as a reference. Build it with :func:`logreg_problem`.
    """

    train: LogRegBatch
    val: LogRegBatch

    @property
    def problem(self) -> BilevelProblem:
        return BilevelProblem(inner=logreg_inner, outer=logreg_outer)

    @property
    def dim(self) -> int:
        return self.train[0].shape[1]

    def hparams(self, lam: float = 1e-3) -> Params:
        """One shared weight ``lam`` for every feature, as log-weights."""
        return {"log_lam": torch.full((self.dim,), math.log(lam), dtype=self.train[0].dtype)}

    def params0(self) -> Params:
        like = self.train[0]
        return {"w": torch.zeros(self.dim, dtype=like.dtype), "b": torch.zeros((), dtype=like.dtype)}

    def lipschitz(self, hparams: Params) -> float:
        r"""Upper bound of the inner Hessian's norm, :math:`\|[X, 1]\|_2^2 / (4n) + \max_j e^{x_j}`: ``lr = 1/L`` is safe."""
        x = torch.cat([self.train[0], torch.ones_like(self.train[0][:, :1])], dim=1)
        return torch.linalg.matrix_norm(x, ord=2).item() ** 2 / (4 * x.shape[0]) + hparams["log_lam"].exp().max().item()

    def solve_inner(self, hparams: Params, params0: Params | None = None, *, gtol: float = 1e-10,
                    max_iter: int = 200) -> Params:
        r"""The inner minimiser to ``||∇g|| <= gtol``, by SciPy's ``trust-exact`` Newton method in float64.

        The Hessian :math:`[X,1]^\top D [X,1]/n + \operatorname{diag}(e^x, 0)` is formed in closed
        form (``(d+1)²`` entries), so a few iterations reach machine precision: the reference
        that gradient-based inner solvers are compared with.
        """
        try:
            from scipy.optimize import minimize
        except ImportError as err:  # pragma: no cover
            raise ImportError("LogRegHPO.solve_inner: needs scipy. Fix: pip install scipy.") from err
        x, t = (v.detach().double() for v in self.train[:2])
        a = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        lam = torch.cat([hparams["log_lam"].detach().double().exp(), torch.zeros(1, dtype=torch.float64)])
        start = self.params0() if params0 is None else params0
        theta0 = torch.cat([start["w"].detach().double().reshape(-1), start["b"].detach().double().reshape(1)])

        def parts(theta):
            th = torch.from_numpy(theta)
            z = a @ th
            return th, z, torch.sigmoid(z)

        def fun(theta):
            th, z, p = parts(theta)
            value = (F.softplus(z) - t * z).mean() + 0.5 * (lam * th ** 2).sum()
            return value.item(), (a.T @ (p - t) / len(t) + lam * th).numpy()

        def hess(theta):
            _, _, p = parts(theta)
            return ((a.T * (p * (1 - p))) @ a / len(t) + torch.diag(lam)).numpy()

        res = minimize(fun, theta0.numpy(), jac=True, hess=hess, method="trust-exact",
                       options={"gtol": gtol, "maxiter": max_iter})
        theta = res.x
        for _ in range(2):  # polish: trust-exact may stop early where f's rounding hides its progress
            theta = theta - torch.linalg.solve(torch.from_numpy(hess(theta)), torch.from_numpy(fun(theta)[1])).numpy()
        theta = torch.from_numpy(theta).to(self.train[0].dtype)
        return {"w": theta[:-1], "b": theta[-1]}

    def metrics(self, params: Params, batch: LogRegBatch) -> dict[str, float]:
        """``loss`` (mean logistic loss) and ``accuracy`` of ``params`` on ``batch``."""
        with torch.no_grad():
            z = batch[0] @ params["w"] + params["b"]
            loss = (F.softplus(z) - batch[1] * z).mean().item()
            acc = ((z > 0).to(batch[1].dtype) == batch[1]).double().mean().item()
        return {"loss": loss, "accuracy": acc}


def _check_pair(pair: object, name: str, call: str, dim: int | None) -> tuple[Tensor, Tensor]:
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
        raise TypeError(f"{call}: {name} must be a pair (X, y) of tensors; got {type(pair).__name__}.")
    x, y = pair
    if x.layout != torch.strided:
        raise TypeError(f"{call}: {name} X is a {x.layout} tensor; the objectives need a dense one. "
                        "Fix: pass X.to_dense() (a9a is 123 columns wide, so dense is cheap).")
    if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{call}: {name} must be X of shape (n, d) and y of shape (n,), n >= 1; got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}.")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{call}: {name} X has {x.shape[1]} columns but the training X has {dim}. "
                         "Fix: load both with the same n_features.")
    if not x.is_floating_point():
        raise TypeError(f"{call}: {name} X has dtype {x.dtype}; expected float32 or float64.")
    bad = torch.nonzero((y != 0) & (y != 1)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{call}: {name} y[{i}] = {y[i].item()!r}; expected labels 0 or 1. Fix: map ±1 "
                         "labels with bilevel.datasets.libsvm.labels_to_01(y).")
    return x, y.to(x.dtype)


def logreg_problem(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor]) -> LogRegHPO:
    """Per-feature-regularised logistic regression on ``train = (X, y)``, tuned on ``val = (X, y)``.

    Args:
        train: training features ``(n, d)`` (dense, floating) and 0/1 labels ``(n,)``.
        val: validation features ``(m, d)`` and 0/1 labels ``(m,)``.

    Example:
        >>> import torch, bilevel as bl
        >>> from bilevel.problems import logreg_problem
        >>> X = torch.randn(200, 5, dtype=torch.float64); y = (X[:, 0] > 0).double()
        >>> hpo = logreg_problem((X[:150], y[:150]), (X[150:], y[150:]))
        >>> x = hpo.hparams(lam=1e-2); y_star = hpo.solve_inner(x)
        >>> hg = bl.hypergrad(hpo.problem, x, y_star, inner=bl.GradientDescent(lr=0.1, steps=0),
        ...                   estimator=bl.AID(), inner_batch=hpo.train, outer_batch=hpo.val)
        >>> hg.value["log_lam"].shape
        torch.Size([5])

    Reference: J. Lorraine, P. Vicol, D. Duvenaud, "Optimizing millions of
    hyperparameters by implicit differentiation", AISTATS 2020 (per-weight
    regularisation); F. Pedregosa, ICML 2016 (HOAG, logistic regression).
    """
    call = "logreg_problem(train, val)"
    xt, yt = _check_pair(train, "train", call, None)
    xv, yv = _check_pair(val, "val", call, xt.shape[1])
    return LogRegHPO(train=(xt, yt), val=(xv.to(xt.dtype), yv.to(xt.dtype)))


def grid_search(hpo: LogRegHPO, lams: list[float], test: tuple[Tensor, Tensor] | None = None) -> list[dict[str, float]]:
    """The baseline a user tries first: one shared weight ``lam`` per row, each solved by :meth:`LogRegHPO.solve_inner`.

    Returns one dict per ``lam`` with ``lam``, ``val_loss``, ``val_accuracy`` (and ``test_loss``,
    ``test_accuracy`` when ``test`` is given); pick the row with the lowest ``val_loss``.
    """
    rows = []
    start = None
    for lam in sorted(lams, reverse=True):  # strong to weak: each solve warm-starts the next
        start = hpo.solve_inner(hpo.hparams(lam), start)
        row = {"lam": lam, **{f"val_{k}": v for k, v in hpo.metrics(start, hpo.val).items()}}
        if test is not None:
            row.update({f"test_{k}": v for k, v in hpo.metrics(start, test).items()})
        rows.append(row)
    return sorted(rows, key=lambda r: r["lam"])
