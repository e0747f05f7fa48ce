"""Model cards: the README.md a finished run keeps in its output folder, in the Hugging Face Hub's
format (YAML front matter, then Markdown), so that the folder can be pushed to the Hub as it is.

`build(recipe, contents)` is a pure function of the run's resolved recipe (its recipe.toml, as a
dict) and of what the run folder holds (`Contents`, which `read` gathers from disk). The engine
writes the card into the folder it publishes the model from (`write`, inside files.publish), so
the card always describes the model beside it; `difftool push` writes it for a run from before
cards (difftool.hub).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD = "README.md"
SAMPLES = "samples"
EPOCH_GRID = re.compile(r"^(\d{4,})\.png$")  # samples/{epoch:04d}.png
STEP_GRID = re.compile(r"^step-(\d+)\.png$")  # samples/step-{step:06d}.png
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # a latent model's LoRA, for load_lora_weights
# the text-to-image model kinds and the diffusers pipeline each is saved as
LATENT_PIPELINES = {"stable-diffusion": "StableDiffusionPipeline", "stable-diffusion-xl": "StableDiffusionXLPipeline",
                    "stable-diffusion-3": "StableDiffusion3Pipeline"}
# datasets' packaged builders: names `load_dataset` takes that are no Hub dataset
PACKAGED_BUILDERS = {"imagefolder", "audiofolder", "videofolder", "csv", "json", "parquet", "text", "arrow",
                     "pandas", "sql", "webdataset", "xml", "pdffolder", "niftifolder", "hdf5", "eval", "lance"}
# schedulers that want scale_model_input before each step (DDPMPipeline does not call it)
SCALED_INPUT = {"EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                "DPMSolverSDEScheduler"}
LOWER_IS_BETTER = {"swd": "SWD", "fid": "FID", "kid": "KID"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
PRECISIONS = {"no": "fp32 (no mixed precision)", "fp16": "fp16 mixed precision", "bf16": "bf16 mixed precision",
              "auto": "mixed_precision = \"auto\" (fp16 on CUDA, bf16 on a CPU with native bf16, else fp32)"}
TOO_LONG = 160  # characters of a component's settings shown in the table; recipe.toml has them all


@dataclass(frozen=True)
class Contents:
    """What the run folder holds that the card describes."""

    names: frozenset[str] = frozenset()  # the saved model's top-level files and folders
    pipeline: dict | None = None  # model_index.json, where the run saved a pipeline
    classes: list[str] | None = None  # classes.json's names, for a class-conditional run
    grid: str | None = None  # the last sample grid, relative to the run folder (samples/0009.png)
    evaluation: dict | None = None  # the last line of metrics.jsonl
    steps: int | None = None  # optimizer steps trained
    processes: int | None = None  # processes of the last training session
    local: frozenset[str] = frozenset()  # the recipe's paths (model pretrained, dataset path) found on disk
    base_card: dict = field(default_factory=dict)  # the front matter of a local base model's README.md


# reading the run folder

def read_recipe(folder: Path) -> dict:
    """The run's resolved recipe, recipe.toml, as a dict (with its [provenance] table)."""
    from difftool.errors import DifftoolError
    from difftool.files import RECIPE

    path = Path(folder) / RECIPE
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DifftoolError(f"cannot read the run's recipe {path} ({exc}); the model card is made from it") from exc


def read(run_dir: Path, recipe: dict, model_folder: Path | None = None, steps: int | None = None,
         grid: str | None = None, processes: int | None = None) -> Contents:
    """What `run_dir` holds, for its card. The model may be in `model_folder` instead (the engine's
    staging folder); `steps`, `grid` and `processes`, when given, replace what the folder says."""
    run_dir = Path(run_dir)
    model = Path(model_folder) if model_folder is not None else run_dir
    names = frozenset(p.name for p in model.iterdir()) if model.is_dir() else frozenset()
    pipeline = read_json(model / "model_index.json")
    classes = None
    if (model / "classes.json").is_file():
        from difftool.conditioning import read_names

        classes = read_names(model)
    logged_steps, logged_processes = history(run_dir)
    local, base_card = set(), {}
    pretrained = recipe.get("model", {}).get("pretrained")
    for value in (pretrained, recipe.get("dataset", {}).get("path")):
        if (found := located(value, run_dir)) is not None:
            local.add(value)
            if value == pretrained:
                base_card = front_matter(found / CARD)
    adapted = read_json(model / "adapters.json")
    if (isinstance(adapted, dict) and adapted.get("base_model_folder") and isinstance(pretrained, str)
            and isinstance(adapted.get("base_model"), dict) and adapted["base_model"].get("pretrained") == pretrained):
        local.add(pretrained)  # the adapters were saved from this base, a local folder
    return Contents(
        names=names,
        pipeline=pipeline if isinstance(pipeline, dict) else None,
        classes=classes,
        grid=grid or last_grid(run_dir),
        evaluation=last_line(run_dir / "metrics.jsonl", "values"),
        steps=steps if steps is not None else logged_steps,
        processes=processes if processes is not None else logged_processes,
        local=frozenset(local),
        base_card=base_card,
    )


