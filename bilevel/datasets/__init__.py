"""Data for meta-learning: the sinusoid task family, Omniglot, and N-way K-shot episodes."""

from .episodes import Episodes, EpisodeSampler
from .omniglot import SPLITS, Omniglot, omniglot_split
from .sinusoid import Sinusoid, TaskBatch

__all__ = ["SPLITS", "EpisodeSampler", "Episodes", "Omniglot", "Sinusoid", "TaskBatch", "omniglot_split"]
