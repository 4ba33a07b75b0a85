"""Tests of the convergence studies (bilevel.convergence): bad input, determinism, interrupted runs,
the CLI, and the exact answers the studies compare against."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import bilevel as bl
from bilevel._cli import main
from bilevel.convergence import STUDIES, AnilStudy, EstimatorStudy, FrontierStudy, MamlStudy, StudyError, make_study
from bilevel.convergence._common import CsvLog, check_grid, prepare_out_dir
from bilevel.convergence._curves import reach, reference_level, spearman
from bilevel.convergence._hyper import logistic_case, ridge_case
from bilevel.convergence._meta import anil_problem, init_anil, meta_loss
from bilevel.datasets import Sinusoid
from bilevel.convergence._search import Search

TINY_ANIL = dict(n_grid=(1,), outer_steps=2, meta_batch=2, eval_tasks=3, eval_every=1, features=4, head_hidden=3)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("grid", [(), (0,), (1, -2), (1.5,), (True,), ("2",)])
def test_bad_grids_raise_before_work(grid):
    for cls in (AnilStudy, MamlStudy, EstimatorStudy, FrontierStudy):
        with pytest.raises(StudyError, match="n_grid"):
            cls(n_grid=grid)


def test_unknown_study_names_the_choices():
    with pytest.raises(StudyError, match="unknown study.*anil, estimators, frontier, maml"):
        make_study("anill")
    assert sorted(STUDIES) == ["anil", "estimators", "frontier", "maml"]


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StudyError, match="cannot write to the output directory"):
        prepare_out_dir(blocker / "out", "test")
    with pytest.raises(StudyError, match="cannot write"):
        AnilStudy(**TINY_ANIL).run(blocker / "out", progress=False)


@pytest.mark.parametrize("argv, message", [
    (["--study", "nope"], "unknown study"),
    (["--study", "anil", "--n-grid", ""], "empty grid"),
    (["--study", "anil", "--n-grid", "1,0"], "not positive"),
    (["--study", "maml", "--n-grid", "2,x"], "not an integer"),
    (["--study", "anil", "--k-grid", "2"], "applies to --study estimators and frontier only"),
    (["--study", "anil", "--set", "nope=1"], "unknown option"),
    (["--study", "anil", "--set", "alpha=-1"], "alpha=-1"),
])
def test_cli_bad_input_exits_2_before_any_file(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["convergence", *argv, "--out", str(out), "--no-progress"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_cli_unwritable_out_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["convergence", "--study", "anil", "--quick", "--out", str(blocker / "sub"), "--no-progress"])
    assert exc.value.code == 2
    assert "cannot write to the output directory" in capsys.readouterr().err


def test_check_grid_accepts_positive_ints():
    assert check_grid([1, 2, 32], "n_grid", "t") == (1, 2, 32)


# ----------------------------------------------------------------------------- runs


def test_anil_is_deterministic_with_a_seed(tmp_path):
    a = AnilStudy(**TINY_ANIL, seed=3).run(tmp_path / "a", progress=False)
    b = AnilStudy(**TINY_ANIL, seed=3).run(tmp_path / "b", progress=False)
    ra, rb = (_rows(r.out / "anil_curves.csv") for r in (a, b))
    assert len(ra) == 2 * 3  # two heads, evaluations at steps 0, 1, 2
    assert [r["meta_loss"] for r in ra] == [r["meta_loss"] for r in rb]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    for name in ("anil.png", "anil.md"):
        assert (a.out / name).is_file()
    assert "Ji, Lee, Liang, Poor" in (a.out / "anil.md").read_text()


class _Stop(Exception):
    pass


def test_interrupted_study_keeps_the_finished_rows(tmp_path):
    def stop_after(k):
        seen = []

        def hook(name, row):
            seen.append(row)
            if len(seen) == k:
                raise _Stop
        return hook

    with pytest.raises(_Stop):
        AnilStudy(**TINY_ANIL).run(tmp_path, progress=False, on_row=stop_after(4))
    rows = _rows(tmp_path / "anil_curves.csv")
    assert len(rows) == 4
    assert rows[-1]["head"] == "two-layer" and rows[-1]["step"] == "0"
    assert not (tmp_path / "anil.md").exists()


def test_csv_log_flushes_each_row(tmp_path):
    log = CsvLog(tmp_path / "x.csv", ("a", "b"))
    log.write(a=1, b=0.5)
    assert _rows(tmp_path / "x.csv") == [{"a": "1", "b": "0.5"}]  # readable before close
    with pytest.raises(KeyError, match="missing"):
        log.write(a=2)
    log.close()


def test_cli_interrupt_reports_and_returns_130(tmp_path, monkeypatch, capsys):
    def interrupted(self, out, progress=True, on_row=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(MamlStudy, "run", interrupted)
    assert main(["convergence", "--study", "maml", "--quick", "--out", str(tmp_path), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_cli_smoke_maml(tmp_path, capsys):
    out = tmp_path / "maml"
    code = main(["convergence", "--study", "maml", "--quick", "--out", str(out), "--no-progress", "--seed", "1",
                 "--set", "eval_tasks=3", "--set", "outer_steps=2"])
    assert code == 0
    for name in ("maml_step_size.csv", "maml_meta_batch.csv", "maml.png", "maml.md"):
        assert (out / name).is_file(), name
    text = (out / "maml.md").read_text()
    assert "--study maml" in text and "--seed 1" in text and "Ji, Yang, Liang" in text
    assert "[" in capsys.readouterr().out  # the verdicts are printed


def test_estimators_quick_writes_every_part(tmp_path):
    study = EstimatorStudy.quick(n_grid=(2,), k_grid=(2,), outer_steps=2, ridge_dim=6, logreg_dim=4)
    report = study.run(tmp_path, progress=False)
    by_n = _rows(tmp_path / "estimators_error_vs_N.csv")
    assert {r["estimator"] for r in by_n} == {"ITD", "AID-CG", "AID-Neumann", "IMAML-CG", "ESJ"}
    assert len(by_n) == 2 * 5 and len(_rows(tmp_path / "estimators_error_vs_K.csv")) == 2 * 4
    walltime = _rows(tmp_path / "estimators_walltime.csv")
    assert {r["estimator"] for r in walltime} >= {"exact", "AID-CG"}
    assert len(report.findings) == 7 and all(f.source for f in report.findings)


def test_frontier_quick_finds_settings(tmp_path):
    study = FrontierStudy.quick(dim=8, n_samples=12, n_grid=(8, 32, 128), k_grid=(2, 8), esj_grid=(2,))
    report = study.run(tmp_path, progress=False)
    rows = _rows(tmp_path / "frontier_evaluations.csv")
    assert {"ITD", "AID-CG", "AID-Neumann", "AID-Dense", "IMAML-CG", "ESJ"} <= {r["estimator"] for r in rows}
    table = report.tables["Cheapest setting per estimator (fewest gradients + HVPs) reaching each target"]
    assert "| AID-CG | 0.001 | N=" in table and (tmp_path / "frontier.png").is_file()


# ----------------------------------------------------------------------------- exact answers


def test_the_seed_changes_the_initialisation_and_the_tasks():
    family = Sinusoid(shots=3)
    problem = anil_problem(0.5)
    losses = [meta_loss(problem, init_anil("linear", 4, 3, seed), family.sample(3, seed=seed), 0.2, 1)
              for seed in (3, 3, 4)]
    assert losses[0] == losses[1] != losses[2]


def test_logistic_exact_hypergradient_matches_finite_differences():
    case = logistic_case(5, 30, seed=1)
    x = case.hparams(math.log(0.1))
    g = case.hypergrad(x)["log_lam"]
    eps = 1e-6
    for i in range(5):
        e = torch.zeros(5, dtype=torch.float64)
        e[i] = eps
        fd = (case.value({"log_lam": x["log_lam"] + e}) - case.value({"log_lam": x["log_lam"] - e})) / (2 * eps)
        assert fd == pytest.approx(g[i].item(), rel=1e-5, abs=1e-10)


def test_ridge_case_matches_the_testing_closed_form():
    case = ridge_case(7, 20, seed=2)
    r = bl.testing.ridge_problem(n_samples=20, dim=7, seed=2)
    x = case.hparams(0.3)
    torch.testing.assert_close(case.hypergrad(x)["log_lam"], r.hypergrad(x)["log_lam"])


def test_imaml_converges_to_the_damped_problem():
    case = ridge_case(6, 12, seed=0)
    x = case.hparams(math.log(0.5))
    lam = 0.3
    hg = bl.hypergrad(case.prox_problem(), x, case.params0(), inner=bl.GradientDescent(lr=0.2, steps=400),
                      estimator=bl.IMAML(lam=lam, linear_solver=bl.CG(max_steps=30)), inner_batch=case.train,
                      outer_batch=case.val)
    torch.testing.assert_close(hg.value["log_lam"], case.hypergrad(x, damping=lam)["log_lam"], rtol=1e-7, atol=1e-10)
    assert (hg.value["log_lam"] - case.hypergrad(x)["log_lam"]).abs().max() > 1e-3  # the bias is real


# ----------------------------------------------------------------------------- helpers


def test_reach_interpolates_and_reports_never():
    pts = [dict(step=0, time_s=0.0, meta_loss=4.0), dict(step=10, time_s=2.0, meta_loss=2.0)]
    assert reach(pts, 3.0) == (5.0, 1.0)
    assert reach(pts, 1.0) == (math.inf, math.inf)
    assert reference_level(pts) == pytest.approx(4.0 - 0.9 * 2.0)
    assert math.isnan(reference_level([dict(step=0, time_s=0.0, meta_loss=1.0)]))


def test_spearman():
    assert spearman([1, 2, 3], [1, 5, math.inf]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_staircase_finds_the_cheapest_setting(monkeypatch):
    study = FrontierStudy(n_grid=(1, 2, 4, 8, 16), k_grid=(1, 2, 4, 8, 16))
    search = Search.__new__(Search)
    search.study, search.cache, search.rows = study, {}, []
    calls = []

    def fake_eval(name, n, k, lam=0.0, q=0):
        calls.append((n, k))
        return dict(estimator=name, N=n, K=k, rel_error=0.6 ** n + 0.3 ** k, num_grad=n + 1, num_hvp=k + 1)
    monkeypatch.setattr(search, "eval", fake_eval)
    for target in (0.2, 1e-2, 1e-3):
        found = search._staircase("AID-CG", target, 0.0)
        brute = min(((n, k) for n in study.n_grid for k in study.k_grid if 0.6 ** n + 0.3 ** k <= target),
                    key=lambda nk: nk[0] + nk[1], default=None)
        assert brute is not None and found is not None
        assert found["N"] + found["K"] == sum(brute)  # the cheapest cost (ties may pick another pair)
        assert 0.6 ** found["N"] + 0.3 ** found["K"] <= target
    assert len(set(calls)) <= 3 * (len(study.n_grid) + len(study.k_grid))  # a walk, not the whole grid


def test_benchmark_suite_matches_the_study_estimators():
    bench = pytest.importorskip("benchmarks.bench_convergence")
    from bilevel.convergence._hgrun import ESTIMATORS
    assert bench.ESTIMATORS == ESTIMATORS
    call, exact = bench._call("AID-CG", 10, 100)
    hg = call()
    assert hg.stats["num_hvp"] == 11 and hg.value["log_lam"].shape == exact.shape
