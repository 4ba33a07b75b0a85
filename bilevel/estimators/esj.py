"""ES-based Jacobian (ESJ): a Hessian-free hypergradient from forward inner solves only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import vmap

from .._batch import is_stochastic
from .._problem import BilevelProblem
from .._result import RESULTS, combine
from .._tree import Batch, Params, tree_add, tree_ravel, tree_unravel
from ..inner._base import AbstractInnerSolver, solve
from ._base import AbstractEstimator, Counts, Estimate, inner_counts, inner_grad_fn, no_linear, outer_grads

Distribution = Literal["gaussian", "sphere"]


@dataclass(frozen=True)
class ESJ(AbstractEstimator):
    r"""ES-based Jacobian estimator (Sow, Ji, Liang): estimate the response
    Jacobian :math:`J = \partial y_N / \partial x` of the inner solver's output
    from forward inner solves at randomly perturbed hyperparameters, with no
    second derivatives at all:

    .. math::

        \widehat J = \frac{c}{Q} \sum_{q=1}^{Q} \frac{y_N(x + \mu u_q) - y_N(x)}{\mu}\, u_q^\top,
        \qquad \widehat{\nabla}\Phi(x) = \nabla_x f(x, y_N) + \widehat J^\top \nabla_y f(x, y_N).

    :math:`\widehat J^\top \nabla_y f` is formed as
    :math:`\frac{c}{Q}\sum_q u_q \langle y_N(x+\mu u_q) - y_N(x), \nabla_y f\rangle / \mu`,
    so :math:`\widehat J` is never materialised. :math:`y_N` is the full map of
    the inner solver, including the learned start ``init(x)`` when there is one;
    every solve uses the same start (``params0``, or ``init`` at its perturbed
    hyperparameters) and the same data. The :math:`Q` perturbed solves and the
    unperturbed one run as *one* batched solve under :func:`torch.func.vmap`, so
    with a :class:`~bilevel.Sampler` (ESJ-S, the stochastic variant) every solve
    sees the same mini-batch at step :math:`k` (the sampler is called once per step).

    Two conventions for the directions exist in the zeroth-order literature:

    * ``distribution="gaussian"`` (default; Nesterov & Spokoiny; the ESJ paper):
      :math:`u_q \sim \mathcal N(0, I_d)` and :math:`c = 1`, since :math:`E[u u^\top] = I`.
    * ``distribution="sphere"`` (Flaxman, Kalai & McMahan): :math:`u_q` uniform on
      the unit sphere of :math:`\mathbb R^d` and :math:`c = d` (the number of entries of
      ``hparams``), since :math:`E[u u^\top] = I/d`. Slightly lower variance:
      :math:`(d-1)\|w\|^2/Q` against :math:`(d+1)\|w\|^2/Q` for the squared error
      of :math:`\widehat J^\top w` when :math:`y_N` is affine.

    When :math:`y_N` is affine in :math:`x` (a quadratic inner problem) both are
    unbiased for every :math:`\mu`; otherwise the bias is :math:`O(\mu)`, and
    ``antithetic=True`` (central differences
    :math:`[y_N(x+\mu u_q) - y_N(x-\mu u_q)]/(2\mu)`) makes it :math:`O(\mu^2)` at the
    price of :math:`2Q+1` instead of :math:`Q+1` solves.

    Randomness: with an integer ``seed`` the directions are drawn by
    ``torch.randn(Q, d, generator=torch.Generator(device).manual_seed(seed))``
    in the dtype of ``hparams`` at every call, so the same seed gives the same
    numbers (but the same directions at every outer step: change the seed per
    step, e.g. ``dataclasses.replace(esj, seed=step)``). With a
    ``torch.Generator`` the directions come from it and it advances, so
    successive calls use fresh directions and a run is reproducible from the
    generator's initial seed. Under :func:`~bilevel.vmap_hypergrad` the directions
    are drawn once per call and shared by all tasks.

    Cost: :math:`(Q+1)N` inner gradients (:math:`(2Q+1)N` antithetic) and one outer
    gradient; no HVPs; memory of :math:`Q+1` inner iterates, independent of :math:`N`.
    A perturbed solve that turns NaN/inf reports ``RESULTS.esj_nonfinite`` and
    names the direction (``esj_bad_direction``).

    Args:
        directions: number of directions :math:`Q \ge 1` (default 16).
        smoothing: step :math:`\mu > 0` (default ``1e-3``).
        seed: an ``int`` or a ``torch.Generator`` (default 0).
        antithetic: use :math:`\pm u_q` pairs (default ``False``).
        distribution: ``"gaussian"`` (default) or ``"sphere"``.

    References: D. Sow, K. Ji, Y. Liang, "ES-based Jacobian enables faster
    bilevel optimization", arXiv:2110.07004 (ESJ and ESJ-S); Y. Nesterov,
    V. Spokoiny, "Random gradient-free minimization of convex functions", Found.
    Comput. Math. 17, 2017 (Gaussian smoothing); A. Flaxman, A. Kalai,
    H. B. McMahan, "Online convex optimization in the bandit setting: gradient
    descent without a gradient", SODA 2005 (sphere smoothing).

    Example:
        >>> import bilevel as bl
        >>> bl.ESJ(directions=16, smoothing=1e-3, seed=0)
        ESJ(directions=16, smoothing=0.001, seed=0, antithetic=False, distribution='gaussian')
    """

    directions: int = 16
    smoothing: float = 1e-3
    seed: int | torch.Generator = 0
    antithetic: bool = False
    distribution: Distribution = "gaussian"

    def __post_init__(self) -> None:
        q = self.directions
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"ESJ(directions={q!r}): the number of directions must be an integer >= 1 "
                             "(e.g. directions=16).")
        mu = self.smoothing
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not (0 < mu < float("inf")):
            raise ValueError(f"ESJ(smoothing={mu!r}): the smoothing step mu must be a positive finite number "
                             "(e.g. smoothing=1e-3).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, torch.Generator)):
            raise TypeError(f"ESJ(seed={self.seed!r}): expected an int or a torch.Generator.")
        if not isinstance(self.antithetic, bool):
            raise TypeError(f"ESJ(antithetic={self.antithetic!r}): expected True or False.")
        if self.distribution not in ("gaussian", "sphere"):
            raise ValueError(f"ESJ(distribution={self.distribution!r}): expected 'gaussian' (u ~ N(0, I)) "
                             "or 'sphere' (u uniform on the unit sphere, scaled by the dimension).")

    def draw(self, hparams: Params) -> Tensor:
        """The ``(Q, d)`` matrix of directions for ``hparams`` (``d`` entries in all).

        With an integer seed this is what every call uses; with a generator it
        advances the generator, like a call does.
        """
        like = next(iter(hparams.values()))
        p = sum(v.numel() for v in hparams.values())
        gen = self.seed
        with torch._C._DisableFuncTorch():  # random constants: drawn outside any vmap/grad transform
            if isinstance(gen, int):
                gen = torch.Generator(device=like.device).manual_seed(gen)
            u = torch.randn(self.directions, p, generator=gen, dtype=like.dtype, device=gen.device)
            if self.distribution == "sphere":
                u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
            return u.to(like.device)

    def run(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
            inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
            adjoint0: Params | None) -> tuple[Estimate, Counts]:
        q, mu = self.directions, float(self.smoothing)
        u = self.draw(hparams)
        flat = tree_ravel(hparams)
        shifts = [torch.zeros_like(u[:1]), mu * u] + ([-mu * u] if self.antithetic else [])
        check_growth = not is_stochastic(inner_batch)

        def inner_solution(x_flat: Tensor):
            x = {k: v.to(hparams[k].dtype) for k, v in tree_unravel(x_flat, hparams).items()}
            start = problem.start(x) if params0 is None else params0
            sol = solve(inner, start, inner_grad_fn(problem, x, inner_batch), check_growth=check_growth)
            return sol.params, sol.steps, sol.grad_norm, sol.loss0, sol.loss, sol.bad_step, sol.code

        # randomness="same": random draws inside (a Sampler, dropout) are common to all Q + 1 solves.
        solved = vmap(inner_solution, randomness="same")(flat + torch.cat(shifts))
        ys, steps, gnorm, loss0, loss, bad_step, code = solved
        y = {k: v[0] for k, v in ys.items()}
        gx, gy, outer_value = outer_grads(problem, hparams, y, outer_batch)
        # <y(x + mu u_q) - y(x - mu u_q or x), grad_y f> / (mu or 2 mu), differences first.
        lower = {k: v[q + 1:] for k, v in ys.items()} if self.antithetic else {k: v[:1] for k, v in ys.items()}
        slope = sum(((ys[k][1:q + 1] - lower[k]) * gy[k]).reshape(q, -1).sum(1) for k in ys)
        slope = slope / (2 * mu if self.antithetic else mu)
        scale = (flat.numel() if self.distribution == "sphere" else 1) / q
        jac_t_gy = tree_unravel(scale * (slope.to(u.dtype) @ u), hparams)
        value = tree_add(gx, {k: v.to(gx[k].dtype) for k, v in jac_t_gy.items()})

        flat_ys = torch.cat([v.reshape(v.shape[0], -1) for v in ys.values()], dim=1)
        failed = (bad_step[1:] >= 0) | ~torch.isfinite(flat_ys[1:]).all(dim=1)
        failed = failed[:q] | failed[q:] if self.antithetic else failed
        bad_direction = torch.where(failed.any(), torch.argmax(failed.long()), torch.full_like(code[0], -1))
        status = combine(code[0], failed.any(), RESULTS.esj_nonfinite)
        estimate = Estimate(value=value, params=y, code=status, outer_value=outer_value, adjoint=None,
                            info={"esj_bad_direction": bad_direction}, inner_steps=steps[0],
                            inner_grad_norm=gnorm[0], inner_loss0=loss0[0], inner_loss=loss[0],
                            inner_bad_step=bad_step[0], **no_linear(outer_value))
        solves = (2 if self.antithetic else 1) * q + 1
        return estimate, Counts(num_grad=solves * inner_counts(inner) + 1, num_hvp=0)
