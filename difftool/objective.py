"""What the model is trained to predict, and how far off it is."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difftool.errors import DifftoolError


def add_noise(noise_scheduler, clean: torch.Tensor, timesteps: torch.Tensor, noise_offset: float):
    """(noise, noisy images): the forward diffusion, with optional per-channel noise offset."""
    noise = torch.randn_like(clean)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(clean.shape[0], clean.shape[1], 1, 1, device=clean.device)
    return noise, noise_scheduler.add_noise(clean, noise, timesteps)


def target(noise_scheduler, prediction_type: str, clean, noise, timesteps) -> torch.Tensor:
    """The noise (epsilon), the velocity (v_prediction) or the clean image (sample)."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps).float()
    if prediction_type == "sample":
        return clean.float()
    raise DifftoolError(f"[noise_scheduler] prediction_type = '{prediction_type}' is not one of epsilon, v_prediction, sample")


def loss(prediction, wanted, kind: str, huber_delta: float, weights) -> torch.Tensor:
    """The mean per-sample `kind` loss ("mse", "l1", "huber"), weighted per sample if `weights`."""
    functions = {
        "mse": F.mse_loss,
        "l1": F.l1_loss,
        "huber": lambda a, b, reduction: F.huber_loss(a, b, reduction=reduction, delta=huber_delta),
    }
    per_sample = functions[kind](prediction.float(), wanted, reduction="none").flatten(1).mean(1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample)).mean()