def located(value: Any, run_dir: Path) -> Path | None:
    """Where a path of the recipe is on disk: as given (from the folder the run started in), else
    from a folder above the run (a card made later, from elsewhere); None where it is not."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value).expanduser()
    if path.exists():
        return path
    if not path.is_absolute():
        for parent in list(Path(run_dir).resolve().parents)[:4]:
            if (parent / path).exists():
                return parent / path
    return None


def point_to(run_dir: Path, repo_id: str, dry_run: bool = False) -> bool:
    """Make the code of a run's card load the model from the Hub repository `repo_id` instead of
    the run's output_dir, where it loads it from there (as the card the run wrote does); write
    the card unless `dry_run`. Returns whether it changes."""
    from difftool import files

    path = Path(run_dir) / CARD
    output_dir = read_recipe(run_dir).get("run", {}).get("output_dir")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if not output_dir or output_dir == repo_id or literal(output_dir) not in text:
        return False
    if not dry_run:
        files.write_text(path, text.replace(literal(output_dir), literal(repo_id)), "the model card")
    return True


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def last_grid(run_dir: Path) -> str | None:
    """The newest epoch grid in samples/ (else the newest step grid), relative to `run_dir`."""
    folder = Path(run_dir) / SAMPLES
    if not folder.is_dir():
        return None
    for pattern in (EPOCH_GRID, STEP_GRID):
        found = [(int(m.group(1)), p.name) for p in folder.iterdir() if (m := pattern.match(p.name)) and p.is_file()]
        if found:
            return f"{SAMPLES}/{max(found)[1]}"
    return None


def last_line(path: Path, key: str) -> dict | None:
    """The last whole JSON line of a log that has `key` (a line cut short by a crash is skipped)."""
    from difftool.files import json_lines

    return next((line for line in reversed(json_lines(path)) if key in line), None)


def history(run_dir: Path) -> tuple[int | None, int | None]:
    """(the last step logged, the processes of the last session) from logs/history.jsonl."""
    from difftool.files import json_lines
    from difftool.history import FILE

    steps = processes = None
    for value in json_lines(Path(run_dir) / FILE):
        if value.get("event") == "start":
            processes = value.get("num_processes")
        elif isinstance(value.get("step"), int):
            steps = value["step"]
    return steps, processes


def front_matter(path: Path) -> dict:
    """The YAML front matter of a model card (empty when there is none or it does not parse)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    found = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.S)
    if not found:
        return {}
    try:
        import yaml

        data = yaml.safe_load(found.group(1))
    except Exception:  # no PyYAML, or YAML it cannot read: no metadata to take over
        return {}
    return data if isinstance(data, dict) else {}


def epoch_grid(recipe: dict, epoch: int, step: int) -> str | None:
    """The grid the engine saves right after the model at this epoch's end, when it saves one:
    every run.save_image_epochs, and at the last epoch (the last one of num_epochs, or the one
    reaching max_steps)."""
    run = recipe.get("run", {})
    last = epoch >= run.get("num_epochs", 1) - 1 or (run.get("max_steps") is not None and step >= run["max_steps"])
    if (epoch + 1) % run.get("save_image_epochs", 10) == 0 or last:
        return f"{SAMPLES}/{epoch:04d}.png"
    return None


