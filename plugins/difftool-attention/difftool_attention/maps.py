"""Recording attention maps, and drawing them over the images they looked at."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from PIL import Image

from difftool.errors import DifftoolError
from difftool_attention.processors import AttentionMaps


def recorders(model) -> dict[str, AttentionMaps]:
    """Attention layer name -> its AttentionMaps processor."""
    return {name: module.processor for name, module in model.named_modules()
            if isinstance(getattr(module, "processor", None), AttentionMaps)}


@contextlib.contextmanager
def capture(model):
    """Record every AttentionMaps layer of `model` within the block. Yields a dict that, after
    the block, maps each layer's name to its maps (batch, queries, keys), averaged over the
    heads and over the forward passes made in the block."""
    layers = recorders(model)
    if not layers:
        raise DifftoolError('the model has no attention-maps processor; set [attention] processor = "attention-maps"')
    shared = len(layers) - len({id(p) for p in layers.values()}) + 1
    if shared > 1:
        raise DifftoolError(f"one AttentionMaps processor serves {shared} layers, so their maps would mix; "
                            "give each layer its own (difftool's [attention] section does)")
    maps: dict[str, torch.Tensor] = {}
    for processor in layers.values():
        processor.reset()
        processor.recording = True
    try:
        yield maps
    finally:
        for name, processor in layers.items():
            processor.recording = False
            if processor.map is not None:
                maps[name] = processor.map.cpu()
            processor.reset()


def overlay(image: Image.Image, weights: torch.Tensor) -> Image.Image:
    """`image` with the attention its positions receive (the mean over queries of one image's
    (queries, keys) map) drawn over it, from blue (least) to red (most)."""
    received = weights.mean(dim=0)
    rows = round(math.sqrt(received.numel() * image.height / image.width))
    heat = received.reshape(rows, -1)
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    heat = np.asarray(Image.fromarray((heat.numpy() * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)) / 255.0
    colour = np.stack([heat, np.zeros_like(heat), 1.0 - heat], axis=-1) * 255
    blended = 0.5 * np.asarray(image.convert("RGB"), dtype=np.float64) + 0.5 * colour
    return Image.fromarray(blended.round().astype(np.uint8))


def to_tensor(images: list, channels: int) -> torch.Tensor:
    """PIL images -> (batch, channels, h, w) in [-1, 1], as the model sees its data."""
    mode = "RGB" if channels == 3 else "L"
    pixels = np.stack([np.asarray(image.convert(mode), dtype=np.float32).reshape(image.height, image.width, -1)
                       for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0


def save_sample_maps(state, images: list) -> None:
    """Noise the sample grid's images to the layers' timestep, run the model once while
    capturing, and save one overlay grid per layer as attention-maps/{epoch}-{layer}.png."""
    from difftool import build, files, objective
    from difftool.sampling import grid

    model = state.accelerator.unwrap_model(state.model)
    layers = recorders(model)
    if not layers or build.is_latent(model):  # text-to-image: use capture(pipeline.unet) around a call
        return
    scheduler = build.noise_scheduler(state.recipe)
    timestep = next(iter(layers.values())).timestep or scheduler.config.num_train_timesteps // 10
    device = state.accelerator.device
    clean = to_tensor(images, model.config.in_channels).to(device)
    timesteps = torch.full((len(images),), timestep, dtype=torch.long, device=device)
    _, noisy = objective.add_noise(scheduler, clean, timesteps, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad(), state.accelerator.autocast(), capture(model) as maps:
        model(noisy, timesteps)
    model.train(was_training)
    for layer, weights in maps.items():
        drawn = [overlay(image, w) for image, w in zip(images, weights)]
        files.save_image(grid(drawn), state.output_dir / "attention-maps" / f"{state.epoch:04d}-{layer}.png")
