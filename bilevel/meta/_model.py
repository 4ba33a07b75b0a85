"""How a user's model enters the meta-learners: a pure ``forward(params, x)``, and the built-in losses.

A ``torch.nn.Module`` is called through :func:`torch.func.functional_call` with the parameters
the meta-learner holds; the module itself is never modified. BatchNorm layers that track running
statistics cannot run under ``vmap`` over tasks (they would write one task's batch statistics into
a buffer shared by all tasks), so such a module is used through a private copy whose BatchNorm
layers normalise with the statistics of the batch they see — each task's support or query set, in
training and evaluation alike (the transductive convention of MAML's reference implementation).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, replace_all_batch_norm_modules_

from .._tree import Params

#: ``forward(params, inputs) -> predictions`` for one task.
Forward = Callable[[Params, Tensor], Tensor]
#: ``loss(predictions, targets) -> scalar`` for one task.
Loss = Callable[[Tensor, Tensor], Tensor]


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every entry; the prediction must have the targets' shape."""
    if pred.shape != target.shape:
        raise ValueError(f"meta-learner loss mse: the model returned predictions of shape {tuple(pred.shape)} "
                         f"for targets of shape {tuple(target.shape)} (one task). Fix: make the model's "
                         "output match the targets, e.g. a final nn.Linear(hidden, 1) for (K, 1) targets.")
    return ((pred - target) ** 2).mean()


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``(K, C)`` logits against ``(K,)`` integer labels."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"meta-learner loss cross_entropy: the model returned logits of shape "
                         f"{tuple(logits.shape)} for labels of shape {tuple(labels.shape)} (one task); expected "
                         "(K, classes) logits for (K,) labels. Fix: end the model with nn.Linear(hidden, ways).")
    # log_softmax + gather rather than F.cross_entropy, whose nll_loss has no fast batching rule
    # for per-task labels under vmap (it falls back to a loop over tasks).
    picked = torch.gather(logits.log_softmax(dim=-1), 1, labels[:, None].long())
    return -picked.mean()


class Functional:
    """``forward(params, x)`` for a module (through ``functional_call``) or a plain callable.

    Args:
        model: an ``nn.Module`` or a callable ``forward(params, x)``.
        owner: the name of the meta-learner, for error messages.
    """

    def __init__(self, model: nn.Module | Forward, owner: str) -> None:
        self.owner = owner
        self.module: nn.Module | None = None
        if isinstance(model, nn.Module):
            self.module = _without_running_stats(model)
            self.fn = None
        elif callable(model):
            self.fn = model
        else:
            raise TypeError(f"{owner}(model={model!r}): expected a torch.nn.Module or a callable "
                            "forward(params, x) -> predictions.")
        self.model = model

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        if self.module is not None:
            return functional_call(self.module, params, (x,))
        return self.fn(params, x)

    def parameters(self) -> Params:
        """Detached copies of the module's parameters (the meta-parameters' start)."""
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"{self.owner}.init_hparams(): the model is a plain function, so it has no "
                            "parameters to start from. Fix: pass params={name: tensor} to init_hparams.")
        params = {k: v.detach().clone() for k, v in self.model.named_parameters()}
        if not params:
            raise ValueError(f"{self.owner}.init_hparams(): the model has no parameters to meta-learn.")
        return params


def _without_running_stats(module: nn.Module) -> nn.Module:
    """``module`` itself, or a private copy whose BatchNorm layers use batch statistics only."""
    tracked = [m for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not tracked:
        return module
    private = copy.deepcopy(module)
    replace_all_batch_norm_modules_(private)
    return private
