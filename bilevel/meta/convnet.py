"""The standard four-block convolutional few-shot classifier, as a pure function and as an ``nn.Module``.

Batch normalisation inside ``vmap`` over tasks
----------------------------------------------
Every block normalises with :func:`torch.nn.functional.batch_norm` called with no running
statistics (``running_mean=None, running_var=None, training=True``). It keeps no buffer, so it is a
pure function of its input and runs under ``torch.func.vmap``: mapped over the task dimension, each
task's batch — its support set in the inner loop, its query set in the outer loss — is normalised
with that batch's own mean and variance. This is *transductive* batch normalisation, the setting of
MAML's reference experiments (batch statistics at meta-training and meta-test time alike), and it
is also what a per-task Python loop computes, which ``tests/test_meta_omniglot.py`` checks. The
learned scale and shift (``norm.weight``, ``norm.bias``) are ordinary parameters: meta-learned, and
adapted by MAML's inner loop like every other weight. A consequence of the transductive choice:
a prediction for one query image depends on the other query images of its task (the usual caveat
of this protocol; Nichol et al. 2018, Section 6, discuss it).

:class:`ConvNetModule` builds the same network from ``nn.Conv2d``, ``nn.BatchNorm2d(...,
track_running_stats=False)`` and ``nn.Linear`` with the same parameter names, so
``torch.func.functional_call(module, params, (x,))`` equals ``ConvNet(...)(params, x)``: a user's own
module enters the meta-learners the same way (they call it through ``functional_call``; a BatchNorm
layer that does track running statistics is replaced by a batch-statistics copy, see ``_model.py``).

Reference: O. Vinyals et al., "Matching networks for one shot learning", NeurIPS 2016 (the
architecture); C. Finn, P. Abbeel, S. Levine, "Model-agnostic meta-learning", ICML 2017, Section 5.2
(its use with MAML, strided convolutions for Omniglot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._tree import Params


@dataclass(frozen=True)
class ConvNet:
    r"""``blocks`` × [3×3 conv (``hidden`` filters, padding 1) → batch norm → ReLU → 2×2 max-pool],
    flattened, then a linear head to ``ways`` logits (``ways=None``: no head, the features).

    With ``pool="stride"`` each block's convolution has stride 2 and there is no max-pool
    (Finn et al.'s Omniglot variant). For 28×28 inputs the feature count is ``hidden`` (max-pool:
    28→14→7→3→1) or ``4 · hidden`` (stride: 28→14→7→4→2).

    Args:
        ways: output classes (default 5); ``None`` for an embedding (for :class:`SharedEmbedding`).
        hidden: filters per block (default 64).
        blocks: number of blocks (default 4).
        channels: input channels (default 1).
        image_size: input side length (default 28).
        pool: ``"max"`` (default) or ``"stride"``.
        eps: batch-norm epsilon (default 1e-5).

    Example:
        >>> import torch
        >>> from bilevel.meta.convnet import ConvNet
        >>> net = ConvNet(ways=5)
        >>> params = net.init(seed=0)
        >>> net(params, torch.rand(10, 1, 28, 28)).shape
        torch.Size([10, 5])
    """

    ways: int | None = 5
    hidden: int = 64
    blocks: int = 4
    channels: int = 1
    image_size: int = 28
    pool: str = "max"
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("hidden", "blocks", "channels", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConvNet({name}={value!r}): expected an int >= 1.")
        if self.ways is not None and (isinstance(self.ways, bool) or not isinstance(self.ways, int) or self.ways < 2):
            raise ValueError(f"ConvNet(ways={self.ways!r}): expected an int >= 2 (classes) or None (no head).")
        if self.pool not in ("max", "stride"):
            raise ValueError(f"ConvNet(pool={self.pool!r}): expected 'max' (2x2 max-pool) or 'stride' (stride-2 conv).")
        if self.side() < 1:
            raise ValueError(f"ConvNet(image_size={self.image_size}, blocks={self.blocks}): the image shrinks to "
                             "nothing. Fix: use fewer blocks or larger images.")

    def side(self) -> int:
        """Side length of the last block's output."""
        side = self.image_size
        for _ in range(self.blocks):
            side = math.ceil(side / 2) if self.pool == "stride" else side // 2
        return side

    @property
    def features(self) -> int:
        """Length of the flattened feature vector (the head's input)."""
        return self.hidden * self.side() ** 2

    def init(self, seed: int | torch.Generator = 0, dtype: torch.dtype = torch.float32) -> Params:
        """Fresh parameters: ``nn.Conv2d`` / ``nn.Linear``'s default uniform init, unit BN scale, zero shift."""
        gen = torch.Generator().manual_seed(seed) if isinstance(seed, int) else seed
        params: Params = {}

        def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
            bound = 1.0 / math.sqrt(fan_in)
            return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)

        cin = self.channels
        for i in range(self.blocks):
            params[f"block{i}.conv.weight"] = uniform((self.hidden, cin, 3, 3), cin * 9)
            params[f"block{i}.conv.bias"] = uniform((self.hidden,), cin * 9)
            params[f"block{i}.norm.weight"] = torch.ones(self.hidden, dtype=dtype)
            params[f"block{i}.norm.bias"] = torch.zeros(self.hidden, dtype=dtype)
            cin = self.hidden
        if self.ways is not None:
            params["head.weight"] = uniform((self.ways, self.features), self.features)
            params["head.bias"] = uniform((self.ways,), self.features)
        return params

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        """Logits ``(M, ways)`` (or features ``(M, features)``) of ``(M, channels, S, S)`` images."""
        if x.dim() != 4 or x.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"ConvNet(...)(params, x): x has shape {tuple(x.shape)}; expected (M, {self.channels}, "
                             f"{self.image_size}, {self.image_size}) for one task. Fix: pass one task's images "
                             "(the meta-learners vmap over tasks themselves).")
        stride = 2 if self.pool == "stride" else 1
        h = x
        for i in range(self.blocks):
            h = F.conv2d(h, params[f"block{i}.conv.weight"], params[f"block{i}.conv.bias"], stride=stride, padding=1)
            h = F.batch_norm(h, None, None, params[f"block{i}.norm.weight"], params[f"block{i}.norm.bias"],
                             training=True, eps=self.eps)
            h = F.relu(h)
            if self.pool == "max":
                h = F.max_pool2d(h, 2)
        h = h.flatten(1)
        return h if self.ways is None else F.linear(h, params["head.weight"], params["head.bias"])

    def module(self) -> ConvNetModule:
        """The same network as an ``nn.Module`` (same parameter names, torch's default init)."""
        return ConvNetModule(self)


