"""Tests for the embedded synthetic butterfly generator."""

import numpy as np
import pytest
from PIL import Image

from difftool.builtins.synthetic import draw_butterfly, synthetic_butterflies


def _arrays(rows: list[dict]) -> list[np.ndarray]:
    return [np.asarray(row["image"], dtype=np.int16) for row in rows]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return synthetic_butterflies(count=32, seed=0, size=64)


def test_rows_are_rgb_images_of_requested_size(rows):
    assert len(rows) == 32
    for row in rows:
        assert set(row) == {"image"}
        assert isinstance(row["image"], Image.Image)
        assert row["image"].mode == "RGB"
        assert row["image"].size == (64, 64)


@pytest.mark.parametrize("size", [8, 13, 32, 96])
def test_other_sizes(size):
    image = synthetic_butterflies(count=2, size=size)[1]["image"]
    assert image.mode == "RGB" and image.size == (size, size)


def test_same_args_give_identical_bytes(rows):
    again = synthetic_butterflies(count=32, seed=0, size=64)
    assert [r["image"].tobytes() for r in rows] == [r["image"].tobytes() for r in again]


def test_growing_count_keeps_earlier_images(rows):
    short = synthetic_butterflies(count=5, seed=0, size=64)
    longer = synthetic_butterflies(count=100, seed=0, size=64)
    for i in range(5):
        assert short[i]["image"].tobytes() == rows[i]["image"].tobytes()
        assert longer[i]["image"].tobytes() == rows[i]["image"].tobytes()


def test_draw_butterfly_matches_per_index_rng(rows):
    image = draw_butterfly(np.random.default_rng([0, 7]), 64)
    assert image.tobytes() == rows[7]["image"].tobytes()


def test_different_seeds_differ(rows):
    other = synthetic_butterflies(count=32, seed=1, size=64)
    assert all(a["image"].tobytes() != b["image"].tobytes() for a, b in zip(rows, other))
    assert len({r["image"].tobytes() for r in rows}) == len(rows)


def test_bilateral_symmetry(rows):
    for arr in _arrays(rows):
        assert np.abs(arr - arr[:, ::-1]).mean() < 3


def test_light_background(rows):
    for arr in _arrays(rows):
        corners = arr[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert corners.mean() > 200


def test_has_dark_body_and_wings(rows):
    for arr in _arrays(rows):
        centre = arr[20:44, 31:33].sum(axis=2)
        assert centre.min() < 3 * 80, "expected a dark body on the centre line"
        assert (np.abs(arr - arr[0, 0]).sum(axis=2) > 60).mean() > 0.08, "expected sizeable wings"


def test_colourful(rows):
    spreads = [np.ptp(arr, axis=2) for arr in _arrays(rows)]
    assert max(s.max() for s in spreads) > 60
    assert sum((s > 60).any() for s in spreads) >= 0.8 * len(spreads)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"count": 0}, "count"), ({"count": -3}, "count"), ({"size": 7}, "size"), ({"size": 0}, "size")],
)
def test_bad_args_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        synthetic_butterflies(**kwargs)
