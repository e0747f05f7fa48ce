"""`difftool export RUN --format kohya`: a text-to-image LoRA run's weights under the key names
AUTOMATIC1111 and ComfyUI load (kohya-ss's: lora_unet_*, lora_te_* for SD's text encoder,
lora_te1_*/lora_te2_* for SDXL's, with .lora_down/.lora_up/.alpha), which diffusers' own
loader reads back to the same LoRA as the run's diffusers-format file. Tiny SD and SDXL
pipelines built from configs, trained one step."""

import re
from importlib.util import find_spec
from pathlib import Path

import pytest
import tomli_w
import torch

from difftool import recipe as recipes
from difftool.engine import train
from difftool.testing import TINY_RECIPE

pytestmark = pytest.mark.skipif(find_spec("difftool_lora") is None, reason="needs the difftool-lora plugin")
KEY = re.compile(r"^(lora_unet|lora_te|lora_te1|lora_te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


def lora_run(folder: Path, pretrained: Path, xl: bool = False, **lora) -> Path:
    """A finished one-step LoRA run (r = 4, lora_alpha = 8, and `lora`) on a tiny pipeline."""
    data = {
        "run": {"output_dir": str(folder / "run"), "seed": 0, "max_steps": 1},
        "dataset": {"name": "synthetic-butterflies", "count": 4, "size": 32, "captions": True, "image_size": 32,
                    "batch_size": 4, "latent_cache_dir": str(folder / "cache")},
        "model": {"name": "stable-diffusion-xl" if xl else "stable-diffusion", "pretrained": str(pretrained)},
        "adapters": [{"name": "lora", "r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian", **lora}],
        "noise_scheduler": {"name": "ddpm"},
        "optimizer": {"name": "adamw", "lr": 1e-2},
        "sampling": {"scheduler": "ddim", "num_inference_steps": 1, "num_images": 1},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.toml").write_text(tomli_w.dumps(data))
    return train(recipes.load(folder / "run.toml"))


@pytest.fixture(scope="module")
def sd_with_text_encoder(tiny_sd, tmp_path_factory) -> Path:
    return lora_run(tmp_path_factory.mktemp("sd-te"), tiny_sd, train_text_encoder=True)


def exported(cli, run: Path, *args) -> dict:
    """Export `run` through the CLI; returns the file's tensors and metadata."""
    from safetensors import safe_open

    code, out, err = cli("export", run, *args)
    assert code == 0, err
    path = Path(re.search(r"wrote (.+\.safetensors)", " ".join(out.split())).group(1))
    with safe_open(str(path), "pt") as opened:
        return {key: opened.get_tensor(key) for key in opened.keys()}, opened.metadata()


def unet_output(pipeline) -> torch.Tensor:
    """The UNet's prediction for fixed inputs (and SDXL's added conditioning)."""
    unet, generator = pipeline.unet, torch.Generator().manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 16, 16, generator=generator)
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = torch.randn(1, pipeline.text_encoder_2.config.projection_dim, generator=generator)
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([10]), states, **extra).sample


def text_output(pipeline, name: str, tokenizer: str) -> torch.Tensor:
    ids = getattr(pipeline, tokenizer)(["a blue butterfly"], padding="max_length", max_length=77,
                                       return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipeline, name)(ids, output_hidden_states=True).hidden_states[-1]


def assert_same_lora(pipeline_class, base: Path, run: Path, kohya: Path, encoders: dict) -> None:
    """diffusers loads the kohya file to the same UNet and text-encoder outputs as the run's own
    file, and both differ from the base's (so the comparison sees the LoRA)."""
    plain = pipeline_class.from_pretrained(base)
    ours, theirs = pipeline_class.from_pretrained(base), pipeline_class.from_pretrained(base)
    ours.load_lora_weights(run)
    theirs.load_lora_weights(kohya)
    outputs = [("unet", unet_output)] + [(name, lambda p, n=name, t=tok: text_output(p, n, t))
                                         for name, tok in encoders.items()]
    for name, output in outputs:
        expected, got = output(ours), output(theirs)
        assert (output(plain) - expected).abs().max() > 1e-3, name
        assert (expected - got).abs().max() < 1e-5, name


