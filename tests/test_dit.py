"""The `dit` model, class conditioning of the built-in models, and image sizes that follow the
model's `size_multiple` rather than UNet settings."""

import pytest
import torch

from difftool import build
from difftool import recipe as recipes
from difftool.errors import DifftoolError
from difftool.memory import convolution_bytes
from difftool.plugins import registry

TINY_DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, patch_size=4)
TINY_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def dit(num_classes=2, **config):
    torch.manual_seed(0)
    return registry("models").get("dit").build({**TINY_DIT, **config}, "test", image_size=16, num_classes=num_classes)


def unet(num_classes=2, **config):
    torch.manual_seed(0)
    return registry("models").get("unet2d").build({**TINY_UNET, **config}, "test", image_size=16, num_classes=num_classes)


def label_embeddings(model):
    from diffusers.models.embeddings import LabelEmbedding

    return [m for m in model.modules() if isinstance(m, LabelEmbedding)]


def outputs(model, labels=(0, 1, 2)):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(len(labels), 3, 16, 16, generator=generator)
    t = torch.tensor([3, 50, 97][:len(labels)])
    with torch.no_grad():
        return model(x, t, class_labels=torch.tensor(labels), return_dict=False)[0]


def test_dit_takes_its_classes_and_the_null_class():
    model = dit()
    assert model.config.in_channels == 3 and model.config.sample_size == 16 and model.config.num_embeds_ada_norm == 2
    assert model.size_multiple == 4
    embeddings = label_embeddings(model)
    assert embeddings and all(e.dropout_prob == 0 and e.embedding_table.num_embeddings == 3 for e in embeddings)
    model.train()  # diffusers' own label dropout is off: training-mode calls are deterministic
    first, second = outputs(model), outputs(model)
    assert first.shape == (3, 3, 16, 16) and torch.equal(first, second)
    assert not torch.equal(outputs(model, (0, 0, 0)), outputs(model, (2, 2, 2)))  # labels matter
    unconditional = dit(num_classes=None)
    assert unconditional.config.num_embeds_ada_norm == 1
    assert outputs(unconditional, (0, 0)).shape == (2, 3, 16, 16)


def test_dit_defaults_are_a_small_pixel_model():
    model = registry("models").get("dit").build({}, "test", image_size=32, num_classes=None)
    config = model.config
    assert (config.in_channels, config.patch_size, config.sample_size, config.num_layers) == (3, 2, 32, 6)
    assert config.num_attention_heads * config.attention_head_dim == 384


