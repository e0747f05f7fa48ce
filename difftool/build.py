"""Turning a validated recipe into the objects the training loop needs."""

from __future__ import annotations

from fnmatch import fnmatch

from difftool.errors import DifftoolError
from difftool.recipe import Recipe


def model(recipe: Recipe, num_classes: int | None = None):
    """The model, fitted to the image size, with its attention processors set. `num_classes`:
    the classes of a class-conditional run (the factory makes room for the null class too),
    None for an unconditional one."""
    built = recipe.entries["model"].build(recipe.kwargs("model"), recipe.where("model"),
                                          image_size=recipe["dataset"]["image_size"], num_classes=num_classes)
    if is_latent(built):
        built.check_image_size(recipe["dataset"]["image_size"], recipe.where("dataset"))
    else:
        fit_image_size(built, recipe["dataset"]["image_size"], recipe.where("dataset"))
    check_buckets(recipe, built)
    if "attention" in recipe.data:
        set_attention(recipe, denoiser(built))
    return built


def is_latent(built) -> bool:
    """Whether the model is a latent text-to-image one (VAE + text encoders + UNet)."""
    from difftool.latent import LatentDiffusion

    return isinstance(built, LatentDiffusion)


def denoiser(built):
    """The network that predicts noise: the model itself, or a latent model's UNet."""
    return built.unet if is_latent(built) else built


def check_memory(recipe: Recipe, built) -> None:
    """Refuse a batch and image size whose activations alone cannot fit in this machine's memory
    (difftool.memory: a floor counted on the meta device, for models that take (sample, timestep)
    and perhaps class_labels; a model it cannot run there is not checked)."""
    from difftool.memory import too_big

    if recipe["run"]["gradient_checkpointing"]:
        return  # the floor counts activations kept for backward, which checkpointing recomputes instead
    table, unet = recipe["dataset"], denoiser(built)
    channels = getattr(getattr(unet, "config", None), "in_channels", 3)
    if problem := too_big(unet, table["batch_size"], table["image_size"], channels):
        raise DifftoolError(f"{recipe.where('dataset')} {problem}: lower image_size or batch_size "
                            "(gradient_accumulation_steps keeps the effective batch)")


def adapters(recipe: Recipe, built) -> list:
    """Apply the [[adapters]] to the model's denoiser in order; returns their Adapter objects
    (each checked to be one when built: difftool.contracts). A factory that takes
    `text_encoders` also gets a latent model's CLIP text encoders by their pipeline names (SD:
    text_encoder; SDXL and SD3: text_encoder and text_encoder_2; {} for a pixel model), the ones
    diffusers' `load_lora_weights` reads a LoRA for."""
    encoders = text_encoders(built)
    network = denoiser(built)
    applied = []
    for i, table in enumerate(recipe["adapters"]):
        section = f"adapters.{i}"
        applied.append(recipe.entries[section].build(recipe.kwargs(section, table), recipe.where(section),
                                                     model=network, text_encoders=encoders))
    return applied


def text_encoders(built) -> dict:
    """{pipeline name: module} of a latent model's CLIP text encoders ({} for a pixel model).
    SD3's T5 is left out: diffusers' SD3 LoRA loader reads no LoRA for it."""
    if not is_latent(built):
        return {}
    named = {"text_encoder": built.text_encoder, "text_encoder_2": built.text_encoder_2}
    return {name: module for name, module in named.items() if module is not None}


def gradient_checkpointing(recipe: Recipe, built) -> None:
    """With [run] gradient_checkpointing, the denoiser keeps only its blocks' inputs in the
    forward pass and recomputes the rest in backward (diffusers' enable_gradient_checkpointing,
    non-reentrant, so an adapter's weights on a frozen base get their gradients too): less
    memory for about a third more compute, and the same loss and gradients. Refuses a model
    that cannot do it, naming it."""
    if not recipe["run"]["gradient_checkpointing"]:
        return
    network = denoiser(built)
    enable = getattr(network, "enable_gradient_checkpointing", None)
    if not callable(enable) or getattr(network, "_supports_gradient_checkpointing", True) is False:
        entry = recipe.entries["model"]
        raise DifftoolError(
            f"{recipe.where('run')} gradient_checkpointing = true, and model '{recipe['model']['name']}' (plugin "
            f"'{entry.plugin}', a {type(network).__name__}) cannot recompute its activations (it has no "
            "enable_gradient_checkpointing(), which diffusers' models have); remove gradient_checkpointing, or "
            "give the model that method")
    enable()


