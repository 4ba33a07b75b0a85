"""Omniglot (Lake et al. 2015): read the npz arrays or the official PNGs, resize, cache, split, rotate."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._omniglot_io import NUM_BACKGROUND, NUM_CHARACTERS, SIDE, find_sources, load

MAML_TRAIN_CHARACTERS = 1200
SPLITS = ("background", "background-val", "evaluation", "maml-train", "maml-val", "maml-test")


def omniglot_split(split: str, validation: int = 0) -> tuple[int, ...]:
    """The official character ids (1..1623, sorted) of a split; see :class:`Omniglot`."""
    ids = _split_ids(split, validation, f"omniglot_split(split={split!r}, validation={validation!r})")
    return tuple(ids.tolist())


class Omniglot:
    r"""The Omniglot characters as a tensor ``images`` of shape ``(classes, 20, S, S)``, ink = 1.

    Every official 105×105 drawing is inverted (ink = 1), area-averaged to ``S × S``
    (``torch.nn.functional.interpolate(mode="area")``) and stored as 8 bits, so the npz arrays and
    the PNGs give identical images. The result is cached under ``cache_dir`` with a SHA-256
    manifest; a cache that does not match its manifest is rebuilt, never trusted.

    Splits (by official character id; the same ids whatever the source):

    * ``"background"`` (ids 1–964) / ``"evaluation"`` (965–1623): Lake et al.'s split.
      ``"background-val"``: ``validation`` background characters held out of ``"background"``.
    * ``"maml-train"`` (1200 characters) / ``"maml-test"`` (the other 423), drawn from all 1623
      as in Finn et al. 2017 / Vinyals et al. 2016. ``"maml-val"``: the last ``validation`` of
      the 1200, held out of ``"maml-train"``. The draw is a fixed SHA-256 ordering of the ids, so
      it never changes with library versions (it is not the split of the MAML code base).

    Args:
        path: a folder holding ``images_background.npz`` and/or ``images_evaluation.npz`` (bool
            arrays ``(characters, 20, 105, 105)``, True = paper); or an official ``.zip`` or a
            folder of them; or a folder tree of the official PNGs. npz beats zip beats PNG tree.
        split: one of ``SPLITS`` (default ``"background"``).
        rotations: add the 90°, 180°, 270° (counter-clockwise) rotations as new classes: class
            ``r * C + c`` is character ``c`` rotated by ``r × 90°`` (default False).
        validation: characters held out for the ``*-val`` splits (default 0).
        image_size: ``S`` (default 28).
        cache_dir: where the preprocessed arrays go (default ``$XDG_CACHE_HOME/bilevel/omniglot``,
            else ``~/.cache/bilevel/omniglot``; never the data folder); ``False``: no cache.
        dtype: ``torch.float32`` (default; values in [0, 1]) or another floating dtype, or
            ``torch.uint8`` (0..255, a quarter of the memory; :class:`EpisodeSampler` accepts it).

    Attributes: ``images``, ``character_ids`` and ``rotation_degrees`` (``(classes,)`` int64),
    ``alphabets`` (a tuple of names, ``""`` where the source does not say, as for npz).

    Example:
        >>> from bilevel.datasets import EpisodeSampler, Omniglot, omniglot_split
        >>> len(omniglot_split("maml-train")), len(omniglot_split("maml-test"))
        (1200, 423)
        >>> train = Omniglot("data/omniglot", "maml-train", rotations=True)  # doctest: +SKIP
        >>> train.images.shape  # doctest: +SKIP
        torch.Size([4800, 20, 28, 28])
        >>> episodes = EpisodeSampler(train, ways=5, shots=1, queries=15, seed=0).sample(8)  # doctest: +SKIP

    References:
        Lake, Salakhutdinov, Tenenbaum (2015). Human-level concept learning through probabilistic
        program induction. Science 350(6266). Finn, Abbeel, Levine (2017). MAML. ICML.
    """

    def __init__(self, path: str | os.PathLike, split: str = "background", *, rotations: bool = False,
                 validation: int = 0, image_size: int = 28, cache_dir: str | os.PathLike | bool | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        call = f"Omniglot(path={str(path)!r}, split={split!r})"
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= SIDE:
            raise ValueError(f"Omniglot(image_size={image_size!r}): expected an int in 1..{SIDE}. "
                             "Fix: pass image_size=28.")
        if not isinstance(rotations, bool):
            raise ValueError(f"Omniglot(rotations={rotations!r}): expected True or False.")
        if not (dtype == torch.uint8 or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)):
            raise ValueError(f"Omniglot(dtype={dtype!r}): expected a floating dtype or torch.uint8. "
                             "Fix: pass dtype=torch.float32.")
        if cache_dir is True:
            raise ValueError("Omniglot(cache_dir=True): expected a folder, None (the default folder) or "
                             "False (no cache).")
        wanted = _split_ids(split, validation, f"Omniglot(split={split!r}, validation={validation!r})")
        ids, alphabets, pixels = load(find_sources(Path(path), call), image_size, cache_dir, call)
        keep = np.isin(ids, wanted)
        if not keep.any():
            raise ValueError(f"{call}: none of the split's {len(wanted)} characters is in this data (it holds "
                             f"{len(ids)} characters, ids {ids.min()}..{ids.max()}). Fix: pass a split the data "
                             "covers, or the full Omniglot data.")
        if keep.sum() < len(wanted):
            warnings.warn(f"{call}: found {keep.sum()} of the split's {len(wanted)} characters; using those.",
                          stacklevel=2)
        images = torch.from_numpy(pixels[keep])
        turns = 4 if rotations else 1
        images = torch.cat([torch.rot90(images, r, dims=(-2, -1)) for r in range(turns)])
        self.images: Tensor = images if dtype == torch.uint8 else images.to(dtype).div_(255)
        self.character_ids: Tensor = torch.from_numpy(ids[keep]).repeat(turns)
        self.rotation_degrees: Tensor = torch.arange(turns).mul(90).repeat_interleave(int(keep.sum()))
        self.alphabets: tuple[str, ...] = tuple(str(a) for a in alphabets[keep]) * turns
        self.split, self.rotations, self.path = split, rotations, Path(path)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (f"Omniglot(split={self.split!r}, classes={len(self)}, rotations={self.rotations}, "
                f"images={tuple(self.images.shape)} {self.images.dtype})")


def _split_ids(split: str, validation: int, call: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"{call}: unknown split. Fix: pass one of {', '.join(map(repr, SPLITS))}.")
    pool = MAML_TRAIN_CHARACTERS if split.startswith("maml") else NUM_BACKGROUND
    if isinstance(validation, bool) or not isinstance(validation, int) or not 0 <= validation < pool:
        raise ValueError(f"{call}: validation must be an int in 0..{pool - 1} (characters held out of "
                         "the training split). Fix: pass e.g. validation=100.")
    if split.endswith("-val") and validation == 0:
        raise ValueError(f"{call}: the validation split is empty. Fix: pass e.g. validation=100.")
    if split == "evaluation":
        return np.arange(NUM_BACKGROUND + 1, NUM_CHARACTERS + 1)
    if split.startswith("maml"):
        order = _hash_order(range(1, NUM_CHARACTERS + 1), "maml")
        if split == "maml-test":
            return np.sort(order[MAML_TRAIN_CHARACTERS:])
        order = order[:MAML_TRAIN_CHARACTERS]
    else:
        order = _hash_order(range(1, NUM_BACKGROUND + 1), "background")
    cut = len(order) - validation
    return np.sort(order[cut:] if split.endswith("-val") else order[:cut])


def _hash_order(ids: range, salt: str) -> np.ndarray:
    key = lambda i: hashlib.sha256(f"bilevel-omniglot-{salt}:{i}".encode()).digest()  # noqa: E731
    return np.array(sorted(ids, key=key), dtype=np.int64)
