"""MNIST from its IDX files, label noise, and a seeded train/validation split.

IDX (LeCun et al.) is big-endian: a 4-byte magic number ``0x000008nd`` (``08`` = unsigned
bytes, ``nd`` = number of dimensions), ``nd`` int32 sizes, then the data, row-major. Images
are ``0x00000803`` with sizes (n, 28, 28); labels ``0x00000801`` with size (n,). Files may
be gzip-compressed (``.gz``, as distributed) or not.

:func:`corrupt_labels` and :func:`train_val_split` build the noisy-label data
hyper-cleaning benchmark of bilevel optimisation (Franceschi et al., 2017).

Reference: Y. LeCun, C. Cortes, C. Burges, "The MNIST database of handwritten digits",
yann.lecun.com/exdb/mnist (file format at the bottom of the page).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["MNIST_MEAN", "MNIST_STD", "corrupt_labels", "load_mnist", "train_val_split"]

#: Mean and standard deviation of the training pixels in [0, 1] (0.13066, 0.30811 rounded),
#: the constants ``normalize=True`` uses for both splits.
MNIST_MEAN = 0.1307
#: Standard deviation of the training pixels in [0, 1]; see ``MNIST_MEAN``.
MNIST_STD = 0.3081
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801
_PREFIX = {"train": "train", "test": "t10k"}
_FIX_FILE = "Fix: re-download the file (md5 sums in the data set's SOURCE.md)."


def _find(root: Path, stem: str, call: str) -> Path:
    """``root/stem`` if present (uncompressed, faster), else ``root/stem.gz``."""
    for path in (root / stem, root / f"{stem}.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{call}: no file {root / stem}.gz (nor uncompressed {stem}). Fix: "
                            "pass the folder holding the four MNIST IDX files (train-images-idx3-"
                            "ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...) from "
                            "yann.lecun.com/exdb/mnist.")


def _read_idx(path: Path, magic: int, what: str, dims: tuple[int | None, ...],
              call: str) -> np.ndarray:
    """Validated uint8 array of an IDX file; ``None`` in ``dims`` accepts any size.

    Byte offsets in messages count bytes of the decompressed content.
    """
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{call}: cannot decompress {path} ({err}). {_FIX_FILE}") from None
    header = 4 * (1 + len(dims))
    if len(data) < header:
        raise ValueError(f"{call}: {path} ends at byte {len(data)}, inside the {header}-byte "
                         f"header of IDX {what}. {_FIX_FILE}")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{call}: bad magic number 0x{found:08x} at byte 0 of {path}; expected "
                         f"0x{magic:08x} (IDX {what}). Fix: check that the file is the MNIST "
                         f"{what} file of the split (images 0x00000803, labels 0x00000801).")
    shape = tuple(int.from_bytes(data[4 * i:4 * i + 4], "big") for i in range(1, 1 + len(dims)))
    for i, (size, want) in enumerate(zip(shape, dims)):
        if want is not None and size != want:
            raise ValueError(f"{call}: dimension {i} is {size} at byte {4 * (1 + i)} of {path}; "
                             f"expected {want} for MNIST {what}. {_FIX_FILE}")
    need = math.prod(shape)
    if len(data) - header != need:
        problem = ("is truncated" if len(data) - header < need
                   else f"has {len(data) - header - need} extra bytes")
        raise ValueError(f"{call}: {path} {problem}: the header (sizes {shape}) requires "
                         f"{need} data bytes from byte {header} to byte {header + need}, but the "
                         f"content ends at byte {len(data)}. {_FIX_FILE}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(root: str | Path, split: str = "train", dtype: torch.dtype = torch.float32,
               normalize: bool = False) -> tuple[Tensor, Tensor]:
    """Load MNIST images and labels from the IDX files in ``root``.

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` uncompressed if present, else the
    ``.gz`` file, and checks magic numbers, dimensions, byte lengths, labels in 0..9 and that
    both files hold the same number of samples.

    Args:
        root: folder holding the IDX files.
        split: ``'train'`` (60,000 samples, default) or ``'test'`` (10,000).
        dtype: floating dtype of the images. Default ``torch.float32``.
        normalize: if True return ``(x - MNIST_MEAN) / MNIST_STD`` (training-set constants,
            for both splits); default False returns pixels ``x`` in [0, 1].

    Returns:
        images of shape (n, 28, 28) and int64 labels of shape (n,).

    Example:
        >>> images, labels = load_mnist("/data/mnist")  # doctest: +SKIP
        >>> images.shape, labels.bincount()[0].item()  # doctest: +SKIP
        (torch.Size([60000, 28, 28]), 5923)
    """
    call = f"load_mnist(root={str(root)!r}, split={split!r})"
    if split not in _PREFIX:
        raise ValueError(f"{call}: unknown split {split!r}. Fix: pass split='train' or 'test'.")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{call}: dtype={dtype!r} must be a floating torch dtype. "
                        "Fix: pass dtype=torch.float32 or torch.float64.")
    images_path = _find(Path(root), f"{_PREFIX[split]}-images-idx3-ubyte", call)
    labels_path = _find(Path(root), f"{_PREFIX[split]}-labels-idx1-ubyte", call)
    images = _read_idx(images_path, _IMAGES_MAGIC, "images", (None, 28, 28), call)
    labels = _read_idx(labels_path, _LABELS_MAGIC, "labels", (None,), call)
    if len(images) != len(labels):
        raise ValueError(f"{call}: {images_path} holds {len(images)} images but {labels_path} "
                         f"holds {len(labels)} labels. Fix: use the images and labels files of "
                         "the same split, re-downloaded if need be.")
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{call}: label {labels[i]} at index {i} (byte {8 + i}) of {labels_path}; "
                         f"expected 0..9. {_FIX_FILE}")
    x = torch.from_numpy(images.copy()).to(dtype).div_(255)
    if normalize:
        x = x.sub_(MNIST_MEAN).div_(MNIST_STD)
    return x, torch.from_numpy(labels.astype(np.int64))


def _generator(seed: int | None, generator: torch.Generator | None, call: str) -> torch.Generator:
    """The CPU generator to draw from: a fresh one seeded by ``seed``, or ``generator``."""
    if (seed is None) == (generator is None):
        raise ValueError(f"{call}: pass exactly one of seed=<int> or generator=<torch.Generator> "
                         "(got both or neither); randomness is explicit here.")
    if generator is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{call}: seed={seed!r} must be an int. Fix: pass e.g. seed=0.")
        return torch.Generator().manual_seed(seed)
    if generator.device.type != "cpu":
        raise ValueError(f"{call}: generator is on {generator.device}; expected a CPU generator. "
                         "Fix: pass torch.Generator() (results are moved to the labels' device).")
    return generator


def corrupt_labels(labels: Tensor, fraction: float, num_classes: int = 10, seed: int | None = None,
                   *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replace a random ``fraction`` of the labels by a uniformly drawn *different* class.

    Exactly ``k = round(fraction * n)`` samples, drawn without replacement, are corrupted;
    each gets ``(y + u) mod num_classes`` with ``u`` uniform in ``1..num_classes-1``, i.e. a
    class drawn uniformly among the ``num_classes - 1`` wrong ones, so every corrupted label
    is wrong (unlike "uniform over all classes" noise, where about 1/num_classes of the
    draws keep the true label). The same seed gives the same result.

    Args:
        labels: 1-D integer tensor with values in ``0..num_classes-1``.
        fraction: share of samples to corrupt, in [0, 1).
        num_classes: number of classes, >= 2. Default 10.
        seed: int seed of a fresh CPU generator; or pass ``generator`` instead (exactly one).
        generator: a CPU ``torch.Generator`` to draw from (advances its state).

    Returns:
        ``(noisy_labels, corrupted_mask)``: a new tensor like ``labels``, and a bool mask
        that is True exactly where the label was changed.

    Example:
        >>> y = torch.arange(10)
        >>> noisy, mask = corrupt_labels(y, 0.3, seed=0)
        >>> int(mask.sum()), bool((noisy[mask] != y[mask]).all())
        (3, True)
        >>> bool((noisy[~mask] == y[~mask]).all())
        True

    Reference: L. Franceschi et al., "Forward and reverse gradient-based hyperparameter
    optimization", ICML 2017, Sec. 5.1 (data hyper-cleaning).
    """
    call = f"corrupt_labels(labels, fraction={fraction!r}, num_classes={num_classes!r})"
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{call}: num_classes must be an int >= 2. "
                         "Fix: pass e.g. num_classes=10.")
    is_number = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
    if not (is_number and 0 <= fraction < 1):
        raise ValueError(f"{call}: fraction={fraction!r} must be a number in [0, 1). "
                         "Fix: pass e.g. fraction=0.5 to corrupt half of the labels.")
    integer = not (labels.dtype.is_floating_point or labels.dtype.is_complex
                   or labels.dtype == torch.bool)
    if labels.dim() != 1 or not integer:
        raise ValueError(f"{call}: labels must be a 1-D integer tensor; got shape "
                         f"{tuple(labels.shape)} and dtype {labels.dtype}. Fix: pass class "
                         "indices, e.g. labels.long().flatten().")
    bad = torch.nonzero((labels < 0) | (labels >= num_classes)).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{call}: labels[{i}] = {int(labels[i])} is outside 0..{num_classes - 1}. "
                         "Fix: pass the right num_classes or map the labels to 0..num_classes-1.")
    g = _generator(seed, generator, call)
    n = labels.numel()
    chosen = torch.randperm(n, generator=g)[:math.floor(fraction * n + 0.5)]
    shift = torch.randint(1, num_classes, (chosen.numel(),), generator=g)
    chosen, shift = chosen.to(labels.device), shift.to(labels.device, labels.dtype)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool, device=labels.device)
    mask[chosen] = True
    return noisy, mask


def train_val_split(n: int, val_size: int, seed: int | None = None, *,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Split ``range(n)`` at random into training and validation indices.

    Args:
        n: number of samples.
        val_size: number of validation samples, ``1 <= val_size < n``.
        seed: int seed of a fresh CPU generator; or pass ``generator`` instead (exactly one).
        generator: a CPU ``torch.Generator`` to draw from.

    Returns:
        ``(train_idx, val_idx)``: int64 tensors of sizes ``n - val_size`` and ``val_size``,
        disjoint, covering ``range(n)``, each in increasing order (shuffle batches separately).

    Example:
        >>> train_idx, val_idx = train_val_split(10, 3, seed=0)
        >>> len(train_idx), len(val_idx)
        (7, 3)
        >>> sorted(train_idx.tolist() + val_idx.tolist()) == list(range(10))
        True
    """
    call = f"train_val_split(n={n!r}, val_size={val_size!r})"
    for name, value in (("n", n), ("val_size", val_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{call}: {name} must be an int. Fix: pass a count, e.g. "
                            "val_size=round(0.1 * n).")
    if not 1 <= val_size < n:
        raise ValueError(f"{call}: val_size must satisfy 1 <= val_size < n so that both parts are "
                         f"non-empty. Fix: pass a val_size between 1 and {max(n - 1, 1)} "
                         "(and n >= 2).")
    perm = torch.randperm(n, generator=_generator(seed, generator, call))
    return perm[val_size:].sort().values, perm[:val_size].sort().values