def fit_image_size(built, image_size: int, where: str) -> None:
    """Check the model can take `image_size` images (a multiple of its `size_multiple`, if it
    has one), and record it as the model's sample_size."""
    factor = getattr(built, "size_multiple", None) or 1
    if image_size % factor:
        raise DifftoolError(f"{where} image_size = {image_size} must be divisible by {factor}, the model's "
                            f"size multiple; use {image_size // factor * factor or factor}")
    config = getattr(built, "config", None)
    sample_size = getattr(config, "sample_size", None)
    if sample_size is None and hasattr(built, "register_to_config"):
        built.register_to_config(sample_size=image_size)
    elif isinstance(sample_size, int) and sample_size != image_size:
        raise DifftoolError(
            f"{where} image_size = {image_size} but the model's sample_size is {sample_size}; "
            "make them equal"
        )


def attention_layers(built) -> dict:
    """'{module}.processor' -> attention module, named as diffusers' `attn_processors` names them.

    Walks the modules itself because not every diffusers model (UNet2DModel among them)
    has `attn_processors`/`set_attn_processor`.
    """
    return {f"{name}.processor": module for name, module in built.named_modules() if hasattr(module, "set_processor")}


def set_attention(recipe: Recipe, built) -> None:
    """Give every attention layer matching [attention] layers a processor from its factory."""
    table, entry = recipe["attention"], recipe.entries["attention"]
    layers = attention_layers(built)
    matched = [name for name in layers if fnmatch(name, table["layers"])]
    if not matched:
        raise DifftoolError(
            f"{recipe.where('attention')} layers = '{table['layers']}' matches no attention layer; "
            f"the model has: {', '.join(layers) or 'none'}"
        )
    kwargs = recipe.kwargs("attention")
    for name in matched:
        layers[name].set_processor(entry.build(kwargs, recipe.where("attention"), model=built, layer=name))


def noise_scheduler(recipe: Recipe, built=None):
    """The training (noise) scheduler. A latent model's inherits the betas and prediction type
    of the scheduler saved with its pipeline (the recipe's keys win), as diffusers' examples
    load it with `from_pretrained(..., subfolder="scheduler")`."""
    if built is not None and is_latent(built):
        from difftool.sampling import sampling_scheduler as inherit

        return inherit(recipe.entries["noise_scheduler"], dict(built.others["scheduler"].config),
                       recipe.kwargs("noise_scheduler"), recipe.where("noise_scheduler"))
    return recipe.entries["noise_scheduler"].build(recipe.kwargs("noise_scheduler"), recipe.where("noise_scheduler"))


def sampling_scheduler(recipe: Recipe, training_scheduler):
    """The [sampling] scheduler, inheriting the training scheduler's config."""
    from difftool.sampling import sampling_scheduler as inherit

    return inherit(recipe.entries["sampling"], dict(training_scheduler.config),
                   recipe.kwargs("sampling"), recipe.where("sampling"))


def rows(recipe: Recipe, kwargs: dict, captions: bool = False):
    """The dataset factory's rows, checked to be non-empty mappings with an `image` column of
    images (and the caption column, when `captions`). The factory's result is checked to be a
    dataset when built; of its rows, the first is checked, or all of an in-memory list. The
    factory's context is `generate_images` (image_generator)."""
    name, where = recipe["dataset"]["name"], recipe.where("dataset")
    entry = recipe.entries["dataset"]
    built = entry.build(kwargs, where, generate_images=image_generator(recipe))
    who = f"dataset '{name}' (plugin '{entry.plugin}')"
    if len(built) == 0:
        raise DifftoolError(f"{where} dataset '{name}' is empty")
    try:
        first = built[0]
    except Exception as exc:
        raise DifftoolError(f"{where} {who}: its first row cannot be read ({type(exc).__name__}: {exc}); "
                            "update the plugin, or report this to its authors") from exc
    for index, row in enumerate(built if isinstance(built, (list, tuple)) else [first]):
        check_row(row, index, where, who)
    if captions:
        check_captions(recipe, built)
    return built


