"""Iterative differentiation: reverse mode through the unrolled inner loop, taped or checkpointed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch.func import grad_and_value, vjp

from .._batch import is_stochastic
from .._problem import BilevelProblem
from .._tree import Batch, Params, tree_add, tree_detach, tree_zeros_like
from ..inner._base import AbstractInnerSolver, LoopState, loop_finish, loop_run, loop_start
from ._base import (AbstractEstimator, Counts, Estimate, inner_counts, inner_fields, inner_grad_fn,
                    keep_params, no_linear, outer_grads, pack_scalars, packed_fields, start_of)


@dataclass(frozen=True)
class ITD(AbstractEstimator):
    r"""Iterative differentiation (ITD): the exact gradient of
    :math:`x \mapsto f(x, y_N(x))`, back-propagated through the :math:`N` unrolled
    inner steps, including the dependence of the start ``init(x)``.

    With ``truncate=K`` only the last :math:`K` steps are on the tape (truncated
    back-propagation): the first :math:`N-K` steps run without it and their
    output, and so the start, is treated as a constant.

    Memory grows linearly with the number of taped steps. Cost: :math:`N`
    gradients forward and about :math:`K` Hessian-vector products backward
    (reported as ``num_hvp``).

    **Memory-lean ITD** (``checkpoint_every=c``): the same hypergradient, to
    rounding, without the tape of all steps. Write one inner step (any solver:
    the whole state, e.g. iterate and velocity) as :math:`s_{k+1} = \Psi_k(s_k, x)`.
    The forward sweep runs without a tape and keeps only :math:`s_0, s_c, s_{2c},
    \dots`; the backward sweep takes the segments from last to first, recomputes
    each on a tape and pulls the adjoint back through it,

    .. math::

        \bar s_N = \nabla_y f, \qquad
        \bar s_k = (\partial_s \Psi_k)^\top \bar s_{k+1}, \qquad
        \bar x \mathrel{+}= (\partial_x \Psi_k)^\top \bar s_{k+1},

    ending with :math:`\bar x \mathrel{+}= J_{\text{init}}^\top \bar s_0` for a learned
    start. Peak memory holds :math:`N/c` states and the tape of :math:`c` steps,
    so ``checkpoint_every="sqrt"`` (:math:`c = \lceil\sqrt N\rceil`) makes it
    :math:`O(\sqrt N)` instead of :math:`O(N)`, for one extra forward pass (the
    recomputation: ``num_grad`` grows by the number of taped steps). With a
    :class:`~bilevel.Sampler` the recomputed steps call ``fn(step)`` again, so
    ``fn`` must return the same batch for the same step (seed it with the step);
    ``Sampler.from_iterable`` cannot replay and is refused.

    Args:
        truncate: number of final steps to differentiate through; ``None`` for all.
        checkpoint_every: ``None`` (default: tape every step), an interval
            :math:`c` between 1 and the inner solver's ``steps`` (checked at the
            call), or ``"sqrt"`` for :math:`\lceil\sqrt{K}\rceil` with :math:`K` the
            number of differentiated steps.

    References: D. Maclaurin, D. Duvenaud, R. Adams, "Gradient-based
    hyperparameter optimization through reversible learning", ICML 2015;
    L. Franceschi et al., "Forward and reverse gradient-based hyperparameter
    optimization", ICML 2017; A. Shaban et al., "Truncated back-propagation for
    bilevel optimization", AISTATS 2019; A. Griewank, A. Walther, "Algorithm 799:
    Revolve", ACM TOMS 26(1), 2000 and T. Chen et al., "Training deep nets with
    sublinear memory cost", arXiv:1604.06174, 2016 (checkpointing).

    Example:
        >>> import bilevel as bl
        >>> bl.ITD(truncate=5)
        ITD(truncate=5)
        >>> bl.ITD(checkpoint_every="sqrt")
        ITD(truncate=None, checkpoint_every='sqrt')
    """

    truncate: int | None = None
    checkpoint_every: int | Literal["sqrt"] | None = None

    def __repr__(self) -> str:  # the taped default prints as before the option existed
        extra = "" if self.checkpoint_every is None else f", checkpoint_every={self.checkpoint_every!r}"
        return f"ITD(truncate={self.truncate!r}{extra})"

    def __post_init__(self) -> None:
        if self.truncate is not None and (isinstance(self.truncate, bool) or not isinstance(self.truncate, int)
                                          or self.truncate < 1):
            raise ValueError(f"ITD(truncate={self.truncate!r}): truncate must be a positive integer "
                             "(the number of final inner steps to differentiate through) or None.")
        c = self.checkpoint_every
        if c is not None and c != "sqrt" and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"ITD(checkpoint_every={c!r}): expected None (tape every step), 'sqrt', or an "
                             "integer interval >= 1 (at most the inner solver's steps).")

    def run(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
            inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
            adjoint0: Params | None) -> tuple[Estimate, Counts]:
        n = inner.steps
        k = n if self.truncate is None else self.truncate
        if k > n:
            raise ValueError(f"hypergrad(estimator={self!r}): truncate={k} exceeds the inner solver's "
                             f"steps={n}. Fix: use truncate <= {n}, or ITD() for the full unroll.")
        if self.checkpoint_every is not None:
            return self._run_checkpointed(problem, hparams, params0, inner, inner_batch, outer_batch, k)

        prefix = None
        if k < n:  # the untaped steps run before, not inside, the grad transform: no transform overhead per step
            x0 = tree_detach(hparams)
            prefix = loop_run(inner, loop_start(inner, start_of(problem, x0, params0)),
                              inner_grad_fn(problem, x0, inner_batch), 0, n - k)
            prefix = _detach(prefix)

        keep = keep_params()  # the adapted params leave the transforms only when the caller wants them

        def phi(x: Params):
            loop = loop_start(inner, start_of(problem, x, params0)) if prefix is None else prefix
            grad_fn = inner_grad_fn(problem, x, inner_batch)
            loop = loop_run(inner, loop, grad_fn, n - k, n)
            sol = loop_finish(inner, loop, grad_fn, check_growth=not is_stochastic(inner_batch))
            value = problem.outer_value(x, sol.params, outer_batch)
            # The scalar diagnostics leave the transforms stacked (Estimate.packed): one aux
            # tensor instead of six, each unwrapped through grad and the caller's vmap.
            packed = pack_scalars(sol, value, n)
            if packed is None:
                return value, (sol.params if keep else {}, inner_fields(sol), sol.code)
            names.append(tuple(sol.params) if keep else ())
            return value, (*(sol.params.values() if keep else ()), packed)  # a flat tuple: no dict to unwrap

        names: list[tuple[str, ...]] = []  # the params' keys, set when the scalars were packed
        value, (outer_value, aux) = grad_and_value(phi, has_aux=True)(hparams)
        if names:
            estimate = Estimate(value=value, params=dict(zip(names[0], aux[:-1])), outer_value=outer_value,
                                adjoint=None, info={}, packed=aux[-1], **packed_fields())
        else:  # not packed (see pack_scalars)
            params, fields, code = aux
            estimate = Estimate(value=value, params=params, code=code, outer_value=outer_value,
                                adjoint=None, info={}, **fields, **no_linear(outer_value))
        return estimate, Counts(num_grad=inner_counts(inner) + 1, num_hvp=k)

    def _run_checkpointed(self, problem: BilevelProblem, hparams: Params, params0: Params | None,
                          inner: AbstractInnerSolver, inner_batch: Batch, outer_batch: Batch,
                          k: int) -> tuple[Estimate, Counts]:
        n, c = inner.steps, self.checkpoint_every
        if c == "sqrt":
            c = max(1, math.ceil(math.sqrt(k)))
        elif not 1 <= c <= n:
            raise ValueError(f"hypergrad(estimator={self!r}): checkpoint_every={c} is outside 1..{n}, the inner "
                             f"solver's steps. Fix: use an interval between 1 and {n}, e.g. "
                             f"checkpoint_every={max(1, math.ceil(math.sqrt(n)))} (or 'sqrt').")
        if is_stochastic(inner_batch) and "from_iterable" in getattr(inner_batch.fn, "__qualname__", ""):
            raise ValueError(f"hypergrad(estimator={self!r}): checkpointed ITD recomputes inner steps and needs "
                             "the batch of each step again, which Sampler.from_iterable cannot replay. Fix: "
                             "use bl.Sampler(fn) with fn(step) seeded by the step, or checkpoint_every=None.")
        learned = params0 is None and k == n  # the start is differentiated only without truncation
        grad_fn = inner_grad_fn(problem, hparams, inner_batch)
        loop = loop_run(inner, loop_start(inner, start_of(problem, hparams, params0)), grad_fn, 0, n - k)
        bounds = list(range(n - k, n, c)) + [n]
        checkpoints = []
        for a, b in zip(bounds[:-1], bounds[1:]):  # forward sweep without a tape
            checkpoints.append(loop)
            loop = loop_run(inner, loop, grad_fn, a, b)
        sol = loop_finish(inner, loop, grad_fn, check_growth=not is_stochastic(inner_batch))
        value, gy, outer_value = outer_grads(problem, hparams, sol.params, outer_batch)
        adjoint = (gy, *(tree_zeros_like(s) for s in loop.solver[1:]))
        for a, b in reversed(list(zip(bounds[:-1], bounds[1:]))):  # backward sweep, one taped segment at a time
            saved = checkpoints.pop()

            def segment(state, x, saved=saved, a=a, b=b):
                grad_x = inner_grad_fn(problem, x, inner_batch)
                return loop_run(inner, saved._replace(solver=state), grad_x, a, b).solver

            _, pullback = vjp(segment, saved.solver, hparams)
            adjoint, grad_x = pullback(adjoint)
            value = tree_add(value, grad_x)
            del pullback, saved
        if learned:
            _, pullback = vjp(lambda x: inner.init(problem.start(x)), hparams)
            value = tree_add(value, pullback(adjoint)[0])
        estimate = Estimate(value=value, params=sol.params, code=sol.code, outer_value=outer_value,
                            adjoint=None, info={}, **inner_fields(sol), **no_linear(outer_value))
        return estimate, Counts(num_grad=inner_counts(inner) + 1 + k, num_hvp=k)


def _detach(loop: LoopState) -> LoopState:
    solver = tuple(tree_detach(s) for s in loop.solver)
    return LoopState(solver, *(t.detach() for t in loop[1:]))
