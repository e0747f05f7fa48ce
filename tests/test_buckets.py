"""Aspect-ratio buckets, crops, SDXL's size and crop ids, and loss masks in the batch.

Real images (the shared butterflies and emoji, cut to several shapes), tiny SD/SDXL pipelines
from difftool.tiny_models, and recipes/sdxl-lora-buckets-tiny.toml.
"""

import math
import shutil
import tomllib
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from PIL import Image

import difftool
from difftool import buckets
from difftool import recipe as recipes
from difftool.builtins.datasets import imagefolder
from difftool.data import BadMask, ImageDataset, flip_batch, image_sizes
from difftool.engine import train
from difftool.errors import DifftoolError
from difftool.latent import LatentDiffusion
from difftool.latent_cache import pixel_digests
from difftool.testing import assert_identical

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sdxl-lora-buckets-tiny.toml"
needs_lora = pytest.mark.skipif(find_spec("difftool_lora") is None, reason="needs the difftool-lora plugin")
SHAPES = [(64, 64), (96, 48), (48, 96), (80, 64)]  # width x height


def shaped_folder(folder: Path, sources: list[Path], shapes=SHAPES) -> Path:
    """Copies of real images resized to cover each shape in turn and cropped to it: a mixed folder."""
    folder.mkdir(parents=True)
    for i, source in enumerate(sources):
        width, height = shapes[i % len(shapes)]
        with Image.open(source) as image:
            scale = max(width / image.width, height / image.height)
            image = image.convert("RGB").resize((math.ceil(image.width * scale), math.ceil(image.height * scale)))
            image.crop((0, 0, width, height)).save(folder / f"{i:03d}.png")
    return folder


def bucket_recipe(tmp_path: Path, pretrained: Path, name: str = "run", **sections) -> Path:
    """recipes/sdxl-lora-buckets-tiny.toml pointed at `pretrained` and tmp_path, sections' keys updated."""
    data = tomllib.loads(RECIPE.read_text())
    data["run"]["output_dir"] = str(tmp_path / name)
    data["model"]["pretrained"] = str(pretrained)
    data["dataset"]["latent_cache_dir"] = str(tmp_path / "latent-cache")
    for section, keys in sections.items():
        data.setdefault(section, {}).update(keys)
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


# the bucket set and assignment

@pytest.mark.parametrize("image_size, step", [(1024, 64), (512, 64), (32, 8), (64, 16)])
def test_bucket_set_has_about_image_size_squared_pixels_in_step_multiples_within_bounds(image_size, step):
    chosen = buckets.settings({"image_size": image_size, "bucket_step": step, "buckets": True}, "[dataset]")
    found = chosen.buckets()
    assert (image_size, image_size) in found and len(found) > 3
    for height, width in found:
        assert height % step == 0 and width % step == 0
        assert chosen.smallest <= min(height, width) and max(height, width) <= chosen.largest
        assert height * width <= image_size ** 2  # never more pixels than the square run
        assert height * width > image_size ** 2 - step * max(height, width) or height == chosen.largest
        assert (width, height) in found  # both orientations
    assert chosen.smallest == max(step, image_size // 2) and chosen.largest == 2 * image_size
    if image_size == 1024:  # SDXL's usual buckets are among them
        assert {(1024, 1024), (896, 1152), (1152, 896), (768, 1344), (640, 1536)} <= set(found)


def test_real_images_of_several_shapes_go_to_the_bucket_of_their_aspect(butterflies, tmp_path):
    folder = shaped_folder(tmp_path / "mixed", sorted(butterflies.glob("*.png"))[:16])
    rows = imagefolder(str(folder))
    sizes = image_sizes(rows)  # from the headers
    assert sorted(set(sizes)) == sorted({(h, w) for w, h in SHAPES})
    chosen = buckets.settings({"image_size": 64, "bucket_step": 16, "buckets": True}, "[dataset]")
    assigned = buckets.assign(sizes, chosen.buckets())
    # 2:1 goes to 5:3 (log-ratio 0.18 away), 5:4 to the square (0.22; 5:3 is 0.29 away)
    expected = {(64, 64): (64, 64), (48, 96): (48, 80), (96, 48): (80, 48), (64, 80): (64, 64)}
    assert all(expected[size] == bucket for size, bucket in zip(sizes, assigned))
    assert buckets.distribution(assigned) == {(80, 48): 4, (64, 64): 8, (48, 80): 4}


# batches and their order

def test_every_batch_is_from_one_bucket_and_the_order_is_a_function_of_seed_and_epoch():
    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler

    assigned = [(32, 32)] * 7 + [(24, 40)] * 5 + [(40, 24)] * 3
    sampler = buckets.BucketBatches(assigned, 2, seed=3)
    epochs = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 4 + 3 + 2
        assert sorted(i for batch in batches for i in batch) == list(range(15))  # each row once, none dropped
        assert all(len({assigned[i] for i in batch}) == 1 for batch in batches)
        epochs.append(batches)
    assert epochs[0] == epochs[2] and epochs[0] != epochs[1]
    assert list(buckets.BucketBatches(assigned, 2, seed=4)) != epochs[0]
    # Accelerate deals whole batches to each process, padding with whole batches, never mixed
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=i)) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert all(len({assigned[i] for i in batch}) == 1 for shard in shards for batch in shard)
    assert {i for shard in shards for batch in shard for i in batch} == set(range(15))
    sampler.set_epoch(1)
    assert list(SkipBatchSampler(sampler, 3)) == epochs[1][3:]  # a resumed epoch skips whole batches
    crops = buckets.BucketBatches(assigned, 2, seed=3, crops=True)
    crops.set_epoch(1)
    keyed = list(crops)
    assert [[i for i, _ in batch] for batch in keyed] == epochs[1]
    assert all(seed == buckets.crop_seed(3, 1, i) for batch in keyed for i, seed in batch)