def image_generator(recipe: Recipe):
    """The datasets' `generate_images` context: a difftool.class_images.Generator that samples
    the recipe's base model (its [model], without [[adapters]]) from a prompt with the [sampling]
    scheduler, num_inference_steps, guidance_scale and negative_prompt, at [dataset] image_size,
    [dataset] batch_size images at a time, seeded by [run] seed. The model is loaded only when
    images are missing, on the process's device, in half precision where the run trains in it
    on a GPU. Its cache folders are keyed by the [model] table (a local `pretrained` by its
    absolute path) and the image size; a model that is not text-to-image is refused then."""
    from pathlib import Path

    from difftool.class_images import Generator

    table, sampling = recipe["dataset"], recipe["sampling"]
    model_table = {k: v for k, v in recipe["model"].items() if k not in ("vae_slicing", "vae_tiling")}
    if isinstance(model_table.get("pretrained"), str) and Path(model_table["pretrained"]).expanduser().exists():
        model_table["pretrained"] = str(Path(model_table["pretrained"]).expanduser().resolve())

    def load():
        import torch
        from accelerate import PartialState

        from difftool.precision import effective, resolve

        built = model(recipe)
        if not is_latent(built):
            raise DifftoolError(f"{recipe.where('dataset')} class images are generated from a prompt by a text-to-image "
                                f"model, and [model] '{recipe['model']['name']}' is not one; put enough images in the "
                                "dataset's class folder yourself, or lower the number of class images")
        sampler = sampling_scheduler(recipe, noise_scheduler(recipe, built))
        device = PartialState().device
        precision = effective(resolve(recipe["run"]["mixed_precision"]), device.type)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        built.to(device, dtype if device.type == "cuda" else torch.float32)
        steps = sampling["num_inference_steps"] or sampler.config.num_train_timesteps
        return built.pipeline(scheduler=sampler), steps

    from difftool.conditioning import guidance

    settings = {"negative_prompt": sampling["negative_prompt"], "guidance_scale": guidance(sampling["guidance_scale"], True),
                "image_size": table["image_size"]}
    return Generator(load, {"model": model_table, "image_size": table["image_size"]}, settings,
                     batch_size=table["batch_size"], seed=recipe["run"]["seed"])


def check_captions(recipe: Recipe, built) -> None:
    """A text-to-image model needs the dataset's rows to have the caption column."""
    name, where, column = recipe["dataset"]["name"], recipe.where("dataset"), recipe["dataset"]["caption_column"]
    first = built[0]
    if column not in first:
        raise DifftoolError(
            f"{where} a text-to-image model needs captions, and dataset '{name}' rows have no '{column}' column "
            f"(they have {list(first)}); set caption_column, or give an imagefolder a metadata.jsonl "
            'with lines like {"file_name": "0001.png", "text": "a caption"}'
        )


def class_names(recipe: Recipe, built) -> list[str] | None:
    """The class names of the [dataset] label_column (None when the run is unconditional)."""
    from difftool.data import class_names as names

    column = recipe["dataset"]["label_column"]
    return None if column is None else names(built, column, recipe.where("dataset"))


def check_guidance(recipe: Recipe, text: bool, classes: list[str] | None) -> None:
    """Classifier-free guidance needs a model that was trained with conditions to drop."""
    scale = recipe["sampling"]["guidance_scale"]
    if scale is not None and not text and classes is None:
        raise DifftoolError(f"{recipe.where('sampling')} guidance_scale = {scale} guides a class-conditional or "
                            "text-to-image model, and this one is unconditional; remove guidance_scale, or train "
                            "a class-conditional model ([dataset] label_column)")
    if classes is not None:
        from difftool.conditioning import check_guidance as check
        from difftool.conditioning import indices

        check(scale, recipe["dataset"]["label_dropout"], recipe.where("sampling"))
        indices(classes, recipe["sampling"]["classes"], recipe.where("sampling"))


