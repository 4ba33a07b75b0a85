"""Tests of the sinusoid task family: shapes, seeding, ranges, the ground-truth curve, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.datasets.sinusoid import Sinusoid, TaskBatch


def test_shapes_and_default_queries() -> None:
    batch = Sinusoid(shots=5).sample(7, seed=0)
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == batch.support_y.shape == (7, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (7, 5, 1)
    assert batch.amplitude.shape == batch.phase.shape == batch.frequency.shape == (7,)
    batch = Sinusoid(shots=3, queries=11).sample(2, seed=0)
    assert batch.support_x.shape == (2, 3, 1) and batch.query_x.shape == (2, 11, 1)


def test_same_seed_same_tasks_and_generator_advances() -> None:
    family = Sinusoid(shots=4)
    a, b = family.sample(6, seed=3), family.sample(6, seed=3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.amplitude, family.sample(6, seed=4).amplitude)
    gen = torch.Generator().manual_seed(3)
    first, second = family.sample(6, gen), family.sample(6, gen)
    assert torch.equal(first.amplitude, a.amplitude)
    assert not torch.equal(first.amplitude, second.amplitude)
    again = torch.Generator().manual_seed(3)
    family.sample(6, again)
    assert torch.equal(family.sample(6, again).query_x, second.query_x)


def test_maml_ranges_and_exact_curve() -> None:
    batch = Sinusoid(shots=10, queries=10).sample(2000, seed=0)
    assert 0.1 <= batch.amplitude.min() and batch.amplitude.max() <= 5.0
    assert 0.0 <= batch.phase.min() and batch.phase.max() <= math.pi
    assert torch.all(batch.frequency == 1.0)
    for x in (batch.support_x, batch.query_x):
        assert -5.0 <= x.min() and x.max() <= 5.0
    # the draws fill their ranges (uniform: mean near the middle)
    assert abs(batch.amplitude.mean().item() - 2.55) < 0.15
    assert abs(batch.phase.mean().item() - math.pi / 2) < 0.1
    expected = batch.amplitude[:, None, None] * torch.sin(batch.support_x - batch.phase[:, None, None])
    assert torch.equal(batch.support_y, expected)
    assert torch.equal(Sinusoid.function(batch, batch.query_x), batch.query_y)


def test_meta_sgd_frequency() -> None:
    family = Sinusoid.meta_sgd(shots=5)
    assert family.frequency_range == (0.8, 1.2)
    batch = family.sample(1000, seed=1)
    assert 0.8 <= batch.frequency.min() and batch.frequency.max() <= 1.2
    assert batch.frequency.std() > 0.05
    w, a, p = (v[:, None, None] for v in (batch.frequency, batch.amplitude, batch.phase))
    assert torch.allclose(batch.query_y, a * torch.sin(w * batch.query_x - p))


def test_function_on_a_shared_grid() -> None:
    batch = Sinusoid().sample(3, seed=0)
    grid = torch.linspace(-5, 5, 50)
    curves = Sinusoid.function(batch, grid)
    assert curves.shape == (3, 50, 1)
    assert torch.equal(curves, Sinusoid.function(batch, grid[:, None]))
    assert torch.allclose(curves[1, :, 0], batch.amplitude[1] * torch.sin(grid - batch.phase[1]))
    with pytest.raises(ValueError, match=r"Sinusoid.function\(x of shape \(4, 50, 1\)\)"):
        Sinusoid.function(batch, torch.zeros(4, 50, 1))


def test_dtype_and_to() -> None:
    batch = Sinusoid(dtype=torch.float64).sample(2, seed=0)
    assert all(t.dtype == torch.float64 for t in batch)
    assert all(t.dtype == torch.float32 for t in batch.to(dtype=torch.float32))


def test_value_semantics() -> None:
    assert Sinusoid(shots=5) == Sinusoid(shots=5) and hash(Sinusoid()) == hash(Sinusoid())
    assert "shots=5" in repr(Sinusoid(shots=5))
    assert Sinusoid(amplitude_range=[1, 2]).amplitude_range == (1.0, 2.0)   # normalised, still hashable
    assert hash(Sinusoid(amplitude_range=[1, 2])) == hash(Sinusoid(amplitude_range=(1.0, 2.0)))


def test_batch_maps_under_vmap() -> None:
    batch = Sinusoid(shots=5).sample(4, seed=0)

    def least_squares_slope(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).sum() / (x * x).sum()

    slopes = torch.func.vmap(least_squares_slope)(batch.support_x, batch.support_y)
    assert slopes.shape == (4,)
    assert torch.allclose(slopes[2], least_squares_slope(batch.support_x[2], batch.support_y[2]))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"shots": 0}, r"Sinusoid\(shots=0\): expected an int >= 1"),
    ({"shots": 2.5}, r"Sinusoid\(shots=2.5\)"),
    ({"queries": 0}, r"Sinusoid\(queries=0\)"),
    ({"amplitude_range": (5.0, 0.1)}, r"Sinusoid\(amplitude_range=\(5.0, 0.1\)\).*low <= high"),
    ({"phase_range": (0.0, math.nan)}, r"Sinusoid\(phase_range=.*finite"),
    ({"x_range": (1.0,)}, r"Sinusoid\(x_range=\(1.0,\)\): expected a pair"),
    ({"frequency_range": "fast"}, r"Sinusoid\(frequency_range='fast'\)"),
    ({"dtype": torch.int64}, r"Sinusoid\(dtype=torch.int64\): expected a floating"),
])
def test_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Sinusoid(**kwargs)


def test_bad_sample_arguments() -> None:
    with pytest.raises(ValueError, match=r"Sinusoid.sample\(num_tasks=0\): expected an int >= 1"):
        Sinusoid().sample(0, seed=0)
    with pytest.raises(TypeError, match=r"Sinusoid.sample\(seed='x'\): expected an int or a torch.Generator"):
        Sinusoid().sample(2, seed="x")  # type: ignore[arg-type]


ranges = st.tuples(st.floats(-10, 10), st.floats(0, 10)).map(lambda t: (t[0], t[0] + t[1]))


@settings(deadline=None, max_examples=25)
@given(amplitude=ranges, phase=ranges, frequency=st.none() | ranges, xs=ranges,
       shots=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_every_draw_is_inside_its_range(amplitude, phase, frequency, xs, shots, seed) -> None:
    family = Sinusoid(shots=shots, amplitude_range=amplitude, phase_range=phase, frequency_range=frequency,
                      x_range=xs, dtype=torch.float64)
    batch = family.sample(8, seed=seed)
    eps = 1e-12
    for values, (low, high) in ((batch.amplitude, amplitude), (batch.phase, phase),
                                (batch.support_x, xs), (batch.query_x, xs),
                                (batch.frequency, frequency or (1.0, 1.0))):
        assert low - eps <= values.min() and values.max() <= high + eps
    assert torch.equal(Sinusoid.function(batch, batch.support_x), batch.support_y)