class _Block(nn.Module):
    def __init__(self, cin: int, hidden: int, stride: int, pool: bool, eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, hidden, 3, stride=stride, padding=1)
        self.norm = nn.BatchNorm2d(hidden, eps=eps, track_running_stats=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(torch.relu(self.norm(self.conv(x))))


class ConvNetModule(nn.Module):
    """:class:`ConvNet` as an ``nn.Module`` (BatchNorm without running statistics), for
    :func:`torch.func.functional_call` and for users who start from modules.

    Example:
        >>> import torch
        >>> from torch.func import functional_call
        >>> from bilevel.meta.convnet import ConvNet
        >>> spec = ConvNet(ways=5, hidden=8)
        >>> params = spec.init(seed=0)
        >>> x = torch.rand(6, 1, 28, 28)
        >>> torch.allclose(functional_call(spec.module(), params, (x,)), spec(params, x), atol=1e-5)
        True
    """

    def __init__(self, spec: ConvNet) -> None:
        super().__init__()
        self.spec = spec
        cin = spec.channels
        for i in range(spec.blocks):
            self.add_module(f"block{i}", _Block(cin, spec.hidden, 2 if spec.pool == "stride" else 1,
                                                spec.pool == "max", spec.eps))
            cin = spec.hidden
        self.head = nn.Linear(spec.features, spec.ways) if spec.ways is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.spec.blocks):
            x = getattr(self, f"block{i}")(x)
        x = x.flatten(1)
        return x if self.head is None else self.head(x)