def check_row(row, index: int, where: str, who: str) -> None:
    """A dataset row must be a mapping whose `image` is a PIL image, or datasets' undecoded
    {"path", "bytes"} dict; `who` names the dataset and its plugin."""
    from collections.abc import Mapping

    from PIL import Image

    from difftool.contracts import describe

    if not isinstance(row, Mapping):
        raise DifftoolError(f"{where} {who} row {index} is {describe(row)}, not a mapping with an 'image' "
                            "column (e.g. {'image': PIL.Image}); update the plugin, or report this to its authors")
    if "image" not in row:
        raise DifftoolError(f"{where} {who} rows have no 'image' column (row {index} has {list(row)})")
    image = row["image"]
    undecoded = isinstance(image, Mapping) and (image.get("path") or image.get("bytes"))
    if not (isinstance(image, Image.Image) or undecoded):
        raise DifftoolError(f"{where} {who} row {index} has image = {describe(image)}, not a PIL image "
                            "(or datasets' {'path': ..., 'bytes': ...}); update the plugin, or report this to "
                            "its authors")


def datasets(recipe: Recipe, captions: bool = False):
    """(training rows, held-out rows or None): [validation] takes a split or a seeded fraction."""
    import torch

    training = rows(recipe, recipe.kwargs("dataset"), captions)
    validation = recipe["validation"]
    if not validation["every_n_steps"]:
        return training, None
    if validation["split"]:
        params, open_ended = recipe.entries["dataset"].parameters()
        if "split" not in params and not open_ended:
            raise DifftoolError(
                f"{recipe.where('validation')} split = '{validation['split']}' needs a dataset that has "
                f"splits, and '{recipe['dataset']['name']}' has none; hold out a fraction instead"
            )
        return training, rows(recipe, {**recipe.kwargs("dataset"), "split": validation["split"]}, captions)
    held_out = max(1, round(len(training) * validation["fraction"]))
    if not validation["fraction"] or held_out >= len(training):
        raise DifftoolError(f"{recipe.where('validation')} fraction = {validation['fraction']} leaves no "
                            f"training or no validation images out of {len(training)}; use e.g. 0.1")
    order = torch.randperm(len(training), generator=torch.Generator().manual_seed(recipe["run"]["seed"])).tolist()
    subset = torch.utils.data.Subset
    return subset(training, order[held_out:]), subset(training, order[:held_out])


def dataloader(recipe: Recipe, dataset_rows, shuffle: bool = True, captions: bool = False,
               classes: list[str] | None = None):
    """A DataLoader over preprocessed rows (with their captions, if asked, and their class
    labels, for a class-conditional run), shuffled anew each epoch from (seed, epoch)."""
    import torch

    from difftool.data import EpochShuffle, ImageDataset

    from difftool.buckets import BucketBatches, assign, settings
    from difftool.data import has_column, image_sizes

    table, seed = recipe["dataset"], recipe["run"]["seed"]
    workers = table["num_workers"]
    buckets = settings(table, recipe.where("dataset"))
    # the images' sizes (file headers; masks checked against them) where buckets or crops need them
    sizes = image_sizes(dataset_rows) if buckets or table["random_crop"] or has_column(dataset_rows, "mask") else None
    targets = assign(sizes, buckets.buckets()) if buckets else None
    crops = table["random_crop"] and shuffle  # held-out rows are cropped at the centre
    dataset = ImageDataset(dataset_rows, table["image_size"], cache=table["cache"], shared=workers > 0,
                           center_crop=table["center_crop"],
                           caption_column=table["caption_column"] if captions else None,
                           labels=None if classes is None else {"column": table["label_column"], "names": classes},
                           targets=targets, random_crop=table["random_crop"], sizes=sizes, geometry=captions)
    common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                  generator=torch.Generator().manual_seed(seed))  # keeps the global RNG out of it
    if buckets:  # every batch from one bucket
        return torch.utils.data.DataLoader(dataset, batch_sampler=BucketBatches(
            targets, table["batch_size"], seed, shuffle=shuffle, crops=crops), **common)
    return torch.utils.data.DataLoader(
        dataset, batch_size=table["batch_size"],
        sampler=EpochShuffle(len(dataset_rows), seed, crops=crops) if shuffle else None, **common)