def test_sd_lora_with_text_encoder_exports_kohya_names_that_diffusers_loads_back(cli, tiny_sd, sd_with_text_encoder):
    from diffusers import StableDiffusionPipeline

    weights, metadata = exported(cli, sd_with_text_encoder)
    assert all(KEY.match(key) for key in weights), [key for key in weights if not KEY.match(key)][:3]
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in weights
    assert any(re.match(r"lora_unet_(down|mid|up)_blocks?_.*_attn2_to_k\.lora_up\.weight$", key) for key in weights)
    assert not any(key.startswith(("lora_te1_", "lora_te2_")) for key in weights)  # SD's one encoder: lora_te_
    downs = [key for key in weights if key.endswith(".lora_down.weight")]
    assert {key.replace(".lora_down.weight", ".alpha") for key in downs} == {k for k in weights if k.endswith(".alpha")}
    assert all(weights[key].shape[0] == 4 for key in downs)
    assert {weights[key].item() for key in weights if key.endswith(".alpha")} == {8.0}  # lora_alpha, not the rank
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8"
    assert metadata["ss_network_module"] == "networks.lora"
    kohya = sd_with_text_encoder / "run.kohya.safetensors"
    assert kohya.is_file()
    assert_same_lora(StableDiffusionPipeline, tiny_sd, sd_with_text_encoder, kohya, {"text_encoder": "tokenizer"})


def test_unet_only_rslora_exports_its_scale_as_alpha(cli, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = lora_run(tmp_path, tiny_sd, use_rslora=True)
    weights, _ = exported(cli, run, "--output", tmp_path / "unet-only.safetensors")
    assert weights and all(KEY.match(key) and key.startswith("lora_unet_") for key in weights)
    # rsLoRA's scale is lora_alpha / sqrt(r) = 4; kohya's is alpha / r, so alpha = 16
    assert {weights[key].item() for key in weights if key.endswith(".alpha")} == {16.0}
    assert_same_lora(StableDiffusionPipeline, tiny_sd, run, tmp_path / "unet-only.safetensors", {})


def test_sdxl_exports_lora_te1_and_lora_te2_and_diffusers_loads_them_back(cli, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    run = lora_run(tmp_path / "te", tiny_sdxl, xl=True, train_text_encoder=True)
    weights, metadata = exported(cli, run)
    assert all(KEY.match(key) for key in weights)
    assert {key.split("_text_model")[0] for key in weights if key.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in weights
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert_same_lora(StableDiffusionXLPipeline, tiny_sdxl, run, run / "run.kohya.safetensors",
                     {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"})

    weights, _ = exported(cli, lora_run(tmp_path / "unet", tiny_sdxl, xl=True))
    assert weights and all(KEY.match(key) and key.startswith("lora_unet_") for key in weights)


def test_export_mistakes_are_one_clear_message_each(cli, sd_with_text_encoder, tmp_path):
    def refused(*args) -> str:
        code, out, err = cli("export", *args)
        assert code == 1 and "Traceback" not in err, (code, out, err)
        return " ".join(err.split())

    assert "is no such run folder" in refused(tmp_path / "nowhere")
    (tmp_path / "file").write_text("not a run")
    assert "is a file, not a run folder" in refused(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert "is not a finished difftool run" in refused(tmp_path / "empty")
    assert "unknown --format 'koyha'; did you mean 'kohya'?" in refused(sd_with_text_encoder, "--format", "koyha")
    target = tmp_path / "lora.safetensors"
    exported(cli, sd_with_text_encoder, "--output", target)
    assert "already exists" in refused(sd_with_text_encoder, "--output", target) and "--force" in refused(
        sd_with_text_encoder, "--output", target)
    target.write_bytes(b"stale")
    exported(cli, sd_with_text_encoder, "--output", target, "--force")
    assert target.stat().st_size > 1000
    assert "ending in .safetensors" in refused(sd_with_text_encoder, "--output", tmp_path / "lora.ckpt")

    base = tmp_path / "full.toml"  # a pixel model, fully trained
    base.write_text(TINY_RECIPE.format(output_dir=(tmp_path / "full").as_posix()))
    code, _, err = cli("run", base, "--set", "run.max_steps=1")
    assert code == 0, err
    assert "holds a full fine-tune" in refused(tmp_path / "full")
    adapted = tmp_path / "adapted.toml"
    text = TINY_RECIPE.format(output_dir=(tmp_path / "adapted").as_posix())
    text = re.sub(r"\[model\].*?\n\n", f'[model]\nname = "unet2d"\npretrained = "{(tmp_path / "full").as_posix()}"\n\n',
                  text, flags=re.S)
    adapted.write_text(text + '\n[[adapters]]\nname = "lora"\nr = 4\n')
    code, _, err = cli("run", adapted, "--set", "run.max_steps=1")
    assert code == 0, err
    assert "adapts a 'unet2d' model" in refused(tmp_path / "adapted")
