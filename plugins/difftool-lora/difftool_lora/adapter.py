"""LoRA through peft: add it to a model, save it in peft's layout, load it back, fuse it."""

from __future__ import annotations

from pathlib import Path

from difftool.adapters import Adapter
from difftool.errors import DifftoolError

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # the projections of diffusers' Attention
CONVOLUTIONS = ["conv1", "conv2"]  # the 3x3 convolutions of diffusers' ResnetBlock2D
WEIGHTS = "adapter_model.safetensors"  # peft's file name, beside its adapter_config.json


def lora(model, r: int = 8, lora_alpha: float | None = None, lora_dropout: float = 0.0,
         target_modules: list[str] | None = None, include_convolutions: bool = False,
         init_lora_weights: bool | str = True, use_rslora: bool = False, use_dora: bool = False):
    """Freeze the model and add LoRA of rank `r` to its `target_modules` (default: the attention
    projections; `include_convolutions` adds the ResNet convolutions). `lora_alpha` defaults
    to `r` (scale 1). The other keys are peft.LoraConfig's."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = list(target_modules or ATTENTION) + (CONVOLUTIONS if include_convolutions else [])
    check_targets(model, targets)
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise DifftoolError("the model already has a LoRA; list one `lora` in [[adapters]] "
                            "(its target_modules can cover every layer you want)")
    config = LoraConfig(r=r, lora_alpha=lora_alpha or r, lora_dropout=lora_dropout, target_modules=targets,
                        init_lora_weights=init_lora_weights, use_rslora=use_rslora, use_dora=use_dora)
    model.requires_grad_(False)
    if hasattr(model, "add_adapter"):  # diffusers models with PeftAdapterMixin keep their own bookkeeping
        model.add_adapter(config)
    else:  # e.g. UNet2DModel: the same injection, done by peft directly
        inject_adapter_in_model(config, model)
    return LoraAdapter(config)


def check_targets(model, targets: list[str]) -> None:
    """Every target must name some layer, as peft matches them: the whole name or its ending."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise DifftoolError(
            f"lora target_modules {missing} match no layer of the model; name layers by their last "
            f"parts, as in {ATTENTION + CONVOLUTIONS}")


class LoraAdapter(Adapter):
    """Saves `adapter_config.json` + `adapter_model.safetensors` (peft's layout, adapter
    weights only), loads them back, and fuses by merging LoRA into the base weights."""

    def __init__(self, config):
        self.config = config

    def save(self, model, folder: Path) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        self.config.save_pretrained(str(folder))
        weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(weights, str(folder / WEIGHTS))

    def load(self, model, folder: Path) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        if not (folder / WEIGHTS).is_file():
            raise DifftoolError(f"{folder} has no {WEIGHTS}; it was not saved by the lora adapter")
        weights = load_file(str(folder / WEIGHTS))
        expected = {name: value.shape for name, value in get_peft_model_state_dict(model).items()}
        if {name: value.shape for name, value in weights.items()} != expected:
            raise DifftoolError(f"{folder}/{WEIGHTS} does not fit this model's LoRA ({len(weights)} tensors, "
                                f"{len(expected)} expected); was it saved with other target_modules or r?")
        set_peft_model_state_dict(model, weights)

    def fuse(self, model):
        # peft merges a LoRA into its layer (module.merge); swapping each merged layer for its
        # base layer is what peft's merge_and_unload does for a PeftModel, which this is not.
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge(safe_merge=True)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config
        if getattr(model, "_hf_peft_config_loaded", False):  # diffusers' PeftAdapterMixin bookkeeping
            model._hf_peft_config_loaded = False
        model.requires_grad_(True)
        return model
