"""Reader for LIBSVM / svmlight sparse text files, and the a9a data set.

The format is one sample per line::

    <label> <index>:<value> <index>:<value> ...

with 1-based feature indices, any amount of whitespace (a trailing space is
usual), ``#`` starting a comment that runs to the end of the line, and blank
lines ignored. Absent features are zero.

Parsing is vectorised: the tokens are split in one pass of Python string
methods and converted by NumPy. When that fast path meets anything it cannot
convert, a line-by-line parser runs instead; it accepts the same files and
reports the first bad line with its number and the offending token.

Reference: T. Joachims, SVMlight (svmlight.joachims.org), input file format;
C.-C. Chang and C.-J. Lin, LIBSVM data sets,
www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary.html#a9a.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["A9A_FEATURES", "labels_to_01", "load_a9a", "load_libsvm"]

#: Number of features of a9a. The test file ``a9a.t`` only uses indices up to 122.
A9A_FEATURES = 123
_A9A_FILES = {"train": "a9a", "test": "a9a.t"}
# Indices above this are rejected even when n_features is inferred: a dense matrix that wide
# could not be allocated, and NumPy saturates int64 overflow to 2**63 - 1 silently.
_MAX_INDEX = 2**40


@dataclass(frozen=True)
class _Tokens:
    """Whitespace-split content of a file: one label token per sample, feature tokens flat."""

    path: Path
    call: str
    line_numbers: list[int]  # 1-based line number of each sample
    labels: list[str]
    features: list[str]  # "<index>:<value>" tokens of all samples, in order
    counts: list[int]  # number of feature tokens of each sample


@dataclass(frozen=True)
class _Parsed:
    """Parsed arrays: labels (n,), and the nonzeros as (row, 0-based col, value)."""

    labels: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray


def _tokenize(path: Path, call: str) -> _Tokens:
    """Read ``path`` and split every non-blank, non-comment line into tokens."""
    if not path.is_file():
        raise FileNotFoundError(f"{call}: no file {path}. Fix: pass the path of a LIBSVM text file "
                                "('<label> <index>:<value> ...' per line).")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{call}: byte {err.start} (line {line}) of {path} is not UTF-8 text "
                         f"({data[err.start:err.start + 1]!r}); is this a binary or compressed "
                         "file? Fix: decompress it or pass the LIBSVM text file.") from None
    has_comments = "#" in text
    numbers: list[int] = []
    labels: list[str] = []
    features: list[str] = []
    counts: list[int] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if has_comments:
            line = line.split("#", 1)[0]
        parts = line.split()
        if parts:
            numbers.append(number)
            labels.append(parts[0])
            features += parts[1:]
            counts.append(len(parts) - 1)
    if not labels:
        raise ValueError(f"{call}: {path} holds no samples (only blank or comment lines). "
                         "Fix: check that the path points at the data file.")
    return _Tokens(path, call, numbers, labels, features, counts)


def _numbers(strings: list[str], dtype: type) -> np.ndarray | None:
    """Convert strings to an array in one NumPy call; None if any string does not convert."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            out = np.fromstring(" ".join(strings), dtype=dtype, sep=" ")
        except (ValueError, DeprecationWarning):
            return None
    return out if out.size == len(strings) else None


def _parse_fast(tok: _Tokens) -> _Parsed | None:
    """Vectorised parse; None when some token needs the careful parser."""
    joined = " ".join(tok.features)
    if joined.count(":") != len(tok.features):
        return None
    pieces = joined.replace(":", " ").split()
    if len(pieces) != 2 * len(tok.features):
        return None
    labels = _numbers(tok.labels, np.float64)
    indices = _numbers(pieces[0::2], np.int64)
    values = _numbers(pieces[1::2], np.float64)
    if labels is None or indices is None or values is None:
        return None
    rows = np.repeat(np.arange(len(tok.labels), dtype=np.int64), tok.counts)
    return _Parsed(labels, rows, indices - 1, values)


