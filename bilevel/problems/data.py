"""The real-data splits of the two HPO problems: a9a for logistic regression, noisy MNIST for hyper-cleaning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..datasets.libsvm import labels_to_01, load_a9a
from ..datasets.mnist import corrupt_labels, load_mnist, train_val_split

Pair = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Splits:
    """Train / validation / test pairs ``(features, labels)``; ``corrupted`` flags the training labels
    that were changed (hyper-cleaning only) and ``clean_labels`` holds their true values."""

    train: Pair
    val: Pair
    test: Pair
    corrupted: Tensor | None = None
    clean_labels: Tensor | None = None


def _count(value: object, name: str, call: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{call}: {name}={value!r} must be an integer >= {low}.")
    return value


def _check_sizes(n_train: int, n_val: int, available: int, call: str, source: str) -> None:
    _count(n_train, "n_train", call)
    _count(n_val, "n_val", call)
    if n_train + n_val > available:
        raise ValueError(f"{call}: n_train + n_val = {n_train} + {n_val} = {n_train + n_val} exceeds the "
                         f"{available} examples of {source}. Fix: lower n_train or n_val so that they fit "
                         f"(n_val <= {max(available - n_train, 0)} with this n_train).")


def a9a_splits(root: str | Path, *, n_train: int = 5000, n_val: int = 20000, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> Splits:
    """a9a: disjoint random training and validation subsets of the LIBSVM training file (32,561 rows),
    and the whole test file ``a9a.t`` (16,281 rows) as the test set; dense features, labels in {0, 1}.

    Example:
        >>> s = a9a_splits("../shared/data/a9a", n_train=5000, n_val=20000)  # doctest: +SKIP
        >>> s.train[0].shape, s.test[0].shape  # doctest: +SKIP
        (torch.Size([5000, 123]), torch.Size([16281, 123]))
    """
    call = f"a9a_splits(n_train={n_train!r}, n_val={n_val!r})"
    x, y = load_a9a(root, "train", dtype=dtype)
    _check_sizes(n_train, n_val, len(y), call, f"{Path(root) / 'a9a'}")
    xt, yt = load_a9a(root, "test", dtype=dtype)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[n_val:n_val + n_train], perm[:n_val]
    y01 = labels_to_01(y)
    return Splits(train=(x[tr], y01[tr]), val=(x[va], y01[va]), test=(xt, labels_to_01(yt)))


def mnist_hyperclean_splits(root: str | Path, *, n_train: int = 20000, n_val: int = 5000, n_test: int = 10000,
                            corruption: float = 0.5, seed: int = 0, center: bool = True,
                            dtype: torch.dtype = torch.float32) -> Splits:
    """Noisy MNIST for data hyper-cleaning.

    ``n_train`` training and ``n_val`` validation images are drawn (disjoint, seeded) from the
    60,000 official training images, ``n_test`` test images are the first of the official test
    set. A ``corruption`` fraction of the *training* labels is replaced by a uniformly drawn
    wrong class (:func:`bilevel.datasets.mnist.corrupt_labels`); validation and test stay clean.
    Pixels are scaled to [0, 1], flattened to 784 features and, with ``center=True``, the mean
    training image is subtracted (it keeps the inner problem well conditioned).

    Raises:
        ValueError: ``corruption`` outside [0, 1), non-positive sizes, ``n_train + n_val`` above
            60,000 or ``n_test`` above 10,000; the message names the option and the fix.
    """
    call = (f"mnist_hyperclean_splits(n_train={n_train!r}, n_val={n_val!r}, n_test={n_test!r}, "
            f"corruption={corruption!r})")
    if isinstance(corruption, bool) or not isinstance(corruption, (int, float)) or not 0 <= corruption < 1:
        raise ValueError(f"{call}: corruption={corruption!r} is the fraction of training labels to corrupt and "
                         "must lie in [0, 1). Fix: pass e.g. corruption=0.5 (half of the labels wrong).")
    _count(n_test, "n_test", call)
    x, y = load_mnist(root, "train", dtype=dtype)
    _check_sizes(n_train, n_val, len(y), call, "the MNIST training set")
    xt, yt = load_mnist(root, "test", dtype=dtype)
    if n_test > len(yt):
        raise ValueError(f"{call}: n_test={n_test} exceeds the {len(yt)} MNIST test images. Fix: n_test <= {len(yt)}.")
    gen = torch.Generator().manual_seed(seed)
    rest, va = train_val_split(len(y), n_val, generator=gen)
    tr = rest[torch.randperm(len(rest), generator=gen)[:n_train]]
    x, xt = x.reshape(len(x), -1), xt[:n_test].reshape(n_test, -1)
    mean = x[tr].mean(0) if center else torch.zeros_like(x[0])
    noisy, corrupted = corrupt_labels(y[tr], float(corruption), generator=gen)
    return Splits(train=(x[tr] - mean, noisy), val=(x[va] - mean, y[va]), test=(xt - mean, yt[:n_test]),
                  corrupted=corrupted, clean_labels=y[tr])
