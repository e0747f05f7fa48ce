"""Memory savers: gradient checkpointing of every built-in denoiser ([run] gradient_checkpointing),
and VAE slicing and tiling for the text-to-image models ([model] vae_slicing, vae_tiling).

Tiny models on the CPU: checkpointing must give the loss and gradients of the plain model, and
runs with each saver on must train.
"""

from importlib.util import find_spec

import numpy as np
import pytest
import torch

import difftool
from difftool import build
from difftool import recipe as recipes
from difftool.engine import train
from test_text_to_image import Watcher, sd_recipe

needs_lora = pytest.mark.skipif(find_spec("difftool_lora") is None, reason="needs the difftool-lora plugin")
DIT = ['model={name = "dit", num_layers = 2, num_attention_heads = 2, attention_head_dim = 8}']
LORA = '\n[[adapters]]\nname = "lora"\nr = 4\ninclude_convolutions = true\n'


def loss_and_gradients(recipe, conditioning=None, channels=3, size=32):
    """The loss of one seeded batch through the recipe's model (adapters applied, checkpointing
    as the recipe says), its trainable parameters' gradients, and how often the model's first
    ResNet or transformer block with trainable weights ran (twice per step when checkpointing
    recomputes it in backward)."""
    torch.manual_seed(0)
    model = build.model(recipe)
    build.adapters(recipe, model)
    build.gradient_checkpointing(recipe, model)
    model.train()
    network = build.denoiser(model)
    first = next(m for m in network.modules() if type(m).__name__ in  # the first block with trainable weights
                 ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock")
                 and any(p.requires_grad for p in m.parameters()))
    calls, forward = [], first.forward  # (forward hooks do not see checkpointing's recomputation)
    first.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, channels, size, size, generator=generator)
    target = torch.randn(2, channels, size, size, generator=generator)
    times = torch.tensor([3, 70])
    keywords = dict(conditioning or {})
    if type(network).__name__ == "DiTTransformer2DModel":
        keywords["class_labels"] = torch.zeros(2, dtype=torch.long)
    loss = torch.nn.functional.mse_loss(model(noisy, times, return_dict=False, **keywords)[0].float(), target)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), gradients, len(calls)


