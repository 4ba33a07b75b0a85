"""Meta-learning on top of :class:`bilevel.BilevelProblem`: MAML (and FO-MAML, iMAML, ES-MAML,
Reptile through the estimator), ANIL, Meta-SGD and shared-embedding learners, task batching, a
meta-training loop with exact resume, and the sinusoid evaluation protocol."""

from ._learner import AbstractMetaLearner, MetaGradient
from ._model import cross_entropy, mse
from .anil import ANIL
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .closed_form import ClosedForm
from .evaluate import Evaluation, evaluate, results_table, sinusoid_figure
from .maml import MAML
from .meta_sgd import LearnedSGD, MetaSGD
from .shared_embedding import RidgeHead, SharedEmbedding, SoftmaxHead
from .tasks import TaskPool, Tasks, split
from .train import Trainer, TrainResult

__all__ = [
    "ANIL", "AbstractMetaLearner", "CheckpointError", "ClosedForm", "Evaluation", "LearnedSGD", "MAML",
    "MetaGradient", "MetaSGD", "RidgeHead", "SharedEmbedding", "SoftmaxHead", "TaskPool", "Tasks", "TrainResult",
    "Trainer", "cross_entropy", "evaluate", "load_checkpoint", "mse", "results_table", "save_checkpoint",
    "sinusoid_figure", "split",
]
