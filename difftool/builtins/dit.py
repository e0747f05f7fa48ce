"""The `dit` model: diffusers' DiTTransformer2DModel in pixel space. Its own module, so that a
recipe of another model does not import diffusers' transformers (seconds)."""

from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from difftool.builtins.models import load_saved, signature
from difftool.errors import DifftoolError

# A small DiT for pixel space: the width of DiT-S (6 heads x 64 = 384) at half its depth.
DIT_DEFAULTS = {"in_channels": 3, "patch_size": 2, "num_layers": 6, "num_attention_heads": 6, "attention_head_dim": 64}


def dit(pretrained: str | None = None, *, image_size: int | None = None, num_classes: int | None = None, **config):
    """A new DiTTransformer2DModel(**config) for pixel space, or the one saved at `pretrained`
    (a run or model folder).

    Defaults: in_channels = 3, patch_size = 2, sample_size = image_size, and a small model (6
    layers of 6 heads x 64 channels). The model always takes `class_labels` (DiT's adaLN-Zero
    embeds a class label with the timestep): `num_embeds_ada_norm` is the number of classes of a
    class-conditional run, else 1, and an unconditional run gives every image label 0. Its label
    embeddings' own dropout is switched off (difftool drops labels itself: [dataset]
    label_dropout); a model saved from it and loaded with plain diffusers has it on again in
    training mode.
    """
    if pretrained is None:
        if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise DifftoolError(f"[model] norm_type = '{config['norm_type']}': DiT supports only 'ada_norm_zero'; remove it")
        embeds, classes = config.get("num_embeds_ada_norm"), num_classes or 1
        if embeds is not None and embeds < classes:
            raise DifftoolError(f"[model] num_embeds_ada_norm = {embeds} is fewer than the {classes} classes of "
                                "this run; remove it (it follows [dataset] label_column)")
        defaults = {**DIT_DEFAULTS, "num_embeds_ada_norm": classes}
        if image_size is not None:
            defaults["sample_size"] = image_size
        model = DiTTransformer2DModel(**{**defaults, **config})
    else:
        model = load_saved(DiTTransformer2DModel, pretrained, config, "DiT")
        check_saved_dit(model.config, pretrained, image_size, num_classes)
    rows = (num_classes or 0) + 1  # the classes and the null class, or label 0 alone
    for embedding in (m for m in model.modules() if isinstance(m, LabelEmbedding)):
        embedding.dropout_prob = 0.0
        if embedding.embedding_table.num_embeddings < rows:
            raise DifftoolError(f"[model] the DiT's class embedding has {embedding.embedding_table.num_embeddings} "
                                f"rows, fewer than the {rows} of {num_classes} classes and the null class")
    model.size_multiple = model.config.patch_size
    return model


def check_saved_dit(config, pretrained: str, image_size: int | None, num_classes: int | None) -> None:
    """A saved DiT must have been made for this image size and at least this many classes."""
    where = f"[model] pretrained = '{pretrained}'"
    if num_classes is not None and config.num_embeds_ada_norm < num_classes:
        raise DifftoolError(f"{where} embeds {config.num_embeds_ada_norm} classes (num_embeds_ada_norm), "
                            f"fewer than the {num_classes} of [dataset] label_column")
    if image_size is None:
        return
    patch, size = config.patch_size, config.sample_size
    if image_size % patch:
        raise DifftoolError(f"{where} has patch_size = {patch}, and [dataset] image_size = {image_size} is not "
                            f"divisible by it; set image_size = {size}")
    if image_size != size:
        raise DifftoolError(f"{where} was made for {size} px images (sample_size = {size}), and [dataset] "
                            f"image_size = {image_size}; set image_size = {size}")


# Expose the model's own parameters so recipe keys are checked against them.
dit.__signature__ = signature(DiTTransformer2DModel, **DIT_DEFAULTS, sample_size=None, num_embeds_ada_norm=None)
