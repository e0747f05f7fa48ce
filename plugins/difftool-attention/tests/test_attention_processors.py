"""The explicit processor matches diffusers' default; attention-maps records maps and draws them."""

import re

import pytest
import torch

pytest.importorskip("difftool_attention", reason="pip install -e plugins/difftool-attention")

from diffusers import UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402
from PIL import Image  # noqa: E402

from difftool import build  # noqa: E402
from difftool import recipe as recipes  # noqa: E402
from difftool.engine import train  # noqa: E402
from difftool.errors import DifftoolError  # noqa: E402
from difftool_attention.maps import capture  # noqa: E402
from difftool_attention.processors import AttentionMaps, ExplicitAttention  # noqa: E402

ATTENTION = '\n[attention]\nprocessor = "{name}"\nlayers = "{layers}"\n'


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
                       attention_head_dim=16).eval()


def set_processor(model, make):
    """Give every attention layer its own processor from `make()`."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(make())


def test_installed_plugin_is_listed(cli):
    code, out, _ = cli("plugins")
    assert code == 0
    assert re.search(r"difftool-attention\s+│\s+0\.1\.0\s+│\s+on_samples", out)
    assert "attention_processors: attention-maps, explicit" in out


def test_explicit_attention_matches_the_default_in_a_unet():
    model = tiny_unet()
    noisy, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([5, 50])
    with torch.no_grad():
        set_processor(model, AttnProcessor2_0)
        expected = model(noisy, t).sample
        set_processor(model, ExplicitAttention)
        got = model(noisy, t).sample
    assert (expected - got).abs().max() < 1e-5


def test_explicit_attention_matches_the_default_with_cross_attention_and_a_mask():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    hidden, context = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    bias = (1 - mask) * -10000.0  # diffusers' additive form of a padding mask
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden, context, bias)
        got = ExplicitAttention()(attn, hidden, context, bias)
    assert (expected - got).abs().max() < 1e-5


def test_layers_pattern_picks_the_layers(tiny_recipe):
    recipe = recipes.load(tiny_recipe(ATTENTION.format(name="explicit", layers="mid_block.*")))
    processors = {name: module.processor for name, module in build.model(recipe).named_modules()
                  if isinstance(module, Attention)}
    assert isinstance(processors.pop("mid_block.attentions.0"), ExplicitAttention)
    assert processors and not any(isinstance(p, ExplicitAttention) for p in processors.values())


def test_capture_records_only_inside_the_block():
    model = tiny_unet()
    set_processor(model, AttentionMaps)
    noisy, t = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    with torch.no_grad():
        model(noisy, t)  # not recorded
        with capture(model) as maps:
            model(noisy, t)
    assert set(maps) == {"down_blocks.1.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1",
                         "mid_block.attentions.0"}
    mid = maps["mid_block.attentions.0"]
    assert mid.shape == (3, 256, 256)  # 16x16 positions attending to 16x16 positions
    assert torch.allclose(mid.sum(dim=-1), torch.ones(3, 256), atol=1e-5)  # each query's weights sum to 1
    assert all(p.map is None for p in (m.processor for m in model.modules() if isinstance(m, Attention)))
    with pytest.raises(DifftoolError, match="no attention-maps processor"):
        with capture(tiny_unet()):
            pass
    shared = AttentionMaps()
    set_processor(model, lambda: shared)  # as diffusers' set_attn_processor(one_processor) would
    with pytest.raises(DifftoolError, match="serves 4 layers"):
        with capture(model):
            pass


def test_training_saves_attention_map_images_with_each_sample_grid(tiny_recipe, tmp_path):
    output_dir = train(recipes.load(tiny_recipe(ATTENTION.format(name="attention-maps", layers="mid_block.*")),
                                    ["run.max_steps=2"]))
    saved = sorted(p.name for p in (output_dir / "attention-maps").iterdir())
    assert saved == ["0000-mid_block.attentions.0.png"]  # the one epoch's grid
    with Image.open(output_dir / "attention-maps" / saved[-1]) as image:
        assert image.size == (64, 64)  # the 2x2 grid of 32 px samples
        assert len(set(image.getdata())) > 10  # a drawn map, not a flat image
