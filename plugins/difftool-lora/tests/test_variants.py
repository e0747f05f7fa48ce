"""LoRA's variants: DoRA and rsLoRA (options of `lora`), and LoHa, LoKr and OFT (adapters of
their own). Each starts from the base, trains only its own weights, is saved in peft's layout,
reloads to identical outputs, fuses to the same outputs and samples through `difftool sample`,
on the pixel UNet of a tiny run and on a tiny Stable Diffusion UNet."""

import json
import re

import pytest
import torch

pytest.importorskip("difftool_lora", reason="pip install -e plugins/difftool-lora")

import difftool  # noqa: E402
from difftool import build, runs  # noqa: E402
from difftool import recipe as recipes  # noqa: E402
from difftool.engine import train  # noqa: E402
from difftool.testing import TINY_RECIPE  # noqa: E402

# the tiny recipe smaller still (16 px, batches of 2, one sample), so that a run of two steps
# with its samples and saves takes a few seconds on a CPU
QUICK = TINY_RECIPE.replace("image_size = 32", "image_size = 16").replace("batch_size = 8", "batch_size = 2")
QUICK = QUICK.replace("num_images = 4", "num_images = 1")

# each variant's recipe lines (a linear layer and a 3x3 convolution of each block, where the
# variant adapts convolutions: every layer would only be slower), and the part of the names
# of the weights it adds
VARIANTS = {
    "loha": ('name = "loha"\nr = 4\ntarget_modules = ["to_q", "conv2"]', ".hada_"),
    "lokr": ('name = "lokr"\nr = 4\ntarget_modules = ["to_q", "conv2"]', ".lokr_"),
    "oft": ('name = "oft"\noft_block_size = 8\ntarget_modules = ["to_q", "to_v"]', ".oft_R."),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The pretrained UNet the adapted runs start from: the tiny recipe's UNet, saved as a
    diffusers model folder (random weights; training it first would only take longer)."""
    from diffusers import UNet2DModel

    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    UNet2DModel(sample_size=16, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                norm_num_groups=8).save_pretrained(folder / "unet")
    return folder


def adapted_recipe(tmp_path, base, adapter: str, name: str = "run"):
    """The tiny recipe fine-tuning `base` through the [[adapters]] table `adapter` (TOML lines)."""
    text = QUICK.format(output_dir=(tmp_path / name).as_posix())
    text = re.sub(r"\[model\].*?\n\n", f'[model]\nname = "unet2d"\npretrained = "{base.as_posix()}"\n\n', text,
                  flags=re.S)
    path = tmp_path / f"{name}.toml"
    path.write_text(text + f"\n[[adapters]]\n{adapter}\n")
    return path


class Weights:
    """Keeps copies of the trained model's weights when training starts and ends."""

    start = end = None

    @staticmethod
    def copy(state):
        model = state.accelerator.unwrap_model(state.model)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    @difftool.hookimpl
    def on_train_start(self, state):
        self.start = self.copy(state)

    @difftool.hookimpl
    def on_train_end(self, state):
        self.end = self.copy(state)


def outputs(unet, seed: int = 0):
    """The UNet's prediction for a fixed noisy batch (pixel UNet, 16 px)."""
    noisy = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return unet.eval()(noisy, torch.tensor([10, 90])).sample


def train_save_reload_fuse_and_sample(tmp_path, base, plugin, cli, adapter: str, marker: str):
    """Train two steps with fuse_adapters; check what trained, the saved folder, the reload,
    the fused pipeline and `difftool sample`. Returns the run folder, the reloaded model and
    the weights at the start and end of training."""
    from diffusers import DDPMPipeline, UNet2DModel

    weights = plugin(Weights(), "weights")
    run = train(recipes.load(adapted_recipe(tmp_path, base, adapter), ["run.max_steps=2", "run.fuse_adapters=true"]))
    adapter_keys = [k for k in weights.end if marker in k]
    assert adapter_keys
    changed = {k for k in weights.end if not torch.equal(weights.start[k], weights.end[k])}
    assert changed and changed <= set(adapter_keys)  # the adapter trained, the base did not move

    saved = run / "adapters" / f"0-{adapter.split(chr(34))[1]}"
    assert sorted(f.name for f in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (run / "pytorch_lora_weights.safetensors").exists()  # that file is diffusers' LoRA format

    reloaded, _ = runs.adapted_model(run)
    state = reloaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.end.items())
    trained = outputs(reloaded)
    base_unet = UNet2DModel.from_pretrained(base, subfolder="unet")
    assert (trained - outputs(base_unet)).abs().max() > 1e-5  # the adapter changes the model

    fused = DDPMPipeline.from_pretrained(run).unet  # a plain pipeline, loadable without difftool
    assert set(fused.state_dict()) == set(base_unet.state_dict())
    assert (outputs(fused) - trained).abs().max() < 1e-4

    code, _, err = cli("sample", run, "--num-images", "1", "--steps", "1")
    assert code == 0, err
    assert (run / "samples" / "sample-ddim-1.png").is_file()
    return run, reloaded, weights


def test_the_variants_are_listed_as_adapters(cli):
    code, out, _ = cli("list", "adapters")
    assert code == 0
    for name in ("loha", "lokr", "lora", "oft"):
        assert re.search(rf"│ {name}\s+│.*│ difftool-lora", out), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_variant_trains_saves_reloads_fuses_and_samples(variant, base, tmp_path, plugin, cli):
    adapter, marker = VARIANTS[variant]
    run, _, _ = train_save_reload_fuse_and_sample(tmp_path, base, plugin, cli, adapter, marker)
    config = json.loads((run / "adapters" / f"0-{variant}" / "adapter_config.json").read_text())
    assert config["peft_type"] == variant.upper()


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_variant_starts_from_the_base_model(variant, base, tmp_path):
    recipe = recipes.load(adapted_recipe(tmp_path, base, VARIANTS[variant][0]))
    model = build.model(recipe)
    before = outputs(model)
    build.adapters(recipe, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(VARIANTS[variant][1] in n for n in trainable)
    assert torch.equal(outputs(model), before)


def test_dora_trains_its_magnitudes_reloads_and_fuses(base, tmp_path, plugin, cli):
    _, reloaded, weights = train_save_reload_fuse_and_sample(
        tmp_path, base, plugin, cli, 'name = "lora"\nr = 4\ntarget_modules = ["to_q", "conv1"]\nuse_dora = true',
        ".lora_")
    magnitudes = [n for n, p in reloaded.named_parameters() if "lora_magnitude_vector" in n]
    assert any(".to_q." in n for n in magnitudes) and any(".conv1." in n for n in magnitudes)
    assert all(not torch.equal(weights.start[n], weights.end[n]) for n in magnitudes)  # each one trained


def test_rslora_scales_by_the_square_root_of_the_rank_and_fuses(base, tmp_path, plugin, cli):
    from peft.tuners.lora import LoraLayer

    _, reloaded, _ = train_save_reload_fuse_and_sample(
        tmp_path, base, plugin, cli, 'name = "lora"\nr = 4\nlora_alpha = 8\nuse_rslora = true', ".lora_")
    scalings = {m.scaling["default"] for m in reloaded.modules() if isinstance(m, LoraLayer)}
    assert scalings == {8 / 4 ** 0.5}  # rsLoRA: alpha / sqrt(r) = 4, where plain LoRA's alpha / r is 2


def sd_recipe(tmp_path, tiny_sd, adapter: dict):
    """recipes/sd-lora-tiny.toml on `tiny_sd`, with `adapter` as its one [[adapters]] table,
    two steps, fused, and its samples at the end only."""
    import tomllib
    from pathlib import Path

    import tomli_w

    source = Path(__file__).resolve().parents[3] / "recipes" / "sd-lora-tiny.toml"
    data = tomllib.loads(source.read_text())
    data["run"].update(output_dir=str(tmp_path / "run"), max_steps=2, fuse_adapters=True)
    data["dataset"].update(latent_cache_dir=str(tmp_path / "cache"), batch_size=2)
    data["model"]["pretrained"] = str(tiny_sd)
    data["adapters"] = [adapter]
    data["sampling"].update(num_images=1, every_n_steps=None)
    del data["sampling"]["every_n_steps"]
    path = tmp_path / "run.toml"
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.mark.parametrize("adapter", [{"name": "loha", "r": 4, "include_convolutions": True},
                                     {"name": "lokr", "r": 4, "include_convolutions": True},
                                     {"name": "oft", "oft_block_size": 8},
                                     {"name": "lora", "r": 4, "use_dora": True, "include_convolutions": True}],
                         ids=["loha", "lokr", "oft", "dora"])
def test_a_variant_on_stable_diffusion_reloads_fuses_and_samples(adapter, tiny_sd, tmp_path, cli):
    from diffusers import StableDiffusionPipeline

    run = train(recipes.load(sd_recipe(tmp_path, tiny_sd, adapter)))
    # diffusers' load_lora_weights file is written for LoRA (DoRA too) alone; the others are in adapters/
    assert (run / "pytorch_lora_weights.safetensors").is_file() == (adapter["name"] == "lora")
    assert (run / "adapters" / f"0-{adapter['name']}" / "adapter_model.safetensors").is_file()
    reloaded = build.denoiser(runs.adapted_model(run)[0])
    fused = StableDiffusionPipeline.from_pretrained(run, safety_checker=None).unet  # plain diffusers
    assert not any("hada_" in k or "lokr_" in k or "oft_" in k or "lora_" in k for k in fused.state_dict())
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None).unet
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad():
        got, want, before = (unet.eval()(latents, torch.tensor([10, 900]), encoder_hidden_states=text).sample
                             for unet in (fused, reloaded, base))
    assert (want - before).abs().max() > 1e-5  # two steps of training changed the model
    assert (got - want).abs().max() < 1e-4
    code, _, err = cli("sample", run, "--prompt", "a blue butterfly", "--steps", "1", "--num-images", "1")
    assert code == 0, err


@pytest.mark.parametrize("variant, settings", [
    ("loha", dict(include_convolutions=True, use_effective_conv2d=True, rank_dropout=0.1, module_dropout=0.1)),
    ("lokr", dict(include_convolutions=True, use_effective_conv2d=True, decompose_both=True, decompose_factor=4)),
    ("oft", dict(r=4, target_modules=["to_q", "to_out.0", "conv_shortcut"], coft=True)),
    ("oft", dict(block_share=True, oft_block_size=4)),
], ids=["loha", "lokr", "oft-coft-1x1", "oft-shared"])
def test_every_accepted_setting_fuses_to_the_adapted_outputs(variant, settings, base):
    """With weights far from their start (random), as trained ones are: peft's merge must give
    the adapted layer's outputs for every layer type and option the factories accept."""
    from diffusers import UNet2DModel

    from difftool_lora import variants

    model = UNet2DModel.from_pretrained(base, subfolder="unet")
    adapter = getattr(variants, variant)(model, **settings)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.normal_(std=0.1)
    adapted = outputs(model)
    fused = adapter.fuse(model)
    assert all(p.requires_grad for p in fused.parameters())  # a plain model again, all of it trainable
    assert set(fused.state_dict()) == set(UNet2DModel.from_pretrained(base, subfolder="unet").state_dict())
    assert (outputs(fused) - adapted).abs().max() < 1e-4 * adapted.abs().max()


@pytest.mark.parametrize("adapters, message", [
    ('{name = "oft", include_convolutions = true}',
     "oft cannot adapt down_blocks.0.resnets.0.conv1 ('conv1'), a 3x3 convolution: peft's OFT changes"),
    ('{name = "oft", target_modules = ["conv2"]}', "cannot be fused into it; adapt the attention projections only"),
    ('{name = "oft", r = 4, oft_block_size = 8}', "oft takes r (the number of blocks) or oft_block_size"),
    ('{name = "loha", target_modules = ["to_q", "attn1"]}', "loha target_modules ['attn1'] match no layer"),
    ('{name = "lokr", target_modules = ["norm1"]}',
     "lokr target_modules 'norm1' names down_blocks.0.resnets.0.norm1, a GroupNorm; lokr adapts only Linear, Conv2d"),
    ('[{name = "lora"}, {name = "loha"}]', "the model already has a peft adapter; list one of lora, loha"),
])
def test_settings_a_variant_cannot_take_are_one_clear_error(adapters, message, base, tmp_path, cli):
    path = adapted_recipe(tmp_path, base, 'name = "loha"')
    value = adapters if adapters.startswith("[") else f"[{adapters}]"
    code, _, err = cli("check", path, "--set", f"adapters={value}", "--set", "run.fuse_adapters=true")
    assert code == 1
    assert message in " ".join(err.split()) and "Traceback" not in err
