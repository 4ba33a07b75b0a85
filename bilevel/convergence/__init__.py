"""Convergence studies: published findings about the inner step count N, measured with this library.

Each study is a frozen dataclass of options; ``run(out)`` writes CSV files (row by row), PNG
figures and ``NAME.md`` (findings with agree / disagree, tables) into ``out``. From the shell:
``bilevel convergence --study NAME [--out DIR]``; see ``docs/convergence.md``.

===============  ==========================================================================
``anil``         ANIL, strongly-convex vs nonconvex head (Ji, Lee, Liang, Poor, NeurIPS 2020)
``maml``         multi-step MAML, inner step size fixed vs 1/N, meta-batch size
                 (Ji, Yang, Liang, JMLR 2022)
``estimators``   AID-BiO vs ITD-BiO vs ESJ vs iMAML on ridge and logistic regression
                 (Grazzi et al., ICML 2020; Ji, Yang, Liang, ICML 2021)
``frontier``     cheapest setting per estimator reaching 1e-3 and 1e-6 on ridge at d = 2000
===============  ==========================================================================

Example:
    >>> from bilevel.convergence import STUDIES, run_study
    >>> sorted(STUDIES)
    ['anil', 'estimators', 'frontier', 'maml']
    >>> report = run_study("estimators", "runs/tiny", quick=True, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from ._common import AbstractStudy, CsvLog, Finding, RowHook, StudyError, StudyReport
from .anil import AnilStudy
from .estimators import EstimatorStudy
from .frontier import FrontierStudy  # noqa
from .maml import MamlStudy

#: ``--study`` name -> study class.
STUDIES: dict[str, type[AbstractStudy]] = {cls.name: cls for cls in (AnilStudy, MamlStudy, EstimatorStudy,
                                                                     FrontierStudy)}


def make_study(name: str, *, quick: bool = False, **options: Any) -> AbstractStudy:
    """The study ``name`` with ``options`` (checked now, before any work); ``quick`` for tiny settings."""
    if name not in STUDIES:
        raise StudyError(f"bilevel convergence --study {name!r}: unknown study. Fix: choose one of "
                         f"{', '.join(sorted(STUDIES))}.")
    cls = STUDIES[name]
    return cls.quick(**options) if quick else cls(**options)


def run_study(name: str, out: str | os.PathLike, *, quick: bool = False, progress: bool = True,
              on_row: RowHook | None = None, **options: Any) -> StudyReport:
    """Check the options and the output directory, then run study ``name`` into ``out``."""
    return make_study(name, quick=quick, **options).run(out, progress=progress, on_row=on_row)


__all__ = ["AbstractStudy", "AnilStudy", "CsvLog", "EstimatorStudy", "Finding", "FrontierStudy", "MamlStudy",
           "STUDIES", "StudyError", "StudyReport", "make_study", "run_study"]
