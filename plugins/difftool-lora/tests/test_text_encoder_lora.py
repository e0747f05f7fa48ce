"""Text-encoder LoRA: `train_text_encoder = true` puts LoRA on the CLIP text encoders as well
as the UNet (or, with `train_unet = false`, on them alone); both train, the run saves them in
the adapter's folder and in the file diffusers' `load_lora_weights` reads, `difftool sample`
reloads them, and run.fuse_adapters merges them into the saved pipeline's text encoders.
Everything runs on tiny random pipelines built from configs (difftool.tiny_models)."""

from pathlib import Path

import pytest
import tomli_w
import torch

pytest.importorskip("difftool_lora", reason="pip install -e plugins/difftool-lora")

import difftool  # noqa: E402
from difftool import build, runs  # noqa: E402
from difftool import recipe as recipes  # noqa: E402
from difftool.engine import train  # noqa: E402
from difftool.testing import TINY_RECIPE  # noqa: E402

PROMPTS = ["a blue butterfly", "an orange butterfly, wings open", ""]


def sd_recipe(tmp_path: Path, pretrained: Path, xl: bool = False, name: str = "run", run: dict | None = None,
              **lora) -> Path:
    """A tiny text-to-image LoRA recipe (captioned synthetic butterflies in batches of 4,
    caption dropout on), one step, with the lora keys given."""
    data = {
        "run": {"output_dir": str(tmp_path / name), "seed": 0, "max_steps": 1, **(run or {})},
        "dataset": {"name": "synthetic-butterflies", "count": 8, "size": 32, "captions": True, "caption_dropout": 0.5,
                    "image_size": 32, "batch_size": 4, "latent_cache_dir": str(tmp_path / "cache")},
        "model": {"name": "stable-diffusion-xl" if xl else "stable-diffusion", "pretrained": str(pretrained)},
        "adapters": [{"name": "lora", "r": 4, "lora_alpha": 8, **lora}],
        "noise_scheduler": {"name": "ddpm"},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "sampling": {"scheduler": "ddim", "num_inference_steps": 1, "num_images": 1, "prompts": ["a blue butterfly"]},
    }
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


class Watcher:
    """The model's parameters (by name, with requires_grad) at the start and end of training."""

    def __init__(self):
        self.start, self.end, self.trainable = {}, {}, set()

    @staticmethod
    def weights(state):
        return {n: p.detach().clone() for n, p in state.accelerator.unwrap_model(state.model).named_parameters()}

    @difftool.hookimpl
    def on_train_start(self, state):
        self.start = self.weights(state)
        model = state.accelerator.unwrap_model(state.model)
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    @difftool.hookimpl
    def on_train_end(self, state):
        self.end = self.weights(state)