def test_a_few_steps_lower_the_dit_loss_on_a_fixed_batch():
    model = dit().train()
    generator = torch.Generator().manual_seed(2)
    images, noise = torch.randn(4, 3, 16, 16, generator=generator), torch.randn(4, 3, 16, 16, generator=generator)
    t, labels = torch.tensor([10, 30, 60, 90]), torch.tensor([0, 1, 2, 1])
    noisy = 0.7 * images + 0.7 * noise
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(model(noisy, t, class_labels=labels).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_saved_dit_loads_with_diffusers_and_difftool(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel

    model = dit().eval()
    model.save_pretrained(tmp_path / "model")
    model.save_pretrained(tmp_path / "run" / "unet")
    expected = outputs(model)
    assert torch.equal(outputs(DiTTransformer2DModel.from_pretrained(tmp_path / "model").eval()), expected)
    entry = registry("models").get("dit")
    for folder in ("model", "run"):
        loaded = entry.build({"pretrained": str(tmp_path / folder)}, "test", image_size=16, num_classes=2)
        assert loaded.size_multiple == 4 and all(e.dropout_prob == 0 for e in label_embeddings(loaded))
        assert torch.equal(outputs(loaded.eval()), expected)
    DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "pipeline")
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert isinstance(pipeline, DDPMPipeline) and isinstance(pipeline.unet, DiTTransformer2DModel)
    assert torch.equal(outputs(pipeline.unet.eval()), expected)


def test_a_saved_dit_must_fit_the_run(tmp_path):
    dit().save_pretrained(tmp_path / "dit")
    unet(num_classes=None).save_pretrained(tmp_path / "unet")
    entry = registry("models").get("dit")

    def load(path=tmp_path / "dit", image_size=16, num_classes=2):
        return entry.build({"pretrained": str(path)}, "test", image_size=image_size, num_classes=num_classes)

    with pytest.raises(DifftoolError, match=r"has patch_size = 4, and \[dataset\] image_size = 18 is not divisible"):
        load(image_size=18)
    with pytest.raises(DifftoolError, match=r"was made for 16 px images .*; set image_size = 16"):
        load(image_size=32)
    with pytest.raises(DifftoolError, match="embeds 2 classes .* fewer than the 5"):
        load(num_classes=5)
    with pytest.raises(DifftoolError, match="holds a UNet2DModel, not a DiTTransformer2DModel; use name = 'unet2d'"):
        load(tmp_path / "unet")
    with pytest.raises(DifftoolError, match="cannot be set beside it"):
        entry.build({"pretrained": str(tmp_path / "dit"), "num_layers": 3}, "test")
    with pytest.raises(DifftoolError, match="is not a saved DiT"):
        load(tmp_path / "dit" / "nothing-here")


def test_dit_settings_that_cannot_work_are_errors():
    with pytest.raises(DifftoolError, match="DiT supports only 'ada_norm_zero'"):
        dit(norm_type="layer_norm")
    with pytest.raises(DifftoolError, match="num_embeds_ada_norm = 1 is fewer than the 2 classes"):
        dit(num_embeds_ada_norm=1)
    assert dit(num_embeds_ada_norm=5).config.num_embeds_ada_norm == 5


def test_unet2d_gets_a_class_embedding_with_the_null_class():
    model = unet().eval()
    assert model.config.num_class_embeds == 3 and model.config.sample_size == 16 and model.size_multiple == 2
    assert outputs(model).shape == (3, 3, 16, 16)
    assert not torch.equal(outputs(model, (0, 0, 0)), outputs(model, (2, 2, 2)))
    assert unet(num_class_embeds=10).config.num_class_embeds == 10
    assert unet(num_classes=None).config.num_class_embeds is None


def test_unet2d_class_embeddings_must_fit_the_run(tmp_path):
    with pytest.raises(DifftoolError, match="num_class_embeds = 2 is too few for 2 classes and the null class.*at least 3"):
        unet(num_class_embeds=2)
    with pytest.raises(DifftoolError, match=r"num_class_embeds = 3 makes a class-conditional UNet, which needs labelled "
                                            r"data: set \[dataset\] label_column"):
        unet(num_classes=None, num_class_embeds=3)
    unet(num_classes=None).save_pretrained(tmp_path / "plain")
    unet(num_classes=1).save_pretrained(tmp_path / "two")
    entry = registry("models").get("unet2d")

    def load(folder, num_classes):
        return entry.build({"pretrained": str(tmp_path / folder)}, "test", image_size=16, num_classes=num_classes)

    assert load("two", 1).config.num_class_embeds == 2 and load("plain", None).size_multiple == 2
    with pytest.raises(DifftoolError, match="is an unconditional UNet .* cannot take the 2 classes"):
        load("plain", 2)
    with pytest.raises(DifftoolError, match="num_class_embeds = 2 is too few for 2 classes"):
        load("two", 2)
    with pytest.raises(DifftoolError, match=r"is a class-conditional UNet \(num_class_embeds = 2\), which needs labelled"):
        load("two", None)


def test_image_sizes_follow_the_models_size_multiple():
    with pytest.raises(DifftoolError, match=r"r.toml \[dataset\] image_size = 18 must be divisible by 4, the model's "
                                            r"size multiple; use 16"):
        build.fit_image_size(dit(), 18, "r.toml [dataset]")
    build.fit_image_size(dit(), 16, "r.toml [dataset]")

    class Plugin(torch.nn.Module):  # another architecture: no config, no down_block_types
        def forward(self, sample, timestep, return_dict=False):
            return (sample,)

    build.fit_image_size(Plugin(), 33, "r.toml [dataset]")
    strict = Plugin()
    strict.size_multiple = 3
    build.fit_image_size(strict, 33, "r.toml [dataset]")
    with pytest.raises(DifftoolError, match="must be divisible by 3, the model's size multiple; use 30"):
        build.fit_image_size(strict, 32, "r.toml [dataset]")


def test_a_dit_recipe_builds_and_its_memory_is_counted(tiny_recipe):
    path = tiny_recipe()
    text = path.read_text()
    start, end = text.index("[model]"), text.index("[noise_scheduler]")
    path.write_text(text[:start] + '[model]\nname = "dit"\nnum_layers = 2\nnum_attention_heads = 2\n'
                    'attention_head_dim = 8\npatch_size = 4\n\n' + text[end:])
    recipe = recipes.load(path)
    model = build.model(recipe, num_classes=3)
    assert model.config.sample_size == 32 and model.config.num_embeds_ada_norm == 3
    assert build.model(recipe).config.num_embeds_ada_norm == 1
    build.check_memory(recipe, model)
    # the patch embedding is the DiT's one convolution: batch x width x (32 / 4)^2 float32s
    assert convolution_bytes(model, 8, 32, 3) == 8 * 16 * 8 * 8 * 4
    with pytest.raises(DifftoolError, match="image_size = 30 must be divisible by 4"):
        build.model(recipes.load(path, ["dataset.image_size=30"]))
    with pytest.raises(DifftoolError, match="unknown key 'num_classes'"):
        recipes.load(path, ["model.num_classes=3"])
