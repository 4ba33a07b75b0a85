"""The ``bilevel`` command line: ``bilevel compare`` in-process, bad arguments, ``python -m bilevel``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bilevel as bl
from bilevel._cli import SUBCOMMANDS, build_parser, main
from bilevel._compare import compare

SMALL = ["compare", "--dim", "4", "--samples", "24"]


def _table(out: str) -> dict[str, list[str]]:
    """Rows of the printed table, by estimator name (the line after the dashes up to the blank line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_compare_prints_setup_table_and_notes(capsys):
    assert main(SMALL) == 0
    out = capsys.readouterr().out
    assert out.startswith("problem: ridge regression, 24 training + 24 validation samples, 4 features")
    assert "inner: GradientDescent(lr=1/L=" in out
    rows = _table(out)
    expected = {"ITD", "FirstOrder", "AID-CG", "AID-Neumann", "AID-Dense"}
    assert expected <= set(rows)
    assert any(name.startswith("ITD(truncate=") for name in rows)
    for name in ("ITD", "AID-CG", "AID-Neumann", "AID-Dense"):
        rel_error, inner, linear, hvps, grads, _time, status = rows[name]
        assert float(rel_error) < 1e-6, (name, rel_error)
        assert status == "successful"
        assert int(inner) > 0 and int(grads) == int(inner) + 1
    assert int(rows["AID-CG"][3]) >= 1 and int(rows["AID-Dense"][3]) == 4 + 1  # dim HVPs + the cross term
    assert float(rows["FirstOrder"][0]) == pytest.approx(1.0)  # x reaches f only through y(x): estimate 0
    assert int(rows["FirstOrder"][3]) == 0


def test_compare_notes_which_estimators_apply(capsys):
    main(SMALL)
    out = capsys.readouterr().out
    rows = _table(out)
    for name in ("IMAML", "Reptile"):
        assert name not in rows  # they need a learned start, which ridge does not have
        if hasattr(bl, name):
            assert re.search(rf"note: .*{name}.* skipped", out)
        else:
            assert re.search(rf"note: not in this version of bilevel: .*{name}", out)
    assert ("ESJ" in rows) == hasattr(bl, "ESJ")


def test_compare_steps_and_dtype_are_used(capsys):
    assert main([*SMALL, "--steps", "3", "--linear-steps", "2", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and "steps=3)" in out
    rows = _table(out)
    assert rows["ITD"][1] == "3" and rows["AID-Neumann"][2] == "2"
    assert "ITD(truncate=1)" in rows


def test_compare_check_passes_when_converged_and_fails_when_not(capsys):
    assert main([*SMALL, "--check"]) == 0
    assert "check passed" in capsys.readouterr().out
    assert main([*SMALL, "--steps", "2", "--check"]) == 1  # 2 inner steps: ITD and AID are far off
    assert "check FAILED: ITD: relative error" in capsys.readouterr().out


def test_compare_quadratic_problem(capsys):
    assert main(["compare", "--problem", "quadratic", "--dim", "3", "--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("problem: random quadratic, y in R^3")
    assert float(_table(out)["FirstOrder"][0]) < 1.0  # here f depends on x directly too


def test_compare_function_matches_exact_hypergradient():
    result = compare(dim=3, samples=10, seed=1)
    assert result.failures() == []
    names = [r.name for r in result.rows]
    assert names[0] == "ITD" and names[1].startswith("ITD(truncate=") and names[2] == "FirstOrder"
    assert all(r.wall_time_s > 0 for r in result.rows)


@pytest.mark.parametrize("args, message", [
    (["compare", "--dim", "0"], "argument --dim: expected a positive integer, got 0"),
    (["compare", "--dim", "-3"], "argument --dim: expected a positive integer, got -3"),
    (["compare", "--dim", "ten"], "argument --dim: expected a positive integer, got 'ten'"),
    (["compare", "--samples", "0"], "argument --samples: expected a positive integer, got 0"),
    (["compare", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["compare", "--seed", "-1"], "argument --seed: expected a non-negative integer"),
    (["compare", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["compare", "--problem", "lasso"], "argument --problem: invalid choice: 'lasso'"),
    (["compare", "--log-lam", "nan"], "argument --log-lam: expected a finite number"),
    (["compare", "--dim", "100000"], "argument --dim: 100000 is too large"),
    (["compare", "--problem", "quadratic", "--samples", "10"], "argument --samples: applies to --problem ridge only"),
    (["compare", "--unknown"], "unrecognized arguments: --unknown"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("usage: bilevel")


def test_every_registered_subcommand_has_help(capsys):
    parser = build_parser()
    for module in SUBCOMMANDS:
        assert module.startswith("bilevel.")
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--help"])
    assert info.value.code == 0
    assert "compare" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bilevel {bl.__version__}"


def test_python_dash_m_bilevel_runs_the_cli():
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bilevel", *SMALL, "--check"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "check passed" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "bilevel", "compare", "--dim", "0"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "expected a positive integer" in bad.stderr
