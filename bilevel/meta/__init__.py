"""Meta-learning on top of :class:`bilevel.BilevelProblem`: MAML (and FO-MAML, iMAML, ES-MAML,
Reptile through the estimator), ANIL, Meta-SGD and shared-embedding learners, task batching, a
meta-training loop with exact resume, and the sinusoid evaluation protocol."""

from ._learner import AbstractMetaLearner, MetaGradient
from ._model import cross_entropy, mse
from .anil import ANIL
from .closed_form import ClosedForm
from .maml import MAML
from .meta_sgd import LearnedSGD, MetaSGD
from .shared_embedding import RidgeHead, SharedEmbedding, SoftmaxHead
from .tasks import TaskPool, Tasks, split

__all__ = [
    "ANIL", "AbstractMetaLearner", "ClosedForm", "LearnedSGD", "MAML", "MetaGradient", "MetaSGD",
    "RidgeHead", "SharedEmbedding", "SoftmaxHead", "TaskPool", "Tasks", "cross_entropy", "mse", "split",
]