def bucket_distribution(recipe: Recipe, dataset_rows) -> dict | None:
    """{bucket (height, width): number of images} of the rows (their sizes read from the files'
    headers), or None when [dataset] buckets is off."""
    from difftool.buckets import assign, distribution, settings
    from difftool.data import image_sizes

    buckets = settings(recipe["dataset"], recipe.where("dataset"))
    return None if buckets is None else distribution(assign(image_sizes(dataset_rows), buckets.buckets()))


def check_buckets(recipe: Recipe, built) -> None:
    """[dataset] buckets and crops must fit the model: bucket sides divisible by its
    down-sampling factor, and no longer than it takes (SD3's position embeddings). Buckets are for latent (text-to-image) models: a pixel-space model
    here is built for one sample_size."""
    from difftool.buckets import check_factor, settings

    chosen = settings(recipe["dataset"], recipe.where("dataset"))
    if chosen is None:
        return
    if not is_latent(built):
        raise DifftoolError(f"{recipe.where('dataset')} buckets = true trains at several resolutions, and model "
                            f"'{recipe['model']['name']}' is built for one (image_size); use buckets with a "
                            "text-to-image model (stable-diffusion, stable-diffusion-xl, stable-diffusion-3), or "
                            "set buckets = false")
    check_factor(chosen, built.size_multiple, recipe.where("dataset"))
    most, longest = built.largest_side, max(max(bucket) for bucket in chosen.buckets())
    if most and longest > most:
        raise DifftoolError(f"{recipe.where('dataset')} bucket_max = {chosen.largest} makes buckets with sides up to "
                            f"{longest} px, and this transformer's position embeddings cover images of at most "
                            f"{most} px a side; set bucket_max to at most {most // chosen.step * chosen.step}")


def cache_folder(recipe: Recipe):
    """Where a latent model's encoders' outputs are cached: [dataset] latent_cache_dir, else the
    user's cache folder."""
    from pathlib import Path

    from difftool.latent_cache import default_folder

    folder = recipe["dataset"]["latent_cache_dir"]
    return Path(folder).expanduser() if folder else default_folder()


def latent_cache(recipe: Recipe, latent):
    """The cache of a latent model's VAE latents, or None when [dataset] cache is off."""
    from difftool.latent_cache import LatentCache

    return LatentCache(cache_folder(recipe), latent.vae) if recipe["dataset"]["cache"] else None


def text_cache(recipe: Recipe, latent):
    """The cache of a latent model's prompt embeddings, beside its latents, or None when
    [dataset] cache is off or shuffle_tags is on. Build it after the encoders are cast to the
    run's precision: their dtype is part of its key."""
    from difftool.latent_cache import TextCache

    if not recipe["dataset"]["cache"] or recipe["dataset"]["shuffle_tags"]:
        return None  # shuffled captions: nearly every one is new, so entries would pile up unread
    if latent.text_encoders_train():
        return None  # an adapter trains the encoders: their embeddings change every step
    # the pipeline's class too: SDXL and SD3 encode the same two CLIPs differently
    return TextCache(cache_folder(recipe), latent.text_encoders(), latent.tokenizers(), [latent.pipeline_class.__name__])


def objective(recipe: Recipe, noise_scheduler):
    """The [objective] over the noise scheduler (which it may configure: flow matching's shift)."""
    return recipe.entries["objective"].build(recipe.kwargs("objective"), recipe.where("objective"),
                                             noise_scheduler=noise_scheduler, image_size=recipe["dataset"]["image_size"])


def scheduler_roles(built_model, noise, sampling, evaluation=None) -> dict:
    """{recipe section: scheduler} of every scheduler the objective must fit: the noise, sampling
    and evaluation ones, and a pipeline's own (under [model]: an SD3 pipeline's flow-match
    scheduler says how its transformer was trained, whatever [noise_scheduler] inherits from it)."""
    roles = {"noise_scheduler": noise, "sampling": sampling}
    if evaluation is not None:
        roles["evaluation"] = evaluation
    if is_latent(built_model):
        roles["model"] = built_model.others["scheduler"]
    return roles


