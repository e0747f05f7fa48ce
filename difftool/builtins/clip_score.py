"""CLIP score: how well generated images match their prompts (torchmetrics' CLIPScore, 100 x the
cosine similarity of CLIP's image and text embeddings, averaged; higher is better).

CLIP comes from a local folder holding a transformers CLIPModel and its processor (the
metric's `model = "DIR"` key, else the environment variable DIFFTOOL_CLIP_MODEL), never from
the hub: evaluation must not depend on the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torchmetrics.multimodal.clip_score import CLIPScore

from difftool.errors import DifftoolError
from difftool.metrics import Metric

MODEL_ENV = "DIFFTOOL_CLIP_MODEL"
EXAMPLE_MODEL = "openai/clip-vit-base-patch16"
WHERE = "[evaluation.clip-score]"


def how_to_get() -> str:
    """How to make a CLIP folder, for error messages."""
    return (f"on a machine with network access run `hf download {EXAMPLE_MODEL} --local-dir DIR` (any transformers "
            f"CLIP model with its processor will do), copy DIR here, then set model = \"DIR\" in {WHERE} "
            f"or {MODEL_ENV}=DIR")


def model_folder(model: Any) -> tuple[Path, str]:
    """The CLIP folder and where it was named: the `model` key, else DIFFTOOL_CLIP_MODEL; checked to
    hold a CLIP model's config."""
    import os

    if model is not None:
        value, source = model, f"{WHERE} model = {model!r}"
    elif os.environ.get(MODEL_ENV):
        value, source = os.environ[MODEL_ENV], f"{MODEL_ENV}={os.environ[MODEL_ENV]}"
    else:
        raise DifftoolError(f"clip-score needs a CLIP model in a local folder (a transformers CLIPModel with its "
                            f"processor), and none is set: {how_to_get()}")
    if not isinstance(value, str) or not value.strip():
        raise DifftoolError(f"{source} must be the path of a folder holding a CLIP model; {how_to_get()}")
    folder = Path(value).expanduser()
    if not folder.exists():
        raise DifftoolError(f"{source}: {folder} does not exist; check the path, or to make one: {how_to_get()}")
    if not folder.is_dir():
        raise DifftoolError(f"{source}: {folder} is a file; give the folder holding the CLIP model, made so: "
                            f"{how_to_get()}")
    config = folder / "config.json"
    model_type = None
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (ValueError, OSError, AttributeError):
            model_type = "unreadable"
    if model_type != "clip":
        found = "has no config.json" if model_type is None else f"holds a '{model_type}' model, not CLIP"
        raise DifftoolError(f"{source}: {folder} {found}; give a folder holding a CLIP model (config.json with "
                            f"model_type \"clip\", its weights, tokenizer and image processor), made so: "
                            f"{how_to_get()}")
    return folder, source


class ClipFeatures(torch.nn.Module):
    """A CLIPModel as torchmetrics calls it: `get_image_features` and `get_text_features` return the
    projected embeddings as tensors (transformers 5 returns output objects, which torchmetrics
    cannot normalise)."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @property
    def config(self):
        return self.model.config

    @staticmethod
    def embedding(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.embedding(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def load_clip(folder: Path, source: str) -> tuple[ClipFeatures, Any]:
    """The CLIP model (wrapped for torchmetrics) and its processor, from local files only."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise DifftoolError(f"{source}: the CLIP model in {folder} could not be loaded ({type(exc).__name__}: {exc}); "
                            f"give a complete CLIP folder, made so: {how_to_get()}") from exc
    try:
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise DifftoolError(f"{source}: {folder} holds a CLIP model but not its processor (tokenizer and image "
                            f"processor) ({type(exc).__name__}: {exc}); download the whole repository, made so: "
                            f"{how_to_get()}") from exc
    return ClipFeatures(model), processor


class ClipScore(Metric):
    """The mean CLIP score of generated images against their prompts (0 to 100); no reference."""

    needs_reference = False
    needs_prompts = True
    min_samples = 1

    def __init__(self, model: ClipFeatures, processor, folder: Path, device=None):
        self.folder = folder
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # a callable, because torchmetrics only loads names it knows from the hub; sync_on_compute=False:
        # difftool gathers the images itself, so each process's metric is complete
        self.tm = CLIPScore(model_name_or_path=lambda: (model, processor), sync_on_compute=False,
                            compute_with_cache=False).to(self.device)

    def settings(self) -> dict[str, Any]:
        return {"model": str(self.folder.resolve())}

    def update_reference(self, images) -> None:
        """Nothing to learn: it compares images with their prompts, not with reference images."""

    def reference_state(self) -> dict:
        return {}

    def load_reference_state(self, state: dict) -> None:
        """Nothing to restore."""

    def update(self, images, prompts: list[str] | None = None) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
                or images.shape[1] != 3:
            got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                   else type(images).__name__)
            raise DifftoolError(f"clip-score takes images as a uint8 tensor (N, 3, H, W); got {got}")
        if prompts is None:
            raise DifftoolError("clip-score scores images against their prompts and got none; use it on a "
                                "text-to-image run with [sampling] prompts = [\"...\"]")
        if isinstance(prompts, str) or len(prompts) != images.shape[0] \
                or not all(isinstance(p, str) for p in prompts):
            count = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise DifftoolError(f"clip-score needs one prompt (a string) per image; got {images.shape[0]} images and "
                                f"{count}")
        if images.shape[0]:
            self.tm.update(list(images.to(self.device)), list(prompts))

    def compute(self) -> dict[str, float]:
        if int(self.tm.n_samples) < self.min_samples:
            raise DifftoolError("clip-score got no images to score; raise [evaluation] num_samples to 1 or more")
        return {"clip_score": float(self.tm.compute())}

    def reset(self) -> None:
        self.tm.reset()


def clip_score(device=None, model: str | None = None) -> ClipScore:
    """CLIP score of each image against its prompt; `model`: a local folder holding a transformers
    CLIPModel and its processor (default: DIFFTOOL_CLIP_MODEL)."""
    folder, source = model_folder(model)
    clip, processor = load_clip(folder, source)
    return ClipScore(clip, processor, folder, device=device)


clip_score.needs_prompts = True  # known before it is built: `difftool check` refuses it on an unconditional run
