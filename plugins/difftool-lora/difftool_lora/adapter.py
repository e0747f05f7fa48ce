"""LoRA through peft: add it to a model (and to its text encoders, if asked), save it in peft's
layout, load it back, fuse it."""

from __future__ import annotations

from pathlib import Path

from difftool.adapters import Adapter
from difftool.errors import DifftoolError

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # the projections of diffusers' Attention
CONVOLUTIONS = ["conv1", "conv2"]  # the 3x3 convolutions of diffusers' ResnetBlock2D
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP's attention projections
WEIGHTS = "adapter_model.safetensors"  # peft's file name, beside its adapter_config.json
CONFIG = "adapter_config.json"


def lora(model, r: int = 8, lora_alpha: float | None = None, lora_dropout: float = 0.0,
         target_modules: list[str] | None = None, include_convolutions: bool = False,
         init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False,
         train_unet: bool = True, train_text_encoder: bool = False,
         text_encoder_target_modules: list[str] | None = None, text_encoders: dict | None = None):
    """Freeze the model and add LoRA of rank `r` to its `target_modules` (default: the attention
    projections; `include_convolutions` adds the ResNet convolutions). `lora_alpha` defaults
    to `r` (scale 1). The other keys are peft.LoraConfig's.

    `train_text_encoder` (a text-to-image model's; diffusers' examples' --train_text_encoder)
    also adds LoRA of the same rank, alpha and options to every CLIP text encoder (SDXL's two),
    on their `text_encoder_target_modules` (default: CLIP's attention projections).
    `train_unet = false` leaves the denoiser without LoRA, so that only the text encoders train
    (sd-scripts' network_train_text_encoder_only); `text_encoders` is the context build gives."""
    from peft import LoraConfig

    text_encoders = text_encoders or {}
    if not isinstance(train_unet, bool) or not isinstance(train_text_encoder, bool):
        raise DifftoolError("lora train_unet and train_text_encoder must be true or false")
    if train_text_encoder and not text_encoders:
        raise DifftoolError("lora train_text_encoder = true needs a text-to-image model (stable-diffusion, "
                            "stable-diffusion-xl or stable-diffusion-3), and this one has no text encoder; "
                            "remove train_text_encoder")
    if not train_unet and not train_text_encoder:
        raise DifftoolError("lora train_unet = false leaves nothing to train; set train_text_encoder = true "
                            "(a text-to-image model), or remove train_unet")
    if text_encoder_target_modules is not None and not train_text_encoder:
        raise DifftoolError("lora text_encoder_target_modules is set, but train_text_encoder is false; "
                            "set train_text_encoder = true, or remove text_encoder_target_modules")
    options = dict(r=r, lora_alpha=lora_alpha or r, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights,
                   use_rslora=use_rslora, use_dora=use_dora)
    model.requires_grad_(False)
    config = None
    if train_unet:
        targets = list(target_modules or ATTENTION) + (CONVOLUTIONS if include_convolutions else [])
        config = LoraConfig(target_modules=targets, **options)
        add(model, config, targets, "target_modules", ATTENTION + CONVOLUTIONS)
    adapted, encoder_config = {}, None
    if train_text_encoder:
        targets = list(text_encoder_target_modules or TEXT_ATTENTION)
        encoder_config = LoraConfig(target_modules=targets, **options)
        for name, encoder in text_encoders.items():
            encoder.requires_grad_(False)
            add(encoder, encoder_config, targets, "text_encoder_target_modules", TEXT_ATTENTION, name)
            adapted[name] = encoder
    return LoraAdapter(config, adapted, encoder_config)


