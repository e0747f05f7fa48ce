"""The built-in fid, kid and clip-score metrics, with stand-in networks written in the tests:
a tiny TorchScript feature network called as the FID Inception is, and a tiny CLIP folder.
Nothing here touches the network (the weights download is replaced by a failure)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import difftool.testing  # noqa: F401 (keeps Hugging Face libraries offline)
from difftool.builtins import clip_score as clip_module
from difftool.builtins import inception
from difftool.errors import DifftoolError
from difftool.metrics import ReferenceCache

FEATURES = 16  # the stand-in network's feature dimension
REAL_DOWNLOAD = inception.download  # the autouse fixture below replaces it in every test


class StandIn(torch.nn.Module):
    """Called as the FID Inception is (uint8 (N, 3, H, W) in, (N, D) features out): an 8x8
    average pool, a fixed random projection and a tanh."""

    def __init__(self, seed: int = 0, features: int = FEATURES):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(3 * 8 * 8, features, generator=generator) / 8)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x.float() / 127.5 - 1.0, 8).flatten(1)
        return torch.tanh(pooled @ self.projection)


class NotInception(torch.nn.Module):
    """A TorchScript module with another call convention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean()


def write_stand_in(path: Path, seed: int = 0) -> Path:
    torch.jit.script(StandIn(seed)).save(str(path))
    return path


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """The stand-in network's TorchScript file."""
    return write_stand_in(tmp_path_factory.mktemp("net") / "stand-in.pt")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """A cache folder of the test's own, no weights named anywhere, and no downloads."""
    monkeypatch.setenv("DIFFTOOL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(clip_module.MODEL_ENV, raising=False)

    def no_network(url, path):
        raise URLError("no network in tests")

    monkeypatch.setattr(inception, "download", no_network)


def images(count: int, seed: int, shift: float = 0.0, contrast: float = 1.0, size: int = 32) -> torch.Tensor:
    """Blocky random images (8x8 random colours upsampled), brighter by `shift` (0..1) and with
    the colours' spread scaled by `contrast`: different settings, different distributions."""
    generator = torch.Generator().manual_seed(seed)
    colours = 0.5 + contrast * (torch.rand(count, 3, 8, 8, generator=generator) - 0.5) + shift
    pixels = F.interpolate(colours, size=(size, size), mode="nearest")
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def scipy_fid(net_path: Path, real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID computed directly: mean and covariance of the stand-in's features, scipy's sqrtm."""
    net = torch.jit.load(str(net_path))
    with torch.no_grad():
        a = net(real, return_features=True).double().numpy()
        b = net(fake, return_features=True).double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def fid_of(metric, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """Feed the reference and the generated images in two batches each, and compute."""
    for half in real.chunk(2):
        metric.update_reference(half)
    for half in fake.chunk(2):
        metric.update(half)
    return metric.compute()


# ---- FID ---------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero(stand_in):
    real = images(64, seed=1)
    value = fid_of(inception.fid(weights=str(stand_in)), real, real)
    assert set(value) == {"fid"} and isinstance(value["fid"], float)
    assert abs(value["fid"]) < 1e-6


def test_fid_matches_a_direct_computation(stand_in):
    real, fake = images(64, seed=1), images(48, seed=2, shift=0.2, contrast=0.6)
    value = fid_of(inception.fid(weights=str(stand_in)), real, fake)["fid"]
    assert value > 0.1
    assert value == pytest.approx(scipy_fid(stand_in, real, fake), rel=1e-5)


def test_fid_grows_with_the_difference_between_the_distributions(stand_in):
    real = images(64, seed=1)
    values = [fid_of(inception.fid(weights=str(stand_in)), real, images(64, seed=3, shift=shift))["fid"]
              for shift in (0.0, 0.1, 0.3)]
    assert 0 < values[0] < values[1] < values[2]  # two draws of one distribution: only the small-sample bias
    assert values[2] > 4 * values[0]


def test_fid_reads_the_weights_from_the_environment_variable(stand_in, monkeypatch):
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(stand_in))
    metric = inception.fid()
    assert metric.network.num_features == FEATURES
    assert metric.settings() == inception.fid(weights=str(stand_in)).settings()


def test_the_weights_key_comes_before_the_environment_variable(stand_in, monkeypatch, tmp_path):
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "nowhere.pt"))
    assert inception.fid(weights=str(stand_in)).network.num_features == FEATURES
    with pytest.raises(DifftoolError, match=f"{inception.WEIGHTS_ENV}=.*nowhere.pt does not exist"):
        inception.fid()


def test_settings_identify_the_weights_not_their_path(stand_in, tmp_path):
    settings = inception.fid(weights=str(stand_in)).settings()
    assert settings["network"] == {"file": "stand-in.pt", "size": stand_in.stat().st_size,
                                   "sha256": hashlib.sha256(stand_in.read_bytes()).hexdigest()}
    copy = tmp_path / "elsewhere" / "stand-in.pt"
    copy.parent.mkdir()
    shutil.copy(stand_in, copy)
    assert inception.fid(weights=str(copy)).settings() == settings
    other = write_stand_in(tmp_path / "stand-in.pt", seed=1)
    assert inception.fid(weights=str(other)).settings() != settings
    json.dumps(settings)  # part of the cache key


def test_fid_needs_two_images_of_each(stand_in):
    metric = inception.fid(weights=str(stand_in))
    assert metric.min_samples == 2
    metric.update_reference(images(8, seed=1))
    metric.update(images(1, seed=2))
    with pytest.raises(DifftoolError, match=r"fid needs at least 2 generated images .*it got 1: raise \[evaluation\] "
                                            r"num_samples to 2"):
        metric.compute()


# ---- KID ---------------------------------------------------------------------------------------


def test_kid_is_near_zero_for_similar_sets_and_positive_for_different_ones(stand_in):
    metric = inception.kid(weights=str(stand_in), subset_size=40, subsets=20)
    assert metric.min_samples == 40
    real = images(64, seed=1)
    similar = fid_of(metric, real, images(64, seed=2))
    assert set(similar) == {"kid", "kid_std"} and all(isinstance(v, float) for v in similar.values())
    metric.reset()
    different = fid_of(metric, real, images(64, seed=2, shift=0.3, contrast=0.5))
    assert abs(similar["kid"]) < 0.05 and different["kid"] > 0.5  # KID is unbiased: ~0 for one distribution
    assert different["kid_std"] >= 0


def test_kid_is_repeatable_and_leaves_the_global_rng_alone(stand_in):
    metric = inception.kid(weights=str(stand_in), subset_size=20, subsets=10)
    metric.update_reference(images(32, seed=1))
    metric.update(images(32, seed=2, shift=0.1))
    before = torch.random.get_rng_state()
    first = metric.compute()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert metric.compute() == first


def test_kid_says_how_many_images_it_needs(stand_in):
    metric = inception.kid(weights=str(stand_in), subset_size=50, subsets=5)
    metric.update_reference(images(64, seed=1))
    metric.update(images(10, seed=2))
    with pytest.raises(DifftoolError, match=r"kid needs at least 50 generated images \(its subset_size\); it got 10: "
                                            r"raise \[evaluation\] num_samples to 50 or more, or set a smaller "
                                            r"subset_size in \[evaluation.kid\]"):
        metric.compute()
    small_reference = inception.kid(weights=str(stand_in), subset_size=50, subsets=5)
    small_reference.update_reference(images(30, seed=1))
    small_reference.update(images(60, seed=2))
    with pytest.raises(DifftoolError, match=r"kid needs at least 50 reference images \(its subset_size\); it got 30: "
                                            r"give a larger reference, or set subset_size = 30 or less"):
        small_reference.compute()


@pytest.mark.parametrize("key,value", [("subset_size", 0), ("subsets", -1), ("subset_size", 2.5),
                                       ("subsets", True)])
def test_kid_refuses_a_bad_subset_setting(stand_in, key, value):
    with pytest.raises(DifftoolError, match=rf"\[evaluation.kid\] {key} must be a whole number of at least 1"):
        inception.kid(weights=str(stand_in), **{key: value})


# ---- both: the reference state and reset -------------------------------------------------------


@pytest.mark.parametrize("name", ["fid", "kid"])
def test_reference_state_round_trips_through_the_cache(stand_in, tmp_path, name):
    def build():
        kwargs = {"subset_size": 20, "subsets": 10} if name == "kid" else {}
        return getattr(inception, name)(weights=str(stand_in), **kwargs)

    seen = build()
    for batch in images(48, seed=1).chunk(3):
        seen.update_reference(batch)
    cache = ReferenceCache(tmp_path / "reference")
    path = cache.path(name, seen, "data", 32, {})
    cache.save(path, seen)
    assert path.is_file()

    restored = build()
    assert cache.load(path, restored)
    for metric in (seen, restored):
        metric.update(images(40, seed=2, shift=0.15))
    assert restored.compute() == seen.compute()
    for key, tensor in seen.reference_state().items():
        assert torch.equal(restored.reference_state()[key].cpu(), tensor.cpu())


@pytest.mark.parametrize("name", ["fid", "kid"])
def test_reset_forgets_the_generated_images_and_keeps_the_reference(stand_in, name):
    kwargs = {"subset_size": 20, "subsets": 10} if name == "kid" else {}
    metric = getattr(inception, name)(weights=str(stand_in), **kwargs)
    metric.update_reference(images(40, seed=1))
    reference = {k: v.clone() for k, v in metric.reference_state().items()}
    metric.update(images(30, seed=2, shift=0.2))
    first = metric.compute()
    metric.reset()
    assert all(torch.equal(metric.reference_state()[k], v) for k, v in reference.items())
    with pytest.raises(DifftoolError, match="it got 0: raise"):
        metric.compute()
    metric.update(images(30, seed=3))
    other = metric.compute()
    assert other != first
    metric.reset()
    metric.update(images(30, seed=2, shift=0.2))
    assert metric.compute() == first


def test_a_damaged_reference_state_is_refused(stand_in):
    metric = inception.fid(weights=str(stand_in))
    with pytest.raises(DifftoolError, match="do not fit its network .*computed again"):
        metric.load_reference_state({"real_features_sum": torch.zeros(3)})


def test_metrics_build_from_the_registry_and_keep_the_contract(stand_in):
    from difftool.plugins import registry

    for name, device in (("fid", None), ("kid", torch.device("cpu"))):
        metric = registry("metrics").get(name).build({"weights": str(stand_in)}, f"[evaluation.{name}]", device=device)
        assert metric.needs_reference and not metric.needs_prompts


def test_images_are_checked(stand_in):
    metric = inception.fid(weights=str(stand_in))
    with pytest.raises(DifftoolError, match=r"fid takes images as a uint8 tensor \(N, 3, H, W\); got torch.float32"):
        metric.update(images(2, seed=1).float())
    with pytest.raises(DifftoolError, match="fid needs images of at least 16x16 px; got 8x8"):
        metric.update_reference(images(2, seed=1, size=8))
    metric.update_reference(images(4, seed=1, size=16))  # any size from 16 px
    metric.update(images(4, seed=1, size=48))


# ---- where the weights come from ---------------------------------------------------------------


def test_no_weights_and_no_network_says_how_to_provide_them(tmp_path):
    with pytest.raises(DifftoolError) as caught:
        inception.fid()
    message = str(caught.value)
    cached = tmp_path / "cache" / "inception-2015-12-05.pt"
    for needed in ("could not download", "URLError", "inception-2015-12-05.pt", inception.WEIGHTS_URL,
                   "(TorchScript)", 'weights = "path/to/inception-2015-12-05.pt" in [evaluation.fid]',
                   "DIFFTOOL_INCEPTION_WEIGHTS=path/to/inception-2015-12-05.pt", f"put it at {cached}"):
        assert needed in message
    assert not cached.exists()
    with pytest.raises(DifftoolError, match=r"\[evaluation.kid\]"):
        inception.kid()


def test_the_download_goes_to_the_cache_once(stand_in, monkeypatch, tmp_path):
    fetched = []

    def from_file(url, path):
        fetched.append(url)
        REAL_DOWNLOAD(stand_in.as_uri(), path)  # the real function, on a file:// URL

    monkeypatch.setattr(inception, "download", from_file)
    first = inception.fid()
    cached = tmp_path / "cache" / "inception-2015-12-05.pt"
    assert cached.read_bytes() == stand_in.read_bytes()
    assert [p.name for p in cached.parent.iterdir()] == ["inception-2015-12-05.pt"]  # no temp file left
    assert inception.fid().settings() == first.settings()
    assert fetched == [inception.WEIGHTS_URL]  # once: the second metric used the cached file


def test_a_missing_weights_path_is_named(tmp_path):
    with pytest.raises(DifftoolError, match=r"\[evaluation.fid\] weights = '.*nowhere.pt': .*nowhere.pt does not "
                                            r"exist; check the path, or to get the file: download "
                                            r"inception-2015-12-05.pt"):
        inception.fid(weights=str(tmp_path / "nowhere.pt"))
    with pytest.raises(DifftoolError, match="is a folder; give the path of the file inception-2015-12-05.pt"):
        inception.fid(weights=str(tmp_path))


def test_a_file_that_is_not_torchscript_is_named(tmp_path):
    junk = tmp_path / "inception-2015-12-05.pkl"
    junk.write_bytes(b"\x80\x04not a TorchScript archive")
    with pytest.raises(DifftoolError, match=r"inception-2015-12-05.pkl is not a TorchScript file \(RuntimeError: "
                                            r".*\); give inception-2015-12-05.pt from https://.*the .pkl from NGC "
                                            r"is a pickle"):
        inception.fid(weights=str(junk))
    state_dict = tmp_path / "state.pt"
    torch.save({"weight": torch.zeros(2)}, state_dict)
    with pytest.raises(DifftoolError, match="is not a TorchScript file"):
        inception.fid(weights=str(state_dict))


def test_a_damaged_cached_download_says_to_delete_it(tmp_path):
    cached = tmp_path / "cache" / "inception-2015-12-05.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a file")
    with pytest.raises(DifftoolError, match="is not a TorchScript file .*delete it so that it is downloaded again"):
        inception.fid()


def test_another_torchscript_network_is_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.jit.script(NotInception()).save(str(other))
    with pytest.raises(DifftoolError, match=r"is a TorchScript file but not the FID Inception network: calling it as "
                                            r"net\(images, return_features=True\) failed"):
        inception.fid(weights=str(other))


# ---- clip-score --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A folder holding a tiny random CLIPModel (32 px images), its tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from difftool.tiny_models import write_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **layers),
        vision_config=dict(image_size=32, patch_size=8, **layers), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


PROMPTS = ["a blue butterfly", "a red moth", "two green leaves", "a yellow flower"]


def direct_clip_score(folder: Path, pictures: torch.Tensor, prompts: list[str]) -> float:
    """The CLIP score computed directly with transformers: 100 x mean cosine similarity, at least 0."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        image = model.get_image_features(**processor(images=list(pictures), return_tensors="pt"))
        text = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
    # transformers 5 returns output objects holding the projected embedding, 4 returned it as is
    image, text = (getattr(out, "pooler_output", out) for out in (image, text))
    cosine = F.cosine_similarity(image, text, dim=-1)
    return max(100 * cosine.mean().item(), 0.0)


def test_clip_score_of_images_against_their_prompts(tiny_clip):
    from difftool.plugins import registry

    metric = registry("metrics").get("clip-score").build({"model": str(tiny_clip)}, "[evaluation.clip-score]",
                                                          device=torch.device("cpu"))
    assert not metric.needs_reference and metric.needs_prompts
    pictures = images(4, seed=1, size=40)
    metric.update(pictures[:2], PROMPTS[:2])
    metric.update(pictures[2:], PROMPTS[2:])
    value = metric.compute()
    assert set(value) == {"clip_score"} and isinstance(value["clip_score"], float)
    assert math.isfinite(value["clip_score"]) and 0 <= value["clip_score"] <= 100
    assert value["clip_score"] == pytest.approx(direct_clip_score(tiny_clip, pictures, PROMPTS), abs=1e-3)
    metric.reset()
    with pytest.raises(DifftoolError, match="clip-score got no images"):
        metric.compute()


def test_clip_score_reads_the_model_from_the_environment_and_has_no_reference(tiny_clip, monkeypatch):
    monkeypatch.setenv(clip_module.MODEL_ENV, str(tiny_clip))
    metric = clip_module.clip_score()
    assert metric.reference_state() == {}
    metric.load_reference_state({})
    metric.update_reference(images(2, seed=1))  # nothing to learn, and no error
    metric.update(images(1, seed=1), ["a moth"])
    assert 0 <= metric.compute()["clip_score"] <= 100


def test_clip_score_needs_one_prompt_per_image(tiny_clip):
    metric = clip_module.clip_score(model=str(tiny_clip))
    with pytest.raises(DifftoolError, match="clip-score needs one prompt \\(a string\\) per image; got 4 images and "
                                            "3 prompts"):
        metric.update(images(4, seed=1), PROMPTS[:3])
    with pytest.raises(DifftoolError, match="clip-score scores images against their prompts and got none"):
        metric.update(images(4, seed=1), None)


def test_clip_score_without_a_model_says_how_to_get_one():
    with pytest.raises(DifftoolError) as caught:
        clip_module.clip_score()
    message = str(caught.value)
    for needed in ("clip-score needs a CLIP model in a local folder", "hf download openai/clip-vit-base-patch16 "
                   "--local-dir DIR", 'model = "DIR" in [evaluation.clip-score]', "DIFFTOOL_CLIP_MODEL=DIR"):
        assert needed in message


def test_clip_score_names_a_folder_that_holds_no_clip_model(tmp_path):
    with pytest.raises(DifftoolError, match="nowhere does not exist; check the path"):
        clip_module.clip_score(model=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DifftoolError, match="empty has no config.json; give a folder holding a CLIP model"):
        clip_module.clip_score(model=str(empty))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DifftoolError, match="holds a 'bert' model, not CLIP"):
        clip_module.clip_score(model=str(bert))
