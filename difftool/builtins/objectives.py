"""Built-in loss weightings and timestep samplers."""

import torch


def no_weighting():
    """Equal weights."""
    return lambda timesteps, noise_scheduler, prediction_type: None


def min_snr(gamma: float = 5.0):
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) over the target's own SNR scale."""
    from diffusers.training_utils import compute_snr

    def weights(timesteps, noise_scheduler, prediction_type):
        snr = compute_snr(noise_scheduler, timesteps)
        clipped = snr.clamp(max=gamma)
        if prediction_type == "epsilon":
            return clipped / snr
        if prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped  # prediction_type "sample"

    return weights


def uniform():
    """Timesteps uniform over [0, num_train_timesteps)."""
    return lambda batch_size, num_train_timesteps, device: torch.randint(
        0, num_train_timesteps, (batch_size,), device=device, dtype=torch.int64)


def logit_normal(mean: float = 0.0, std: float = 1.0):
    """Timesteps t = T * sigmoid(mean + std * N(0, 1)) (as in Stable Diffusion 3)."""

    def sample(batch_size, num_train_timesteps, device):
        u = torch.sigmoid(mean + std * torch.randn(batch_size, device=device))
        return (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)

    return sample
