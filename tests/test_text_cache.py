"""The text-embedding cache of text-to-image training ([dataset] cache): captions encoded once by
the frozen text encoders, on disk beside the latent cache, giving exactly what encoding them
each step gives, for SD, SDXL (two encoders, pooled embeddings, size ids per batch) and SD3.
"""

from pathlib import Path

import pytest
import torch

import difftool
from difftool import build
from difftool import recipe as recipes
from difftool.engine import train
from difftool.latent import LatentDiffusion, stable_diffusion, stable_diffusion_3, stable_diffusion_xl
from difftool.latent_cache import TextCache, text_digest, text_digests
from difftool.tiny_models import write_sd3
from test_faults import cut, disk, fill  # noqa: F401 (disk is a fixture)
from test_text_to_image import sd_recipe

PROMPTS = ["a blue butterfly", "", "an orange butterfly", "a blue butterfly", ""]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    return write_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def flat(conditioning: dict, prefix: str = "") -> dict:
    """{'added_cond_kwargs.time_ids': tensor, ...}: the conditioning's tensors by their path."""
    out = {}
    for name, value in conditioning.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def cache_of(latent: LatentDiffusion, folder: Path) -> TextCache:
    return TextCache(folder, latent.text_encoders(), latent.tokenizers(), [latent.pipeline_class.__name__])


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3"])
def test_cached_prompts_come_back_identical(kind, request, monkeypatch, tmp_path):
    load = {"sd": stable_diffusion, "sdxl": stable_diffusion_xl, "sd3": stable_diffusion_3}[kind]
    latent = load(str(request.getfixturevalue(f"tiny_{kind}")))
    encoded = latent.encode_prompts(PROMPTS, 32)
    expected = flat(encoded)
    assert expected["encoder_hidden_states"].shape[0] == len(PROMPTS)
    if kind == "sdxl":
        assert set(expected) == {"encoder_hidden_states", "added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"}
    # a prompt is conditioned on the same bits whatever its batch (batched matmuls would round it by its neighbours)
    alone = flat(latent.encode_prompts(PROMPTS[2:3], 32))
    assert all(torch.equal(alone[name][0], expected[name][2]) for name in expected)

    calls = []
    encode_each = LatentDiffusion.encode_each
    monkeypatch.setattr(LatentDiffusion, "encode_each", lambda self, prompts: calls.append(list(prompts))
                        or encode_each(self, prompts))
    latent.text_cache = cache_of(latent, tmp_path)
    filled = flat(latent.encode_prompts(PROMPTS, 32))
    assert calls == [["a blue butterfly", "", "an orange butterfly"]]  # each distinct prompt once, "" too
    read = flat(latent.encode_prompts(list(reversed(PROMPTS)), 64))  # another order, another image size
    assert len(calls) == 1  # no encoder ran: every prompt came from the cache
    assert len(list(latent.text_cache.folder.rglob("*.safetensors"))) == 3
    for name, tensor in expected.items():
        assert torch.equal(filled[name], tensor), name
        assert read[name].dtype == tensor.dtype and read[name].device == tensor.device
        if name != "added_cond_kwargs.time_ids":
            assert torch.equal(read[name], tensor.flip(0)), name
    if kind == "sdxl":  # the size ids are computed per batch, for the batch's image size
        time_ids = read["added_cond_kwargs.time_ids"]
        assert time_ids.shape == (len(PROMPTS), 6) and time_ids[0].tolist() == [64, 64, 0, 0, 64, 64]