def write(folder: Path, state) -> None:
    """Write the card into `folder`, where the engine is saving the model it publishes into
    state.output_dir (after the model and recipe.toml are in `folder`). The sample grid it
    links to is the one saved right after the model, from the same weights; at an epoch without
    one, the newest earlier grid. A card that cannot be made (a bug) is reported and left out,
    so that it never costs the model; one that cannot be written fails like any other file."""
    from difftool import files

    try:
        recipe = read_recipe(folder)
        grid = epoch_grid(recipe, state.epoch, state.global_step)
        contents = read(state.output_dir, recipe, model_folder=folder, steps=state.global_step, grid=grid,
                        processes=state.accelerator.num_processes)
        text = build(recipe, contents)
    except Exception as exc:  # noqa: BLE001 (the model matters more than its card)
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True).print(f"[yellow]the model card could not be made ({escape(type(exc).__name__)}: "
                                   f"{escape(str(exc))}); the model is saved without README.md, and "
                                   "`difftool push` writes one[/]", highlight=False)
        return
    files.write_text(Path(folder) / CARD, text, "the model card")


def write_missing(run_dir: Path, repo_id: str | None = None, dry_run: bool = False) -> str | None:
    """Make the card of a finished run that has none (a run from before cards); write it unless
    `dry_run`. Returns its text, or None when the run has one."""
    from difftool import files

    if (Path(run_dir) / CARD).exists():
        return None
    recipe = read_recipe(run_dir)
    text = build(recipe, read(run_dir, recipe), repo_id)
    if not dry_run:
        files.write_text(Path(run_dir) / CARD, text, "the model card")
    return text


# building the card

def build(recipe: dict, contents: Contents, repo_id: str | None = None) -> str:
    """The model card: YAML front matter (Hub metadata), then what was trained and how, the last
    sample grid, the last evaluation, the classes, and how to load the model. `repo_id` is where
    the code loads it from (default: the run's output_dir)."""
    return f"---\n{yaml_text(metadata(recipe, contents))}---\n\n{body(recipe, contents, repo_id)}"


def kind(recipe: dict, contents: Contents) -> str:
    """'text-to-image', 'class-conditional' or 'unconditional'."""
    if text_to_image(recipe, contents):
        return "text-to-image"
    if contents.classes is not None or recipe.get("dataset", {}).get("label_column"):
        return "class-conditional"
    return "unconditional"


def text_to_image(recipe: dict, contents: Contents) -> bool:
    pipeline = (contents.pipeline or {}).get("_class_name")
    return (recipe.get("model", {}).get("name") in LATENT_PIPELINES or LORA_WEIGHTS in contents.names
            or (pipeline is not None and pipeline != "DDPMPipeline"))


def hub_id(value: Any, local: frozenset[str]) -> str | None:
    """`value` where it names something on the Hub (owner/name, or a legacy name), else None:
    local folders, absolute or relative paths, and datasets' packaged builders are no hub ids."""
    if not isinstance(value, str) or value in local or value in PACKAGED_BUILDERS:
        return None
    if not HUB_ID.match(value) or ".." in value or "--" in value or value.endswith((".", "-")):
        return None
    return value


def metadata(recipe: dict, contents: Contents) -> dict:
    """The card's front matter, as the Hub reads it."""
    model, dataset = recipe.get("model", {}), recipe.get("dataset", {})
    task = kind(recipe, contents)
    tags = ["diffusers", "difftool"]
    tags.append({"text-to-image": "text-to-image", "class-conditional": "class-conditional"}.get(
        task, "unconditional-image-generation"))
    if model.get("name") in LATENT_PIPELINES:
        tags.append(model["name"])
    if recipe.get("objective", {}).get("name") == "flow-matching":
        tags.append("flow-matching")
    for adapter in recipe.get("adapters", []):
        tag = "lora" if "lora" in str(adapter.get("name", "")) else str(adapter.get("name", ""))
        if tag and tag not in tags:
            tags.append(tag)
    data: dict[str, Any] = {"library_name": "diffusers"}
    if task != "class-conditional":  # the Hub has no task for it
        data["pipeline_tag"] = "text-to-image" if task == "text-to-image" else "unconditional-image-generation"
    license_ = contents.base_card.get("license")  # a fine-tune or adapter carries its base's license
    if isinstance(license_, str) and license_:
        data["license"] = license_
        for key in ("license_name", "license_link"):
            if isinstance(contents.base_card.get(key), str):
                data[key] = contents.base_card[key]
    if base := hub_id(model.get("pretrained"), contents.local):
        data["base_model"] = base
    if dataset.get("name") == "huggingface" and (name := hub_id(dataset.get("path"), contents.local)):
        data["datasets"] = [name]
    data["tags"] = tags
    return data


