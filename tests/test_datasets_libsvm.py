"""Tests of the LIBSVM reader: small files written here, then the real a9a when present."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.datasets import libsvm
from bilevel.datasets.libsvm import A9A_FEATURES, labels_to_01, load_a9a, load_libsvm
from tests._data import data_dir


def _write(tmp_path: Path, text: str, name: str = "data.svm") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- parsing


def test_dense_values_labels_and_inferred_width(tmp_path):
    path = _write(tmp_path, "+1 1:0.5 3:2 \n-1 2:1e-3 \n0 4:-7\n")
    X, y = load_libsvm(path)
    assert X.dtype == torch.float32 and y.dtype == torch.float32
    expected = [[0.5, 0, 2, 0], [0, 1e-3, 0, 0], [0, 0, 0, -7]]
    torch.testing.assert_close(X, torch.tensor(expected))
    assert y.tolist() == [1.0, -1.0, 0.0]


def test_comments_blank_lines_crlf_tabs_and_label_only_rows(tmp_path):
    text = "# header comment\n\n+1 2:1 # trailing comment\r\n   \n-1\t1:3\t\n  # indented\n2\n"
    X, y = load_libsvm(_write(tmp_path, text), dtype=torch.float64)
    assert X.dtype == torch.float64 and y.dtype == torch.float64
    assert X.tolist() == [[0, 1], [3, 0], [0, 0]]
    assert y.tolist() == [1, -1, 2]


def test_n_features_pads_missing_columns(tmp_path):
    X, _ = load_libsvm(_write(tmp_path, "1 1:1\n-1 2:1\n"), n_features=5)
    assert X.shape == (2, 5) and X[:, 2:].abs().sum() == 0


def test_sparse_csr_matches_dense_and_sorts_columns(tmp_path):
    path = _write(tmp_path, "1 5:2 1:1 3:4\n-1\n1 2:-1\n")
    dense, y = load_libsvm(path, n_features=6)
    X, y_sparse = load_libsvm(path, n_features=6, sparse=True)
    assert X.layout == torch.sparse_csr and X.shape == (3, 6)
    assert X.crow_indices().tolist() == [0, 3, 3, 4]
    assert X.col_indices().tolist() == [0, 2, 4, 1]
    assert torch.equal(X.to_dense(), dense) and torch.equal(y, y_sparse)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([-1.0, 1.0, 0.0, 2.5]),
            st.dictionaries(st.integers(1, 12), st.floats(-1e3, 1e3, allow_nan=False), max_size=6),
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from([" ", "  ", "\t"]),
    st.booleans(),
)
def test_roundtrip_and_fast_equals_careful_parser(tmp_path_factory, rows, sep, comments):
    lines = []
    for label, feats in rows:
        tokens = [repr(label)] + [f"{j}:{v!r}" for j, v in feats.items()]
        lines.append(sep.join(tokens) + (" # c" if comments else " "))
    path = _write(tmp_path_factory.mktemp("rt"), "\n".join(lines) + "\n")
    X, y = load_libsvm(path, n_features=12, dtype=torch.float64)
    for i, (label, feats) in enumerate(rows):
        assert y[i].item() == label
        assert X[i].tolist() == [feats.get(j, 0.0) for j in range(1, 13)]
    tok = libsvm._tokenize(path, "test")
    fast, slow = libsvm._parse_fast(tok), libsvm._parse_slow(tok)
    assert fast is not None
    for name in ("labels", "rows", "cols", "values"):
        assert getattr(fast, name).tolist() == getattr(slow, name).tolist()


def test_labels_to_01():
    y = torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64)
    out = labels_to_01(y)
    assert out.dtype == torch.float64 and out.tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=re.escape("labels_to_01(y): y[1] = 0.0; expected only -1")):
        labels_to_01(torch.tensor([1.0, 0.0]))


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"load_libsvm\(.*: no file .*nope\.svm\. Fix"):
        load_libsvm(tmp_path / "nope.svm")


def test_load_a9a_missing_file_names_folder_and_fix(tmp_path):
    expected = (f"load_a9a(root='{tmp_path}', split='train'): no file {tmp_path / 'a9a'}. "
                "Fix: pass the folder holding a9a and a9a.t (LIBSVM format)")
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        load_a9a(tmp_path)


def test_load_a9a_bad_split(tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'val'.*split='train' or 'test'"):
        load_a9a(tmp_path, split="val")


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("1 1:1\n1 2:1 3-1\n", r"line 2 of .*data\.svm: cannot parse token '3-1'"),
        ("1 1:1\n\n1 x:1\n", r"line 3 of .*: cannot parse token 'x:1'"),
        ("1 1:1\n1 2:\n", r"line 2 of .*: cannot parse token '2:'"),
        ("1 1:1\n1 2:1:3\n", r"line 2 of .*: cannot parse token '2:1:3'"),
        ("1 1:1\n1 2:abc\n", r"line 2 of .*: cannot parse token '2:abc'"),
        ("1 1:1\n1 1.5:1\n", r"line 2 of .*: cannot parse token '1.5:1'"),
        ("1 1:1\n1 2:1_0\n", r"line 2 of .*: cannot parse token '2:1_0'"),
        ("1 1:1\n1 2:\uff11\n", r"line 2 of .*: cannot parse token '2:\uff11'"),
        ("# c\nyes 1:1\n", r"line 2 of .*: label 'yes' is not a number\. Fix"),
        ("1 1:1\n3:1 4:1\n", r"line 2 of .*: label '3:1' is not a number \(the line seems to have no label\)"),
        ("1 1:1\nnan 1:1\n", r"line 2 of .*: label 'nan' is not finite"),
        ("1 1:1\n1 2:inf\n", r"line 2 of .*: value in token '2:inf' is not finite"),
        ("1 1:1\n-1 0:1\n", r"line 2 of .*: index in token '0:1' is < 1; LIBSVM indices are 1-based"),
        ("1 1:1 2:3 1:2\n", r"line 1 of .*: index in token '1:2' appears twice"),
        ("1 99999999999999999999999:1\n", r"line 1 of .*: index in token '9+:1' is larger than"),
        ("# only a comment\n\n", r".*data\.svm holds no samples \(only blank or comment lines\)"),
    ],
)
def test_malformed_files_name_line_and_token(tmp_path, text, pattern):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=r"load_libsvm\('.*data\.svm'\): " + pattern):
        load_libsvm(path)


def test_careful_parser_also_caps_huge_indices(tmp_path):
    # "x" sends the file to the line-by-line parser, which must not build a huge matrix either.
    path = _write(tmp_path, "1 99999999999999999999999:1\nx 1:1\n")
    with pytest.raises(ValueError, match=r"line 2 of .*: label 'x' is not a number"):
        load_libsvm(path)
    tok = libsvm._tokenize(_write(tmp_path, "1 99999999999999999999999:1 +2:1\n"), "test")
    with pytest.raises(ValueError, match=r"line 1 of .*: index in token '9+:1' is larger than "
                                         r"n_features=1099511627776"):
        libsvm._check(tok, libsvm._parse_slow(tok), None)


def test_index_above_n_features_names_line_token_and_fix(tmp_path):
    path = _write(tmp_path, "1 1:1\n1 2:1\n-1 7:1\n")
    with pytest.raises(ValueError, match=r"line 3 of .*: index in token '7:1' is larger than "
                                         r"n_features=5\. Fix: pass n_features >= 7"):
        load_libsvm(path, n_features=5)


def test_not_utf8_names_byte_and_line(tmp_path):
    path = tmp_path / "data.svm"
    path.write_bytes(b"1 1:1\n1 \xff\xfe\n")
    with pytest.raises(ValueError, match=r"byte 8 \(line 2\) of .* is not UTF-8"):
        load_libsvm(path)


@pytest.mark.parametrize("n_features", [0, -3, 2.0, True])
def test_bad_n_features(tmp_path, n_features):
    with pytest.raises(ValueError, match=r"n_features=.* must be a positive int or None"):
        load_libsvm(_write(tmp_path, "1 1:1\n"), n_features=n_features)


def test_bad_dtype(tmp_path):
    with pytest.raises(TypeError, match=r"dtype=torch\.int64 must be a floating torch dtype"):
        load_libsvm(_write(tmp_path, "1 1:1\n"), dtype=torch.int64)


# ----------------------------------------------------------------------------- real a9a


@pytest.mark.parametrize("split, n, positives", [("train", 32561, 7841), ("test", 16281, 3846)])
def test_a9a_real(split, n, positives):
    root = data_dir("a9a")
    X, y = load_a9a(root, split=split)
    assert X.shape == (n, A9A_FEATURES) and y.shape == (n,)
    assert int((y == 1).sum()) == positives and int((y == -1).sum()) == n - positives
    assert set(X.unique().tolist()) == {0.0, 1.0}
    assert labels_to_01(y).sum().item() == positives
    Xs, ys = load_a9a(root, split=split, sparse=True, dtype=torch.float64)
    assert Xs.layout == torch.sparse_csr and torch.equal(Xs.to_dense().float(), X)
    assert torch.equal(ys.float(), y)