def test_the_bucketed_loader_under_accelerate_gives_one_size_per_batch(tmp_path, tiny_sdxl):
    from accelerate import Accelerator

    from difftool import build

    recipe = recipes.load(bucket_recipe(tmp_path, tiny_sdxl))
    rows = build.rows(recipe, recipe.kwargs("dataset"))
    loader = Accelerator().prepare(build.dataloader(recipe, rows, captions=True))
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert {tuple(b["images"].shape[-2:]) for b in batches} == {(40, 24), (32, 32), (24, 40), (16, 48)}
    for batch in batches:
        height, width = batch["images"].shape[-2:]
        assert (batch["resized_sizes"] >= torch.tensor([height, width])).all()
        assert set(batch) >= {"captions", "original_sizes", "crop_top_lefts"}


# crops, flips and masks

def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """A grayscale picture with detail everywhere, so that any shift of a crop shows."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width)) * 255).astype(np.uint8), "L")


def gray(values: torch.Tensor, mask: bool = False) -> torch.Tensor:
    """The uint8 values behind an image channel in [-1, 1] or a mask in [0, 1]."""
    return (values * 255 if mask else (values + 1) * 127.5).round().to(torch.uint8)


def test_random_crops_are_drawn_per_epoch_and_row_and_masks_follow_their_images(tmp_path):
    # each image is its mask's gray in all three channels, so a mask with the very same geometry
    # equals the image's first channel exactly
    rows = []
    for i, (width, height) in enumerate([(60, 30), (30, 60), (40, 40)]):
        picture = gradient(width, height, i)
        picture.convert("RGB").save(tmp_path / f"{i}.png")
        picture.save(tmp_path / f"{i}_mask.png")
        rows.append({"image": {"path": str(tmp_path / f"{i}.png"), "bytes": None},
                     "mask": {"path": str(tmp_path / f"{i}_mask.png"), "bytes": None}})
    targets = [(16, 24), (24, 16), (24, 24)]
    for options in ({}, {"center_crop": True}, {"targets": targets}, {"targets": targets, "random_crop": True},
                    {"random_crop": True}):
        for cache in (True, False):
            dataset = ImageDataset(rows, 24, cache=cache, geometry=True, **options)
            for index in range(3):
                for key in (index, (index, 11), (index, 12)):
                    item = dataset[key]
                    assert torch.equal(gray(item["masks"][0], 1), gray(item["images"][0])), (options, key)
                    expected = targets[index] if "targets" in options else (24, 24)
                    assert tuple(item["images"].shape[1:]) == expected
    dataset = ImageDataset(rows, 24, targets=targets, random_crop=True, geometry=True)
    offsets = {tuple(dataset[(0, seed)]["crop_top_lefts"].tolist()) for seed in range(20)}
    assert len(offsets) > 3 and all(top == 0 for top, _ in offsets)  # 60x30 covers 24x16 at 32x16: sideways only
    assert torch.equal(dataset[(0, 5)]["images"], dataset[(0, 5)]["images"])  # the same seed, the same crop
    assert dataset[0]["crop_top_lefts"].tolist() == [0, 4]  # no seed: the centre
    # the crop is the covered image's window at that offset; a flip mirrors it and its offset
    item = dataset[(0, 7)]
    top, left = item["crop_top_lefts"].tolist()
    whole = ImageDataset(rows, 24, targets=[(16, 32)] * 3, cache=False, geometry=True)[0]
    assert item["resized_sizes"].tolist() == [16, 32] and item["original_sizes"].tolist() == [30, 60]
    assert torch.equal(item["images"], whole["images"][:, top:top + 16, left:left + 24])
    torch.manual_seed(0)
    flips = torch.rand(64) < 0.5
    torch.manual_seed(0)
    batch = {k: v[None].expand(64, *v.shape) for k, v in item.items()}
    images, masks, crops = flip_batch(batch["images"], batch["masks"], batch["crop_top_lefts"], batch["resized_sizes"])
    mirrored = whole["images"].flip(-1)
    for n in (int(flips.nonzero()[0]), int((~flips).nonzero()[0])):
        new_left = crops[n, 1].item()
        assert new_left == (32 - left - 24 if flips[n] else left)
        assert torch.equal(images[n], (mirrored if flips[n] else whole["images"])[:, top:top + 16, new_left:new_left + 24])
        assert torch.equal(gray(masks[n][0], 1), gray(images[n][0]))


def test_a_mask_of_another_size_is_refused_naming_it(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (40, 20), "white").save(folder / f"{name}.png")
    Image.new("L", (40, 20), 255).save(folder / "a_mask.png")
    rows = imagefolder(str(folder))
    assert len(rows) == 2 and rows.column_names == ["image", "mask"]  # the mask is no training image
    masks = [row["mask"] for row in rows.cast_column("mask", __import__("datasets").Image(decode=False))]
    assert masks[0]["path"].endswith("a_mask.png") and masks[1] is None  # b has none: all of it counts
    item = ImageDataset(rows, 16)[1]
    assert torch.equal(item["masks"], torch.ones(1, 16, 16))
    Image.new("L", (20, 40), 255).save(folder / "a_mask.png")
    with pytest.raises(DifftoolError, match=r"the mask .*a_mask\.png is 20x40 but its image .*a\.png is 40x20"):
        imagefolder(str(folder))
    listed = [{"image": {"path": str(folder / "a.png"), "bytes": None},
               "mask": {"path": str(folder / "a_mask.png"), "bytes": None}}]
    with pytest.raises(BadMask, match=r"a_mask\.png is 20x40 but its image .*a\.png is 40x20"):
        image_sizes(listed)
    with pytest.raises(BadMask, match="resize the mask"):
        ImageDataset(listed, 16)[0]
    (folder / "a_mask.png").rename(folder / "c_mask.png")
    with pytest.raises(DifftoolError, match=r"c_mask\.png is named as a loss mask .* no image c\.\*"):
        imagefolder(str(folder))


# SDXL's size and crop ids

def test_sdxl_time_ids_are_original_size_crop_and_target_per_image(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    latent = LatentDiffusion(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), str(tiny_sdxl))
    encoded = latent.encode_prompts(["a", "b"], 32, torch.tensor([[30, 60], [100, 50]]), torch.tensor([[0, 7], [3, 0]]),
                                    (16, 32))
    assert encoded["added_cond_kwargs"]["time_ids"].tolist() == [[30, 60, 0, 7, 16, 32], [100, 50, 3, 0, 16, 32]]
    plain = latent.encode_prompts(["a"], 32)  # no sizes (a plain validation batch): the whole image at image_size
    assert plain["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]


class UNetInputs:
    """Records the latent size and time ids of every UNet call in training (with gradients: not
    sampling)."""

    def __init__(self):
        self.calls = []

    @difftool.hookimpl
    def on_train_start(self, state):
        unet = state.accelerator.unwrap_model(state.model).unet
        unet.register_forward_pre_hook(lambda module, args, kwargs: self.calls.append(
            (tuple(args[0].shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"].clone())) if torch.is_grad_enabled() else None,
            with_kwargs=True)


@needs_lora
def test_bucketed_sdxl_run_conditions_on_sizes_and_resumes_bit_identically(plugin, tiny_sdxl, tmp_path):
    from difftool.checkpoints import complete

    from test_training import read_state

    watcher = plugin(UNetInputs(), "unet-inputs")
    # 8 images in 4 buckets, 2 a batch: 4 batches an epoch, so step 3 lands mid-epoch and step 6 in the next
    keys = {"run": {"checkpointing_steps": 3, "max_steps": 6, "save_image_epochs": 100, "save_model_epochs": 100},
            "dataset": {"count": 8, "batch_size": 2}, "sampling": {"num_images": 1}}
    straight = train(recipes.load(bucket_recipe(tmp_path, tiny_sdxl, "straight", **keys)))
    calls = watcher.calls
    assert len(calls) == 6 and len({size for size, _ in calls}) > 1  # batches of several buckets
    for size, time_ids in calls:
        target = [side * 2 for side in size]  # the tiny VAE halves the images once
        assert (time_ids[:, 4:] == torch.tensor(target, dtype=time_ids.dtype)).all()
        assert {tuple(row) for row in time_ids[:, :2].int().tolist()} <= {(32, 48), (48, 32), (40, 40), (24, 64)}
    assert any(row[3] > 0 for _, time_ids in calls for row in time_ids.tolist())  # random crops sideways
    assert [p.name for p in complete(straight)] == ["checkpoint-3", "checkpoint-6"]
    halves = tmp_path / "halves"
    (halves / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-3", halves / "checkpoints" / "checkpoint-3")
    train(recipes.load(bucket_recipe(tmp_path, tiny_sdxl, "halves", **keys), ['run.resume_from_checkpoint="latest"']))
    assert_identical(read_state(straight / "checkpoints" / "checkpoint-6"), read_state(halves / "checkpoints" / "checkpoint-6"))


# refusals, check and the cache

def test_buckets_that_the_model_cannot_take_are_refused(cli, tiny_sdxl, tmp_path):
    code, out, err = cli("check", bucket_recipe(tmp_path, tiny_sdxl))
    assert code == 0, err
    assert "16 images in 4 buckets" in out and "16 x 48" in out
    for keys, message in [
        ({"bucket_step": 6, "image_size": 36, "bucket_min": 18, "bucket_max": 72},
         "bucket_step = 6 makes buckets this model cannot take: every bucket side must be divisible by 4"),
        ({"image_size": 36}, "image_size = 36 must be a multiple of bucket_step = 8"),
        ({"bucket_min": 40}, "must hold image_size = 32 between them"),
        ({"bucket_max": 60}, "bucket_max = 60 must be a multiple of bucket_step = 8"),
        ({"center_crop": True}, "center_crop = true and random_crop = true"),
    ]:
        code, _, err = cli("check", bucket_recipe(tmp_path, tiny_sdxl, "bad", dataset=keys))
        assert code == 1 and message in " ".join(err.split()), (keys, err)


def test_the_latent_cache_tells_shapes_apart_and_keeps_square_digests():
    import hashlib

    values = torch.arange(3 * 32 * 64, dtype=torch.float32) / 1e4
    wide, tall = pixel_digests(values.view(1, 3, 32, 64)), pixel_digests(values.view(1, 3, 64, 32))
    assert wide != tall
    square = torch.rand(2, 3, 16, 16)
    assert pixel_digests(square) == [hashlib.blake2b(image.contiguous().view(torch.uint8).numpy().tobytes(),
                                                     digest_size=16).hexdigest() for image in square]


def test_photos_are_bucketed_upright_and_large_jpegs_decoded_in_draft(tmp_path):
    # a phone photo stored landscape (400x200) with EXIF orientation 6: shown portrait, 200x400
    photo = Image.fromarray((np.random.default_rng(0).random((200, 400, 3)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "p.jpg", exif=exif, quality=90)
    gradient(400, 200).transpose(Image.Transpose.ROTATE_270).save(tmp_path / "p_mask.png")  # drawn upright
    rows = imagefolder(str(tmp_path))
    assert image_sizes(rows) == [(400, 200)]
    chosen = buckets.settings({"image_size": 32, "bucket_step": 8, "buckets": True}, "[dataset]")
    (target,) = buckets.assign(image_sizes(rows), chosen.buckets())
    assert target == (40, 24)
    for cache in (True, False):  # the JPEG is drafted at 1/4 scale (100x50) before the resize to 48x24
        item = ImageDataset(rows, 32, cache=cache, targets=[target], random_crop=True, geometry=True)[(0, 3)]
        assert item["images"].shape == (3, 40, 24) and item["masks"].shape == (1, 40, 24)
        assert item["original_sizes"].tolist() == [400, 200] and item["resized_sizes"].tolist() == [48, 24]
