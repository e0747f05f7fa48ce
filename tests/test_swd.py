"""The built-in `swd` metric: its values on like and unlike image sets, determinism, bounded
memory, its reference state, and its messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difftool.builtins.swd import (Reservoir, SlicedWasserstein, binomial_kernel, laplacian_pyramid, level_sizes,
                                   pyramid_up, swd)
from difftool.errors import DifftoolError
from difftool.metrics import ReferenceCache
from difftool.plugins import registry

FAST = {"directions": 64, "repeats": 2}  # enough directions to rank sets, a fraction of the time


def blobs(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` uint8 images (N, 3, size, size) of smooth random colour blobs."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    fine = torch.rand(count, 3, 8, 8, generator=generator)
    mixed = sum(weight * F.interpolate(grid, size=size, mode="bicubic", align_corners=False)
                for weight, grid in ((0.7, coarse), (0.3, fine)))
    return (mixed.clamp(0, 1) * 255).round().to(torch.uint8)


def noise(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` uint8 images of uniform noise."""
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def evaluate(reference: torch.Tensor, generated: torch.Tensor, batch: int = 64, **kwargs) -> dict[str, float]:
    """The metric's values for two image sets, fed in batches of `batch`."""
    metric = swd(**{**FAST, **kwargs})
    for start in range(0, len(reference), batch):
        metric.update_reference(reference[start:start + batch])
    for start in range(0, len(generated), batch):
        metric.update(generated[start:start + batch])
    return metric.compute()


def test_like_sets_are_close_and_unlike_sets_far():
    images = blobs(128, 32, seed=0)
    halves = evaluate(images[:64], images[64:])["swd"]
    itself = evaluate(images[:64], images[:64])["swd"]
    shuffled = evaluate(images[:64], images[:64].flip(0))["swd"]  # other patches of the same images
    unlike = evaluate(images[:64], noise(64, 32, seed=1))["swd"]
    assert itself == 0.0
    assert 0 < shuffled < halves < unlike / 2.5, (shuffled, halves, unlike)


def test_deterministic_and_independent_of_batching():
    reference, generated = blobs(40, 32, seed=2), blobs(40, 32, seed=3)
    few = {"descriptors_per_image": 32, "max_descriptors": 1000}  # the reservoirs overflow
    whole = evaluate(reference, generated, batch=64, **few)
    assert evaluate(reference, generated, batch=64, **few) == whole
    assert evaluate(reference, generated, batch=16, **few) == whole
    assert evaluate(reference, generated, batch=7, **few) == whole
    assert evaluate(reference, generated, batch=64, **few, seed=1) != whole


def test_reservoir_never_exceeds_its_cap():
    metric = swd(max_descriptors=100, descriptors_per_image=16, **FAST)
    for seed in range(6):
        metric.update_reference(blobs(8, 32, seed))
        metric.update(blobs(8, 32, seed + 100))
        for side in (metric.reference, metric.generated):
            assert all(len(reservoir.data) <= 100 for reservoir in side.reservoirs.values())
    state = metric.reference_state()
    assert state["level_32"].shape == state["level_16"].shape == (100, 147)
    assert int(state["seen_32"]) == int(state["seen_16"]) == 6 * 8 * 16
    assert metric.compute()["swd"] > 0

    single = swd(max_descriptors=1, descriptors_per_image=1, **FAST)  # most images add nothing
    for seed in range(10):
        single.update_reference(blobs(1, 32, seed))
    assert [len(reservoir.data) for reservoir in single.reference.reservoirs.values()] == [1, 1]


