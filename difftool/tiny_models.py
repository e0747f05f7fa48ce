"""Tiny Stable Diffusion (SDXL, SD3) pipelines built from configs, for offline tests and demos.

The weights are random, so they learn nothing worth seeing; what they give is every code path
of a real pipeline folder (diffusers layout, CLIP tokenizer and text encoder, VAE, conditional
UNet or SD3 transformer) in seconds on a CPU, without the hub.
`python -m difftool.tiny_models DIR [--xl | --sd3]` writes one.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

TEXT_WIDTH = 32  # hidden size of each tiny CLIP text encoder
MAX_TOKENS = 77  # the tokenizer's model_max_length, as CLIP's
SD3_LATENT_CHANNELS = 16  # as SD3's VAE


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer whose vocabulary is single characters (lower-case letters, digits and a
    few marks), each also as a word end, with no merges: enough to tokenize any caption."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = string.ascii_lowercase + string.digits + ".,!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(symbols) + [f"{s}</w>" for s in symbols]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))


def text_encoder(with_projection: bool = False, vocab_size: int = 100):
    """A 2-layer CLIP text encoder of width TEXT_WIDTH (with a projection, as SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                            projection_dim=TEXT_WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def vae(sd3: bool = False):
    """An AutoencoderKL with 4 latent channels that halves the resolution once (SD's halves it
    three times); SD3's has 16 latent channels, a shift factor and no quant convolutions."""
    from diffusers import AutoencoderKL

    extra = dict(latent_channels=SD3_LATENT_CHANNELS, shift_factor=0.0609, scaling_factor=1.5305,
                 use_quant_conv=False, use_post_quant_conv=False) if sd3 else dict(latent_channels=4)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=32, **extra)


def unet(xl: bool = False):
    """A UNet2DConditionModel with cross-attention in its inner block (SDXL's adds the pooled
    text embedding and the size/crop conditioning)."""
    from diffusers import UNet2DConditionModel

    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH) if xl else {}
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, sample_size=16,
        in_channels=4, out_channels=4, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_WIDTH if xl else TEXT_WIDTH, **extra)


def sd3_transformer():
    """A two-block SD3Transformer2DModel (2 heads of 8 channels; the last block, as in SD3,
    does not update the text tokens) on 2x2 patches of the tiny SD3 VAE's latents. SD3
    concatenates the two CLIPs' hidden states (2 * TEXT_WIDTH wide) and pads them to
    joint_attention_dim, the T5's width (zeros when there is no T5); the pooled projection is
    the two CLIPs' projections concatenated."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=SD3_LATENT_CHANNELS,
                                 out_channels=SD3_LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=2 * TEXT_WIDTH,
                                 caption_projection_dim=16,  # = the blocks' width, 2 heads x 8
                                 pooled_projection_dim=2 * TEXT_WIDTH,
                                 pos_embed_max_size=16)


def write_sd3(folder: Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusion3Pipeline to `folder`: two CLIP text encoders with
    projections, no T5 (text_encoder_3 = None, which diffusers allows), and SD3's
    FlowMatchEulerDiscreteScheduler (shift 3). diffusers reloads it with
    `StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`;
    difftool's loaders pass those Nones themselves (difftool.latent.absent_components)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    pipeline = StableDiffusion3Pipeline(
        transformer=sd3_transformer(), vae=vae(sd3=True), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=text_encoder(with_projection=True, vocab_size=len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=text_encoder(with_projection=True, vocab_size=len(tokenizer)), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipeline.save_pretrained(folder)
    return folder


def write_pipeline(folder: Path, xl: bool = False, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline (or StableDiffusionXLPipeline) to `folder`."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(seed)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    parts = dict(unet=unet(xl), vae=vae(), text_encoder=text_encoder(vocab_size=len(tokenizer)),
                 tokenizer=tokenizer, scheduler=scheduler)
    if xl:
        parts.update(text_encoder_2=text_encoder(with_projection=True, vocab_size=len(tokenizer)),
                     tokenizer_2=tokenizer)
        pipeline = StableDiffusionXLPipeline(**parts)
    else:
        pipeline = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--xl"], ["--sd3"]):
        sys.exit("usage: python -m difftool.tiny_models DIR [--xl | --sd3]")
    if sys.argv[2:] == ["--sd3"]:
        print(write_sd3(Path(sys.argv[1])))
    else:
        print(write_pipeline(Path(sys.argv[1]), xl=sys.argv[2:] == ["--xl"]))
