"""Data hyper-cleaning: shapes, the hypergradient, detection metrics, baselines and bad input on synthetic data."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.problems import MLP, Linear, detection_metrics, hyperclean_problem, mnist_hyperclean_splits

from tests._data import data_dir


def _blobs(n=300, m=150, d=6, classes=3, corrupt=0.4, seed=0):
    """Gaussian blobs; a ``corrupt`` share of the training labels moved to another class."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, d, generator=gen, dtype=torch.float64)
    t = torch.randint(0, classes, (n + m,), generator=gen)
    z = centres[t] + torch.randn(n + m, d, generator=gen, dtype=torch.float64)
    bad = torch.rand(n, generator=gen) < corrupt
    noisy = t[:n].clone()
    noisy[bad] = (noisy[bad] + torch.randint(1, classes, (int(bad.sum()),), generator=gen)) % classes
    return (z[:n], noisy), (z[n:], t[n:]), bad


def test_shapes_hypergradient_and_objective():
    train, val, _ = _blobs()
    hc = hyperclean_problem(train, val)
    assert hc.classifier == Linear(6, 3)
    x, y = hc.hparams(), hc.params0()
    assert x["weight_logits"].shape == (300,) and y["W"].shape == (6, 3) and y["b"].shape == (3,)
    # With every weight 1/2, g is half the mean cross-entropy (+ the penalty, zero at W = 0).
    g = hc.problem.inner(x, y, hc.train_batch)
    assert g.item() == pytest.approx(0.5 * torch.log(torch.tensor(3.0)).item())
    hg = bl.hypergrad(hc.problem, x, y, inner=bl.GradientDescent(lr=0.3, steps=100),
                      estimator=bl.AID(bl.CG(max_steps=50, rtol=1e-8)), inner_batch=hc.train_batch,
                      outer_batch=hc.val)
    assert hg.value["weight_logits"].shape == (300,) and hg.value["weight_logits"].abs().sum() > 0
    # A mini-batch only touches the weights of its examples.
    sampled = bl.hypergrad(hc.problem, x, y, inner=bl.GradientDescent(lr=0.3, steps=5),
                           estimator=bl.AID(bl.Neumann(steps=5, alpha=0.3)),
                           inner_batch=bl.Sampler.minibatches(hc.train, 40, seed=0), outer_batch=hc.val)
    assert 0 < int((sampled.value["weight_logits"] != 0).sum()) <= 40


def test_hyper_cleaning_learns_weights_that_separate_corrupted_examples():
    train, val, bad = _blobs()
    hc = hyperclean_problem(train, val, l2=1e-2)
    x = {"weight_logits": torch.zeros(300, dtype=torch.float64, requires_grad=True)}
    opt = torch.optim.Adam([x["weight_logits"]], lr=0.3)
    y = hc.params0()
    for _ in range(12):
        hg = bl.hypergrad(hc.problem, x, y, inner=bl.Momentum(lr=0.3, steps=10),
                          estimator=bl.AID(bl.CG(max_steps=10, rtol=1e-6), hvp="reverse"), inner_batch=hc.train_batch,
                          outer_batch=hc.val, throw=False)
        x["weight_logits"].grad = hg.value["weight_logits"]
        opt.step()
        y = hg.params
    found = detection_metrics(x["weight_logits"], bad)
    assert found["auc"] > 0.9 and found["precision"] > 0.8 and found["recall"] > 0.6
    cleaned = hc.metrics(hc.fit(torch.sigmoid(x["weight_logits"].detach())), val)["accuracy"]
    noisy = hc.metrics(hc.fit(torch.ones(300)), val)["accuracy"]
    assert cleaned >= noisy


def test_detection_metrics_known_values():
    bad = torch.tensor([False, False, True, True])
    assert detection_metrics(torch.zeros(4), bad)["auc"] == 0.5          # all tied: chance
    assert detection_metrics(torch.tensor([-2.0, -1.0, 1.0, 2.0]), bad)["auc"] == 0.0
    m = detection_metrics(torch.tensor([1.0, -1.0, -1.0, 3.0]), bad)    # flags examples 1 and 2
    assert m["auc"] == pytest.approx(1.5 / 4) and m["precision"] == 0.5 and m["recall"] == 0.5
    with pytest.raises(ValueError, match="4 weights but 3 corruption flags"):
        detection_metrics(torch.zeros(4), bad[:3])


def test_mlp_classifier_runs():
    train, val, _ = _blobs()
    hc = hyperclean_problem(train, val, MLP(6, hidden=8, num_classes=3))
    y = hc.params0()
    assert set(y) == {"W1", "b1", "W2", "b2"} and y["W1"].dtype == torch.float64
    hg = bl.hypergrad(hc.problem, hc.hparams(), y, inner=bl.GradientDescent(lr=0.1, steps=5),
                      estimator=bl.ITD(), inner_batch=hc.train_batch, outer_batch=hc.val)
    assert hg.value["weight_logits"].shape == (300,)


def test_bad_input_names_the_problem():
    train, val, _ = _blobs()
    with pytest.raises(ValueError, match=r"val labels span 0..3; expected 0..2"):
        hyperclean_problem(train, (val[0], val[1].clamp(max=3) + (val[1] == 2).long()), Linear(6, 3))
    with pytest.raises(ValueError, match="must be Linear or MLP with in_features=6"):
        hyperclean_problem(train, val, Linear(5, 3))
    with pytest.raises(ValueError, match=r"flatten images"):
        hyperclean_problem((train[0].reshape(300, 2, 3), train[1]), val)
    with pytest.raises(TypeError, match="labels int64"):
        hyperclean_problem((train[0], train[1].double()), val)
    with pytest.raises(ValueError, match=r"l2=-1.0 must be a non-negative number"):
        hyperclean_problem(train, val, l2=-1.0)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_corruption_fraction_outside_unit_interval_is_refused_before_reading(fraction, tmp_path):
    with pytest.raises(ValueError, match=rf"corruption={fraction} is the fraction .* must lie in \[0, 1\)"):
        mnist_hyperclean_splits(tmp_path, corruption=fraction)


@pytest.mark.data
def test_mnist_splits_sizes_corruption_and_errors():
    root = data_dir("mnist")
    s = mnist_hyperclean_splits(root, n_train=1000, n_val=300, n_test=200, corruption=0.5, seed=3)
    assert s.train[0].shape == (1000, 784) and s.val[0].shape == (300, 784) and s.test[0].shape == (200, 784)
    assert int(s.corrupted.sum()) == 500
    assert bool((s.train[1][s.corrupted] != s.clean_labels[s.corrupted]).all())
    assert bool((s.train[1][~s.corrupted] == s.clean_labels[~s.corrupted]).all())
    assert s.train[0].mean(0).abs().max() < 1e-5                          # centred by the training mean
    again = mnist_hyperclean_splits(root, n_train=1000, n_val=300, n_test=200, corruption=0.5, seed=3)
    assert torch.equal(again.train[1], s.train[1])
    with pytest.raises(ValueError, match=r"n_train \+ n_val = 58000 \+ 5000 = 63000 exceeds the 60000 examples"):
        mnist_hyperclean_splits(root, n_train=58000, n_val=5000)
    with pytest.raises(ValueError, match="n_test=20000 exceeds the 10000 MNIST test images"):
        mnist_hyperclean_splits(root, n_train=100, n_val=100, n_test=20000)
