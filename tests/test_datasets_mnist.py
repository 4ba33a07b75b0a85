"""Tests of the MNIST reader on small IDX files written here, of label noise and splits,
then of the real MNIST files when present."""

from __future__ import annotations

import gzip
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel.datasets.mnist import (
    MNIST_MEAN,
    MNIST_STD,
    corrupt_labels,
    load_mnist,
    train_val_split,
)
from tests._data import data_dir

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def _idx(magic: int, sizes: tuple[int, ...], payload: bytes) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(s.to_bytes(4, "big") for s in sizes)
    return header + payload


def _write(path: Path, data: bytes, gz: bool = True) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _toy(root: Path, n: int = 5, gz: bool = True, prefix: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Write n random images and labels 0..9 as IDX files; return them."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    _write(root / f"{prefix}-images-idx3-ubyte", _idx(0x803, (n, 28, 28), images.tobytes()), gz)
    _write(root / f"{prefix}-labels-idx1-ubyte", _idx(0x801, (n,), labels.tobytes()), gz)
    return images, labels


# ----------------------------------------------------------------------------- load_mnist


@pytest.mark.parametrize("gz", [True, False])
def test_load_toy_files(tmp_path, gz):
    images, labels = _toy(tmp_path, gz=gz)
    x, y = load_mnist(tmp_path)
    assert x.shape == (5, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    torch.testing.assert_close(x, torch.from_numpy(images).float() / 255)
    assert 0 <= x.min() and x.max() <= 1


def test_test_split_dtype_and_normalize(tmp_path):
    images, _ = _toy(tmp_path, n=3, prefix="t10k")
    x, _ = load_mnist(tmp_path, split="test", dtype=torch.float64, normalize=True)
    assert x.dtype == torch.float64
    expected = (torch.from_numpy(images).double() / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(x, expected)


def test_uncompressed_file_is_preferred(tmp_path):
    images, _ = _toy(tmp_path, n=2, gz=False)
    (tmp_path / f"{IMAGES}.gz").write_bytes(b"not gzip")  # would fail if it were read
    x, _ = load_mnist(tmp_path)
    torch.testing.assert_close(x, torch.from_numpy(images).float() / 255)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_mnist\(root=.*, split='train'\): no file "
                                                r".*train-images-idx3-ubyte\.gz .*Fix"):
        load_mnist(tmp_path)


def test_bad_magic_names_file_and_byte(tmp_path):
    _toy(tmp_path)
    path = _write(tmp_path / IMAGES, _idx(0x804, (5, 28, 28), bytes(5 * 784)))
    expected = (f"bad magic number 0x00000804 at byte 0 of {path}; "
                "expected 0x00000803 (IDX images)")
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_mnist(tmp_path)


def test_labels_file_with_images_magic(tmp_path):
    _toy(tmp_path)
    _write(tmp_path / LABELS, _idx(0x803, (5,), bytes(5)))
    with pytest.raises(ValueError, match=r"bad magic number 0x00000803 at byte 0 of "
                                         r".*labels-idx1-ubyte\.gz; expected 0x00000801"):
        load_mnist(tmp_path)


def test_bad_dimension(tmp_path):
    _toy(tmp_path)
    _write(tmp_path / IMAGES, _idx(0x803, (5, 27, 28), bytes(5 * 27 * 28)))
    with pytest.raises(ValueError, match=r"dimension 1 is 27 at byte 8 of .*; expected 28"):
        load_mnist(tmp_path)


def test_truncated_and_overlong_files(tmp_path):
    _toy(tmp_path)
    _write(tmp_path / IMAGES, _idx(0x803, (5, 28, 28), bytes(5 * 784 - 10)))
    with pytest.raises(ValueError, match=r"images-idx3-ubyte\.gz is truncated: the header .* "
                                         r"requires 3920 data bytes from byte 16 to byte 3936, "
                                         r"but the content ends at byte 3926"):
        load_mnist(tmp_path)
    _write(tmp_path / IMAGES, _idx(0x803, (5, 28, 28), bytes(5 * 784 + 3)))
    with pytest.raises(ValueError, match=r"has 3 extra bytes"):
        load_mnist(tmp_path)


def test_header_cut_short(tmp_path):
    _toy(tmp_path)
    _write(tmp_path / LABELS, b"\x00\x00\x08\x01\x00")
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte\.gz ends at byte 5, inside the "
                                         r"8-byte header"):
        load_mnist(tmp_path)


def test_corrupt_gzip(tmp_path):
    _toy(tmp_path)
    (tmp_path / f"{IMAGES}.gz").write_bytes(gzip.compress(bytes(100))[:-12])
    with pytest.raises(ValueError, match=r"cannot decompress .*images-idx3-ubyte\.gz"):
        load_mnist(tmp_path)


def test_label_out_of_range_names_index(tmp_path):
    _toy(tmp_path)
    _write(tmp_path / LABELS, _idx(0x801, (5,), bytes([1, 2, 3, 12, 4])))
    with pytest.raises(ValueError, match=r"label 12 at index 3 \(byte 11\) of .*; expected 0\.\.9"):
        load_mnist(tmp_path)


def test_count_mismatch_names_both_files(tmp_path):
    _toy(tmp_path)
    _write(tmp_path / LABELS, _idx(0x801, (4,), bytes(4)))
    with pytest.raises(ValueError, match=r"images-idx3-ubyte\.gz holds 5 images but "
                                         r".*labels-idx1-ubyte\.gz holds 4 labels"):
        load_mnist(tmp_path)


def test_bad_split_and_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'val'"):
        load_mnist(tmp_path, split="val")
    with pytest.raises(TypeError, match=r"dtype=torch\.uint8 must be a floating torch dtype"):
        load_mnist(tmp_path, dtype=torch.uint8)


# ----------------------------------------------------------------------------- corrupt_labels


@pytest.mark.parametrize("n, fraction", [(1000, 0.3), (10, 0.25), (7, 0.5), (100, 0.29), (50, 0.0)])
def test_corrupt_exact_fraction_and_all_changed(n, fraction):
    labels = torch.arange(n) % 10
    noisy, mask = corrupt_labels(labels, fraction, seed=1)
    assert mask.dtype == torch.bool and noisy.dtype == labels.dtype
    assert int(mask.sum()) == math.floor(fraction * n + 0.5)
    assert (noisy[mask] != labels[mask]).all() and (noisy[~mask] == labels[~mask]).all()
    assert ((0 <= noisy) & (noisy < 10)).all()
    assert torch.equal(labels, torch.arange(n) % 10)  # input untouched


def test_corrupt_is_deterministic_by_seed_and_generator():
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    a, mask_a = corrupt_labels(labels, 0.4, seed=3)
    b, mask_b = corrupt_labels(labels, 0.4, seed=3)
    c, _ = corrupt_labels(labels, 0.4, seed=4)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b) and not torch.equal(a, c)
    d, _ = corrupt_labels(labels, 0.4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, d)