def add(model, config, targets: list[str], key: str, usual: list[str], part: str = "model") -> None:
    """Inject `config`'s LoRA into `model` (the denoiser, or the text encoder `part`)."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    check_targets(model, targets, key, usual, part)
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise DifftoolError(f"the {part} already has a LoRA; list one `lora` in [[adapters]] "
                            "(its target_modules can cover every layer you want)")
    if is_diffusers_model(model) and hasattr(model, "add_adapter"):  # diffusers' models keep their own bookkeeping
        model.add_adapter(config)
    else:  # UNet2DModel, and transformers' text encoders (whose add_adapter asks for a newer peft): the
        inject_adapter_in_model(config, model)  # same injection, done by peft directly


def is_diffusers_model(model) -> bool:
    from diffusers import ModelMixin

    return isinstance(model, ModelMixin)


def check_targets(model, targets: list[str], key: str = "target_modules", usual: list[str] | None = None,
                  part: str = "model") -> None:
    """Every target must name some layer, as peft matches them: the whole name or its ending."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise DifftoolError(
            f"lora {key} {missing} match no layer of the {part}; name layers by their last "
            f"parts, as in {usual or ATTENTION + CONVOLUTIONS}")


class LoraAdapter(Adapter):
    """Saves `adapter_config.json` + `adapter_model.safetensors` (peft's layout, adapter
    weights only), loads them back, and fuses by merging LoRA into the base weights. The
    denoiser's LoRA is at the top of the adapter's folder; each adapted text encoder's is in a
    subfolder named as the pipeline names it (`text_encoder/`, `text_encoder_2/`).

    `config` is the denoiser's LoraConfig (None with train_unet = false), `encoders` the text
    encoders adapted with `encoder_config`."""

    def __init__(self, config, encoders: dict | None = None, encoder_config=None):
        self.config = config
        self.encoders = dict(encoders or {})
        self.encoder_config = encoder_config

    def text_encoders(self) -> dict:
        return self.encoders

    def parts(self, model, folder: Path):
        """(module, its LoraConfig, its folder) for the denoiser (if adapted) and each text encoder."""
        found = [(model, self.config, folder)] if self.config is not None else []
        return found + [(encoder, self.encoder_config, folder / name) for name, encoder in self.encoders.items()]

    def save(self, model, folder: Path) -> None:
        for module, config, place in self.parts(model, folder):
            place.mkdir(exist_ok=True)
            save_peft(module, config, place)

    def load(self, model, folder: Path) -> None:
        for module, _, place in self.parts(model, folder):
            if not (place / WEIGHTS).is_file():
                raise DifftoolError(f"{place} has no {WEIGHTS}; it was not saved by the lora adapter with this "
                                    "recipe's train_unet and train_text_encoder")
            load_peft(module, place, "LoRA")

    def fuse(self, model):
        return merge_peft(model)


def save_peft(module, config, folder: Path) -> None:
    """Write the peft adapter of `module` into `folder` as peft lays it out: its config
    (adapter_config.json) and its weights alone (adapter_model.safetensors)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    config.save_pretrained(str(folder))
    weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(module).items()}
    save_file(weights, str(folder / WEIGHTS))


def load_peft(module, folder: Path, what: str) -> None:
    """Load the adapter weights `save_peft` wrote into `module`, which has just been given the
    same adapter (`what` names it in messages); weights of other shapes are refused."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / WEIGHTS))
    expected = {name: value.shape for name, value in get_peft_model_state_dict(module).items()}
    if {name: value.shape for name, value in weights.items()} != expected:
        raise DifftoolError(f"{folder}/{WEIGHTS} does not fit this model's {what} ({len(weights)} tensors, "
                            f"{len(expected)} expected); was it saved with other target_modules or r?")
    set_peft_model_state_dict(module, weights)


def merge_peft(model):
    """`model` with every peft tuner layer merged into its base layer and replaced by it: a plain
    model again, trainable as a whole. (peft's merge_and_unload does this for a PeftModel, which
    a model given an adapter in place is not.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):  # diffusers' and transformers' PeftAdapterMixin bookkeeping
        model._hf_peft_config_loaded = False
    model.requires_grad_(True)
    return model
