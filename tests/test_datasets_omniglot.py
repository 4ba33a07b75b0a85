"""Tests of the Omniglot reader: npz / zip / PNG tree on small data written here, the resize, the
splits, rotations, the cache (reuse, corruption, atomic files), bad input; then the real data."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bilevel.datasets import _omniglot_io as om
from bilevel.datasets.omniglot import Omniglot, omniglot_split
from tests._data import data_dir

BACKGROUND_IDS = (1, 2, 3, 4, 5, 6)      # synthetic background characters (ids 1..6)
EVALUATION_IDS = (965, 966, 967)       # synthetic evaluation characters


def _paper(n: int, seed: int) -> np.ndarray:
    """Random (n, 20, 105, 105) bool drawings, True = paper, about 10% ink."""
    return np.random.default_rng(seed).random((n, 20, 105, 105)) > 0.1


def _png(paper: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(paper).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


def _members(ids: tuple[int, ...], paper: np.ndarray, top: str = "images_background"):
    for i, cid in enumerate(ids):
        for d in range(20):
            yield f"{top}/Alpha{cid % 2}/character{i + 1:02d}/{cid:04d}_{d + 1:02d}.png", _png(paper[i, d])


def _write_zip(path: Path, members) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in members:
            archive.writestr(name, raw)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """The same synthetic characters as npz files, as an official-layout zip and as a PNG tree."""
    root = tmp_path_factory.mktemp("omniglot-synthetic")
    bg, ev = _paper(len(BACKGROUND_IDS), 0), _paper(len(EVALUATION_IDS), 1)
    (root / "npz").mkdir()
    np.savez_compressed(root / "npz" / "images_background.npz", images=bg,
                        labels=np.repeat(np.arange(len(bg))[:, None], 20, 1))
    np.savez_compressed(root / "npz" / "images_evaluation.npz", images=ev,
                        labels=np.repeat(np.arange(len(ev))[:, None], 20, 1))
    (root / "zips").mkdir()
    _write_zip(root / "zips" / "images_background.zip", _members(BACKGROUND_IDS, bg))
    _write_zip(root / "zips" / "images_evaluation.zip", _members(EVALUATION_IDS, ev, "images_evaluation"))
    for name, raw in [*_members(BACKGROUND_IDS, bg), *_members(EVALUATION_IDS, ev, "images_evaluation")]:
        (root / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "tree" / name).write_bytes(raw)
    return {"root": root, "background": bg, "evaluation": ev}


def _load(path, split="background", **kwargs) -> Omniglot:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*found \d+ of the split's")
        return Omniglot(path, split, **kwargs)


def test_resize_is_area_average_with_ink_one() -> None:
    paper = np.ones((105, 105), bool)
    paper[:4] = False                         # ink on input rows 0..3
    small = om.resize(paper, 28)
    # output row 0 averages input rows [0, 4): all ink; row 1 averages rows [3, 8): 1 of 5 rows
    assert small.dtype == np.uint8 and small.shape == (28, 28)
    assert (small[0] == 255).all() and (small[1] == 51).all() and (small[2:] == 0).all()
    assert (om.resize(np.zeros((2, 105, 105), bool), 14) == 255).all()


def test_npz_zip_and_tree_give_the_same_images(synthetic, tmp_path) -> None:
    root, bg = synthetic["root"], synthetic["background"]
    loaded = {kind: _load(root / kind, cache_dir=False) for kind in ("npz", "zips", "tree")}
    expected = torch.from_numpy(om.resize(bg, 28)).float() / 255
    for kind, data in loaded.items():
        assert data.images.shape == (6, 20, 28, 28) and data.images.dtype == torch.float32, kind
        assert data.character_ids.tolist() == list(BACKGROUND_IDS), kind
        assert torch.equal(data.images, expected), kind
    assert loaded["npz"].alphabets == ("",) * 6
    assert loaded["zips"].alphabets == loaded["tree"].alphabets == tuple(f"Alpha{i % 2}" for i in BACKGROUND_IDS)
    single_zip = _load(root / "zips" / "images_evaluation.zip", "evaluation", cache_dir=False)
    assert single_zip.character_ids.tolist() == list(EVALUATION_IDS)
    ink = 1.0 - synthetic["evaluation"].mean()
    assert abs(single_zip.images.mean().item() - ink) < 1e-3


def test_incomplete_split_warns_and_unknown_split_raises(synthetic) -> None:
    with pytest.warns(UserWarning, match=r"found 6 of the split's 964 characters; using those"):
        Omniglot(synthetic["root"] / "npz", "background", cache_dir=False)
    none = r"none of the split's 659 characters is in this data \(it holds 6 characters, ids 1..6\)"
    with pytest.raises(ValueError, match=none):
        _load(synthetic["root"] / "zips" / "images_background.zip", "evaluation", cache_dir=False)
    with pytest.raises(ValueError, match=r"Omniglot\(split='train', validation=0\): unknown split. Fix: pass"):
        Omniglot(synthetic["root"] / "npz", "train")


def test_rotations_and_dtypes(synthetic) -> None:
    plain = _load(synthetic["root"] / "npz", cache_dir=False)
    rotated = _load(synthetic["root"] / "npz", rotations=True, cache_dir=False)
    assert len(rotated) == 4 * len(plain) == 24
    assert rotated.rotation_degrees.tolist() == [0] * 6 + [90] * 6 + [180] * 6 + [270] * 6
    assert rotated.character_ids.tolist() == list(BACKGROUND_IDS) * 4
    for r in range(4):
        assert torch.equal(rotated.images[6 * r + 2], torch.rot90(plain.images[2], r, dims=(-2, -1)))
    raw = _load(synthetic["root"] / "npz", dtype=torch.uint8, image_size=20, cache_dir=False)
    assert raw.images.dtype == torch.uint8 and raw.images.shape == (6, 20, 20, 20)
    assert "classes=6" in repr(raw)


def test_cache_is_reused_and_kept_out_of_the_data_folder(synthetic, tmp_path, monkeypatch) -> None:
    data = synthetic["root"] / "npz"
    before = sorted(os.listdir(data))
    first = _load(data, cache_dir=tmp_path / "cache")
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npz")
    assert sorted(os.listdir(data)) == before
    monkeypatch.setattr(om, "_build", lambda *a: pytest.fail("the valid cache was not used"))
    second = _load(data, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images)


def test_default_cache_dir_follows_xdg(synthetic, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _load(synthetic["root"] / "npz")
    assert len(list((tmp_path / "bilevel" / "omniglot").glob("*.npz"))) == 1


@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "bad-manifest", "no-manifest"])
def test_corrupt_cache_is_rebuilt_not_trusted(synthetic, tmp_path, damage) -> None:
    data, cache = synthetic["root"] / "npz", tmp_path / "cache"
    good = _load(data, cache_dir=cache)
    [npz_file] = cache.glob("*.npz")
    [manifest] = cache.glob("*.json")
    raw = bytearray(npz_file.read_bytes())
    if damage == "flip-a-byte":
        raw[len(raw) // 2] ^= 0xFF
        npz_file.write_bytes(bytes(raw))
    elif damage == "truncate":
        npz_file.write_bytes(bytes(raw[: len(raw) // 3]))
    elif damage == "bad-manifest":
        manifest.write_text("{not json")
    else:
        manifest.unlink()
    with pytest.warns(UserWarning, match="preprocessing cache .* is invalid"):
        rebuilt = _load(data, cache_dir=cache)
    assert torch.equal(rebuilt.images, good.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the rebuilt cache is valid again
        warnings.filterwarnings("ignore", message=r".*found \d+ of the split's")
        Omniglot(data, cache_dir=cache)
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_cache_key_follows_the_source(synthetic, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    np.savez_compressed(data / "images_background.npz", images=synthetic["background"][:2])
    first = _load(data, cache_dir=tmp_path / "cache")
    np.savez_compressed(data / "images_background.npz", images=synthetic["background"][2:5])
    assert len(_load(data, cache_dir=tmp_path / "cache")) == 3 != len(first)


@pytest.mark.parametrize("member", ["../0001_01.png", "/abs/0001_01.png", "a/../../0001_01.png",
                                    "C:/x/0001_01.png", "..\\evil.png"])
def test_zip_members_with_absolute_or_parent_paths_are_refused(tmp_path, member) -> None:
    good = list(_members((1,), _paper(1, 2)))
    archive = _write_zip(tmp_path / "evil.zip", [*good, (member, b"x")])
    with pytest.raises(ValueError, match=r"absolute or parent \('\.\.'\) path .*refusing to read it"):
        Omniglot(archive, cache_dir=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.zip"]


def test_bad_paths_and_contents(synthetic, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"Omniglot\(path='/no/such/omniglot'.*no such file.*Fix: pass"):
        Omniglot("/no/such/omniglot")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"found no npz, zip or Omniglot PNG .* Fix: pass"):
        Omniglot(tmp_path / "notes", cache_dir=False)
    with pytest.raises(ValueError, match=r"neither images_background.npz"):
        Omniglot(tmp_path / "notes" / "readme.txt", cache_dir=False)
    empty = _write_zip(tmp_path / "empty.zip", [("images_background/readme.txt", b"no pngs here")])
    with pytest.raises(ValueError, match=r"empty.zip holds no Omniglot PNG"):
        Omniglot(empty, cache_dir=False)
    bomb = _write_zip(tmp_path / "bomb.zip", [("a/b/0001_01.png", bytes(2 << 20))])
    with pytest.raises(ValueError, match=r"has a 2097152-byte PNG .*under 2 KB"):
        Omniglot(bomb, cache_dir=False)
    (tmp_path / "broken.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"broken.zip is not a readable zip archive"):
        Omniglot(tmp_path / "broken.zip", cache_dir=False)


@pytest.mark.parametrize(("images", "match"), [
    (np.ones((2, 20, 50, 50), bool), r"shape \(2, 20, 50, 50\); expected bool \(n <= 964, 20, 105, 105\)"),
    (np.ones((2, 20, 105, 105), np.uint8), r"dtype uint8 .*expected bool"),
    (np.ones((965, 1, 105, 105), bool), r"shape \(965, 1, 105, 105\)"),
])
def test_npz_with_wrong_arrays(tmp_path, images, match) -> None:
    np.savez(tmp_path / "images_background.npz", images=images)
    with pytest.raises(ValueError, match=match):
        Omniglot(tmp_path, cache_dir=False)


def test_npz_without_images_and_incomplete_pngs(tmp_path) -> None:
    np.savez(tmp_path / "images_background.npz", pictures=np.zeros(3))
    with pytest.raises(ValueError, match=r"has no 'images' array"):
        Omniglot(tmp_path, cache_dir=False)
    members = list(_members((1,), _paper(1, 3)))
    del members[4]                                        # drawing 5 of character 1 is missing
    with pytest.raises(ValueError, match=r"character 1 lacks drawings \[5\]"):
        Omniglot(_write_zip(tmp_path / "partial.zip", members), cache_dir=False)
    wrong = _write_zip(tmp_path / "wrong.zip", [("a/b/9999_01.png", _png(np.ones((105, 105), bool)))])
    with pytest.raises(ValueError, match=r"names character 9999, drawing 1"):
        Omniglot(wrong, cache_dir=False)
    small = _write_zip(tmp_path / "small.zip", [("a/b/0001_01.png", _png(np.ones((50, 50), bool)))])
    with pytest.raises(ValueError, match=r"is 50x50 pixels; Omniglot's are 105x105"):
        Omniglot(small, cache_dir=False)


def test_bad_options(synthetic) -> None:
    path = synthetic["root"] / "npz"
    with pytest.raises(ValueError, match=r"Omniglot\(image_size=0\): expected an int in 1..105"):
        Omniglot(path, image_size=0)
    with pytest.raises(ValueError, match=r"Omniglot\(dtype=torch.int32\)"):
        Omniglot(path, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"split='maml-val', validation=0\): the validation split is empty"):
        Omniglot(path, "maml-val")
    with pytest.raises(ValueError, match=r"validation must be an int in 0..1199"):
        Omniglot(path, "maml-train", validation=1200)
    with pytest.raises(ValueError, match=r"Omniglot\(cache_dir=True\)"):
        Omniglot(path, cache_dir=True)


def test_splits_partition_the_characters() -> None:
    train, test = set(omniglot_split("maml-train")), set(omniglot_split("maml-test"))
    assert len(train) == 1200 and len(test) == 423 and train | test == set(range(1, 1624))
    train_v, val = set(omniglot_split("maml-train", 100)), set(omniglot_split("maml-val", 100))
    assert len(val) == 100 and train_v | val == train and not train_v & val
    bg, ev = omniglot_split("background"), omniglot_split("evaluation")
    assert bg == tuple(range(1, 965)) and ev == tuple(range(965, 1624))
    assert omniglot_split("maml-test")[:5] == (5, 9, 12, 18, 21)
    bg_v = set(omniglot_split("background-val", 64))
    assert len(bg_v) == 64 and bg_v | set(omniglot_split("background", 64)) == set(range(1, 965))
    # the MAML split is a fixed function of the ids: pin it
    digest = hashlib.sha256(np.asarray(omniglot_split("maml-test"), dtype=np.int64).tobytes()).hexdigest()
    assert digest == MAML_TEST_SHA256


MAML_TEST_SHA256 = "cb87645d4e7a673a850ed873f8286a89912d8f89da4170abddeaf7eb1b24e1d5"


# ---- the real data (skipped when absent) ---------------------------------------------------------

@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.mark.data
def test_real_full_data_maml_split(real_cache) -> None:
    root = data_dir("omniglot")
    train = Omniglot(root, "maml-train", cache_dir=real_cache)
    test = Omniglot(root, "maml-test", cache_dir=real_cache, rotations=True)
    assert train.images.shape == (1200, 20, 28, 28) and test.images.shape == (4 * 423, 20, 28, 28)
    assert not set(train.character_ids.tolist()) & set(test.character_ids.tolist())
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    assert 0.03 < train.images.mean() < 0.2                       # ink is the minority of pixels
    assert len(Omniglot(root, "background", cache_dir=real_cache)) == 964
    assert len(Omniglot(root, "evaluation", cache_dir=real_cache)) == 659


@pytest.mark.data
def test_real_small_zips_equal_the_npz(real_cache, tmp_path) -> None:
    """SOURCE.md: the official small zips' PNGs equal the npz at [id-1, drawing-1]; so must ours."""
    root = data_dir("omniglot")
    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        (tmp_path / name).symlink_to(root / name)
    from_zips = _load(tmp_path, cache_dir=real_cache)          # a folder of zips, read in memory
    assert len(from_zips) == 136 + 156 - (24 + 26)             # Greek and Latin are in both zips
    full = Omniglot(root, "background", cache_dir=real_cache)
    assert torch.equal(from_zips.images, full.images[from_zips.character_ids - 1])
    assert {"Balinese", "Greek", "Latin", "Tagalog"} <= set(from_zips.alphabets)
    assert sorted(os.listdir(tmp_path)) == ["images_background_small1.zip", "images_background_small2.zip"]
