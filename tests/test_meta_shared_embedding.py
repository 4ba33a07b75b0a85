"""Shared-embedding meta-learning: ridge head in closed form vs the inner solver with AID/ITD/IMAML/ESJ,
and the softmax head against finite differences, float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel.meta import ClosedForm, RidgeHead, SharedEmbedding, SoftmaxHead, Tasks

D = torch.float64


def embedding(inputs: int = 1, features: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, features), nn.Tanh()).double()


def regression_tasks() -> Tasks:
    batch = bl.datasets.Sinusoid(shots=8, queries=6, dtype=D).sample(3, seed=5)
    return Tasks(batch.support_x, batch.support_y, batch.query_x, batch.query_y)


def classification_tasks(tasks: int = 3, ways: int = 3, shots: int = 4) -> Tasks:
    gen = torch.Generator().manual_seed(2)
    centres = 1.5 * torch.randn(tasks, ways, 1, 2, generator=gen, dtype=D)
    labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)

    def draw() -> torch.Tensor:
        return (centres + 0.7 * torch.randn(tasks, ways, shots, 2, generator=gen, dtype=D)).reshape(tasks, -1, 2)

    return Tasks(draw(), labels, draw(), labels)


def ridge(estimator, steps: int = 120) -> SharedEmbedding:
    """The ridge head solved by gradient descent (condition number about 6: 120 steps reach 1e-14)."""
    return SharedEmbedding(embedding(), head=RidgeHead(lam=2.0), inner=bl.GradientDescent(lr=0.25, steps=steps),
                           estimator=estimator)


def test_ridge_closed_form_is_the_inner_optimum() -> None:
    tasks, closed = regression_tasks(), SharedEmbedding(embedding(), head=RidgeHead(lam=2.0))
    assert isinstance(closed.estimator, ClosedForm)
    theta = closed.init_hparams()
    heads = closed.adapt(theta, tasks)
    iterative = ridge(bl.AID()).adapt(theta, tasks)
    for key in ("w", "b"):
        torch.testing.assert_close(heads[key], iterative[key], rtol=1e-9, atol=1e-10)
    problem = closed.problem
    for t in range(3):  # the closed form is stationary for the inner objective
        grad = torch.func.grad(problem.inner, argnums=1)(theta, {k: v[t] for k, v in heads.items()},
                                                         (tasks.support_x[t], tasks.support_y[t]))
        assert max(float(g.abs().max()) for g in grad.values()) < 1e-12


@pytest.mark.parametrize("estimator", [bl.AID(linear_solver=bl.CG(max_steps=20, rtol=1e-12)), bl.ITD()],
                         ids=["AID", "ITD"])
def test_ridge_closed_form_meta_gradient_equals_solver_plus_estimator(estimator) -> None:
    tasks = regression_tasks()
    closed = SharedEmbedding(embedding(), head=RidgeHead(lam=2.0))
    theta = closed.init_hparams()
    want = closed.meta_gradient(theta, tasks)
    got = ridge(estimator).meta_gradient(theta, tasks)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-8, atol=1e-10)
    for key, value in want.value.items():
        torch.testing.assert_close(got.value[key], value, rtol=1e-6, atol=1e-8, msg=key)


def test_imaml_and_esj_also_differentiate_the_shared_embedding() -> None:
    tasks = regression_tasks()
    theta = ridge(bl.AID()).init_hparams()
    # iMAML's proximal pull towards the zero head adds mu to the penalty of w and b alike.
    imaml = ridge(bl.IMAML(lam=0.3, linear_solver=bl.CG(max_steps=20, rtol=1e-12))).meta_gradient(theta, tasks)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in imaml.value.values())
    exact = ridge(bl.AID()).meta_gradient(theta, tasks).value
    es = ridge(bl.ESJ(directions=200, smoothing=1e-4, seed=0, distribution="sphere"), steps=40)
    got = es.meta_gradient(theta, tasks).value
    flat = lambda g: torch.cat([v.reshape(-1) for v in g.values()])
    cosine = torch.nn.functional.cosine_similarity(flat(got), flat(exact), dim=0)
    assert cosine > 0.8


def test_softmax_head_aid_meta_gradient_matches_finite_differences() -> None:
    tasks = classification_tasks()
    learner = SharedEmbedding(embedding(inputs=2), head=SoftmaxHead(ways=3, lam=1.0),
                              inner=bl.GradientDescent(lr=0.45, steps=50),
                              estimator=bl.AID(linear_solver=bl.CG(max_steps=30, rtol=1e-12)))
    theta = learner.init_hparams()
    mg = learner.meta_gradient(theta, tasks)
    for key, index in (("0.weight", 3), ("0.bias", 1)):
        def meta_loss(delta: float) -> float:
            x = {k: v.clone() for k, v in theta.items()}
            x[key].view(-1)[index] += delta
            return float(learner.losses(x, learner.adapt(x, tasks), tasks).mean())

        fd = (meta_loss(1e-6) - meta_loss(-1e-6)) / 2e-6
        assert float(mg.value[key].reshape(-1)[index]) == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_shared_embedding_bad_configurations() -> None:
    with pytest.raises(ValueError, match="only the ridge head has a closed form"):
        SharedEmbedding(embedding(), head=SoftmaxHead(ways=3))
    with pytest.raises(ValueError, match="ridge penalty must be positive"):
        RidgeHead(lam=0.0)
    with pytest.raises(ValueError, match="ways"):
        SoftmaxHead(ways=1)
    flat = SharedEmbedding(nn.Sequential(nn.Linear(1, 4), nn.Unflatten(1, (2, 2))).double())
    with pytest.raises(ValueError, match="expected \\(1, features\\)"):
        flat.meta_gradient(flat.init_hparams(), regression_tasks())
