"""Built-in objectives (DDPM, flow matching), loss weightings and timestep samplers.

The timestep densities and the flow-matching weightings are those of Stable Diffusion 3
(Esser et al. 2024, section 3.1): logit-normal, mode (with heavy tails) and cosmap densities
over the noise level t, and the timestep shift t' = s t / (1 + (s - 1) t) of section 5.3.2,
the same map diffusers' FlowMatchEulerDiscreteScheduler applies to its sigmas.
"""

import math

import torch

from difftool.errors import DifftoolError
from difftool.objective import Objective, broadcast, signal_and_noise_scales, target


class DDPM(Objective):
    """Denoising diffusion (Ho et al. 2020) over the noise scheduler's betas: x_t = sqrt(a_t) x_0 +
    sqrt(1 - a_t) noise at an integer timestep t, the target set by the scheduler's prediction_type."""

    scheduler = "ddpm"
    continuous = False

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.get("prediction_type", "epsilon")

    def noisy(self, clean, noise, times):
        signal, sigma = signal_and_noise_scales(self.noise_scheduler, times, clean)
        return (signal * clean + sigma * noise).to(clean.dtype)

    def target(self, clean, noise, times):
        return target(self.noise_scheduler, self.prediction_type, clean, noise, times)

    def snr(self, times):
        from diffusers.training_utils import compute_snr

        return compute_snr(self.noise_scheduler, times)

    def check_scheduler(self, scheduler, role):
        if hasattr(scheduler, "alphas_cumprod"):
            return None
        kind = "a flow-matching scheduler" if "shift" in scheduler.config else "not a DDPM-family scheduler"
        return (f"is {kind} (it has no betas, alphas_cumprod), and objective 'ddpm' noises data by them; "
                "set [objective] name = \"flow-matching\" for a flow model, or use a DDPM-family scheduler "
                "(ddpm, ddim, euler, dpm-solver++, ...)")


def ddpm(noise_scheduler):
    """DDPM's objective on the noise scheduler's betas."""
    return DDPM(noise_scheduler)


ddpm.scheduler = DDPM.scheduler


class FlowMatching(Objective):
    """Rectified flow / flow matching (Lipman et al. 2023, Liu et al. 2023, as in SD3): x_t = (1 - t)
    x_0 + t noise for t in [0, 1], the model predicts the velocity noise - x_0 and is given
    t * num_train_timesteps, as diffusers' flow-match schedulers step. Times are shifted by the
    noise scheduler's `shift` (t' = s t / (1 + (s - 1) t)), which sampling applies too."""

    scheduler = "flow-euler"
    continuous = True
    prediction_type = "flow"

    def __init__(self, noise_scheduler, image_size: int | None = None, base_image_size: int | None = None):
        super().__init__(noise_scheduler)
        if base_image_size is not None:
            set_shift(noise_scheduler, image_size / base_image_size, base_image_size, image_size)
        self.shift = float(noise_scheduler.config.get("shift", 1.0) or 1.0)

    def times(self, sampler, batch_size, device):
        return self.shifted(super().times(sampler, batch_size, device))

    def fixed_times(self, batch_size, generator):
        return self.shifted(super().fixed_times(batch_size, generator))

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.shift == 1.0 else self.shift * t / (1 + (self.shift - 1) * t)

    def noisy(self, clean, noise, times):
        t = broadcast(times.float(), clean)
        return ((1 - t) * clean + t * noise).to(clean.dtype)

    def target(self, clean, noise, times):
        return (noise.float() - clean.float())

    def model_time(self, times):
        return times * self.num_train_timesteps

    def snr(self, times):
        t = times.float().clamp(min=1e-6)
        return ((1 - t) / t) ** 2

    def check_scheduler(self, scheduler, role):
        if hasattr(scheduler, "alphas_cumprod"):
            return ("is a DDPM-family scheduler (it steps by betas), and a flow-matching model needs a flow-match "
                    "one: use flow-euler or flow-heun (or leave the name out to get flow-euler)")
        if scheduler.config.get("use_dynamic_shifting"):
            return ("sets use_dynamic_shifting = true, which shifts by a `mu` per image size that neither training "
                    "nor sampling here gives; remove it, and set [objective] base_image_size for a shift that "
                    "follows the image size (or [noise_scheduler] shift for a fixed one)")
        return None


def set_shift(noise_scheduler, shift: float, base: int, image_size: int) -> None:
    """Give the noise scheduler the resolution-dependent shift (SD3's sqrt(m / n) for m and n
    pixels, i.e. image_size / base_image_size), so that sampling and the saved pipeline use it."""
    current = float(noise_scheduler.config.get("shift", 1.0) or 1.0)
    if current not in (1.0, shift):  # a saved run's scheduler already has it
        raise DifftoolError(f"[objective] base_image_size = {base} sets the timestep shift from the image size "
                            f"({image_size} / {base} = {shift:g}), and [noise_scheduler] sets shift = "
                            f"{noise_scheduler.config.shift} too; keep one of them")
    if "shift" not in noise_scheduler.config:
        raise DifftoolError("[objective] base_image_size shifts the timesteps of a flow-match scheduler, and "
                            f"{type(noise_scheduler).__name__} has no shift; use flow-euler or flow-heun")
    noise_scheduler.register_to_config(shift=shift)
    if hasattr(noise_scheduler, "set_shift"):
        noise_scheduler.set_shift(shift)


