"""Latent text-to-image diffusion (Stable Diffusion, SDXL, SD3): a trainable denoiser (a
UNet2DConditionModel, or SD3's SD3Transformer2DModel) between a frozen VAE and frozen text
encoders (CLIP; SD3 adds a T5, which may be absent), loaded from a diffusers pipeline folder.

Training follows diffusers' text-to-image LoRA examples: images become VAE latents shifted and
scaled by the VAE's factors, captions become `encoder_hidden_states` (and, for SDXL, the pooled
embedding and the size/crop ids; for SD3, `pooled_projections`), and the denoiser predicts the
noise or the velocity (SD3: trained by flow matching, [objective] name = "flow-matching").
Prompts are encoded with the pipeline's own `encode_prompt`, so training conditions the
denoiser exactly as sampling does.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from difftool.errors import DifftoolError


class LatentDiffusion(torch.nn.Module):
    """The pipeline's modules; only the denoiser is trainable. Calling it runs the denoiser.

    The denoiser is always held as `unet` (so that build.denoiser, adapters and the engine treat
    every kind alike), whatever the pipeline calls it: `component` is the pipeline's name for it,
    "transformer" for SD3 and "unet" otherwise."""

    def __init__(self, pipeline, source: str):
        super().__init__()
        components = pipeline.components
        self.sd3 = components.get("transformer") is not None
        self.unet = components[self.component]
        self.vae = pipeline.vae.requires_grad_(False).eval()
        self.text_encoder = pipeline.text_encoder.requires_grad_(False).eval()
        self.text_encoder_2 = components.get("text_encoder_2")
        self.text_encoder_3 = components.get("text_encoder_3")  # SD3's T5, None where it was left out
        for encoder in (self.text_encoder_2, self.text_encoder_3):
            if encoder is not None:
                encoder.requires_grad_(False).eval()
        self.xl = self.text_encoder_2 is not None and not self.sd3
        self.source = source  # the folder or hub id it was loaded from
        self.pipeline_class = type(pipeline)
        self.others = {k: v for k, v in components.items() if not isinstance(v, torch.nn.Module)}
        self.text_cache = None  # a difftool.latent_cache.TextCache that encode_prompts reads through, if set

    def text_encoders(self) -> list:
        """The frozen text encoders, None where the pipeline has none (SD's second and third)."""
        return [self.text_encoder, self.text_encoder_2, self.text_encoder_3]

    def train(self, mode: bool = True):
        """Train mode (mode=True) for the denoiser and any text encoder with trainable weights, so
        that an adapter's dropout acts in training; the frozen VAE and text encoders stay in eval
        mode whatever is asked. (diffusers' from_pretrained leaves every part in eval mode.)"""
        super().train(mode)
        for module in (self.vae, *self.text_encoders()):
            if module is not None and not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    def text_encoders_train(self) -> bool:
        """Whether an adapter put trainable weights on a text encoder (a text-encoder LoRA): then
        prompts are encoded with gradients, and no embedding can be cached."""
        return any(p.requires_grad for encoder in self.text_encoders() if encoder is not None
                   for p in encoder.parameters())

    def tokenizers(self) -> list:
        """Their tokenizers, None where the pipeline has none."""
        return [self.others.get(name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")]

    @property
    def component(self) -> str:
        """The pipeline's name for the denoiser: "transformer" (SD3) or "unet"."""
        return "transformer" if self.sd3 else "unet"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """What every image side must divide by: the VAE's down-sampling times the UNet's (once
        per down block but the last) or SD3's patch size (as check_image_size computes it)."""
        config = self.unet.config
        return self.vae_scale_factor * (config.patch_size if self.sd3 else 2 ** (len(config.down_block_types) - 1))

    def forward(self, noisy, timesteps, return_dict: bool = False, **conditioning):
        if self.sd3:  # SD3Transformer2DModel's second positional argument is encoder_hidden_states
            return self.unet(hidden_states=noisy, timestep=timesteps, return_dict=return_dict, **conditioning)
        return self.unet(noisy, timesteps, return_dict=return_dict, **conditioning)

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Keep the frozen encoders in the run's half precision (as diffusers' examples do), the
        VAE too unless its config asks to stay in float32 (SDXL's overflows in fp16). A text
        encoder that trains (an adapter on it) stays in float32 like the denoiser: its trainable
        weights must (the optimizer steps them in float32, as diffusers' cast_training_params
        keeps them), and it runs outside the model's autocast (encode_prompts is no forward of
        the prepared model), so half-precision frozen layers would take its backward pass in
        fp16 without autocast's float32 layer norms and softmax."""
        frozen = [self.text_encoder, self.text_encoder_2, self.text_encoder_3]
        if not self.vae.config.get("force_upcast", False):
            frozen.append(self.vae)
        for module in frozen:
            if module is None or any(p.requires_grad for p in module.parameters()):
                continue
            if module.dtype != dtype:
                module.to(dtype=dtype)

    def check_image_size(self, image_size: int, where: str) -> None:
        """The denoiser must take the VAE's latents; the VAE halves images once per block but the
        last. A UNet halves the latents once per down block but the last; SD3's transformer cuts
        them into patch_size patches, at most pos_embed_max_size of them a side."""
        config, name = self.unet.config, "transformer" if self.sd3 else "UNet"
        if config.in_channels != self.vae.config.latent_channels:
            raise DifftoolError(
                f"[model] the {name} takes {config.in_channels} input channels but the VAE gives "
                f"{self.vae.config.latent_channels}; fine-tune a text-to-image pipeline (an inpainting "
                f"pipeline's {name} also takes the mask and the masked image)")
        factor = self.size_multiple
        if image_size % factor:
            raise DifftoolError(f"{where} image_size = {image_size} must be divisible by {factor} for this "
                                f"VAE and {name}; use {image_size // factor * factor or factor}")
        most = self.largest_side
        if most and image_size > most:
            raise DifftoolError(f"{where} image_size = {image_size} makes {image_size // factor} patches a side, and "
                                f"the transformer's position embeddings cover at most {most // factor}; use at most "
                                f"{most}")

    @property
    def largest_side(self) -> int | None:
        """The longest image side the denoiser takes, in pixels: SD3's transformer has position
        embeddings for at most pos_embed_max_size patches a side; a UNet has no limit (None)."""
        most = self.unet.config.get("pos_embed_max_size") if self.sd3 else None
        return most * self.size_multiple if most else None

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

    def encode_prompts(self, prompts: list[str], image_size: int, original_sizes=None, crop_top_lefts=None,
                       target_size=None) -> dict:
        """The denoiser's text conditioning for each prompt, through the pipeline's `encode_prompt`.
        For SDXL also the pooled embedding and the size and crop ids, per image as diffusers' SDXL
        training examples make them: (original height, width) + (crop top, left) + (target
        height, width), from `original_sizes` and `crop_top_lefts` ((batch, 2) each: the file's
        size, the crop's offset in the resized image) and `target_size` (height, width: the size
        trained at, default image_size x image_size); without them they say the whole image,
        uncropped, at the target size. For SD3, the
        CLIPs' and the T5's token embeddings (zeros where there is no T5) and the pooled CLIP
        projections, at the pipeline's default max_sequence_length, as sampling has them.

        Each distinct prompt is encoded on its own (`encode_each`), read from the text cache
        where one is set: batched, the encoders' matmuls round a prompt's embedding differently
        with the other prompts of the batch (by 1e-7 on a CPU), and a cached embedding could not
        then be the one encoding each step gives. So training is bit-identical with and
        without the cache, and a caption is conditioned on the same bits whatever its batch."""
        distinct = list(dict.fromkeys(prompts))
        encoded = self.text_cache.encode(distinct, self.encode_each) if self.text_cache else self.encode_each(distinct)
        by_prompt = dict(zip(distinct, encoded))
        device = self.unet.device
        text = {name: torch.stack([by_prompt[p][name] for p in prompts]).to(device) for name in encoded[0]}
        if not self.xl:
            return text
        # SDXL's size and crop ids: computed per batch, never cached
        target = (image_size, image_size) if target_size is None else tuple(int(side) for side in target_size)
        if original_sizes is None:
            originals, crops = [target] * len(prompts), [(0, 0)] * len(prompts)
        else:
            originals = [tuple(size) for size in torch.as_tensor(original_sizes).tolist()]
            crops = [tuple(offset) for offset in torch.as_tensor(crop_top_lefts).tolist()]
        embeddings, pipeline = text["encoder_hidden_states"], self.pipeline()
        time_ids = torch.cat([pipeline._get_add_time_ids(original, crop, target, dtype=embeddings.dtype,
                                                         text_encoder_projection_dim=self.text_encoder_2.config.projection_dim)
                              for original, crop in zip(originals, crops)])
        return {"encoder_hidden_states": embeddings, "added_cond_kwargs": {
            "text_embeds": text["text_embeds"], "time_ids": time_ids.to(device)}}

    def encode_each(self, prompts: list[str]) -> list[dict]:
        """{name: tensor} for each prompt, encoded on its own by the pipeline's `encode_prompt`:
        `encoder_hidden_states`, and the pooled embedding (SDXL: `text_embeds`; SD3:
        `pooled_projections`), without the batch dimension. Without gradients, unless a text
        encoder trains (text_encoders_train) and the caller records them: in training, not in
        validation, which runs under no_grad."""
        device = self.unet.device
        pipeline = self.pipeline()
        encoded = []
        recording = self.text_encoders_train() and torch.is_grad_enabled()
        with torch.enable_grad() if recording else torch.no_grad():
            for prompt in prompts:
                if self.sd3:
                    embeddings, _, pooled, _ = pipeline.encode_prompt([prompt], None, None, device=device,
                                                                      num_images_per_prompt=1,
                                                                      do_classifier_free_guidance=False)
                    one = {"encoder_hidden_states": embeddings, "pooled_projections": pooled}
                elif self.xl:
                    embeddings, _, pooled, _ = pipeline.encode_prompt([prompt], device=device, num_images_per_prompt=1,
                                                                      do_classifier_free_guidance=False)
                    one = {"encoder_hidden_states": embeddings, "text_embeds": pooled}
                else:
                    embeddings, _ = pipeline.encode_prompt([prompt], device, 1, do_classifier_free_guidance=False)
                    one = {"encoder_hidden_states": embeddings}
                encoded.append({name: tensor[0] for name, tensor in one.items()})
        return encoded

    def pipeline(self, unet=None, scheduler=None, text_encoders: dict | None = None):
        """A diffusers pipeline over these modules (another denoiser or scheduler if given, and
        other text encoders by pipeline name: the fused copies a run saves)."""
        modules = {"vae": self.vae, "text_encoder": self.text_encoder, self.component: unet or self.unet}
        if self.text_encoder_2 is not None:
            modules["text_encoder_2"] = self.text_encoder_2
        if self.sd3:
            modules["text_encoder_3"] = self.text_encoder_3
        modules.update(text_encoders or {})
        parts = {**self.others, **modules}
        if scheduler is not None:
            parts["scheduler"] = scheduler
        accepts = inspect.signature(self.pipeline_class.__init__).parameters
        extra = {"requires_safety_checker": False} if "requires_safety_checker" in accepts else {}
        pipeline = self.pipeline_class(**parts, **extra)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def save_lora_weights(self, folder: Path) -> None:
        """Write the peft LoRA on the denoiser and on each text encoder (those that have one) as
        `pytorch_lora_weights.safetensors`, keys prefixed `unet.` (`transformer.` for SD3),
        `text_encoder.` and `text_encoder_2.`: the file the pipeline's `load_lora_weights(folder)`
        reads. Each part's LoraConfig goes along as metadata, so its lora_alpha (the scale)
        survives loading. Only LoRA (peft_type LORA, DoRA and rsLoRA included) is written:
        diffusers' loaders read no other peft adapter (LoHa, LoKr, OFT), which stay in the run's
        adapters/ folder alone. Nothing is written when no part has a LoRA."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft import PeftType, get_peft_model_state_dict

        parts = {self.component: self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        saved = {}
        for name, module in parts.items():
            configs = getattr(module, "peft_config", None) or {}
            lora = [adapter for adapter, config in configs.items() if config.peft_type == PeftType.LORA]
            if not lora:
                continue
            layers = get_peft_model_state_dict(module, adapter_name=lora[0])
            if not self.sd3:  # SD3's loader takes peft's keys as they are (as diffusers' SD3 LoRA example saves them)
                layers = convert_state_dict_to_diffusers(layers)
            saved[f"{name}_lora_layers"] = layers
            saved[f"{name}_lora_adapter_metadata"] = configs[lora[0]].to_dict()
        if saved:
            self.pipeline_class.save_lora_weights(folder, **saved)


def absent_components(folder: Path) -> dict:
    """{name: None} for each component a pipeline folder was saved without ([null, null] in its
    model_index.json: SD3 without its T5, say). diffusers' from_pretrained refuses such a folder
    unless told that those components are None (only the class's optional ones may be missing)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {name: None for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
            and value[:1] == [None]}


def load(pipeline_class, pretrained: str, revision: str | None, variant: str | None, vae_slicing: bool = False,
         vae_tiling: bool = False) -> LatentDiffusion:
    """The pipeline at `pretrained` (a local diffusers folder, else a hub id) as a LatentDiffusion,
    its VAE slicing and tiling set (`vae_memory`)."""
    latent = load_pipeline(pipeline_class, pretrained, revision, variant)
    vae_memory(latent.vae, vae_slicing, vae_tiling)
    return latent


def vae_memory(vae, slicing: bool, tiling: bool) -> None:
    """[model] vae_slicing: the VAE encodes and decodes a batch one image at a time (peak memory
    of one image's activations, not the batch's; the same latents up to rounding). vae_tiling:
    it encodes and decodes an image larger than its sample_size in overlapping tiles, blended
    at the seams (the latents differ a little from untiled ones, so tiling is part of the
    latent cache's key). Both as diffusers' enable_slicing() / enable_tiling()."""
    for key, value, method in (("vae_slicing", slicing, "enable_slicing"), ("vae_tiling", tiling, "enable_tiling")):
        if not isinstance(value, bool):
            raise DifftoolError(f"[model] {key} = {value!r} must be true or false")
        if not value:
            continue
        if not callable(getattr(vae, method, None)):
            raise DifftoolError(f"[model] {key} = true, and this pipeline's VAE ({type(vae).__name__}) has no "
                                f"{method}(); remove {key}")
        getattr(vae, method)()


def load_pipeline(pipeline_class, pretrained: str, revision: str | None, variant: str | None) -> LatentDiffusion:
    """The pipeline at `pretrained` (a local diffusers folder, else a hub id) as a LatentDiffusion."""
    path = Path(pretrained).expanduser()
    options = {"revision": revision, "variant": variant}
    if "requires_safety_checker" in inspect.signature(pipeline_class.__init__).parameters:
        options.update(safety_checker=None, requires_safety_checker=False)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise DifftoolError(f"[model] pretrained = '{pretrained}' is not a diffusers pipeline folder (it has no "
                                "model_index.json); point it at a folder saved by save_pretrained, such as a "
                                "downloaded Stable Diffusion snapshot")
        try:
            pipeline = pipeline_class.from_pretrained(path, **{**absent_components(path), **options})
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


def stable_diffusion(pretrained: str, revision: str | None = None, variant: str | None = None,
                     vae_slicing: bool = False, vae_tiling: bool = False):
    """Stable Diffusion 1.x/2.x (StableDiffusionPipeline) from a local folder or hub id."""
    from diffusers import StableDiffusionPipeline

    return load(StableDiffusionPipeline, pretrained, revision, variant, vae_slicing, vae_tiling)


def stable_diffusion_xl(pretrained: str, revision: str | None = None, variant: str | None = None,
                        vae_slicing: bool = False, vae_tiling: bool = False):
    """Stable Diffusion XL (StableDiffusionXLPipeline) from a local folder or hub id."""
    from diffusers import StableDiffusionXLPipeline

    return load(StableDiffusionXLPipeline, pretrained, revision, variant, vae_slicing, vae_tiling)


def stable_diffusion_3(pretrained: str, revision: str | None = None, variant: str | None = None,
                       vae_slicing: bool = False, vae_tiling: bool = False):
    """Stable Diffusion 3 (StableDiffusion3Pipeline: VAE, two CLIPs, optionally a T5, and an
    SD3Transformer2DModel) from a local folder or hub id; train it with [objective] name =
    "flow-matching", on the pipeline's FlowMatchEulerDiscreteScheduler (and its shift)."""
    from diffusers import StableDiffusion3Pipeline

    return load(StableDiffusion3Pipeline, pretrained, revision, variant, vae_slicing, vae_tiling)
