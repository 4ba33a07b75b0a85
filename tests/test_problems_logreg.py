"""Per-feature-regularised logistic regression: the hypergradient against finite differences, the reference
solve, grid search, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl
from bilevel.problems import a9a_splits, grid_search, logreg_problem

from tests._data import data_dir


def _data(n=160, m=120, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    y = (torch.rand(n + m, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ w + 0.3)).double()
    return (x[:n], y[:n]), (x[n:], y[n:])


def test_reference_solve_reaches_the_stationary_point():
    hpo = logreg_problem(*_data())
    x = {"log_lam": torch.tensor([-3.0, -1.0, -5.0, 0.0], dtype=torch.float64)}
    y = hpo.solve_inner(x)
    grad = torch.func.grad(hpo.problem.inner, argnums=1)(x, y, hpo.train)
    assert max(g.abs().max().item() for g in grad.values()) < 1e-10


def test_aid_cg_hypergradient_matches_finite_differences_of_the_solved_objective():
    hpo = logreg_problem(*_data())
    x = {"log_lam": torch.tensor([-3.0, -1.0, -5.0, -2.0], dtype=torch.float64)}

    def phi(log_lam):
        params = hpo.solve_inner({"log_lam": log_lam}, gtol=1e-13)
        return hpo.problem.outer(None, params, hpo.val).item()

    h = 1e-5
    fd = torch.tensor([(phi(x["log_lam"] + h * e) - phi(x["log_lam"] - h * e)) / (2 * h)
                       for e in torch.eye(4, dtype=torch.float64)], dtype=torch.float64)
    y_star = hpo.solve_inner(x, gtol=1e-13)
    hg = bl.hypergrad(hpo.problem, x, y_star, inner=bl.GradientDescent(lr=0.1, steps=0),
                      estimator=bl.AID(bl.CG(max_steps=20, rtol=1e-12)), inner_batch=hpo.train, outer_batch=hpo.val)
    assert torch.allclose(hg.value["log_lam"], fd, rtol=1e-5, atol=1e-9)
    # The same from a cold start, with the inner problem solved by heavy-ball steps instead of Newton.
    lr = 1.0 / hpo.lipschitz(x)
    hg2 = bl.hypergrad(hpo.problem, x, hpo.params0(), inner=bl.Momentum(lr=lr, momentum=0.9, steps=600),
                       estimator=bl.AID(bl.CG(max_steps=20, rtol=1e-12)), inner_batch=hpo.train, outer_batch=hpo.val)
    assert torch.allclose(hg2.value["log_lam"], fd, rtol=1e-4, atol=1e-8)


def test_grid_search_rows_and_metrics():
    hpo = logreg_problem(*_data())
    rows = grid_search(hpo, [1e-3, 1e-1, 10.0], test=hpo.val)
    assert [r["lam"] for r in rows] == [1e-3, 1e-1, 10.0]
    assert rows[0]["val_loss"] == pytest.approx(rows[0]["test_loss"])
    assert rows[-1]["val_loss"] > rows[0]["val_loss"]           # lam = 10 all but zeroes the weights
    assert 0.0 <= rows[0]["val_accuracy"] <= 1.0
    assert hpo.metrics(hpo.params0(), hpo.val)["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_bad_input_names_the_problem():
    train, val = _data()
    with pytest.raises(ValueError, match=r"train y\[0\] = -1.0; expected labels 0 or 1.*labels_to_01"):
        logreg_problem((train[0], 2 * train[1] - 1), val)
    with pytest.raises(ValueError, match="val X has 3 columns but the training X has 4"):
        logreg_problem(train, (val[0][:, :3], val[1]))
    with pytest.raises(TypeError, match="train must be a pair"):
        logreg_problem(train[0], val)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        sparse = train[0].to_sparse_csr()
    with pytest.raises(TypeError, match="to_dense"):
        logreg_problem((sparse, train[1]), val)


@pytest.mark.data
def test_a9a_splits_sizes_and_errors():
    root = data_dir("a9a")
    s = a9a_splits(root, n_train=300, n_val=200, seed=1)
    assert s.train[0].shape == (300, 123) and s.val[0].shape == (200, 123) and s.test[0].shape == (16281, 123)
    assert set(s.train[1].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"n_train \+ n_val = 30000 \+ 5000 = 35000 exceeds the 32561 examples"):
        a9a_splits(root, n_train=30000, n_val=5000)
    with pytest.raises(ValueError, match="n_val=0 must be an integer >= 1"):
        a9a_splits(root, n_train=100, n_val=0)