def encoded(encoder, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    """The text encoder's last hidden states of `prompts`, padded as the pipelines pad them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids.to(encoder.device), output_hidden_states=True).hidden_states[-1]


def test_text_encoder_and_unet_lora_both_train_and_load_into_diffusers(plugin, cli, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    watcher = plugin(Watcher(), "watcher")
    out = train(recipes.load(sd_recipe(tmp_path, tiny_sd, train_text_encoder=True, run={"fuse_adapters": True})))
    lora = {n for n in watcher.start if "lora_" in n}
    assert watcher.trainable == lora
    assert any(n.startswith("text_encoder.") for n in lora) and any(n.startswith("unet.") for n in lora)
    assert any(".self_attn.q_proj.lora_A." in n for n in lora) and any(".attn2.to_k.lora_A." in n for n in lora)
    changed = {n for n in watcher.start if not torch.equal(watcher.start[n], watcher.end[n])}
    # gradient reaches both: every LoRA B (zero at the start) moved, and nothing frozen did
    assert {n for n in lora if ".lora_B." in n} <= changed <= lora
    assert any(n.startswith("text_encoder.") and ".lora_B." in n for n in changed)
    assert not (tmp_path / "cache" / "text").exists() or not any((tmp_path / "cache" / "text").rglob("*.safetensors"))

    folder = out / "adapters" / "0-lora"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                         "text_encoder"]
    assert sorted(p.name for p in (folder / "text_encoder").iterdir()) == ["adapter_config.json",
                                                                           "adapter_model.safetensors"]
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {key.split(".")[0] for key in saved} == {"unet", "text_encoder"}

    # the run reloaded by difftool (as `difftool sample` does) has the trained text encoder
    unet, _, latent = runs.load_run(out)
    tokenizer = latent.others["tokenizer"]
    trained = encoded(latent.text_encoder, tokenizer)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    assert (encoded(base.text_encoder, tokenizer) - trained).abs().max() > 1e-3  # the LoRA changed it
    # plain diffusers: load_lora_weights gives the same text encoder, and so does the fused pipeline
    base.load_lora_weights(out)
    assert (encoded(base.text_encoder, tokenizer) - trained).abs().max() < 1e-5
    fused = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert not any("lora" in name for name in fused.text_encoder.state_dict())
    assert (encoded(fused.text_encoder, tokenizer) - trained).abs().max() < 1e-4

    code, _, err = cli("sample", out, "--prompt", "a red butterfly", "--num-images", "1", "--steps", "1")
    assert code == 0, err


def test_sdxl_trains_both_text_encoders_and_diffusers_loads_them(plugin, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    watcher = plugin(Watcher(), "watcher")
    out = train(recipes.load(sd_recipe(tmp_path, tiny_sdxl, xl=True, train_text_encoder=True,
                                       text_encoder_target_modules=["q_proj", "v_proj"])))
    changed = {n for n in watcher.start if not torch.equal(watcher.start[n], watcher.end[n])}
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(n.startswith(part) and ".lora_B." in n for n in changed), part
    assert not any(".k_proj.lora_" in n for n in watcher.trainable)
    assert (out / "adapters" / "0-lora" / "text_encoder_2" / "adapter_model.safetensors").is_file()

    _, _, latent = runs.load_run(out)
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipeline.load_lora_weights(out)
    for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        expected = encoded(getattr(latent, name), latent.others[tokenizer])
        assert (encoded(getattr(pipeline, name), latent.others[tokenizer]) - expected).abs().max() < 1e-5, name


def test_train_unet_false_trains_the_text_encoder_alone(plugin, tiny_sd, tmp_path):
    from safetensors.torch import load_file

    watcher = plugin(Watcher(), "watcher")
    out = train(recipes.load(sd_recipe(tmp_path, tiny_sd, train_text_encoder=True, train_unet=False)))
    assert watcher.trainable and all(n.startswith("text_encoder.") for n in watcher.trainable)
    folder = out / "adapters" / "0-lora"
    assert sorted(p.name for p in folder.iterdir()) == ["text_encoder"]
    assert all(key.startswith("text_encoder.") for key in load_file(str(out / "pytorch_lora_weights.safetensors")))
    runs.load_run(out)  # reloads with no LoRA on the UNet


def test_trained_text_encoders_stay_float32_and_take_their_own_learning_rate(tiny_sd, tmp_path):
    recipe = recipes.load(sd_recipe(tmp_path, tiny_sd, train_text_encoder=True))
    model = build.model(recipe)
    build.adapters(recipe, model)
    assert model.text_encoders_train()
    model.cast_frozen(torch.bfloat16)
    assert model.text_encoder.dtype == torch.float32  # trainable LoRA and the layers it backpropagates through
    assert build.text_cache(recipe, model) is None  # embeddings change every step: nothing to cache

    recipe["optimizer"]["param_groups"] = [{"modules": "text_encoder.*", "lr": 1e-5}]
    groups = build.optimizer(recipe, model).param_groups
    encoder = {id(p) for n, p in model.named_parameters() if n.startswith("text_encoder.") and p.requires_grad}
    assert groups[0]["lr"] == 1e-5 and {id(p) for p in groups[0]["params"]} == encoder
    assert groups[1]["lr"] == 1e-2 and not encoder & {id(p) for p in groups[1]["params"]}

    # without train_text_encoder the encoders stay frozen, cast, and cached
    plain = recipes.load(sd_recipe(tmp_path, tiny_sd, name="plain"))
    model = build.model(plain)
    build.adapters(plain, model)
    model.cast_frozen(torch.bfloat16)
    assert not model.text_encoders_train() and model.text_encoder.dtype == torch.bfloat16


def test_text_encoder_lora_mistakes_are_clear_errors(cli, tiny_sd, tmp_path):
    pixel = tmp_path / "pixel.toml"
    pixel.write_text(TINY_RECIPE.format(output_dir=(tmp_path / "pixel").as_posix())
                     + '\n[[adapters]]\nname = "lora"\ntrain_text_encoder = true\n')
    code, _, err = cli("check", pixel)
    assert code == 1 and "train_text_encoder = true needs a text-to-image model" in err and "Traceback" not in err
    code, _, err = cli("check", sd_recipe(tmp_path, tiny_sd, name="nothing", train_unet=False))
    assert code == 1 and "train_unet = false leaves nothing to train" in err
    code, _, err = cli("check", sd_recipe(tmp_path, tiny_sd, name="unused", text_encoder_target_modules=["q_proj"]))
    assert code == 1 and "train_text_encoder is false" in err
    code, _, err = cli("check", sd_recipe(tmp_path, tiny_sd, name="typo", train_text_encoder=True,
                                          text_encoder_target_modules=["q_proj", "query"]))
    assert code == 1 and "text_encoder_target_modules ['query'] match no layer of the text_encoder" in err


class Modes:
    """Which parts of the model are in train mode at every step."""

    def __init__(self):
        self.steps = []

    @difftool.hookimpl
    def on_step_end(self, state):
        model = state.accelerator.unwrap_model(state.model)
        self.steps.append((model.unet.training, model.text_encoder.training, model.vae.training))


def test_the_adapted_parts_train_in_train_mode_and_the_frozen_ones_stay_in_eval_mode(plugin, tiny_sd, tmp_path):
    """diffusers loads a pipeline in eval mode, where a LoRA's dropout does nothing: training puts
    the UNet and a text encoder with a LoRA in train mode from the first step, and validation
    (which evaluates in eval mode) leaves them so; the frozen VAE stays in eval mode."""
    modes = Modes()
    plugin(modes, "modes")
    recipe = recipes.load(sd_recipe(tmp_path, tiny_sd, run={"max_steps": 2}, train_text_encoder=True, lora_dropout=0.1))
    recipe["validation"].update(every_n_steps=1, fraction=0.25, num_batches=1)
    train(recipe)
    assert modes.steps == [(True, True, False), (True, True, False)]
