"""Tests of the N-way K-shot episode sampler: shapes, labels, which images land where, seeding,
uniformity of the class draw (both code paths), vmap-readiness and bad input."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bilevel.datasets.episodes import Episodes, EpisodeSampler, _distinct


def _coded(classes: int, drawings: int = 20, side: int = 4) -> torch.Tensor:
    """Images whose every pixel holds ``class * drawings + drawing``, so a draw can be decoded."""
    code = torch.arange(classes * drawings, dtype=torch.float32).reshape(classes, drawings, 1, 1)
    return code.expand(classes, drawings, side, side).contiguous()


def _decode(x: torch.Tensor, drawings: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    code = x[..., 0, 0, 0].long()
    return code // drawings, code % drawings


@pytest.mark.parametrize(("classes", "ways", "shots", "queries"), [(30, 5, 1, 15), (12, 5, 5, 5), (4, 4, 2, 18)])
def test_episodes_hold_the_right_images(classes, ways, shots, queries) -> None:
    batch = EpisodeSampler(_coded(classes), ways, shots, queries, seed=0).sample(16)
    assert isinstance(batch, Episodes)
    assert batch.support_x.shape == (16, ways * shots, 1, 4, 4)
    assert batch.query_x.shape == (16, ways * queries, 1, 4, 4)
    assert batch.support_y.dtype == batch.query_y.dtype == torch.int64
    assert batch.support_y.tolist() == [[n for n in range(ways) for _ in range(shots)]] * 16
    assert batch.query_y.tolist() == [[n for n in range(ways) for _ in range(queries)]] * 16
    support_class, support_drawing = _decode(batch.support_x)
    query_class, query_drawing = _decode(batch.query_x)
    # every example comes from the class its label names
    assert torch.equal(support_class, batch.classes.gather(1, batch.support_y))
    assert torch.equal(query_class, batch.classes.gather(1, batch.query_y))
    for b in range(16):
        assert len(set(batch.classes[b].tolist())) == ways                      # distinct classes
        for n in range(ways):                                                   # distinct drawings
            used = [*support_drawing[b][batch.support_y[b] == n].tolist(),
                    *query_drawing[b][batch.query_y[b] == n].tolist()]
            assert len(set(used)) == len(used) == shots + queries


def test_seeded_and_deterministic() -> None:
    images = _coded(50)
    a = EpisodeSampler(images, 5, 1, 3, seed=7)
    b = EpisodeSampler(images, 5, 1, 3, seed=7)
    first, second = a.sample(4), a.sample(4)
    assert all(torch.equal(x, y) for x, y in zip(first, b.sample(4)))
    assert all(torch.equal(x, y) for x, y in zip(second, b.sample(4)))
    assert not torch.equal(first.classes, second.classes)
    c = EpisodeSampler(images, 5, 1, 3, seed=torch.Generator().manual_seed(7))
    assert torch.equal(c.sample(4).support_x, first.support_x)
    assert not torch.equal(EpisodeSampler(images, 5, 1, 3, seed=8).sample(4).classes, first.classes)


@pytest.mark.parametrize(("classes", "ways"), [(8, 3), (30, 5)])   # rand-topk path, then randint path
def test_class_and_label_draws_are_uniform(classes, ways) -> None:
    episodes = 6000
    picked = _distinct(episodes, classes, ways, torch.Generator().manual_seed(0))
    assert all(len(set(row)) == ways for row in picked.tolist())
    expected = episodes * ways / classes
    counts = Counter(picked.flatten().tolist())
    assert sorted(counts) == list(range(classes))
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values())
    first = Counter(picked[:, 0].tolist())          # which class gets label 0 is uniform too
    assert all(abs(first[c] - episodes / classes) < 0.2 * episodes / classes for c in range(classes))


def test_uint8_images_and_objects_with_images() -> None:
    raw = torch.randint(0, 256, (10, 20, 5, 5), dtype=torch.uint8)
    as_float = EpisodeSampler(raw.float() / 255, 3, 2, 2, seed=1).sample(2)
    as_uint8 = EpisodeSampler(raw, 3, 2, 2, seed=1).sample(2)
    assert as_uint8.support_x.dtype == torch.float32
    assert torch.allclose(as_uint8.support_x, as_float.support_x) and torch.allclose(as_uint8.query_x, as_float.query_x)

    class Dataset:  # e.g. an Omniglot
        images = raw.float() / 255

    assert torch.equal(EpisodeSampler(Dataset(), 3, 2, 2, seed=1).sample(2).query_x, as_float.query_x)
    assert "ways=3" in repr(EpisodeSampler(Dataset(), 3, 2))


def test_ready_for_vmap_and_to() -> None:
    batch = EpisodeSampler(torch.rand(10, 20, 6, 6), 5, 2, 3, seed=0).sample(4)
    weight = torch.randn(36, 5)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(x.flatten(1) @ weight, y)

    losses = torch.func.vmap(loss)(batch.support_x, batch.support_y)
    assert losses.shape == (4,)
    assert torch.allclose(losses[1], loss(batch.support_x[1], batch.support_y[1]))
    moved = batch.to(dtype=torch.float64)
    assert moved.support_x.dtype == torch.float64 and moved.support_y.dtype == torch.int64


def test_bad_input() -> None:
    images = torch.rand(10, 20, 4, 4)
    with pytest.raises(ValueError, match=r"EpisodeSampler\(ways=11\): the images hold only 10 classes"):
        EpisodeSampler(images, 11, 1)
    with pytest.raises(ValueError, match=r"shots \+ queries = 21 exceeds the 20 drawings per class"):
        EpisodeSampler(images, 5, 1, 20)
    with pytest.raises(ValueError, match=r"EpisodeSampler\(ways=0\): expected an int >= 1"):
        EpisodeSampler(images, 0, 1)
    with pytest.raises(ValueError, match=r"EpisodeSampler\(shots=0\)"):
        EpisodeSampler(images, 5, 0)
    with pytest.raises(ValueError, match=r"EpisodeSampler\(queries=0\)"):
        EpisodeSampler(images, 5, 1, 0)
    with pytest.raises(ValueError, match=r"EpisodeSampler\(images: shape \(10, 4, 4\) torch.float32\)"):
        EpisodeSampler(images[:, 0], 5, 1)
    with pytest.raises(ValueError, match=r"EpisodeSampler\(images: shape .* torch.int64\)"):
        EpisodeSampler(images.long(), 5, 1)
    with pytest.raises(ValueError, match=r"EpisodeSampler\(images: list\)"):
        EpisodeSampler([1, 2], 5, 1)
    with pytest.raises(ValueError, match=r"EpisodeSampler.sample\(meta_batch=0\)"):
        EpisodeSampler(images, 5, 1).sample(0)
    with pytest.raises(TypeError, match=r"EpisodeSampler\(seed=1.5\)"):
        EpisodeSampler(images, 5, 1, seed=1.5)  # type: ignore[arg-type]
