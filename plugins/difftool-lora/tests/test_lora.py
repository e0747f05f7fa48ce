"""The lora adapter: trains only LoRA weights on a pretrained UNet, saves them small in peft's
layout, loads them back exactly, and fuses into a plain pipeline."""

import re

import pytest
import torch

pytest.importorskip("difftool_lora", reason="pip install -e plugins/difftool-lora")

import difftool  # noqa: E402
from difftool import build, runs  # noqa: E402
from difftool import recipe as recipes  # noqa: E402
from difftool.engine import train  # noqa: E402
from difftool.testing import TINY_RECIPE  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished tiny run: the pretrained UNet the LoRA runs adapt."""
    folder = tmp_path_factory.mktemp("base")
    path = folder / "base.toml"
    path.write_text(TINY_RECIPE.format(output_dir=(folder / "run").as_posix()))
    return train(recipes.load(path, ["run.max_steps=2"]))


def lora_recipe(tmp_path, base, lora: str = "r = 4", name: str = "lora"):
    """The tiny recipe fine-tuning `base` through a LoRA configured by `lora` (TOML lines)."""
    text = TINY_RECIPE.format(output_dir=(tmp_path / name).as_posix())
    text = re.sub(r"\[model\].*?\n\n", f'[model]\nname = "unet2d"\npretrained = "{base.as_posix()}"\n\n', text, flags=re.S)
    path = tmp_path / f"{name}.toml"
    path.write_text(text + f'\n[[adapters]]\nname = "lora"\n{lora}\n')
    return path


class FinalWeights:
    """Keeps a copy of the trained model's weights when training ends."""

    weights = None

    @difftool.hookimpl
    def on_train_end(self, state):
        model = state.accelerator.unwrap_model(state.model)
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_installed_plugin_is_listed(cli):
    code, out, _ = cli("plugins")
    assert code == 0
    assert re.search(r"difftool-lora\s+│\s+0\.1\.0", out) and "adapters: loha, lokr, lora, oft" in out


def test_only_the_adapter_trains_and_the_base_stays_as_it_was(base, tmp_path, plugin):
    recipe = recipes.load(lora_recipe(tmp_path, base, "r = 4\ninclude_convolutions = true"), ["run.max_steps=3"])
    model = build.model(recipe)
    build.adapters(recipe, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(".conv1.lora_A." in n for n in trainable) and any(".to_q.lora_A." in n for n in trainable)

    final = plugin(FinalWeights(), "final-weights")
    run = train(recipe)
    from diffusers import UNet2DModel

    base_weights = UNet2DModel.from_pretrained(base, subfolder="unet").state_dict()
    for name, value in final.weights.items():
        if ".lora_" not in name:
            assert torch.equal(value, base_weights[name.replace(".base_layer.", ".")]), name
    assert all(final.weights[n].abs().sum() > 0 for n in trainable if ".lora_B." in n)  # LoRA B starts at zero

    saved = run / "adapters" / "0-lora"
    assert sorted(f.name for f in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    full = (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (saved / "adapter_model.safetensors").stat().st_size * 5 < full
    assert not (run / "unet").exists()


def test_saved_adapter_loads_back_to_identical_outputs_and_fuses(base, tmp_path, plugin, cli):
    final = plugin(FinalWeights(), "final-weights")
    run = train(recipes.load(lora_recipe(tmp_path, base, 'r = 4\ninit_lora_weights = "gaussian"'),
                             ["run.max_steps=2", "run.fuse_adapters=true"]))
    trained, _ = runs.adapted_model(run)
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in final.weights.items())

    from diffusers import DDPMPipeline

    fused = DDPMPipeline.from_pretrained(run).unet  # a plain pipeline, loadable without difftool
    assert not any("lora" in name for name in fused.state_dict())
    noisy, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 90])
    with torch.no_grad():
        expected, got = trained.eval()(noisy, t).sample, fused.eval()(noisy, t).sample
    assert (expected - got).abs().max() < 1e-4

    code, out, err = cli("sample", run, "--num-images", "2", "--steps", "2")
    assert code == 0, err
    assert (run / "samples" / "sample-ddim-2.png").is_file()


def test_an_adapted_run_samples_from_any_folder(base, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(base.parent)  # the recipe names its base by a relative path
    path = lora_recipe(tmp_path, base.relative_to(base.parent))
    code, _, err = cli("run", path, "--set", "run.max_steps=1")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("sample", tmp_path / "lora", "--num-images", "1", "--steps", "1")
    assert code == 0, err


def test_bad_target_modules_are_one_clear_error(base, tmp_path, cli):
    code, _, err = cli("check", lora_recipe(tmp_path, base, 'target_modules = ["to_q", "attn1"]'))
    assert code == 1
    assert "lora target_modules ['attn1'] match no layer" in err and "Traceback" not in err


def test_broken_adapted_runs_and_a_second_lora_are_clear_errors(base, tmp_path, cli):
    path = lora_recipe(tmp_path, base)
    code, _, err = cli("check", path, "--set", 'adapters=[{name="lora"}, {name="lora"}]')
    assert code == 1 and "the model already has a LoRA" in err
    code, _, err = cli("run", path, "--set", "run.max_steps=1")
    assert code == 0, err
    run = tmp_path / "lora"
    saved = run / "adapters" / "0-lora" / "adapter_model.safetensors"
    other = train(recipes.load(lora_recipe(tmp_path, base, "r = 2", name="other"), ["run.max_steps=1"]))
    saved.write_bytes((other / "adapters" / "0-lora" / "adapter_model.safetensors").read_bytes())
    code, _, err = cli("sample", run, "--num-images", "1", "--steps", "1")
    assert code == 1 and "does not fit this model's LoRA" in err and "Traceback" not in err
    saved.unlink()
    code, _, err = cli("sample", run, "--num-images", "1", "--steps", "1")
    assert code == 1 and "has no adapter_model.safetensors" in err
    (run / "adapters" / "0-lora").rename(tmp_path / "moved")
    code, _, err = cli("sample", run, "--num-images", "1", "--steps", "1")
    assert code == 1 and "its adapters were not saved completely" in err
