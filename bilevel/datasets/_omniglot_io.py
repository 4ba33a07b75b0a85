"""Omniglot files to arrays: find the sources, decode npz / zip / PNG, resize, and cache the result.

Private to :mod:`bilevel.datasets.omniglot`. Every source ends as ``(ids, alphabets, pixels)``:
official character ids ``(C,)``, alphabet names ``(C,)`` and ``(C, 20, S, S)`` uint8 ink.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

NUM_CHARACTERS = 1623      # official character ids 1..1623
NUM_BACKGROUND = 964       # ids 1..964 form the background set, 965..1623 the evaluation set
DRAWINGS = 20              # drawings per character
SIDE = 105                 # side of the official images

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]
_CACHE_VERSION = 1
_MAX_MEMBER = 1 << 20      # bytes: a larger "PNG" in a zip is refused unread (the official ones are < 2 KB)
_NPZ = {"images_background.npz": (1, NUM_BACKGROUND), "images_evaluation.npz": (NUM_BACKGROUND + 1, 659)}
_PNG = re.compile(r"^(\d{4})_(\d{2})\.png$")
_FIX = ("Fix: pass the folder holding images_background.npz / images_evaluation.npz, an official Omniglot "
        ".zip (or a folder of them), or a folder of the official PNGs (<Alphabet>/characterNN/XXXX_YY.png).")


@dataclass(frozen=True)
class _Source:
    kind: str                                   # "npz", "zip" or "tree"
    path: Path
    files: tuple[tuple[str, int, int], ...] = ()  # tree: (relative path, char id, drawing)


def find_sources(path: Path, call: str) -> list[_Source]:
    """What ``path`` holds: npz files beat zips beat a PNG tree; raises when it holds none."""
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


def load(sources: list[_Source], side: int, cache_dir: str | os.PathLike | bool | None, call: str) -> Arrays:
    """(ids (C,) int64, alphabets (C,) str, pixels (C, 20, side, side) uint8), from the cache when valid."""
    if cache_dir is False:
        return _build(sources, side, call)
    def stamp(path: Path) -> tuple[int, int]:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns

    prints = [[s.kind, str(s.path.resolve()), stamp(s.path), [(rel, stamp(s.path / rel)) for rel, _, _ in s.files]]
              for s in sources]   # a changed, moved or replaced source gets a new cache entry
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


def _read_cache(data_file: Path, manifest: Path, key: str, side: int) -> Arrays:
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


def _write_cache(data_file: Path, manifest: Path, key: str, arrays: Arrays) -> None:
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


def _build(sources: list[_Source], side: int, call: str) -> Arrays:
    """Decode and resize every source; a character is kept once (the first complete copy)."""
    done: dict[int, tuple[str, np.ndarray]] = {}
    pending: dict[int, tuple[str, np.ndarray, np.ndarray]] = {}   # PNGs of characters still incomplete
    complete: list[tuple[int, str, np.ndarray]] = []               # complete, not yet resized
    finished: set[int] = set()                                     # ids in done or complete

    def put(ids: range | list[int], alphabets: list[str], paper: np.ndarray, where: str) -> None:
        for cid, alphabet, pixels in zip(ids, alphabets, resize(paper, side)):  # one batched resize
            if cid in done and not np.array_equal(done[cid][1], pixels):
                raise ValueError(f"{call}: character {cid} appears twice with different images ({where}). "
                                 "Fix: pass one copy of the data.")
            done.setdefault(cid, (alphabet, pixels))

    def flush() -> None:
        if complete:
            put([c[0] for c in complete], [c[1] for c in complete], np.stack([c[2] for c in complete]), "PNGs")
            complete.clear()

    def put_png(raw: bytes, cid: int, drawing: int, alphabet: str, where: str) -> None:
        if not (1 <= cid <= NUM_CHARACTERS and 1 <= drawing <= DRAWINGS):
            raise ValueError(f"{call}: {where} names character {cid}, drawing {drawing}; Omniglot has characters "
                             f"1..{NUM_CHARACTERS} with drawings 1..{DRAWINGS}. {_FIX}")
        if cid in finished:  # complete from an earlier source (the official small zips overlap)
            return
        if cid not in pending:
            pending[cid] = (alphabet, np.ones((DRAWINGS, SIDE, SIDE), bool), np.zeros(DRAWINGS, bool))
        _, paper, seen = pending[cid]
        image = decode_png(raw, where, call)
        if seen[drawing - 1] and not np.array_equal(paper[drawing - 1], image):
            raise ValueError(f"{call}: {where} repeats character {cid}, drawing {drawing} with a different image. "
                             "Fix: pass one copy of the data.")
        paper[drawing - 1], seen[drawing - 1] = image, True
        if seen.all():
            complete.append((cid, alphabet, paper))
            finished.add(cid)
            del pending[cid]
            if len(complete) == 16:  # small batches: the resize runs in cache
                flush()

    for source in sources:
        if source.kind == "npz":
            first, most = _NPZ[source.path.name]
            for start, paper in _read_npz(source.path, most, call):
                put(range(first + start, first + start + len(paper)), [""] * len(paper), paper, str(source.path))
        elif source.kind == "zip":
            for member, raw in _read_zip(source.path, call):
                match = _PNG.match(member.name)
                put_png(raw, int(match[1]), int(match[2]), _alphabet(member), f"{source.path}:{member}")
        else:
            for rel, cid, drawing in source.files:
                put_png((source.path / rel).read_bytes(), cid, drawing, _alphabet(PurePosixPath(rel)),
                        str(source.path / rel))
    flush()
    if pending:
        cid, (_, _, seen) = next(iter(pending.items()))
        raise ValueError(f"{call}: character {cid} lacks drawings {(np.flatnonzero(~seen) + 1).tolist()} "
                         f"({len(pending)} characters are incomplete). Fix: pass the complete data (20 drawings "
                         "per character).")
    ids = np.array(sorted(done), dtype=np.int64)
    alphabets = np.array([done[i][0] for i in ids], dtype=str)
    return ids, alphabets, np.stack([done[i][1] for i in ids])


def _alphabet(member: PurePosixPath) -> str:
    return member.parts[-3] if len(member.parts) >= 3 else ""


def resize(paper: np.ndarray, side: int) -> np.ndarray:
    """``(..., 105, 105)`` bool (True = paper) to ``(..., side, side)`` uint8 ink (255 = full ink)."""
    ink = torch.from_numpy(~paper.reshape(-1, 1, SIDE, SIDE)).to(torch.float32)
    small = F.interpolate(ink, size=(side, side), mode="area")
    return small.mul_(255).round_().to(torch.uint8).reshape(*paper.shape[:-2], side, side).numpy()


def _read_npz(path: Path, most: int, call: str, chunk: int = 16) -> Iterator[tuple[int, np.ndarray]]:
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


def _read_zip(path: Path, call: str) -> Iterator[tuple[PurePosixPath, bytes]]:
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
            if info.file_size > _MAX_MEMBER and _PNG.match(PurePosixPath(name).name):
                raise ValueError(f"{call}: the archive {path} has a {info.file_size}-byte PNG ({info.filename!r}); "
                                 f"Omniglot's are under 2 KB. Fix: use the official Omniglot zips.")
        pngs = [info for info in infos if _PNG.match(PurePosixPath(info.filename).name)]
        if not pngs:
            raise ValueError(f"{call}: the archive {path} holds no Omniglot PNG (<Alphabet>/characterNN/"
                             f"XXXX_YY.png). {_FIX}")
        for info in pngs:
            yield PurePosixPath(info.filename), archive.read(info)


def decode_png(raw: bytes, where: str, call: str) -> np.ndarray:
    """A 105×105 PNG as bool, True = paper (the npz convention)."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(f"{call}: reading PNGs needs Pillow. Fix: pip install pillow, or pass the npz "
                          "files.") from err
    try:
        with Image.open(io.BytesIO(raw)) as image:  # the official PNGs are 1-bit: read them as bool
            paper = np.asarray(image) if image.mode == "1" else np.asarray(image.convert("L")) >= 128
    except Exception as err:
        raise ValueError(f"{call}: {where} is not a readable image ({err}). {_FIX}") from err
    if paper.shape != (SIDE, SIDE):
        raise ValueError(f"{call}: {where} is {paper.shape[-1]}x{paper.shape[0]} pixels; Omniglot's are "
                         f"{SIDE}x{SIDE}. {_FIX}")
    return paper
