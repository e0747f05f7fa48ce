"""Exporting a finished run's LoRA for other programs: `difftool export RUN --format kohya`.

A text-to-image LoRA run saves `pytorch_lora_weights.safetensors` in diffusers' layout (keys
`unet.`, `text_encoder.`, `text_encoder_2.`, each part's LoraConfig in the file's metadata).
AUTOMATIC1111 and ComfyUI read LoRA files with the key names kohya-ss's sd-scripts write:
`lora_unet_*`, `lora_te_*` (SD 1.x/2.x's one text encoder) or `lora_te1_*` / `lora_te2_*`
(SDXL's two), each layer's `.lora_down.weight`, `.lora_up.weight` and `.alpha`, the layer's
scale being alpha / rank. diffusers' converters do the renaming (convert_all_state_dict_to_peft,
part by part, then convert_state_dict_to_kohya). This module then gives each layer the alpha of
the scale the run trained with (the converter writes alpha = rank, a scale of 1, whatever
lora_alpha was), names CLIP's layers and SD's single text encoder as kohya does, and writes the
file atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from difftool.errors import DifftoolError

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, as the run saves it
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts the LoraConfigs
FORMATS = {"kohya": "kohya-ss's key names (lora_unet_*, lora_te_* or lora_te1_*/lora_te2_*), read by "
                    "AUTOMATIC1111 and ComfyUI"}
PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}  # diffusers -> kohya
PIXEL_MODELS = ("unet2d", "dit")
CLIP_ROOTS = ("encoder_", "embeddings_", "final_layer_norm")  # CLIP's modules under text_model


def export(run_dir: Path, format: str = "kohya", output: Path | None = None, force: bool = False) -> Path:
    """Write the LoRA of the finished run in `run_dir` in `format` to `output` (default:
    RUN_DIR/NAME.kohya.safetensors, NAME the run folder's name); an existing file is replaced
    only with `force`. Returns the file written."""
    from safetensors.torch import save_file

    from difftool.files import atomic_path, writing
    from difftool.registry import suggest

    if format not in FORMATS:
        raise DifftoolError(f"unknown --format '{format}'{suggest(format, FORMATS)}; the formats are: "
                            + "; ".join(f"{name}: {what}" for name, what in FORMATS.items()))
    weights, configs, model = read_lora(run_dir)
    converted = to_kohya(weights, configs, single_text_encoder=model != "stable-diffusion-xl" and not any(
        key.startswith("text_encoder_2.") for key in weights))
    target = output or run_dir / f"{run_dir.resolve().name}.{format}.safetensors"
    if target.suffix != ".safetensors":
        raise DifftoolError(f"--output {target}: give a file name ending in .safetensors, e.g. my-lora.safetensors")
    if target.is_dir():
        raise DifftoolError(f"--output {target} is a folder; give a file name ending in .safetensors")
    if target.exists() and not force:
        raise DifftoolError(f"{target} already exists; choose another --output, or pass --force to replace it")
    with writing("the exported LoRA", target), atomic_path(target) as tmp:
        save_file(converted, str(tmp), metadata=kohya_metadata(converted, model))
    return target


def read_lora(run_dir: Path) -> tuple[dict, dict, str | None]:
    """(the run's LoRA weights in diffusers' layout, {part: its LoraConfig as a dict}, the
    recipe's model name) of a finished text-to-image LoRA run; refuses anything else, saying why."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from difftool.integrity import damaged_output
    from difftool.runs import saved_recipe

    if not run_dir.is_dir():
        problem = "is a file, not a run folder" if run_dir.exists() else "is no such run folder"
        raise DifftoolError(f"{run_dir} {problem}; give the output_dir of a finished LoRA run")
    recipe = saved_recipe(run_dir)  # refuses an unfinished run
    model = recipe.get("model", {}).get("name")
    file = run_dir / LORA_FILE
    if not file.is_file():
        raise DifftoolError(no_lora(run_dir, recipe, model))
    try:
        with safe_open(str(file), "pt") as opened:
            packed = json.loads((opened.metadata() or {}).get(METADATA_KEY) or "{}")
        weights = load_file(str(file))
    except Exception as exc:
        problem = f"its {LORA_FILE} cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
        raise damaged_output(run_dir, problem) from exc
    if any(key.startswith("transformer.") for key in weights):
        raise DifftoolError(f"{run_dir} is a Stable Diffusion 3 LoRA, and kohya's key names are defined here for SD "
                            f"1.x/2.x and SDXL only; use its {LORA_FILE} (diffusers' layout) as it is")
    unknown = sorted({key.split(".")[0] for key in weights} - PARTS.keys())
    if unknown:
        raise DifftoolError(f"{file} has weights of {unknown}, which kohya's key names do not cover (only "
                            f"{list(PARTS)}); export a stable-diffusion or stable-diffusion-xl LoRA run")
    configs = {part: {key[len(part) + 1:]: value for key, value in packed.items() if key.startswith(f"{part}.")}
               for part in PARTS}
    for part, config in configs.items():
        if config.get("use_dora"):
            raise DifftoolError(f"{run_dir} is a DoRA (use_dora = true on its {part}), whose magnitude vectors "
                                "--format kohya does not write; export a plain LoRA run, or use its "
                                f"{LORA_FILE} with diffusers")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise DifftoolError(f"{run_dir}: its {part} LoRA has per-layer ranks or alphas (rank_pattern, "
                                "alpha_pattern), which this export does not carry over; export a run with one r "
                                "and lora_alpha")
    return weights, {part: config for part, config in configs.items() if config}, model


def no_lora(run_dir: Path, recipe: dict, model: str | None) -> str:
    """Why a finished run has no LoRA to export, and what to do instead."""
    from difftool.adapters import MARKER

    if not (run_dir / MARKER).is_file():
        return (f"{run_dir} holds a full fine-tune (a whole pipeline, no LoRA), and --format kohya exports LoRA "
                "runs; load the pipeline folder itself with diffusers' from_pretrained")
    if model in PIXEL_MODELS:
        return (f"{run_dir} adapts a '{model}' model, and kohya's LoRA format is for Stable Diffusion and SDXL "
                "(what AUTOMATIC1111 and ComfyUI load); its adapters stay in adapters/ in peft's layout")
    names = [table.get("name") for table in recipe.get("adapters", [])]
    return (f"{run_dir} has no {LORA_FILE}: its adapters ({', '.join(map(str, names)) or 'none'}) hold no LoRA "
            "(LoHa, LoKr and OFT stay in adapters/ in peft's layout, which diffusers' loaders and kohya's format "
            "do not cover); export a run trained with the `lora` adapter")


def to_kohya(weights: dict, configs: dict, single_text_encoder: bool) -> dict:
    """kohya's state dict of a diffusers-layout LoRA: renamed by diffusers' converters, each
    layer's alpha set to scale x rank (scale: lora_alpha / r, or lora_alpha / sqrt(r) for
    rsLoRA, from its part's config; 1 where the file has no config, as diffusers then loads it),
    and SD's text encoder named lora_te_ as sd-scripts names it."""
    import torch
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    # each part on its own: the file names a text encoder's layers one way (lora_linear_layer)
    # and the UNet's another (lora.down), and the converter infers one naming per call
    peft = {}
    for part in PARTS:
        layers = {key: value for key, value in weights.items() if key.startswith(f"{part}.")}
        if layers:
            peft.update(convert_all_state_dict_to_peft(layers))
    converted = convert_state_dict_to_kohya(peft)
    by_prefix = {prefix: configs.get(part) for part, prefix in PARTS.items()}
    result = {}
    for key, value in converted.items():
        layer, _, kind = key.partition(".")
        if kind == "alpha":
            down = converted[f"{layer}.lora_down.weight"]
            config = next((c for prefix, c in by_prefix.items() if layer.startswith(prefix)), None)
            value = torch.tensor(scale(config) * down.shape[0], dtype=torch.float32)
        prefix = next((p for p in ("lora_te1_", "lora_te2_") if layer.startswith(p)), None)
        if prefix and key[len(prefix):].startswith(CLIP_ROOTS):
            # CLIP's layers by the names of its original checkpoints (text_model.encoder...), as
            # sd-scripts, AUTOMATIC1111 and ComfyUI know them; transformers 5 names them without text_model
            key = f"{prefix}text_model_{key[len(prefix):]}"
        if single_text_encoder and key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_"):]
        result[key] = value.contiguous()
    return result


def scale(config: dict | None) -> float:
    """The LoRA's output scale from its LoraConfig (as a dict): lora_alpha / r, over sqrt(r) with rsLoRA."""
    if not config:
        return 1.0
    r = config["r"]
    return config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)


def kohya_metadata(converted: dict, model: str | None) -> dict[str, str]:
    """sd-scripts' metadata that AUTOMATIC1111 shows and sorts by: the network module, the rank
    and alpha (of the first layer: the UNet's, else the text encoder's), and SDXL's base model
    version."""
    alphas = sorted(key for key in converted if key.endswith(".alpha"))
    first = next((key for key in alphas if key.startswith("lora_unet_")), alphas[0])
    layer = first[:-len(".alpha")]
    metadata = {"ss_network_module": "networks.lora",
                "ss_network_dim": str(converted[f"{layer}.lora_down.weight"].shape[0]),
                "ss_network_alpha": f"{converted[first].item():g}"}
    if model == "stable-diffusion-xl" or any(key.startswith("lora_te2_") for key in converted):
        metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    return metadata