def _parse_slow(tok: _Tokens) -> _Parsed:
    """Line-by-line parse that raises on the first malformed label or token."""
    labels: list[float] = []
    cols: list[int] = []
    values: list[float] = []
    start = 0
    for number, label, count in zip(tok.line_numbers, tok.labels, tok.counts):
        where = f"{tok.call}: line {number} of {tok.path}"
        try:
            labels.append(float(label))
        except ValueError:
            hint = " (the line seems to have no label)" if ":" in label else ""
            raise ValueError(f"{where}: label {label!r} is not a number{hint}. Fix: start each "
                             "line with a numeric label such as +1, -1 or 3.") from None
        for token in tok.features[start:start + count]:
            index, sep, value = token.partition(":")
            try:
                # The same language as the fast path: ASCII, no "1_000" digit separators.
                if not (sep and index.lstrip("+-").isdigit() and (index + value).isascii()
                        and "_" not in value):
                    raise ValueError
                cols.append(min(int(index), _MAX_INDEX + 1) - 1)
                values.append(float(value))
            except ValueError:
                raise ValueError(f"{where}: cannot parse token {token!r}; expected "
                                 "<index>:<value> such as '3:1.5' (integer index >= 1, numeric "
                                 "value, no spaces around ':'). Fix: correct or remove the "
                                 "token.") from None
        start += count
    rows = np.repeat(np.arange(len(labels), dtype=np.int64), tok.counts)
    return _Parsed(np.array(labels), rows, np.array(cols, dtype=np.int64), np.array(values))


def _token_at(tok: _Tokens, parsed: _Parsed, position: int) -> tuple[int, str]:
    """Line number and text of the ``position``-th feature token."""
    return tok.line_numbers[int(parsed.rows[position])], tok.features[position]


def _check(tok: _Tokens, parsed: _Parsed, n_features: int | None) -> tuple[int, np.ndarray]:
    """Validate labels, values and indices.

    Returns the number of features and the permutation that sorts the nonzeros by (row, col).
    """
    bad = np.flatnonzero(~np.isfinite(parsed.labels))
    if bad.size:
        line, label = tok.line_numbers[bad[0]], tok.labels[bad[0]]
        raise ValueError(f"{tok.call}: line {line} of {tok.path}: label {label!r} is not finite. "
                         "Fix: remove the sample or give it a finite label.")
    bad = np.flatnonzero(~np.isfinite(parsed.values))
    if bad.size:
        line, token = _token_at(tok, parsed, bad[0])
        raise ValueError(f"{tok.call}: line {line} of {tok.path}: value in token {token!r} is not "
                         "finite. Fix: impute or remove the entry before loading.")
    bad = np.flatnonzero(parsed.cols < 0)
    if bad.size:
        line, token = _token_at(tok, parsed, bad[0])
        raise ValueError(f"{tok.call}: line {line} of {tok.path}: index in token {token!r} is < 1; "
                         "LIBSVM indices are 1-based. Fix: add 1 to every index if the file is "
                         "0-based.")
    limit = _MAX_INDEX if n_features is None else n_features
    bad = np.flatnonzero(parsed.cols >= limit)
    if bad.size:
        line, token = _token_at(tok, parsed, bad[0])
        fix = (f"pass n_features >= {token.partition(':')[0]}, or n_features=None to infer it"
               if n_features is not None else "check the file; such a wide matrix cannot be built")
        raise ValueError(f"{tok.call}: line {line} of {tok.path}: index in token {token!r} is "
                         f"larger than n_features={limit}. Fix: {fix}.")
    order = np.lexsort((parsed.cols, parsed.rows))
    rows, cols = parsed.rows[order], parsed.cols[order]
    dup = np.flatnonzero((rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1]))
    if dup.size:
        line, token = _token_at(tok, parsed, order[dup[0] + 1])
        raise ValueError(f"{tok.call}: line {line} of {tok.path}: index in token {token!r} appears "
                         "twice on the line. Fix: keep one entry per index.")
    d = n_features if n_features is not None else int(parsed.cols.max(initial=-1)) + 1
    return d, order


def _to_tensor(parsed: _Parsed, order: np.ndarray, shape: tuple[int, int], dtype: torch.dtype,
               sparse: bool) -> Tensor:
    """Dense (n, d) tensor, or CSR with column indices sorted within each row by ``order``."""
    values = torch.from_numpy(parsed.values).to(dtype)
    if not sparse:
        X = torch.zeros(shape, dtype=dtype)
        X[torch.from_numpy(parsed.rows), torch.from_numpy(parsed.cols)] = values
        return X
    index = torch.from_numpy(order)
    crow = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(parsed.rows, minlength=shape[0]), out=crow[1:])
    with warnings.catch_warnings():  # torch warns that CSR support is "in beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(parsed.cols)[index],
                                       values[index], size=shape, dtype=dtype,
                                       check_invariants=False)  # sorted and in range by _check


