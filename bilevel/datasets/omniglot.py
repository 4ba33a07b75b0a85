"""Omniglot (Lake et al. 2015): read the npz arrays or the official PNGs, resize, cache, split, rotate."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NUM_CHARACTERS = 1623      # official character ids 1..1623
NUM_BACKGROUND = 964       # ids 1..964 form the background set, 965..1623 the evaluation set
DRAWINGS = 20              # drawings per character
SIDE = 105                 # side of the official images
MAML_TRAIN_CHARACTERS = 1200
SPLITS = ("background", "background-val", "evaluation", "maml-train", "maml-val", "maml-test")

_CACHE_VERSION = 1
_NPZ = {"images_background.npz": (1, NUM_BACKGROUND), "images_evaluation.npz": (NUM_BACKGROUND + 1, 659)}
_PNG = re.compile(r"^(\d{4})_(\d{2})\.png$")
_FIX = ("Fix: pass the folder holding images_background.npz / images_evaluation.npz, an official Omniglot "
        ".zip (or a folder of them), or a folder of the official PNGs (<Alphabet>/characterNN/XXXX_YY.png).")


def omniglot_split(split: str, validation: int = 0) -> tuple[int, ...]:
    """The official character ids (1..1623, sorted) of a split; see :class:`Omniglot`."""
    return _split_ids(split, validation, f"omniglot_split(split={split!r}, validation={validation!r})")


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
        >>> from bilevel.datasets import Omniglot  # doctest: +SKIP
        >>> train = Omniglot("data/omniglot", split="maml-train", rotations=True)  # doctest: +SKIP
        >>> train.images.shape  # doctest: +SKIP
        torch.Size([4800, 20, 28, 28])

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
        ids, alphabets, pixels = _load(_find_sources(Path(path), call), image_size, cache_dir, call)
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


@dataclass(frozen=True)
class _Source:
    kind: str                                   # "npz", "zip" or "tree"
    path: Path
    files: tuple[tuple[str, int, int], ...] = ()  # tree: (relative path, char id, drawing)


def _find_sources(path: Path, call: str) -> list[_Source]:
    if not path.exists():
        raise FileNotFoundError(f"{call}: no such file or directory. {_FIX}")
    if path.is_file():
        if path.suffix.lower() == ".zip":
            return [_Source("zip", path)]
        if path.name in _NPZ:
            return [_Source("npz", path)]
        raise ValueError(f"{call}: this file is neither images_background.npz / images_evaluation.npz nor a "
                         f".zip. {_FIX}")
    npz = [_Source("npz", path / name) for name in _NPZ if (path / name).is_file()]
    zips = [_Source("zip", p) for p in sorted(path.glob("*.zip")) if p.is_file()]
    if npz or zips:
        return npz or zips
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            if match := _PNG.match(name):
                rel = (Path(root) / name).relative_to(path).as_posix()
                files.append((rel, int(match[1]), int(match[2])))
    if not files:
        raise ValueError(f"{call}: found no npz, zip or Omniglot PNG (XXXX_YY.png) in this folder. {_FIX}")
    return [_Source("tree", path, tuple(files))]


def _load(sources: list[_Source], side: int, cache_dir: str | os.PathLike | bool | None,
          call: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (C,) int64, alphabets (C,) str, pixels (C, 20, side, side) uint8), from the cache when valid."""
    if cache_dir is False:
        return _build(sources, side, call)
    prints = []
    for s in sources:
        stat = s.path.stat()
        files = [(rel, st.st_size, st.st_mtime_ns) for rel, _, _ in s.files if (st := (s.path / rel).stat())]
        prints.append([s.kind, str(s.path.resolve()), stat.st_size, stat.st_mtime_ns, files])
    key = hashlib.sha256(json.dumps([_CACHE_VERSION, side, prints]).encode()).hexdigest()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    data_file, manifest = folder / f"omniglot-{side}-{key[:20]}.npz", folder / f"omniglot-{side}-{key[:20]}.json"
    if data_file.exists() or manifest.exists():
        try:
            return _read_cache(data_file, manifest, key, side)
        except Exception as err:  # any defect: rebuild, never trust
            warnings.warn(f"{call}: the preprocessing cache {data_file} is invalid ({err}); rebuilding it.",
                          stacklevel=3)
    built = _build(sources, side, call)
    try:
        _write_cache(data_file, manifest, key, built)
    except OSError as err:
        warnings.warn(f"{call}: could not write the preprocessing cache in {folder} ({err}); going on without "
                      "it. Fix: pass cache_dir=<a writable folder>, or cache_dir=False.", stacklevel=3)
    return built


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bilevel" / "omniglot"


