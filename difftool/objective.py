"""What the model is trained to predict, and how far off it is: the objective contract.

An objective (the `objectives` registry kind, `[objective] name`) owns the forward process (how
clean data and noise are mixed at a time value), the training target, the time value the model
is given, and which time values the timestep samplers draw from: integer indices into the
noise scheduler's `num_train_timesteps` steps (DDPM), or a continuous t in [0, 1] (flow
matching). The built-ins are in `difftool.builtins.objectives`.

DDPM's forward process is computed from the noise scheduler's `alphas_cumprod` rather than its
`add_noise`/`get_velocity`: only the DDPM-family schedulers implement those on training
timesteps (the sigma-based ones, such as euler, and the multistep solvers expect their own
inference timesteps), while every scheduler of that family defines the same betas.
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


class Objective:
    """The training objective of a run; a plugin subclasses it and registers a factory that
    returns one (factory context: `noise_scheduler`, `image_size`).

    A subclass sets `continuous` and `prediction_type`, and implements `noisy`, `target` and
    `snr`; `model_time` and `check_scheduler` have defaults it may override. The class attribute
    `scheduler` names the noise scheduler a recipe gets when its [noise_scheduler] names none
    (and so, unless [sampling] names another, the sampling scheduler); difftool reads it from
    the registered factory, so a factory that is a function may carry it as an attribute too.
    """

    scheduler = "ddpm"
    continuous = False  # False: int64 indices in [0, num_train_timesteps); True: float t in [0, 1]
    prediction_type = "epsilon"  # what the model predicts, for loss weightings ("flow": noise - data)

    def __init__(self, noise_scheduler):
        self.noise_scheduler = noise_scheduler

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    # what a subclass implements

    def noisy(self, clean: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """The forward process: `clean` mixed with `noise` at `times` (in clean's dtype)."""
        raise NotImplementedError

    def target(self, clean: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """What the model should output for the noisy sample, in float32."""
        raise NotImplementedError

    def snr(self, times: torch.Tensor) -> torch.Tensor:
        """The signal-to-noise ratio of the noisy sample at each time (for loss weightings)."""
        raise NotImplementedError

    def model_time(self, times: torch.Tensor) -> torch.Tensor:
        """The time value the model is given (and the sampling schedulers' `timesteps` hold)."""
        return times

    def check_scheduler(self, scheduler, role: str) -> str | None:
        """Why `scheduler` (the noise or the sampling one, named by `role`) cannot serve this
        objective, or None when it can."""
        return None

    # what difftool calls; a subclass rarely needs to change these

    def times(self, sampler, batch_size: int, device) -> torch.Tensor:
        """Training times drawn by a timestep sampler: called with num_train_timesteps for an
        objective of integer indices, with None for a continuous one (then it returns t in [0, 1])."""
        drawn = sampler(batch_size, None if self.continuous else self.num_train_timesteps, device)
        if not isinstance(drawn, torch.Tensor) or drawn.is_floating_point() != self.continuous:
            wanted = "float t in [0, 1]" if self.continuous else "int64 indices in [0, num_train_timesteps)"
            raise DifftoolError(f"it gives {describe_times(drawn)}, and this objective trains on {wanted}")
        return drawn

    def fixed_times(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Uniform times from `generator` (validation measures the same ones at every step)."""
        if self.continuous:
            return torch.rand(batch_size, generator=generator)
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)

    def add_noise(self, clean: torch.Tensor, times: torch.Tensor, noise_offset: float = 0.0,
                  generator: torch.Generator | None = None):
        """(noise, noisy samples), with an optional per-channel noise offset."""
        noise = draw_noise(clean, noise_offset, generator)
        return noise, self.noisy(clean, noise, times)

    def compute_loss(self, model, clean, noise, noisy, times, settings: dict, weighting=None,
                     conditioning: dict | None = None, element_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The model's loss on one noised batch, by the [objective] settings and a loss
        weighting; `conditioning` holds the model's extra keywords (text embeddings, class labels).
        `element_weights` (broadcastable to the prediction: a loss mask and per-sample weights,
        see difftool.engine.loss_weights) multiply the per-element loss before it is averaged."""
        weights = weighting(times, self) if weighting else None
        prediction = model(noisy, self.model_time(times), return_dict=False, **(conditioning or {}))[0]
        wanted = self.target(clean, noise, times)
        return loss(prediction, wanted, settings["loss"], settings["huber_delta"], weights, element_weights)


def describe_times(value) -> str:
    """What a timestep sampler returned, for messages."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{'an' if dtype.startswith('int') else 'a'} {dtype} tensor"
    return type(value).__name__


def draw_noise(clean: torch.Tensor, noise_offset: float = 0.0, generator: torch.Generator | None = None):
    """Gaussian noise shaped like `clean`, plus `noise_offset` times a per-channel constant."""
    noise = torch.randn(clean.shape, generator=generator).to(clean.device) if generator else torch.randn_like(clean)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(clean.shape[0], clean.shape[1], 1, 1, device=clean.device)
    return noise


def broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values shaped to broadcast over `like`."""
    return values.view((-1,) + (1,) * (like.dim() - 1))


def signal_and_noise_scales(noise_scheduler, timesteps: torch.Tensor, like: torch.Tensor):
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), shaped to broadcast over `like`."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(like.device)[timesteps].float()
    return broadcast(alpha_bar.sqrt(), like), broadcast((1 - alpha_bar).sqrt(), like)


def add_noise(noise_scheduler, clean: torch.Tensor, timesteps: torch.Tensor, noise_offset: float = 0.0,
              generator: torch.Generator | None = None):
    """(noise, noisy images) of DDPM's forward diffusion, with an optional per-channel noise offset."""
    noise = draw_noise(clean, noise_offset, generator)
    signal, sigma = signal_and_noise_scales(noise_scheduler, timesteps, clean)
    return noise, (signal * clean + sigma * noise).to(clean.dtype)


def target(noise_scheduler, prediction_type: str, clean, noise, timesteps) -> torch.Tensor:
    """DDPM's targets: the noise (epsilon), the velocity (v_prediction) or the clean image (sample)."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        signal, sigma = signal_and_noise_scales(noise_scheduler, timesteps, clean)
        return (signal * noise - sigma * clean).float()
    if prediction_type == "sample":
        return clean.float()
    raise DifftoolError(f"[noise_scheduler] prediction_type = '{prediction_type}' is not one of epsilon, v_prediction, sample")


def loss(prediction, wanted, kind: str, huber_delta: float, weights,
         element_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean per-sample `kind` loss ("mse", "l1", "huber"), weighted per sample if `weights`
    (one per sample: a loss weighting's).

    `element_weights`, broadcastable to the prediction (e.g. (B, 1, h, w) for a loss mask, or
    (B, 1, 1, 1) per sample), multiply each element's loss before the per-sample mean. That mean
    stays over all elements, as kohya-ss/sd-scripts' masked loss takes it, not over the weights'
    sum: a sample whose mask covers a quarter of it contributes a quarter as much, every counted
    element of the batch weighs the same, and a sample masked out entirely contributes 0 (no
    division by an empty mask). Without them, the result is bit-identical to before they existed."""
    elementwise = LOSSES[kind](prediction.float(), wanted, huber_delta)
    if element_weights is not None:
        elementwise = elementwise * element_weights.to(elementwise)
    per_sample = elementwise.flatten(1).mean(1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample)).mean()
