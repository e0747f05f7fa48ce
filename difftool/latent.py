"""Latent text-to-image diffusion (Stable Diffusion, SDXL): a trainable UNet2DConditionModel
between a frozen VAE and frozen CLIP text encoders, loaded from a diffusers pipeline folder.

Training follows diffusers' text-to-image LoRA example: images become VAE latents scaled by the
VAE's scaling factor, captions become `encoder_hidden_states` (and, for SDXL, the pooled
embedding and the size/crop ids), and the UNet predicts the noise or the velocity. Prompts are
encoded with the pipeline's own `encode_prompt`, so training conditions the UNet exactly as
sampling does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftool.errors import DifftoolError


class LatentDiffusion(torch.nn.Module):
    """The pipeline's modules; only `unet` is trainable. Calling it runs the UNet."""

    def __init__(self, pipeline, source: str):
        super().__init__()
        self.unet = pipeline.unet
        self.vae = pipeline.vae.requires_grad_(False).eval()
        self.text_encoder = pipeline.text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
        if self.text_encoder_2 is not None:
            self.text_encoder_2.requires_grad_(False).eval()
        self.xl = self.text_encoder_2 is not None
        self.source = source  # the folder or hub id it was loaded from
        self.pipeline_class = type(pipeline)
        self.others = {k: v for k, v in pipeline.components.items() if not isinstance(v, torch.nn.Module)}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def forward(self, noisy, timesteps, return_dict: bool = False, **conditioning):
        return self.unet(noisy, timesteps, return_dict=return_dict, **conditioning)

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Keep the frozen encoders in the run's half precision (as diffusers' examples do), the
        VAE too unless its config asks to stay in float32 (SDXL's overflows in fp16)."""
        frozen = [self.text_encoder, self.text_encoder_2]
        if not self.vae.config.get("force_upcast", False):
            frozen.append(self.vae)
        for module in frozen:
            if module is not None and module.dtype != dtype:
                module.to(dtype=dtype)

    def check_image_size(self, image_size: int, where: str) -> None:
        """The UNet must take the VAE's latents, and halves them once per down block but the
        last; the VAE halves images once per block but the last."""
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise DifftoolError(
                f"[model] the UNet takes {self.unet.config.in_channels} input channels but the VAE gives "
                f"{self.vae.config.latent_channels}; fine-tune a text-to-image pipeline (an inpainting "
                "pipeline's UNet also takes the mask and the masked image)")
        factor = self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        if image_size % factor:
            raise DifftoolError(f"{where} image_size = {image_size} must be divisible by {factor} for this "
                                f"VAE and UNet; use {image_size // factor * factor or factor}")

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's latent distribution (mean and log-variance, stacked on dim 1) of images in [-1, 1]."""
        return self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.parameters

    def sample_latents(self, parameters: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the latent distribution, shifted and scaled as the UNet sees latents."""
        # contiguous: the VAE's output is channels-last in memory and the cache's is not, and
        # randn_like (here and in the forward process) draws its noise in memory order
        mean, logvar = parameters.float().contiguous().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator).to(mean.device) if generator else torch.randn_like(mean)
        latents = mean + std * noise
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], image_size: int) -> dict:
        """The UNet's text conditioning for each prompt, through the pipeline's `encode_prompt`.
        For SDXL the size ids say: the whole image, uncropped, at `image_size`."""
        device = self.unet.device
        pipeline = self.pipeline()
        if not self.xl:
            embeddings, _ = pipeline.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeddings}
        embeddings, _, pooled, _ = pipeline.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
        size = (image_size, image_size)
        time_ids = pipeline._get_add_time_ids(size, (0, 0), size, dtype=embeddings.dtype,
                                              text_encoder_projection_dim=self.text_encoder_2.config.projection_dim)
        return {"encoder_hidden_states": embeddings, "added_cond_kwargs": {
            "text_embeds": pooled, "time_ids": time_ids.to(device).repeat(len(prompts), 1)}}

    def pipeline(self, unet=None, scheduler=None):
        """A diffusers pipeline over these modules (another UNet or scheduler if given)."""
        modules = {"vae": self.vae, "text_encoder": self.text_encoder, "unet": unet or self.unet}
        if self.xl:
            modules["text_encoder_2"] = self.text_encoder_2
        parts = {**self.others, **modules}
        if scheduler is not None:
            parts["scheduler"] = scheduler
        extra = {} if self.xl else {"requires_safety_checker": False}
        pipeline = self.pipeline_class(**parts, **extra)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


    def save_lora_weights(self, folder: Path) -> None:
        """Write the UNet's peft LoRA (if it has one) as `pytorch_lora_weights.safetensors`, keys
        prefixed `unet.`, the file the pipeline's `load_lora_weights(folder)` reads."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import get_peft_model_state_dict

        configs = getattr(self.unet, "peft_config", None)
        if not configs:
            return
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        # the LoraConfig goes along as metadata, so lora_alpha (the scale) survives loading
        metadata = next(iter(configs.values())).to_dict()
        self.pipeline_class.save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)


def load(pipeline_class, pretrained: str, revision: str | None, variant: str | None) -> LatentDiffusion:
    """The pipeline at `pretrained` (a local diffusers folder, else a hub id) as a LatentDiffusion."""
    path = Path(pretrained).expanduser()
    options = {"revision": revision, "variant": variant}
    if not pipeline_class.__name__.startswith("StableDiffusionXL"):
        options.update(safety_checker=None, requires_safety_checker=False)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise DifftoolError(f"[model] pretrained = '{pretrained}' is not a diffusers pipeline folder (it has no "
                                "model_index.json); point it at a folder saved by save_pretrained, such as a "
                                "downloaded Stable Diffusion snapshot")
        try:
            pipeline = pipeline_class.from_pretrained(path, **options)
        except (OSError, ValueError, TypeError) as exc:
            raise DifftoolError(f"[model] could not load {pipeline_class.__name__} from '{pretrained}' "
                                f"({type(exc).__name__}: {exc}); is it a complete pipeline of that kind?") from exc
        return LatentDiffusion(pipeline, str(path.resolve()))
    if pretrained.count("/") != 1:
        raise DifftoolError(f"[model] pretrained = '{pretrained}': no such folder; point it at a local "
                            "diffusers pipeline folder (or a hub id such as owner/name)")
    try:
        pipeline = pipeline_class.from_pretrained(pretrained, **options)
    except OSError as exc:
        raise DifftoolError(
            f"[model] pretrained = '{pretrained}' is no local folder, and as a hub id it could not be loaded "
            f"({type(exc).__name__}: {str(exc)[:200]}); point pretrained at a local diffusers pipeline folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), or download it where "
            "the Hugging Face Hub is reachable"
        ) from exc
    return LatentDiffusion(pipeline, pretrained)


def stable_diffusion(pretrained: str, revision: str | None = None, variant: str | None = None):
    """Stable Diffusion 1.x/2.x (StableDiffusionPipeline) from a local folder or hub id."""
    from diffusers import StableDiffusionPipeline

    return load(StableDiffusionPipeline, pretrained, revision, variant)


def stable_diffusion_xl(pretrained: str, revision: str | None = None, variant: str | None = None):
    """Stable Diffusion XL (StableDiffusionXLPipeline) from a local folder or hub id."""
    from diffusers import StableDiffusionXLPipeline

    return load(StableDiffusionXLPipeline, pretrained, revision, variant)