def _load(path: Path, n_features: int | None, dtype: torch.dtype, sparse: bool,
          call: str) -> tuple[Tensor, Tensor]:
    """Validate the options, then tokenize, parse, check and build; ``call`` prefixes errors."""
    if n_features is not None and (isinstance(n_features, bool) or not isinstance(n_features, int)
                                   or n_features < 1):
        raise ValueError(f"{call}: n_features={n_features!r} must be a positive int or None. "
                         "Fix: pass the number of features (e.g. 123 for a9a) or None to infer it.")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{call}: dtype={dtype!r} must be a floating torch dtype. "
                        "Fix: pass dtype=torch.float32 or torch.float64.")
    tok = _tokenize(path, call)
    parsed = _parse_fast(tok) or _parse_slow(tok)
    d, order = _check(tok, parsed, n_features)
    X = _to_tensor(parsed, order, (len(tok.labels), d), dtype, sparse)
    return X, torch.from_numpy(parsed.labels).to(dtype)


def load_libsvm(path: str | Path, n_features: int | None = None, dtype: torch.dtype = torch.float32,
                sparse: bool = False) -> tuple[Tensor, Tensor]:
    """Read a LIBSVM / svmlight text file into ``(X, y)``.

    Args:
        path: the text file; lines ``<label> <index>:<value> ...`` with 1-based indices.
        n_features: number of columns of ``X``. Default None infers it as the largest index
            in the file; pass it when a split may miss the last features (a9a.t).
        dtype: floating dtype of ``X`` and ``y``. Default ``torch.float32``.
        sparse: return ``X`` as a ``torch.sparse_csr`` tensor instead of a dense one.
            Default False.

    Returns:
        ``X`` of shape (n, n_features) and labels ``y`` of shape (n,), as written in the file
        (a9a keeps -1/+1; see :func:`labels_to_01`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a label that is not a number, a token that is not ``<index>:<value>``,
            an index < 1 or > n_features, a repeated index, or a non-finite number; the
            message names the file, the line number and the token.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "toy.svm"
        >>> _ = p.write_text("+1 1:0.5 3:2 \\n-1 2:1 \\n")
        >>> X, y = load_libsvm(p)
        >>> X.tolist(), y.tolist()
        ([[0.5, 0.0, 2.0], [0.0, 1.0, 0.0]], [1.0, -1.0])
    """
    path = Path(path)
    return _load(path, n_features, dtype, sparse, f"load_libsvm({str(path)!r})")


def load_a9a(root: str | Path, split: str = "train", dtype: torch.dtype = torch.float32,
             sparse: bool = False) -> tuple[Tensor, Tensor]:
    """Load the a9a (UCI Adult) binary classification set: 123 binary features, labels ±1.

    Train has 32,561 samples (7,841 positive), test 16,281 (3,846 positive). ``n_features``
    is fixed to 123 because ``a9a.t`` never uses index 123.

    Args:
        root: folder holding ``a9a`` (train) and ``a9a.t`` (test) from the LIBSVM site.
        split: ``'train'`` (default) or ``'test'``.
        dtype: floating dtype of ``X`` and ``y``. Default ``torch.float32``.
        sparse: return ``X`` as a CSR tensor. Default False.

    Example:
        >>> X, y = load_a9a("/data/a9a")  # doctest: +SKIP
        >>> X.shape, int((y > 0).sum())  # doctest: +SKIP
        (torch.Size([32561, 123]), 7841)

    Reference: J. Platt, "Fast training of support vector machines using sequential minimal
    optimization" (1998); LIBSVM data sets, binary.html#a9a.
    """
    call = f"load_a9a(root={str(root)!r}, split={split!r})"
    if split not in _A9A_FILES:
        raise ValueError(f"{call}: unknown split {split!r}. Fix: pass split='train' or 'test'.")
    path = Path(root) / _A9A_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"{call}: no file {path}. Fix: pass the folder holding a9a and "
                                "a9a.t (LIBSVM format).")
    return _load(path, A9A_FEATURES, dtype, sparse, call)


def labels_to_01(y: Tensor) -> Tensor:
    """Map binary labels -1/+1 to 0/1 (same dtype), as logistic losses on {0, 1} expect.

    Example:
        >>> labels_to_01(torch.tensor([-1.0, 1.0, 1.0])).tolist()
        [0.0, 1.0, 1.0]
    """
    bad = torch.nonzero(~((y == 1) | (y == -1)))
    if bad.numel():
        index = tuple(bad[0].tolist())
        raise ValueError(f"labels_to_01(y): y{list(index)} = {y[index].item()!r}; expected only "
                         "-1 and +1. Fix: pass binary ±1 labels (multi-class labels need their "
                         "own encoding).")
    return (y > 0).to(y.dtype)
