"""Real bilevel problems: hyperparameter optimisation and data hyper-cleaning."""

from .logreg import LogRegHPO, grid_search, logistic_loss, logreg_inner, logreg_outer, logreg_problem

__all__ = ["LogRegHPO", "grid_search", "logistic_loss", "logreg_inner", "logreg_outer", "logreg_problem"]