def flow_matching(noise_scheduler, image_size: int | None = None, base_image_size: int | None = None):
    """Flow matching; with `base_image_size`, the timestep shift is image_size / base_image_size."""
    if base_image_size is not None and base_image_size < 1:
        raise DifftoolError(f"[objective] base_image_size = {base_image_size} must be a positive number of pixels")
    return FlowMatching(noise_scheduler, image_size, base_image_size)


flow_matching.scheduler = FlowMatching.scheduler


# Loss weightings: callables (times, objective) -> one weight per sample, or None.


def no_weighting():
    """Equal weights."""
    return lambda times, objective: None


def min_snr(gamma: float = 5.0):
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) on the x_0 loss, carried over to the
    objective's own target (for flow matching's velocity, x_0's error is t times its error)."""

    def weights(times, objective):
        snr = objective.snr(times)
        clipped = snr.clamp(max=gamma)
        kind = objective.prediction_type
        if kind == "epsilon":  # at snr = 0 (zero terminal SNR betas) its limit, 1, rather than 0 / 0
            return torch.where(snr == 0, 1.0, clipped / snr)
        if kind == "v_prediction":
            return clipped / (snr + 1)
        if kind == "sample":
            return clipped
        if kind == "flow":
            return clipped / (1 + snr.sqrt()) ** 2  # t ** 2, since sqrt(snr) = (1 - t) / t
        raise DifftoolError(f"min-snr has no form for a model that predicts '{kind}'; it fits epsilon, "
                            "v_prediction, sample and flow objectives")

    return weights


def flow_only(name: str, objective) -> None:
    if objective.prediction_type != "flow":
        raise DifftoolError(f"{name} weights a flow-matching loss by its noise level t, and this objective "
                            f"predicts '{objective.prediction_type}'; use none or min-snr, or set [objective] "
                            "name = \"flow-matching\"")


def sigma_sqrt():
    """SD3's 'sigma_sqrt' weighting, 1 / t^2 (t at least 1 / num_train_timesteps)."""

    def weights(times, objective):
        flow_only("sigma-sqrt", objective)
        return times.float().clamp(min=1 / objective.num_train_timesteps) ** -2.0

    return weights


def cosmap_weighting():
    """SD3's 'cosmap' weighting, 2 / (pi (1 - 2t + 2t^2))."""

    def weights(times, objective):
        flow_only("cosmap", objective)
        t = times.float()
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))

    return weights


# Timestep samplers: (batch_size, num_train_timesteps, device) -> int64 indices, or, when
# num_train_timesteps is None (a continuous objective), float t in [0, 1]. Each density is
# drawn as u in [0, 1] and, for indices, floored onto the training steps.


def indices(u: torch.Tensor, num_train_timesteps: int | None) -> torch.Tensor:
    return u if num_train_timesteps is None else (u * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


def uniform():
    """Timesteps uniform over [0, num_train_timesteps), or t uniform over [0, 1)."""

    def sample(batch_size, num_train_timesteps, device):
        if num_train_timesteps is None:
            return torch.rand(batch_size, device=device)
        return torch.randint(0, num_train_timesteps, (batch_size,), device=device, dtype=torch.int64)

    return sample


def logit_normal(mean: float = 0.0, std: float = 1.0):
    """t = sigmoid(mean + std * N(0, 1)) (as in Stable Diffusion 3)."""

    def sample(batch_size, num_train_timesteps, device):
        return indices(torch.sigmoid(mean + std * torch.randn(batch_size, device=device)), num_train_timesteps)

    return sample


def mode(scale: float = 1.29):
    """SD3's mode sampling with heavy tails: t = 1 - u - scale (cos^2(pi u / 2) - 1 + u) for uniform u;
    scale 0 is uniform, larger scales favour the middle (scale must stay within [-1, 2/(pi-2)])."""
    if not -1 <= scale <= 2 / (math.pi - 2):
        raise DifftoolError(f"[timestep_sampler] scale = {scale} must be within [-1, {2 / (math.pi - 2):.3f}] "
                            "for the density to stay in [0, 1]; SD3 uses 1.29")

    def sample(batch_size, num_train_timesteps, device):
        u = torch.rand(batch_size, device=device)
        t = 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return indices(t.clamp(0, 1), num_train_timesteps)

    return sample


def cosmap():
    """SD3's CosMap density: t = 1 - 1 / (tan(pi u / 2) + 1) for uniform u."""

    def sample(batch_size, num_train_timesteps, device):
        u = torch.rand(batch_size, device=device)
        return indices(1 - 1 / (torch.tan(math.pi * u / 2) + 1), num_train_timesteps)

    return sample
