"""``bilevel hpo``: bad arguments, missing data, and small real-data runs writing CSV, PNG and a table."""

from __future__ import annotations

import csv

import pytest

from bilevel._cli import main

from tests._data import data_dir


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_unknown_method_and_problem(capsys, tmp_path):
    err = _usage_error(capsys, ["hpo", "--problem", "logreg-a9a", "--method", "aid-cg,newton", "--out", str(tmp_path)])
    assert "--method 'aid-cg,newton': unknown method 'newton' for --problem logreg-a9a" in err
    assert "reference, aid-cg, aid-neumann, stocbio, itd, esj" in err
    err = _usage_error(capsys, ["hpo", "--problem", "hyperclean-cifar"])
    assert "invalid choice: 'hyperclean-cifar'" in err
    err = _usage_error(capsys, ["hpo", "--problem", "hyperclean-mnist", "--method", "reference"])
    assert "unknown method 'reference' for --problem hyperclean-mnist" in err


@pytest.mark.parametrize("fraction", ["1", "1.5", "-0.2"])
def test_corruption_outside_unit_interval(capsys, tmp_path, fraction):
    err = _usage_error(capsys, ["hpo", "--problem", "hyperclean-mnist", "--corruption", fraction,
                                "--out", str(tmp_path)])
    assert f"--corruption {float(fraction):g}: the fraction of corrupted labels must lie in [0, 1)" in err


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _usage_error(capsys, ["hpo", "--problem", "logreg-a9a", "--out", str(blocker / "sub")])
    assert f"cannot write to --out '{blocker / 'sub'}'" in err


def test_missing_data_names_the_file(capsys, tmp_path):
    assert main(["hpo", "--problem", "logreg-a9a", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "bilevel hpo: error:" in err and str(tmp_path / "a9a" / "a9a") in err
    assert main(["hpo", "--problem", "hyperclean-mnist", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err


@pytest.mark.data
def test_validation_split_larger_than_the_data(capsys, tmp_path):
    root = data_dir("a9a").parent
    assert main(["hpo", "--problem", "logreg-a9a", "--data", str(root), "--n-val", "40000",
                 "--out", str(tmp_path)]) == 1
    assert "n_train + n_val = 5000 + 40000 = 45000 exceeds the 32561 examples" in capsys.readouterr().err


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.data
def test_logreg_a9a_smoke(capsys, tmp_path):
    root = data_dir("a9a").parent
    argv = ["hpo", "--problem", "logreg-a9a", "--method", "reference,stocbio", "--data", str(root),
            "--n-train", "200", "--n-val", "200", "--steps", "2", "--inner-steps", "3", "--linear-steps", "3",
            "--batch-size", "50", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| grid search (25 shared weights)" in out and "| stocbio | 2 |" in out
    rows = _rows(tmp_path / "curves.csv")
    assert [r["method"] for r in rows] == ["reference"] * 2 + ["stocbio"] * 2
    assert all(0 < float(r["test_loss"]) < 1 for r in rows)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    report = (tmp_path / "results.md").read_text()
    assert "| reference | 2 |" in report
    assert "Settings: --problem logreg-a9a --method reference,stocbio --n-train 200 --n-val 200 --seed 0" in report
    assert "--inner-steps 3 --linear-steps 3 --batch-size 50; torch threads 1; load average" in report


@pytest.mark.data
def test_hyperclean_mnist_smoke(capsys, tmp_path):
    root = data_dir("mnist").parent
    argv = ["hpo", "--problem", "hyperclean-mnist", "--method", "stocbio,aid-cg", "--data", str(root),
            "--n-train", "300", "--n-val", "100", "--n-test", "200", "--steps", "2", "--batch-size", "100",
            "--out", str(tmp_path), "--no-progress", "--no-tuned-baseline"]
    assert main(argv) == 0
    table = (tmp_path / "results.md").read_text()
    assert "train on corrupted data (no cleaning)" in table and "oracle" in table and "| stocbio | 2 |" in table
    assert "--corruption 0.5 --classifier linear --n-test 200; torch threads 1" in table
    rows = _rows(tmp_path / "curves.csv")
    assert {"auc", "precision", "recall", "test_accuracy"} <= set(rows[0])
    assert 0 <= float(rows[-1]["auc"]) <= 1
