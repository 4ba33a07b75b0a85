"""Data: the sinusoid task family, Omniglot, N-way K-shot episodes, a9a (LIBSVM) and MNIST (IDX)."""

from .episodes import Episodes, EpisodeSampler
from .libsvm import A9A_FEATURES, labels_to_01, load_a9a, load_libsvm
from .mnist import MNIST_MEAN, MNIST_STD, corrupt_labels, load_mnist, train_val_split
from .omniglot import SPLITS, Omniglot, omniglot_split
from .sinusoid import Sinusoid, TaskBatch

__all__ = ["A9A_FEATURES", "MNIST_MEAN", "MNIST_STD", "SPLITS", "EpisodeSampler", "Episodes", "Omniglot",
           "Sinusoid", "TaskBatch", "corrupt_labels", "labels_to_01", "load_a9a", "load_libsvm", "load_mnist",
           "omniglot_split", "train_val_split"]
