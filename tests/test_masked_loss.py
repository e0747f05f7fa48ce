"""Loss weights: loss masks (batch["masks"], resized to the latents by area) and per-sample weights
(a row's `loss_weight`), multiplied into the per-element loss, and averaged as documented in
difftool.objective.loss and difftool.engine.loss_weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

import difftool
from difftool import engine
from difftool import recipe as recipes
from difftool.builtins.objectives import ddpm, min_snr
from difftool.data import ImageDataset
from difftool.errors import DifftoolError
from difftool.objective import loss


def batch_tensors(seed=0, shape=(3, 4, 4, 4)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_without_element_weights_the_loss_is_bit_identical_to_the_plain_mean():
    prediction, wanted = batch_tensors()
    weights = torch.tensor([0.5, 1.0, 2.0])
    for kind, plain in (("mse", F.mse_loss), ("l1", F.l1_loss)):
        per_sample = plain(prediction, wanted, reduction="none").flatten(1).mean(1)
        assert torch.equal(loss(prediction, wanted, kind, 1.0, None), per_sample.mean())
        assert torch.equal(loss(prediction, wanted, kind, 1.0, weights), (per_sample * weights).mean())
    # all-ones element weights change no bit either
    ones = torch.ones(3, 1, 4, 4)
    assert torch.equal(loss(prediction, wanted, "mse", 1.0, weights, ones), loss(prediction, wanted, "mse", 1.0, weights))


def test_element_weights_weight_each_element_and_the_mean_stays_over_all_elements():
    prediction, wanted = batch_tensors()
    mask = torch.zeros(3, 1, 4, 4)
    mask[:, :, :2] = 1.0  # the top half counts
    mask[1] = 0.25  # sample 1: a grey mask, a quarter weight everywhere
    mask[2] = 0.0  # sample 2: masked out entirely
    per_sample = torch.tensor([1.0, 2.0, 3.0])
    snr_weights = torch.tensor([0.5, 1.0, 4.0])
    got = loss(prediction, wanted, "mse", 1.0, snr_weights, mask * per_sample.view(-1, 1, 1, 1))
    squared = (prediction - wanted) ** 2
    by_hand = [
        squared[0, :, :2].sum() / 64 * 1.0 * 0.5,  # the top half's sum over all 64 elements: no area normalising
        squared[1].sum() * 0.25 / 64 * 2.0 * 1.0,
        torch.tensor(0.0),
    ]
    assert torch.isclose(got, sum(by_hand) / 3, rtol=1e-6)
    # a sample masked out entirely adds 0 and still counts in the batch mean (no division by its empty mask)
    assert math.isfinite(got.item())


def test_masks_are_resized_to_the_latents_by_area_and_multiplied_by_per_sample_weights():
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, :16] = 1.0  # top half
    masks[1, :, :, :12] = 1.0  # a left part that does not fall on the latents' 8-pixel grid
    latents = torch.zeros(2, 4, 4, 4)
    weights = engine.loss_weights({"masks": masks}, latents)
    assert weights.shape == (2, 1, 4, 4)
    assert torch.equal(weights, F.avg_pool2d(masks, 8))  # each latent pixel: the mean of its 8 x 8 pixels
    assert torch.equal(weights[1, 0, 0], torch.tensor([1.0, 0.5, 0.0, 0.0]))
    both = engine.loss_weights({"masks": masks, "loss_weights": torch.tensor([1.0, 3.0], dtype=torch.float64)}, latents)
    assert torch.equal(both, weights * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)) and both.dtype == torch.float32
    alone = engine.loss_weights({"loss_weights": torch.tensor([1.0, 3.0])}, latents)
    assert alone.shape == (2, 1, 1, 1) and alone.flatten().tolist() == [1.0, 3.0]
    pixels = torch.zeros(2, 3, 32, 32)  # a pixel model: the masks as they are
    assert torch.equal(engine.loss_weights({"masks": masks}, pixels), masks)
    assert engine.loss_weights({"images": pixels}, pixels) is None


def test_masked_out_latent_pixels_get_no_gradient():
    objective = ddpm(DDPMScheduler(num_train_timesteps=100))
    clean, noise = batch_tensors(1, (2, 4, 4, 4))
    times = torch.tensor([10, 90])
    noisy = objective.noisy(clean, noise, times)
    prediction = torch.zeros(2, 4, 4, 4, requires_grad=True)
    masks = torch.ones(2, 1, 32, 32)
    masks[:, :, :, 16:] = 0.0  # the right half of every image does not count
    weights = engine.loss_weights({"masks": masks}, clean)
    settings = {"loss": "mse", "huber_delta": 1.0}
    value = objective.compute_loss(lambda *args, **kwargs: (prediction,), clean, noise, noisy, times, settings,
                                   min_snr(gamma=5.0), element_weights=weights)
    value.backward()
    assert torch.count_nonzero(prediction.grad[..., 2:]) == 0  # latent columns 2, 3 encode pixels 16-31
    assert torch.count_nonzero(prediction.grad[..., :2]) == prediction.grad[..., :2].numel()


def test_a_rows_loss_weight_reaches_the_batch_and_bad_ones_are_refused():
    from PIL import Image

    image = Image.new("RGB", (8, 8), "red")
    rows = [{"image": image, "loss_weight": 2.0}, {"image": image, "loss_weight": None}, {"image": image, "loss_weight": 0}]
    dataset = ImageDataset(rows, 8)
    assert [dataset[i]["loss_weights"] for i in range(3)] == [2.0, 1.0, 0.0]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3)))
    assert batch["loss_weights"].tolist() == [2.0, 1.0, 0.0]
    assert "loss_weights" not in ImageDataset([{"image": image}], 8)[0]  # no column, no weights
    import datasets  # a datasets.Dataset's column (an imagefolder's metadata), empty where a row has none

    table = datasets.Dataset.from_dict({"image": [image, image], "loss_weight": [0.5, None]})
    assert [item["loss_weights"] for item in ImageDataset(table, 8)] == [0.5, 1.0]
    assert "loss_weights" not in ImageDataset(table.remove_columns("loss_weight"), 8)[0]
    for bad in (-1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(DifftoolError, match=r"row 1 has loss_weight = .*finite number >= 0"):
            ImageDataset([rows[0], {"image": image, "loss_weight": bad}], 8)[1]


class WeightedButterflies:
    """A dataset plugin: synthetic butterflies, every row with loss_weight = `weight`."""

    def __init__(self, weight):
        self.weight = weight

    @difftool.hookimpl
    def register_datasets(self, register):
        from difftool.builtins.synthetic import synthetic_butterflies

        def weighted(count: int = 16, size: int = 32):
            return [{**row, "loss_weight": self.weight} for row in synthetic_butterflies(count=count, size=size)]

        register("weighted-butterflies", weighted)


class Losses:
    def __init__(self):
        self.losses, self.val_losses = [], []

    @difftool.hookimpl
    def on_step_end(self, state):
        self.losses.append(state.loss)

    @difftool.hookimpl
    def on_train_end(self, state):  # validation runs after on_step_end: its last value is here
        self.val_losses.append(state.val_loss)


def test_per_sample_weights_scale_the_training_and_validation_loss(plugin, tiny_recipe, tmp_path):
    settings = ["run.max_steps=1", "validation.every_n_steps=1", "validation.num_batches=1"]
    seen = plugin(Losses(), "losses")
    engine.train(recipes.load(tiny_recipe(output_dir=tmp_path / "base"), settings))
    plugin(WeightedButterflies(2.0), "weighted")
    engine.train(recipes.load(tiny_recipe(output_dir=tmp_path / "two"), [*settings, 'dataset.name="weighted-butterflies"']))
    base, doubled = seen.losses
    assert base > 0 and doubled == 2 * base  # the same images, noise and times: exactly twice the loss
    assert seen.val_losses[0] > 0


def test_rows_of_weight_zero_add_nothing_to_the_loss(plugin, tiny_recipe, tmp_path):
    seen = plugin(Losses(), "losses")
    plugin(WeightedButterflies(0.0), "weighted")
    engine.train(recipes.load(tiny_recipe(output_dir=tmp_path / "zero"), [
        "run.max_steps=2", "validation.every_n_steps=1", "validation.num_batches=1", 'dataset.name="weighted-butterflies"']))
    assert seen.losses == [0.0, 0.0] and seen.val_losses == [0.0]  # validation weighs rows as training does


def test_loss_masks_from_mask_files_weight_the_latent_loss(plugin, tiny_sd, tmp_path):
    """DreamBooth instance images with NAME_mask.png beside them (the imagefolder convention), on
    the tiny Stable Diffusion pipeline: black masks zero the loss, white ones leave it (all-ones
    weights change no bit of it: test_without_element_weights_...)."""
    from PIL import Image

    from difftool.builtins.synthetic import synthetic_butterflies

    rows = synthetic_butterflies(count=4, size=32)
    seen = plugin(Losses(), "losses")
    for mask in ("white", "black"):
        folder = tmp_path / f"instances-{mask}"
        folder.mkdir()
        for i, row in enumerate(rows):
            row["image"].save(folder / f"{i}.png")
            Image.new("L", (32, 32), mask).save(folder / f"{i}_mask.png")
        path = tmp_path / f"{mask}.toml"
        path.write_text(f"""
[run]
output_dir = "{tmp_path / f'run-{mask}'}"
max_steps = 1
[dataset]
name = "dreambooth"
instance_dir = "{folder}"
instance_prompt = "a photo of sks butterfly"
image_size = 32
batch_size = 4
latent_cache_dir = "{tmp_path / 'latent-cache'}"
[model]
name = "stable-diffusion"
pretrained = "{tiny_sd}"
[sampling]
scheduler = "ddim"
num_inference_steps = 1
num_images = 1
""")
        engine.train(recipes.load(path))
    white, black = seen.losses
    assert white > 0 and black == 0.0
