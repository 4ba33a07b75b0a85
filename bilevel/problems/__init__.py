"""Real bilevel problems: per-feature regularisation of logistic regression and data hyper-cleaning.

Each problem is a small object holding its data with a ``.problem`` (a
:class:`~bilevel.BilevelProblem`), starting points and metrics; ``bilevel hpo``
(:mod:`bilevel.problems.cli`) compares estimators on them with real data.
"""

from .data import Splits, a9a_splits, mnist_hyperclean_splits
from .hyperclean import MLP, HyperClean, Linear, detection_metrics, hyperclean_problem
from .logreg import LogRegHPO, grid_search, logistic_loss, logreg_inner, logreg_outer, logreg_problem
from .runner import Method, run_method

__all__ = ["HyperClean", "Linear", "LogRegHPO", "MLP", "Method", "Splits", "a9a_splits", "detection_metrics",
           "grid_search", "hyperclean_problem", "logistic_loss", "logreg_inner", "logreg_outer", "logreg_problem",
           "mnist_hyperclean_splits", "run_method"]