def assert_same(plain, checkpointed):
    (loss, gradients, calls), (loss_c, gradients_c, calls_c) = plain, checkpointed
    assert calls == 1 and calls_c == 2  # checkpointing is on: the block ran again in backward
    assert torch.allclose(loss, loss_c, rtol=1e-6, atol=0)
    assert gradients.keys() == gradients_c.keys() and gradients
    assert any(g.abs().max() > 0 for g in gradients.values())
    for name, gradient in gradients.items():
        assert torch.allclose(gradient, gradients_c[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("model", ["unet2d", "dit", pytest.param("unet2d+lora", marks=needs_lora)])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_recipe, model):
    overrides = DIT if model == "dit" else []
    path = tiny_recipe(LORA if model.endswith("lora") else "")
    plain = loss_and_gradients(recipes.load(path, overrides))
    assert_same(plain, loss_and_gradients(recipes.load(path, [*overrides, "run.gradient_checkpointing=true"])))


@needs_lora
def test_gradient_checkpointing_of_a_text_to_image_unet_under_lora(tiny_sd, tmp_path):
    path = sd_recipe(tmp_path, tiny_sd)
    latent = build.model(recipes.load(path))
    conditioning = latent.encode_prompts(["a blue butterfly", ""], 32)
    plain = loss_and_gradients(recipes.load(path), conditioning, channels=4, size=16)
    checkpointed = loss_and_gradients(recipes.load(path, ["run.gradient_checkpointing=true"]), conditioning,
                                      channels=4, size=16)
    assert all("lora_" in name for name in plain[1])  # only the LoRA trains, through the frozen, recomputed base
    assert_same(plain, checkpointed)


class Steps(Watcher):
    """Watcher's record (each step's loss, the weights at start and end; here the trainable ones
    only), and whether the denoiser checkpoints."""

    checkpointing = None

    @staticmethod
    def weights(state):
        return {n: p.detach().clone() for n, p in state.accelerator.unwrap_model(state.model).named_parameters()
                if p.requires_grad}

    @difftool.hookimpl
    def on_train_start(self, state):
        super().on_train_start(state)
        model = build.denoiser(state.accelerator.unwrap_model(state.model))
        self.checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_a_run_with_gradient_checkpointing_trains(plugin, tiny_recipe, tmp_path):
    steps = plugin(Steps(), "steps")
    path = tiny_recipe()
    train(recipes.load(path, ["run.gradient_checkpointing=true", "run.max_steps=3", "run.num_epochs=2"]))
    assert steps.checkpointing and len(steps.losses) == 3 and np.isfinite(steps.losses).all()
    assert all(not torch.equal(steps.start[n], steps.end[n]) for n in steps.start)
    assert (tmp_path / "run" / "model_index.json").is_file()


class Plain(torch.nn.Module):
    """A plugin's denoiser that cannot checkpoint: no enable_gradient_checkpointing."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, sample, timestep, return_dict=False):
        return (self.conv(sample),)


class PlainModels:
    @difftool.hookimpl
    def register_models(self, register):
        register("plain-conv", lambda image_size=None: Plain(), "a one-convolution denoiser")


def test_a_model_that_cannot_checkpoint_is_refused_by_check_and_run(plugin, cli, tiny_recipe, tmp_path):
    plugin(PlainModels(), "plain-models")
    path = tiny_recipe()
    model = ["--set", "model={name = 'plain-conv'}"]
    assert cli("check", path, *model)[0] == 0
    for command in ("check", "run"):
        code, _, err = cli(command, path, *model, "--set", "run.gradient_checkpointing=true")
        message = " ".join(err.split())
        assert code == 1 and "Traceback" not in err, err
        assert "gradient_checkpointing = true, and model 'plain-conv' (plugin 'plain-models', a Plain)" in message
        assert "remove gradient_checkpointing, or give the model that method" in message
    assert not (tmp_path / "run" / "model_index.json").exists() and not (tmp_path / "run" / "logs").exists()


def test_vae_slicing_and_tiling_are_applied_and_a_run_with_them_trains(plugin, monkeypatch, cli, tiny_sd,
                                                                        tmp_path):
    from diffusers import AutoencoderKL

    from difftool.latent_cache import vae_digest

    tiled = []
    encode = AutoencoderKL._tiled_encode
    monkeypatch.setattr(AutoencoderKL, "_tiled_encode", lambda self, x: tiled.append(len(x)) or encode(self, x))
    savers = {"vae_slicing": True, "vae_tiling": True}
    latent = build.model(recipes.load(sd_recipe(tmp_path, tiny_sd, "built", model=savers)))
    plain = build.model(recipes.load(sd_recipe(tmp_path, tiny_sd, "plain")))
    assert latent.vae.use_slicing and latent.vae.use_tiling and not (plain.vae.use_slicing or plain.vae.use_tiling)
    assert vae_digest(latent.vae) != vae_digest(plain.vae)  # tiled latents are other latents: another cache

    steps = plugin(Steps(), "steps")
    # 48 px is larger than the tiny VAE's 32 px sample_size, so it encodes in tiles, one image at a time
    dataset = {"image_size": 48, "size": 48}
    recipe = sd_recipe(tmp_path, tiny_sd, model=savers, dataset=dataset, run={"max_steps": 2, "gradient_checkpointing": True},
                       sampling={"every_n_steps": None, "num_images": 1})
    train(recipes.load(recipe))
    assert tiled and set(tiled) == {1}  # sliced: each image on its own, in tiles
    assert steps.checkpointing and len(steps.losses) == 2 and np.isfinite(steps.losses).all()
    assert any(not torch.equal(steps.start[n], steps.end[n]) for n in steps.start)

    code, _, err = cli("check", sd_recipe(tmp_path, tiny_sd, "bad", model={"vae_slicing": "yes"}))
    assert code == 1 and "[model] vae_slicing = 'yes' must be true or false" in err
    code, _, err = cli("check", tiny_recipe_with(tmp_path, "vae_tiling = true"))
    assert code == 1 and "vae_tiling" in err  # a pixel-space model has no VAE: an unknown key


def tiny_recipe_with(tmp_path, model_line: str):
    """The tiny unet2d recipe with one more [model] line."""
    from difftool.testing import TINY_RECIPE

    path = tmp_path / "pixels.toml"
    text = TINY_RECIPE.format(output_dir=(tmp_path / "pixels").as_posix())
    path.write_text(text.replace('name = "unet2d"\n', f'name = "unet2d"\n{model_line}\n'))
    return path