def test_the_text_cache_key_changes_with_the_encoders_tokenizers_dtype_and_pipeline(tiny_sd):
    latent = stable_diffusion(str(tiny_sd))

    def digest(kind="StableDiffusionPipeline"):
        return text_digest(latent.text_encoders(), latent.tokenizers(), [kind])

    first = digest()
    assert digest() == text_digest(stable_diffusion(str(tiny_sd)).text_encoders(), latent.tokenizers(),
                                   ["StableDiffusionPipeline"])
    assert digest("StableDiffusionXLPipeline") != first
    tokenizer = latent.others["tokenizer"]
    tokenizer.add_tokens(["butterfly"])  # the same text becomes other token ids
    assert digest() != first
    latent = stable_diffusion(str(tiny_sd))
    with torch.no_grad():
        next(latent.text_encoder.parameters()).view(-1)[0] += 1e-3
    changed = digest()
    assert changed != first
    latent.text_encoder.to(torch.float16)
    assert digest() not in (first, changed)
    assert text_digests(["a", "a ", ""]) == list(dict.fromkeys(text_digests(["a", "a ", ""])))  # all distinct


class Weights:
    """The trained weights at the end of a run."""

    def __init__(self):
        self.end = {}

    @difftool.hookimpl
    def on_train_end(self, state):
        self.end = {n: p.detach().clone() for n, p in state.accelerator.unwrap_model(state.model).named_parameters()}


def test_training_with_the_text_cache_is_bit_identical_to_encoding_every_step(plugin, monkeypatch, tiny_sd,
                                                                              tmp_path):
    weights = plugin(Weights(), "weights")
    calls = []
    encode_each = LatentDiffusion.encode_each
    monkeypatch.setattr(LatentDiffusion, "encode_each", lambda self, prompts: calls.append(len(prompts))
                        or encode_each(self, prompts))
    text_cache = build.text_cache

    def trained(name, cached: bool):
        # the latent cache is on in both runs, each in a new folder so that it encodes the same
        # batches alike: only the text cache differs
        monkeypatch.setattr(build, "text_cache", text_cache if cached else lambda recipe, latent: None)
        calls.clear()
        recipe = sd_recipe(tmp_path, tiny_sd, name, adapters=None,
                           dataset={"caption_dropout": 0.5, "latent_cache_dir": str(tmp_path / name)},
                           sampling={"every_n_steps": None, "num_images": 1})
        train(recipes.load(recipe, ["run.max_steps=4", "dataset.batch_size=4", "dataset.count=8"]))
        return weights.end, sum(calls)

    plain, every_step = trained("plain", False)
    cached, first_epoch = trained("cached", True)  # the first epoch fills the text cache, the second reads it
    entries = list((tmp_path / "cached" / "text").rglob("*.safetensors"))
    assert 0 < first_epoch == len(entries) < every_step  # each distinct caption encoded once, "" among them
    assert any(path.stem == text_digests([""])[0] for path in entries)
    assert plain.keys() == cached.keys() and any(n.startswith("unet.") for n in plain)
    for name in plain:
        assert torch.equal(plain[name], cached[name]), name


def test_a_damaged_text_entry_is_encoded_again_and_a_full_disk_goes_on_without(disk, capsys, tiny_sd):
    latent = stable_diffusion(str(tiny_sd))
    expected = latent.encode_prompts(PROMPTS, 32)["encoder_hidden_states"]
    latent.text_cache = cache_of(latent, disk())
    assert torch.equal(latent.encode_prompts(PROMPTS, 32)["encoder_hidden_states"], expected)
    entries = sorted(latent.text_cache.folder.rglob("*.safetensors"))
    cut(entries[0])
    assert torch.equal(latent.encode_prompts(PROMPTS, 32)["encoder_hidden_states"], expected)
    assert len(sorted(latent.text_cache.folder.rglob("*.safetensors"))) == 3
    fill(latent.text_cache.folder)
    more = ["a green butterfly", "a red butterfly"]
    assert latent.encode_prompts(more, 32)["encoder_hidden_states"].shape[0] == 2
    assert not latent.text_cache.writable
    err = " ".join(capsys.readouterr().err.split())
    assert "could not write a text embedding cache entry" in err and "goes on without caching text embeddings" in err
    assert latent.encode_prompts(more, 32)["encoder_hidden_states"].shape[0] == 2
