"""What the model is trained to predict, and how far off it is.

The forward process is computed from the noise scheduler's `alphas_cumprod` rather than its
`add_noise`/`get_velocity`: only the DDPM-family schedulers implement those on training
timesteps (the sigma-based ones, such as euler, and the multistep solvers expect their own
inference timesteps), while every scheduler defines the same betas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difftool.errors import DifftoolError

LOSSES = {
    "mse": lambda a, b, delta: F.mse_loss(a, b, reduction="none"),
    "l1": lambda a, b, delta: F.l1_loss(a, b, reduction="none"),
    "huber": lambda a, b, delta: F.huber_loss(a, b, reduction="none", delta=delta),
}


def signal_and_noise_scales(noise_scheduler, timesteps: torch.Tensor, like: torch.Tensor):
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), shaped to broadcast over `like`."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(like.device)[timesteps].float()
    shape = (-1,) + (1,) * (like.dim() - 1)
    return alpha_bar.sqrt().view(shape), (1 - alpha_bar).sqrt().view(shape)


def add_noise(noise_scheduler, clean: torch.Tensor, timesteps: torch.Tensor, noise_offset: float = 0.0,
              generator: torch.Generator | None = None):
    """(noise, noisy images) of the forward diffusion, with an optional per-channel noise offset."""
    noise = torch.randn(clean.shape, generator=generator).to(clean.device) if generator else torch.randn_like(clean)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(clean.shape[0], clean.shape[1], 1, 1, device=clean.device)
    signal, sigma = signal_and_noise_scales(noise_scheduler, timesteps, clean)
    return noise, (signal * clean + sigma * noise).to(clean.dtype)


def target(noise_scheduler, prediction_type: str, clean, noise, timesteps) -> torch.Tensor:
    """The noise (epsilon), the velocity (v_prediction) or the clean image (sample)."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        signal, sigma = signal_and_noise_scales(noise_scheduler, timesteps, clean)
        return (signal * noise - sigma * clean).float()
    if prediction_type == "sample":
        return clean.float()
    raise DifftoolError(f"[noise_scheduler] prediction_type = '{prediction_type}' is not one of epsilon, v_prediction, sample")


def loss(prediction, wanted, kind: str, huber_delta: float, weights) -> torch.Tensor:
    """The mean per-sample `kind` loss ("mse", "l1", "huber"), weighted per sample if `weights`."""
    per_sample = LOSSES[kind](prediction.float(), wanted, huber_delta).flatten(1).mean(1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample)).mean()


def compute_loss(model, noise_scheduler, clean, noise, noisy, timesteps, settings: dict, weighting=None,
                 conditioning: dict | None = None):
    """The model's loss on one noised batch, by the [objective] settings and a loss weighting;
    `conditioning` holds the model's extra keywords (a latent model's text embeddings)."""
    prediction_type = noise_scheduler.config.get("prediction_type", "epsilon")
    weights = weighting(timesteps, noise_scheduler, prediction_type) if weighting else None
    prediction = model(noisy, timesteps, return_dict=False, **(conditioning or {}))[0]
    wanted = target(noise_scheduler, prediction_type, clean, noise, timesteps)
    return loss(prediction, wanted, settings["loss"], settings["huber_delta"], weights)