def test_reservoir_keeps_a_uniform_sample_whatever_the_batches():
    """Offering the numbers 0..9999 to a reservoir of 1000: what it keeps is spread evenly
    over them, and the same for any batching of the same draws."""
    uniforms = torch.rand(10000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kept = []
    for batch in (10000, 999):
        reservoir = Reservoir(1000, 1, torch.device("cpu"))
        for start in range(0, 10000, batch):
            draws = uniforms[start:start + batch]
            chosen, slots = reservoir.plan(draws)
            reservoir.store(len(draws), slots, (chosen + start).float()[:, None])
        kept.append(reservoir.data[:, 0])
    assert torch.equal(kept[0], kept[1])
    values = kept[0]
    assert len(values.unique()) == 1000
    counts = torch.histc(values, bins=10, min=0, max=10000)
    assert counts.min() >= 70 and counts.max() <= 130, counts  # 100 expected per tenth


def test_reference_state_round_trip_through_the_cache(tmp_path):
    reference, generated = blobs(48, 32, seed=4), blobs(40, 32, seed=5)
    first = swd(**FAST)
    first.update_reference(reference[:32])
    first.update_reference(reference[32:])  # the reservoir's buffer has grown past its 48 * 128 descriptors
    first.update(generated)
    expected = first.compute()
    cache = ReferenceCache(tmp_path)
    path = cache.path("swd", first, "data", 32, FAST)
    cache.save(path, first)

    second = swd(**FAST)
    assert cache.load(path, second)
    assert second.reference_state()["level_32"].shape == (48 * 128, 147)
    second.update(generated)
    assert second.compute() == expected
    assert set(first.reference_state()) == {"size", "generator", "level_32", "seen_32", "level_16", "seen_16"}

    # the restored generator continues the stream: more reference images after a load
    # give what they would have given without the round trip
    more = blobs(8, 32, seed=6)
    first.update_reference(more)
    second.update_reference(more)
    assert second.compute() == first.compute()


def test_reset_forgets_only_the_generated_images():
    metric = swd(**FAST)
    metric.update_reference(blobs(32, 32, seed=7))
    metric.update(blobs(32, 32, seed=8))
    before = metric.compute()
    metric.reset()
    with pytest.raises(DifftoolError, match="no generated images"):
        metric.compute()
    metric.update(blobs(32, 32, seed=8))
    assert metric.compute() == before


def test_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    metric = swd(**FAST)
    metric.update_reference(blobs(16, 32, seed=9))
    metric.update(blobs(16, 32, seed=10))
    metric.compute()
    metric.reset()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("size, levels", [(64, ["64", "32", "16"]), (32, ["32", "16"]), (16, ["16"]),
                                          (12, ["12"]), (48, ["48", "24"]), (40, ["40", "20"])])
def test_levels_are_named_by_resolution(size, levels):
    metric = swd(descriptors_per_image=4, **FAST)
    metric.update_reference(blobs(4, size, seed=11))
    metric.update(blobs(4, size, seed=12))
    values = metric.compute()
    assert list(values) == ["swd"] + [f"swd_{level}" for level in levels]
    assert values["swd"] == pytest.approx(sum(values[f"swd_{level}"] for level in levels) / len(levels))
    assert {key for key in metric.reference_state() if key.startswith("level_")} == {f"level_{l}" for l in levels}


@pytest.mark.parametrize("size", [32, 33])
def test_laplacian_pyramid(size):
    """Flat images have empty band-pass levels; any image is rebuilt from its pyramid."""
    kernel = binomial_kernel(torch.device("cpu"))
    sizes = level_sizes(size, size, 8)
    flat = laplacian_pyramid(torch.full((2, 3, size, size), 0.25), sizes, kernel)
    assert [tuple(level.shape[-2:]) for level in flat] == sizes
    assert all(level.abs().max() < 1e-6 for level in flat[:-1])
    assert torch.allclose(flat[-1], torch.tensor(0.25))

    images = blobs(2, size, seed=17).float() / 255
    levels = laplacian_pyramid(images, sizes, kernel)
    rebuilt = levels[-1].reshape(-1, 1, *levels[-1].shape[-2:])
    for level in reversed(levels[:-1]):
        rebuilt = level.reshape(rebuilt.shape[0], 1, *level.shape[-2:]) + pyramid_up(rebuilt, level.shape[-2:], kernel)
    assert torch.allclose(rebuilt.reshape(images.shape), images, atol=1e-5)


def test_level_sizes_round_odd_sizes_up():
    assert level_sizes(33, 33, 16) == [(33, 33), (17, 17)]
    assert level_sizes(64, 32, 16) == [(64, 32), (32, 16)]
    assert level_sizes(128, 128, 7) == [(128, 128), (64, 64), (32, 32), (16, 16), (8, 8)]


def test_messages_for_missing_and_mismatched_images():
    metric = swd(**FAST)
    with pytest.raises(DifftoolError, match="no reference images"):
        metric.compute()
    metric.update_reference(blobs(4, 64, seed=13))
    metric.update(blobs(0, 32, seed=13))  # an empty batch is no images
    with pytest.raises(DifftoolError, match="no generated images"):
        metric.compute()
    metric.update(blobs(4, 32, seed=14))
    with pytest.raises(DifftoolError, match="the generated images are 32 px and the reference's 64 px"):
        metric.compute()
    with pytest.raises(DifftoolError, match="changed size from 32 px to 64 px.*reset"):
        metric.update(blobs(4, 64, seed=14))
    with pytest.raises(DifftoolError, match="reference images changed size from 64 px to 32 px"):
        metric.update_reference(blobs(4, 32, seed=14))
    with pytest.raises(DifftoolError, match="must be uint8"):
        metric.update(blobs(4, 32, seed=14).float())
    with pytest.raises(DifftoolError, match=r"\(N, 3, H, W\)"):
        metric.update(blobs(4, 32, seed=14)[:, :1])
    with pytest.raises(DifftoolError, match="smaller than a patch"):
        swd().update(blobs(2, 6, seed=15))


@pytest.mark.parametrize("kwargs, message", [
    ({"patch_size": 6}, "patch_size must be odd"),
    ({"patch_size": 1}, "patch_size must be an integer >= 3"),
    ({"descriptors_per_image": 0}, "descriptors_per_image must be a positive integer"),
    ({"max_descriptors": -5}, "max_descriptors must be a positive integer"),
    ({"directions": 2.5}, "directions must be an integer"),
    ({"repeats": True}, "repeats must be an integer"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"min_resolution": 4}, r"min_resolution \(4\) must be at least patch_size \(7\)"),
    ({"device": "no-such-device"}, "is not a torch device"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(DifftoolError, match=message):
        swd(**kwargs)


def test_a_damaged_reference_state_is_refused():
    metric = swd(**FAST)
    metric.update_reference(blobs(2, 32, seed=18))
    state = metric.reference_state()
    with pytest.raises(DifftoolError, match="not an swd reference state"):
        swd().load_reference_state({"level_32": state["level_32"]})
    with pytest.raises(DifftoolError, match=r"level_32 has shape \(256, 147\), not \(M, 75\)"):
        swd(patch_size=5).load_reference_state(state)


def test_built_through_the_registry():
    metric = registry("metrics").get("swd").build({"directions": 8}, "test", device=torch.device("cpu"))
    assert isinstance(metric, SlicedWasserstein) and metric.min_samples == 1
    assert metric.settings() == {"descriptors_per_image": 128, "max_descriptors": 131072, "patch_size": 7,
                                 "min_resolution": 16, "seed": 0}


def test_real_butterflies_halves_are_closer_than_noise(butterflies):
    paths = sorted(p for p in butterflies.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BICUBIC)) for p in paths]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    assert len(images) == 64
    halves = evaluate(images[:32], images[32:])
    unlike = evaluate(images[:32], noise(32, 32, seed=16))
    assert halves["swd"] < unlike["swd"] / 2, (halves, unlike)