def _read_cache(data_file: Path, manifest: Path, key: str, side: int) -> tuple[np.ndarray, ...]:
    meta = json.loads(manifest.read_text())
    if meta.get("version") != _CACHE_VERSION or meta.get("key") != key:
        raise ValueError("manifest of another version or source")
    raw = data_file.read_bytes()
    if len(raw) != meta["bytes"] or hashlib.sha256(raw).hexdigest() != meta["sha256"]:
        raise ValueError("size or checksum differs from the manifest")
    with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
        ids, alphabets, pixels = arrays["ids"], arrays["alphabets"], arrays["pixels"]
    if pixels.dtype != np.uint8 or pixels.shape != (len(ids), DRAWINGS, side, side) or len(alphabets) != len(ids):
        raise ValueError(f"unexpected arrays {pixels.dtype}{pixels.shape}")
    return ids, alphabets, pixels


def _write_cache(data_file: Path, manifest: Path, key: str, arrays: tuple[np.ndarray, ...]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, ids=arrays[0], alphabets=arrays[1], pixels=arrays[2])
    raw = buffer.getvalue()
    meta = {"version": _CACHE_VERSION, "key": key, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    data_file.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(data_file, raw)                       # data first: an old manifest cannot vouch for it
    _atomic_write(manifest, json.dumps(meta).encode())


def _atomic_write(target: Path, raw: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build(sources: list[_Source], side: int, call: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    done: dict[int, tuple[str, np.ndarray]] = {}
    pending: dict[int, tuple[str, np.ndarray, np.ndarray]] = {}

    def put(cid: int, alphabet: str, pixels: np.ndarray, where: str) -> None:
        if cid in done and not np.array_equal(done[cid][1], pixels):
            raise ValueError(f"{call}: character {cid} appears twice with different images ({where}). "
                             "Fix: pass one copy of the data.")
        done.setdefault(cid, (alphabet, pixels))

    def put_png(raw: bytes, cid: int, drawing: int, alphabet: str, where: str) -> None:
        if not (1 <= cid <= NUM_CHARACTERS and 1 <= drawing <= DRAWINGS):
            raise ValueError(f"{call}: {where} names character {cid}, drawing {drawing}; Omniglot has characters "
                             f"1..{NUM_CHARACTERS} with drawings 1..{DRAWINGS}. {_FIX}")
        if cid in done:  # already complete from an earlier source (the small zips overlap)
            return
        _, paper, seen = pending.setdefault(cid, (alphabet, np.ones((DRAWINGS, SIDE, SIDE), bool), np.zeros(DRAWINGS, bool)))
        image = _decode_png(raw, where, call)
        if seen[drawing - 1] and not np.array_equal(paper[drawing - 1], image):
            raise ValueError(f"{call}: {where} repeats character {cid}, drawing {drawing} with a different image. "
                             "Fix: pass one copy of the data.")
        paper[drawing - 1], seen[drawing - 1] = image, True
        if seen.all():
            put(cid, alphabet, _resize(paper, side), where)
            del pending[cid]

    for source in sources:
        if source.kind == "npz":
            first, most = _NPZ[source.path.name]
            for start, paper in _read_npz(source.path, most, call):
                for i, pixels in enumerate(_resize(paper, side)):
                    put(first + start + i, "", pixels, str(source.path))
        elif source.kind == "zip":
            for member, raw in _read_zip(source.path, call):
                match = _PNG.match(member.name)
                put_png(raw, int(match[1]), int(match[2]), _alphabet(member), f"{source.path}:{member}")
        else:
            for rel, cid, drawing in source.files:
                put_png((source.path / rel).read_bytes(), cid, drawing, _alphabet(PurePosixPath(rel)),
                        str(source.path / rel))
    if pending:
        cid, (_, _, seen) = next(iter(pending.items()))
        raise ValueError(f"{call}: character {cid} lacks drawings {[i + 1 for i in np.flatnonzero(~seen)]} "
                         f"({len(pending)} characters are incomplete). Fix: pass the complete data (20 drawings "
                         "per character).")
    ids = np.array(sorted(done), dtype=np.int64)
    alphabets = np.array([done[i][0] for i in ids], dtype=str)
    return ids, alphabets, np.stack([done[i][1] for i in ids])


def _alphabet(member: PurePosixPath) -> str:
    return member.parts[-3] if len(member.parts) >= 3 else ""


def _resize(paper: np.ndarray, side: int) -> np.ndarray:
    """``(..., 105, 105)`` bool (True = paper) to ``(..., side, side)`` uint8 ink (255 = full ink)."""
    ink = torch.from_numpy(~paper.reshape(-1, 1, SIDE, SIDE)).to(torch.float32)
    small = F.interpolate(ink, size=(side, side), mode="area")
    return small.mul_(255).round_().to(torch.uint8).reshape(*paper.shape[:-2], side, side).numpy()


def _read_npz(path: Path, most: int, call: str, chunk: int = 128):
    """Yield ``(first index, bool paper (n, 20, 105, 105))`` chunks, streaming the npz's ``images``."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{call}: {path.name} is not a readable npz file ({err}). {_FIX}") from err
    with archive:
        if "images.npy" not in archive.namelist():
            raise ValueError(f"{call}: {path.name} has no 'images' array (it holds {archive.namelist()}). {_FIX}")
        with archive.open("images.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if dtype != np.bool_ or fortran or len(shape) != 4 or shape[1:] != (DRAWINGS, SIDE, SIDE) \
                    or not 1 <= shape[0] <= most:
                raise ValueError(f"{call}: {path.name} holds 'images' of dtype {dtype} and shape {shape}; expected "
                                 f"bool (n <= {most}, {DRAWINGS}, {SIDE}, {SIDE}), True = paper. {_FIX}")
            size = DRAWINGS * SIDE * SIDE
            for start in range(0, shape[0], chunk):
                n = min(chunk, shape[0] - start)
                raw = f.read(n * size)
                if len(raw) != n * size:
                    raise ValueError(f"{call}: {path.name} is truncated. {_FIX}")
                yield start, np.frombuffer(raw, dtype=bool).reshape(n, DRAWINGS, SIDE, SIDE)


def _read_zip(path: Path, call: str):
    """Yield ``(member path, bytes)`` for each Omniglot PNG, read in memory; unsafe member names are refused."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{call}: {path} is not a readable zip archive ({err}). {_FIX}") from err
    with archive:
        infos = archive.infolist()
        for info in infos:
            name = info.filename.replace("\\", "/")
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
                raise ValueError(f"{call}: the archive {path} has a member with an absolute or parent ('..') path "
                                 f"({info.filename!r}); refusing to read it. Fix: use the official Omniglot zips, "
                                 "or repack the archive with relative paths.")
        pngs = [info for info in infos if _PNG.match(PurePosixPath(info.filename).name)]
        if not pngs:
            raise ValueError(f"{call}: the archive {path} holds no Omniglot PNG (<Alphabet>/characterNN/"
                             f"XXXX_YY.png). {_FIX}")
        for info in pngs:
            yield PurePosixPath(info.filename), archive.read(info)


def _decode_png(raw: bytes, where: str, call: str) -> np.ndarray:
    """A 105×105 PNG as bool, True = paper (the npz convention)."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(f"{call}: reading PNGs needs Pillow. Fix: pip install pillow, or pass the npz "
                          "files.") from err
    try:
        with Image.open(io.BytesIO(raw)) as image:
            gray = np.asarray(image.convert("L"))
    except Exception as err:
        raise ValueError(f"{call}: {where} is not a readable image ({err}). {_FIX}") from err
    if gray.shape != (SIDE, SIDE):
        raise ValueError(f"{call}: {where} is {gray.shape[1]}x{gray.shape[0]} pixels; Omniglot's are "
                         f"{SIDE}x{SIDE}. {_FIX}")
    return gray >= 128