def test_corrupt_new_class_is_uniform_over_wrong_classes():
    labels = torch.zeros(20000, dtype=torch.int64)
    noisy, mask = corrupt_labels(labels, 0.9, num_classes=4, seed=0)
    counts = torch.bincount(noisy[mask], minlength=4).tolist()
    assert counts[0] == 0
    assert all(abs(c - 6000) < 300 for c in counts[1:])  # 18000 / 3 each, > 6 sigma margin


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan"), True, "0.2"])
def test_corrupt_bad_fraction_names_value(fraction):
    with pytest.raises(ValueError, match=re.escape(f"fraction={fraction!r} must be a number in [0, 1)")):
        corrupt_labels(torch.zeros(4, dtype=torch.int64), fraction, seed=0)


def test_corrupt_bad_arguments():
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"labels\[1\] = 11 is outside 0\.\.9"):
        corrupt_labels(torch.tensor([0, 11]), 0.5, seed=0)
    with pytest.raises(ValueError, match=r"1-D integer tensor; got shape \(3,\) and dtype torch\.float32"):
        corrupt_labels(y.float(), 0.5, seed=0)
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 2"):
        corrupt_labels(y, 0.5, num_classes=1, seed=0)
    with pytest.raises(ValueError, match=r"exactly one of seed=<int> or generator"):
        corrupt_labels(y, 0.5)
    with pytest.raises(ValueError, match=r"exactly one of seed=<int> or generator"):
        corrupt_labels(y, 0.5, seed=0, generator=torch.Generator())


# ----------------------------------------------------------------------------- train_val_split


def test_split_partitions_and_is_seeded():
    train, val = train_val_split(100, 20, seed=0)
    assert train.dtype == val.dtype == torch.int64 and len(train) == 80 and len(val) == 20
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    assert torch.equal(train, train.sort().values)
    again, val_again = train_val_split(100, 20, 0)
    assert torch.equal(train, again) and torch.equal(val, val_again)
    assert not torch.equal(val, train_val_split(100, 20, seed=1)[1])


@pytest.mark.parametrize("n, val_size", [(10, 10), (10, 11), (10, 0), (10, -1), (1, 1)])
def test_split_bad_val_size(n, val_size):
    with pytest.raises(ValueError, match=re.escape(f"train_val_split(n={n}, val_size={val_size}): "
                                                   "val_size must satisfy 1 <= val_size < n")):
        train_val_split(n, val_size, seed=0)


def test_split_fractional_val_size_is_rejected():
    with pytest.raises(TypeError, match=r"val_size must be an int\. Fix: pass a count"):
        train_val_split(10, 0.2, seed=0)


# ----------------------------------------------------------------------------- real MNIST


def test_mnist_train_real():
    x, y = load_mnist(data_dir("mnist"), split="train")
    assert x.shape == (60000, 28, 28) and y.shape == (60000,)
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(y, minlength=10).tolist() == counts
    assert abs(x.double().mean().item() - 0.13066) < 1e-5
    assert abs(x.double().std().item() - 0.30811) < 1e-5
    assert x.min() == 0 and x.max() == 1


def test_mnist_test_real():
    x, y = load_mnist(data_dir("mnist"), split="test")
    assert x.shape == (10000, 28, 28)
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert torch.bincount(y, minlength=10).tolist() == counts