def check_objective(recipe: Recipe, built, schedulers: dict, sampler, weighting) -> None:
    """Refuse schedulers ({section: scheduler}), a timestep sampler or a loss weighting that do
    not fit the objective: each scheduler is asked of the objective, and the sampler and the
    weighting are tried on one batch of times, with torch's RNG left as it was."""
    import torch

    name = recipe["objective"]["name"]
    for section, scheduler in schedulers.items():
        if problem := built.check_scheduler(scheduler, section):
            raise DifftoolError(f"{recipe.where(section)} scheduler '{type(scheduler).__name__}' does not fit "
                                f"objective '{name}': it {problem}")
    with torch.random.fork_rng(devices=[]):
        times = trial(recipe, "timestep_sampler", "draw", lambda: built.times(sampler, 64, "cpu"),
                      "(batch_size, num_train_timesteps, device), with num_train_timesteps None for a continuous "
                      "objective")
        low, high = (0.0, 1.0) if built.continuous else (0, built.num_train_timesteps - 1)
        if times.numel() and (times.min().item() < low or times.max().item() > high):
            raise DifftoolError(f"{recipe.where('timestep_sampler')} timestep sampler "
                                f"'{recipe['timestep_sampler']['name']}' drew times outside [{low}, {high}] for "
                                f"objective '{name}'")
        if weighting:
            trial(recipe, "loss_weighting", "batch", lambda: weighting(times, built),
                  "(times, objective) and returns one weight per sample or None")


def trial(recipe: Recipe, section: str, what: str, call, called_as: str):
    """`call()` of the component in `section`: its DifftoolError says it does not fit the
    objective, any other error that it failed (`what`: "draw" or "batch"; `called_as`: its contract)."""
    from difftool.recipe import COMPONENTS
    from difftool.registry import KINDS

    who = f"{recipe.where(section)} {KINDS[COMPONENTS[section][0]][0]} '{recipe[section]['name']}'"
    import torch

    try:
        return call()
    except DifftoolError as exc:
        raise DifftoolError(f"{who} does not fit objective '{recipe['objective']['name']}': {exc}") from exc
    except (MemoryError, torch.OutOfMemoryError):
        raise  # not a broken contract: the run's out-of-memory message names the sizes
    except Exception as exc:
        raise DifftoolError(f"{who} failed on a trial {what} ({type(exc).__name__}: {exc}); it is called as "
                            f"{called_as}") from exc


def component(recipe: Recipe, section: str):
    """The object a component section's factory returns (loss weighting, timestep sampler, ...)."""
    return recipe.entries[section].build(recipe.kwargs(section), recipe.where(section))


def ema(recipe: Recipe, built):
    """The EMA of the model's weights, or None when [ema] is not enabled."""
    from difftool.ema import EMA

    table = recipe["ema"]
    if not table["enabled"]:
        return None
    return EMA(built, decay=table["decay"], inv_gamma=table["inv_gamma"], power=table["power"],
               warmup=table["warmup"], update_every=table["update_every"], on_cpu=table["on_cpu"])


def optimizer(recipe: Recipe, built):
    """The optimizer over trainable parameters, split into the recipe's param_groups."""
    trainable = [(n, p) for n, p in built.named_parameters() if p.requires_grad]
    groups, taken = [], set()
    for i, spec in enumerate(recipe["optimizer"]["param_groups"]):
        patterns = [spec["modules"]] if isinstance(spec["modules"], str) else spec["modules"]
        members = [
            (n, p) for n, p in trainable
            if n not in taken and any(fnmatch(n, pat) or fnmatch(n, f"{pat}.*") for pat in patterns)
        ]
        if not members:
            raise DifftoolError(
                f"{recipe.path}: [[optimizer.param_groups]] #{i + 1} modules = {spec['modules']!r} matches "
                f"no trainable parameter; names look like '{trainable[0][0]}'"
            )
        taken.update(n for n, _ in members)
        groups.append({**{k: v for k, v in spec.items() if k != "modules"}, "params": [p for _, p in members]})
    rest = [p for n, p in trainable if n not in taken]
    if rest:
        groups.append({"params": rest})
    return recipe.entries["optimizer"].build(recipe.kwargs("optimizer"), recipe.where("optimizer"), params=groups)


def lr_schedule(recipe: Recipe, optim, num_training_steps: int):
    """The LR schedule over `num_training_steps` optimizer steps."""
    return recipe.entries["lr_schedule"].build(
        recipe.kwargs("lr_schedule"), recipe.where("lr_schedule"),
        optimizer=optim, num_training_steps=num_training_steps,
    )