def yaml_text(data: dict) -> str:
    """The front matter as YAML: huggingface_hub's ModelCardData where it is installed (it is a
    dependency of diffusers), else plain YAML with every string quoted."""
    try:
        from huggingface_hub import ModelCardData
    except ImportError:
        return plain_yaml(data)
    return ModelCardData(**data).to_yaml() + "\n"


def plain_yaml(data: dict) -> str:
    """Strings and lists of strings as YAML (JSON's quoted strings are YAML's too)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(str(item))}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(str(value))}")
    return "\n".join(lines) + "\n"


def body(recipe: dict, contents: Contents, repo_id: str | None) -> str:
    run = recipe.get("run", {})
    title = repo_id.split("/")[-1] if repo_id else Path(run.get("output_dir", "model")).name or "model"
    where = repo_id or run.get("output_dir", ".")
    parts = [f"# {title}\n", summary(recipe, contents) + "\n"]
    if contents.grid:
        parts.append(samples(recipe, contents))
    parts.append(training(recipe, contents))
    if contents.evaluation:
        parts.append(evaluation(recipe, contents.evaluation))
    if contents.classes:
        parts.append("## Classes\n\n" + "The model draws these classes, by label (`classes.json`):\n\n"
                     + "| label | class |\n|---|---|\n"
                     + "".join(f"| {i} | {cell(name)} |\n" for i, name in enumerate(contents.classes))
                     + f"| {len(contents.classes)} | (the null class of classifier-free guidance) |\n")
    parts.append(usage(recipe, contents, where))
    parts.append("The full resolved recipe, with the versions of the libraries that trained the model, is "
                 "[recipe.toml](recipe.toml). This card was written by difftool from it; edit it as you like.\n")
    return "\n".join(parts)


def summary(recipe: dict, contents: Contents) -> str:
    model = recipe.get("model", {})
    task = kind(recipe, contents)
    what = {"text-to-image": "A text-to-image diffusion model", "class-conditional": "A class-conditional diffusion "
            "model", "unconditional": "An unconditional image-generation diffusion model"}[task]
    base = model.get("pretrained")
    adapters = [a.get("name") for a in recipe.get("adapters", [])]
    if adapters:
        how = f"{names(adapters)} adapter{'s' if len(adapters) > 1 else ''} for `{base or model.get('name')}`"
        what = f"{what}: {how}"
    elif base:
        what = f"{what}, fine-tuned from `{base}`"
    return f"{what}, trained with difftool ({objective_name(recipe)}, {dataset_name(recipe)})."


def names(items: list) -> str:
    return ", ".join(f"`{item}`" for item in items)


def objective_name(recipe: dict) -> str:
    name = recipe.get("objective", {}).get("name", "ddpm")
    return {"ddpm": "DDPM", "flow-matching": "flow matching"}.get(name, f"the `{name}` objective")


def dataset_name(recipe: dict) -> str:
    dataset = recipe.get("dataset", {})
    return f"on `{dataset.get('path', dataset.get('name', '?'))}` at {dataset.get('image_size', '?')} px"


def settings(recipe: dict, section: str, table: dict | None = None) -> dict:
    """The keys of a component table that go to its factory (not the engine's)."""
    from difftool.recipe import SCHEMA

    table = recipe.get(section, {}) if table is None else table
    return {k: v for k, v in table.items() if k not in SCHEMA.get(section, {})}


def inline(values: dict) -> str:
    """Settings as `key = value` (JSON values), cut short where long."""
    shown = ", ".join(f"{key} = {json.dumps(value, default=str)}" for key, value in values.items())
    return shown if len(shown) <= TOO_LONG else shown[:TOO_LONG].rsplit(",", 1)[0] + ", ... (see recipe.toml)"


def component(name: Any, values: dict) -> str:
    return f"`{name}`" + (f" ({cell(inline(values))})" if values else "")


def cell(text: Any) -> str:
    """Text for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def training(recipe: dict, contents: Contents) -> str:
    """The table of what was trained and how, from the resolved recipe."""
    run, dataset, model = recipe.get("run", {}), recipe.get("dataset", {}), recipe.get("model", {})
    rows = []
    kwargs = {k: v for k, v in settings(recipe, "model").items() if k != "pretrained"}
    described = component(model.get("name"), kwargs)
    if model.get("pretrained"):
        local = " (a local folder)" if model["pretrained"] in contents.local else ""
        described += f", from `{cell(model['pretrained'])}`{local}"
    rows.append(("Model", described))
    for adapter in recipe.get("adapters", []):
        rows.append(("Adapter", component(adapter.get("name"), settings(recipe, "adapters", adapter))
                     + "; only its weights were trained, the base model stayed frozen"))
    objective = recipe.get("objective", {})
    trained = [f"{objective_name(recipe)}, {objective.get('loss', 'mse')} loss"]
    prediction = recipe.get("noise_scheduler", {}).get("prediction_type")
    if prediction:
        trained.append(f"{prediction} prediction")
    weighting = recipe.get("loss_weighting", {})
    if weighting.get("name", "none") != "none":
        trained.append(f"{component(weighting['name'], settings(recipe, 'loss_weighting'))} loss weighting")
    sampler = recipe.get("timestep_sampler", {})
    if sampler.get("name", "uniform") != "uniform":
        trained.append(f"{component(sampler['name'], settings(recipe, 'timestep_sampler'))} timesteps")
    if objective.get("noise_offset"):
        trained.append(f"noise offset {objective['noise_offset']}")
    rows.append(("Objective", ", ".join(trained)))
    noise = recipe.get("noise_scheduler", {})
    rows.append(("Noise scheduler", component(noise.get("name"), settings(recipe, "noise_scheduler"))))
    data = component(dataset.get("name"), settings(recipe, "dataset"))
    if dataset.get("label_column"):
        data += f"; classes from its `{dataset['label_column']}` column"
        if dataset.get("label_dropout"):
            data += f", {dataset['label_dropout']:g} of the labels dropped (for guidance)"
    if text_to_image(recipe, contents):
        data += f"; captions from its `{dataset.get('caption_column', 'text')}` column"
        if dataset.get("caption_dropout"):
            data += f", {dataset['caption_dropout']:g} of them dropped"
    rows.append(("Data", data))
    crop = "random crops" if dataset.get("random_crop") else "centre-cropped"
    prepared = crop if dataset.get("center_crop") or dataset.get("random_crop") else "resized"
    flip = ", random horizontal flips" if dataset.get("random_flip", True) else ""
    size = dataset.get("image_size", "?")
    if dataset.get("buckets"):
        shown = (f"aspect-ratio buckets of about {size}² px, sides in steps of {dataset.get('bucket_step', 64)} px "
                 f"({'random crops' if dataset.get('random_crop') else 'centre-cropped'}{flip})")
    else:
        shown = f"{size} px ({prepared}{flip})"
    rows.append(("Image size", shown))
    limits = [f"num_epochs = {run.get('num_epochs', 1)}"] + (
        [f"max_steps = {run['max_steps']}"] if run.get("max_steps") else [])
    steps = (f"{contents.steps} optimizer step{'' if contents.steps == 1 else 's'}" if contents.steps is not None
             else "optimizer steps")
    rows.append(("Steps", f"{steps} ({', '.join(limits)})"))
    accumulation, processes = run.get("gradient_accumulation_steps", 1), contents.processes or 1
    batch = f"{dataset.get('batch_size', '?')} images"
    if accumulation > 1 or processes > 1:
        total = dataset.get("batch_size", 0) * accumulation * processes
        batch += (f" x {accumulation} accumulation steps" if accumulation > 1 else "") + (
            f" x {processes} processes" if processes > 1 else "") + f" = {total} per optimizer step"
    rows.append(("Batch", batch))
    optimizer = recipe.get("optimizer", {})
    described = component(optimizer.get("name"), settings(recipe, "optimizer"))
    if optimizer.get("param_groups"):
        described += f", {len(optimizer['param_groups'])} parameter groups with their own settings"
    schedule = recipe.get("lr_schedule", {})
    rows.append(("Optimizer", f"{described}; learning-rate schedule "
                 f"{component(schedule.get('name'), settings(recipe, 'lr_schedule'))}"))
    clip = run.get("max_grad_norm", 1.0)
    rows.append(("Precision", PRECISIONS.get(run.get("mixed_precision", "no"), str(run.get("mixed_precision")))
                 + (f"; gradients clipped to norm {clip:g}" if clip else "")))
    ema = recipe.get("ema", {})
    if ema.get("enabled"):
        decay = ema.get("decay", 0.9999)
        rows.append(("EMA", f"the saved weights are an EMA of the trained ones (decay up to {decay})"))
    rows.append(("Seed", str(run.get("seed", 0))))
    versions = recipe.get("provenance", {}).get("versions", {})
    if versions:
        rows.append(("Libraries", ", ".join(f"{name} {version}" for name, version in versions.items())))
    return ("## Training\n\n| | |\n|---|---|\n" + "".join(f"| {name} | {value} |\n" for name, value in rows))


def samples(recipe: dict, contents: Contents) -> str:
    """The last sample grid, and how it was drawn."""
    name = Path(contents.grid).name
    if found := EPOCH_GRID.match(name):
        when = f"after epoch {int(found.group(1)) + 1}"
    elif found := STEP_GRID.match(name):
        when = f"at step {int(found.group(1))}"
    else:
        when = "last"
    sampling = recipe.get("sampling", {})
    how = f"{sampling.get('scheduler', 'the run scheduler')}"
    if sampling.get("num_inference_steps"):
        how += f", {sampling['num_inference_steps']} steps"
    task = kind(recipe, contents)
    if task == "class-conditional" and contents.classes:
        shown = sampling.get("classes") or contents.classes
        how += f"; one row per class: {', '.join(shown)}"
    elif task == "text-to-image":
        prompts = sampling.get("prompts") or [""]
        how += "; prompts: " + "; ".join(f'"{p}"' for p in prompts)
    return f"![Samples {when}]({contents.grid})\n\n*Samples {when} ({cell(how)}).*\n"


def evaluation(recipe: dict, last: dict) -> str:
    """The metrics of the last evaluation during training."""
    values = last.get("values") or {}
    table = "".join(f"| {cell(name)} | {format_value(value)} |\n" for name, value in values.items())
    reference = recipe.get("evaluation", {}).get("reference") or "the training data"
    notes = [label for key, label in LOWER_IS_BETTER.items() if any(n.split("_")[0] == key for n in values)]
    better = f" {', '.join(notes)}: lower is better." if notes else ""
    if any(name.startswith("clip") for name in values):
        better += " CLIP score: higher is better."
    return (f"## Evaluation\n\nThe last evaluation during training (`metrics.jsonl`), at step {last.get('step', '?')}: "
            f"{last.get('num_samples', '?')} samples against {cell(reference)}.{better}\n\n"
            f"| metric | value |\n|---|---|\n{table}")


def format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def usage(recipe: dict, contents: Contents, where: str) -> str:
    """How to load and run the model with diffusers (or difftool, where diffusers alone cannot)."""
    model, sampling = recipe.get("model", {}), recipe.get("sampling", {})
    pipeline = (contents.pipeline or {}).get("_class_name")
    folder = Path(recipe.get("run", {}).get("output_dir", "run")).name or "run"
    local = where if where == recipe.get("run", {}).get("output_dir") else folder
    download = "" if local == where else f"`hf download {where} --local-dir {local}`, then "
    difftool = (f"With difftool installed, {download}`difftool sample {local}` draws a grid from the run "
                "folder with any registered scheduler (`--scheduler`, `--steps`).")
    if text_to_image(recipe, contents):
        return "## Use\n\n" + text_to_image_code(recipe, contents, where, pipeline) + "\n" + difftool + "\n"
    if pipeline is None:  # the adapters alone, for a pixel-space base model
        base = model.get("pretrained") or "the base model"
        return ("## Use\n\n"
                f"This folder holds the adapters alone (`adapters/`, `adapters.json`), for the base model `{base}`. "
                "diffusers cannot load them onto a pixel-space UNet by itself: use difftool, with the plugin "
                f"that gives the adapter installed: {download}`difftool sample {local}`, which loads the base model "
                "and the adapters. Train with `run.fuse_adapters = true` to also save a plain diffusers pipeline "
                "with the adapters merged in.\n")
    steps = sampling.get("num_inference_steps") or recipe.get("noise_scheduler", {}).get("num_train_timesteps")
    scheduler = scheduler_class(recipe)
    fused = " (the adapters merged into the base model)" if recipe.get("adapters") else ""
    if kind(recipe, contents) == "class-conditional" or model.get("name") == "dit":
        labels = "" if contents.classes else " (class 0 for every image of this unconditional DiT)"
        return ("## Use\n\n" + f"The folder is a diffusers `{pipeline}`{fused}. Its denoiser takes class "
                f"labels{labels}, which `DDPMPipeline` does not pass, so sample it with a loop of your own:\n\n"
                + guided_code(recipe, contents, where, scheduler, steps) + "\n" + difftool + "\n")
    swap = ""
    if scheduler and scheduler not in SCALED_INPUT:
        extra = "".join(f", {key}={literal(value)}" for key, value in settings(recipe, "sampling").items())
        swap = f"pipeline.scheduler = {scheduler}.from_config(pipeline.scheduler.config{extra})  # the run's sampler\n"
    imports = "DDPMPipeline" + (f", {scheduler}" if swap else "")
    code = (f"import torch\nfrom diffusers import {imports}\n\n"
            f"pipeline = DDPMPipeline.from_pretrained({literal(where)})\n{swap}"
            f"images = pipeline(batch_size=4, num_inference_steps={steps or 50}, "
            "generator=torch.manual_seed(0)).images\n")
    return (f"## Use\n\nThe folder is a diffusers `{pipeline}`{fused}:\n\n```python\n{code}```\n\n{difftool}\n")


def literal(value: Any) -> str:
    """A Python literal of a recipe value (strings, and lists of them, in double quotes)."""
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return json.dumps(value)
    return repr(value)


def scheduler_class(recipe: dict) -> str | None:
    """The diffusers class of the run's [sampling] scheduler, where it is a built-in one."""
    from difftool.builtins import FLOW_SCHEDULERS, SCHEDULERS

    name = recipe.get("sampling", {}).get("scheduler") or recipe.get("noise_scheduler", {}).get("name")
    found = {**SCHEDULERS, **FLOW_SCHEDULERS}.get(name)
    return found[0] if found else None


def guided_code(recipe: dict, contents: Contents, where: str, scheduler: str | None, steps: int | None) -> str:
    """A sampling loop for a pixel-space model that takes class labels, with guidance."""
    from difftool.conditioning import guidance

    classes = contents.classes
    dataset, sampling = recipe.get("dataset", {}), recipe.get("sampling", {})
    size = dataset.get("image_size", 32)
    if classes:
        chosen = (sampling.get("classes") or classes)[0]
        scale = guidance(sampling.get("guidance_scale"), False, bool(dataset.get("label_dropout")))
        labels = (f"classes = {literal(classes)}\nlabels = torch.tensor([classes.index({literal(chosen)})] * 4)\n"
                  "null = torch.full_like(labels, len(classes))  # the null class\n"
                  f"scale = {scale:g}  # classifier-free guidance\n")
    else:  # an unconditional DiT: every image is class 0
        scale = 1.0
        labels = "labels = torch.zeros(4, dtype=torch.long)  # an unconditional model: class 0\n"
    extra = "".join(f", {key}={literal(value)}" for key, value in settings(recipe, "sampling").items())
    use = (f"scheduler = {scheduler}.from_config(pipeline.scheduler.config{extra})\n" if scheduler else
           "scheduler = pipeline.scheduler\n")
    saved = (contents.pipeline or {}).get("scheduler")
    saved_class = saved[1] if isinstance(saved, list) and len(saved) == 2 and isinstance(saved[1], str) else ""
    flow = (scheduler or saved_class).startswith("FlowMatch")
    noise = "" if flow else " * scheduler.init_noise_sigma"  # flow-match schedulers start from unit noise
    scaled = "sample" if flow else "scheduler.scale_model_input(sample, t)"
    imports = "DDPMPipeline" + (f", {scheduler}" if scheduler else "")
    if scale != 1.0:
        predict = ("        both = model(torch.cat([x, x]), t.expand(2 * len(labels)),\n"
                   "                     class_labels=torch.cat([labels, null])).sample\n"
                   "        conditional, unconditional = both.chunk(2)\n"
                   "        prediction = unconditional + scale * (conditional - unconditional)\n")
    else:
        predict = "        prediction = model(x, t.expand(len(labels)), class_labels=labels).sample\n"
    return ("```python\nimport torch\n"
            f"from diffusers import {imports}\n\n"
            f"pipeline = DDPMPipeline.from_pretrained({literal(where)})\n"
            f"model = pipeline.unet\n{use}{labels}"
            f"scheduler.set_timesteps({steps or 50})\n"
            f"sample = torch.randn(len(labels), model.config.in_channels, {size}, {size}, "
            f"generator=torch.manual_seed(0)){noise}\n"
            "for t in scheduler.timesteps:\n"
            f"    x = {scaled}\n"
            "    with torch.no_grad():\n"
            f"{predict}"
            "    sample = scheduler.step(prediction, t, sample).prev_sample\n"
            "images = (sample / 2 + 0.5).clamp(0, 1)  # (batch, 3, height, width) in [0, 1]\n```\n")


def text_to_image_code(recipe: dict, contents: Contents, where: str, pipeline: str | None) -> str:
    """Loading a text-to-image run: its pipeline, or the base pipeline and its LoRA."""
    model, sampling = recipe.get("model", {}), recipe.get("sampling", {})
    prompt = (sampling.get("prompts") or ["a photo"])[0] or "a photo"
    scale = sampling.get("guidance_scale")
    options = [f"negative_prompt={literal(sampling['negative_prompt'])}"] if sampling.get("negative_prompt") else []
    options.append(f"guidance_scale={scale if scale is not None else 7.5:g}")
    if sampling.get("num_inference_steps"):
        options.append(f"num_inference_steps={sampling['num_inference_steps']}")
    size = recipe.get("dataset", {}).get("image_size")
    if size:
        options.append(f"height={size}, width={size}")  # the size it was trained at
    call = f"image = pipeline({literal(prompt)}, {', '.join(options)}).images[0]\n"
    scheduler = scheduler_class(recipe)
    if scheduler:
        extra = "".join(f", {key}={literal(value)}" for key, value in settings(recipe, "sampling").items())
        call = (f"pipeline.scheduler = {scheduler}.from_config(pipeline.scheduler.config{extra})  # the run's sampler\n"
                + call)
    if pipeline is not None:  # a full fine-tune, or adapters fused
        components = contents.pipeline or {}
        without_t5 = components.get("text_encoder_3") in ([None, None], None) and "StableDiffusion3" in pipeline
        extra = ", text_encoder_3=None, tokenizer_3=None" if without_t5 else ""
        load = f"pipeline = {pipeline}.from_pretrained({literal(where)}{extra})\n"
        text = f"The folder is a diffusers `{pipeline}`:\n\n"
        cls = pipeline
    elif LORA_WEIGHTS not in contents.names:  # adapters diffusers cannot load (LoHa, LoKr, OFT)
        names = ", ".join(f"`{a.get('name')}`" for a in recipe.get("adapters", []))
        return (f"The folder holds adapters ({names}) in peft's layout, under `adapters/`, for the base "
                f"pipeline `{model.get('pretrained', 'BASE_MODEL')}`. diffusers' `load_lora_weights` reads LoRA "
                "only: sample with `difftool sample`, or train with `run.fuse_adapters = true` to save a "
                "pipeline with them merged in.\n")
    else:
        cls = LATENT_PIPELINES.get(model.get("name"), "DiffusionPipeline")
        base = model.get("pretrained", "BASE_MODEL")
        load = f"pipeline = {cls}.from_pretrained({literal(base)})\npipeline.load_lora_weights({literal(where)})\n"
        text = (f"The folder holds a LoRA (`{LORA_WEIGHTS}`) for the base pipeline `{base}`, which "
                "diffusers loads onto it (peft must be installed):\n\n")
    imports = cls + (f", {scheduler}" if scheduler and scheduler != cls else "")
    return f"{text}```python\nfrom diffusers import {imports}\n\n{load}{call}```\n"
