"""TOML recipes: read, override from the command line, validate, resolve components, write back.

Each section has engine keys (typed, with defaults, listed in SCHEMA); the other keys of a
component section are the keyword arguments of the factory it names, checked against the
factory's signature before anything heavy runs.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftool.errors import DifftoolError
from difftool.registry import Entry, suggest

REQUIRED = object()
POSITIVE, NON_NEGATIVE, FRACTION, UNIT = "a positive integer", "zero or more", "a fraction in [0, 1)", "a number in [0, 1]"
MAX_SEED = 2**32 - 1  # numpy's seed range, which Accelerate's set_seed needs
SEED = f"an integer from 0 to {MAX_SEED} (2**32 - 1)"
FOLDER = "a folder, e.g. runs/my-run"
STRINGS = "a list of strings"
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}

# section -> key -> (type, default, constraint); `name`-like keys pick the component.
SCHEMA: dict[str, dict[str, tuple]] = {
    "run": {
        "output_dir": (str, REQUIRED, FOLDER),
        "seed": (int, 0, SEED),
        "num_epochs": (int, 1, POSITIVE),
        "max_steps": (int, None, POSITIVE),
        "gradient_accumulation_steps": (int, 1, POSITIVE),
        "mixed_precision": (str, "no", ("no", "fp16", "bf16", "auto")),
        "max_grad_norm": (float, 1.0, NON_NEGATIVE),
        "save_image_epochs": (int, 10, POSITIVE),
        "save_model_epochs": (int, 30, POSITIVE),
        "log_with": (str, "tensorboard", ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "none")),
        "overwrite_output_dir": (bool, False, None),
        "checkpointing_steps": (int, None, POSITIVE),
        "checkpoints_total_limit": (int, None, POSITIVE),
        "resume_from_checkpoint": (str, None, None),
        "max_nonfinite_steps": (int, 10, POSITIVE),
        "fuse_adapters": (bool, False, None),
        "gradient_checkpointing": (bool, False, None),  # the denoiser recomputes activations in backward
        "compile": (bool, False, None),  # torch.compile of the model for training steps
        "allow_tf32": (bool, False, None),  # fp32 matmuls in TF32 where the hardware has it (CUDA, Ampere on)
    },
    "dataset": {
        "name": (str, REQUIRED, None),
        "image_size": (int, 128, POSITIVE),
        "batch_size": (int, 16, POSITIVE),
        "random_flip": (bool, True, None),
        "num_workers": (int, 0, NON_NEGATIVE),
        "cache": (bool, True, None),
        "center_crop": (bool, False, None),
        "random_crop": (bool, False, None),  # crop at a random offset (drawn from seed, epoch and row) instead
        "buckets": (bool, False, None),  # aspect-ratio buckets of about image_size² pixels (difftool.buckets)
        "bucket_step": (int, 64, POSITIVE),  # bucket sides are multiples of it
        "bucket_min": (int, None, POSITIVE),  # smallest bucket side (default image_size / 2)
        "bucket_max": (int, None, POSITIVE),  # largest bucket side (default image_size * 2)
        "caption_column": (str, "text", None),
        "caption_dropout": (float, 0.0, FRACTION),
        "shuffle_tags": (bool, False, None),  # training captions' comma-separated tags in a random order
        "keep_tags": (int, 0, NON_NEGATIVE),  # leading tags shuffle_tags leaves in place
        "latent_cache_dir": (str, None, None),
        "label_column": (str, None, None),
        "label_dropout": (float, 0.0, FRACTION),
    },
    "model": {"name": (str, "unet2d", None)},
    "noise_scheduler": {"name": (str, "ddpm", None)},
    "optimizer": {"name": (str, "adamw", None), "param_groups": (list, [], None)},
    "lr_schedule": {"name": (str, "constant", None)},
    "sampling": {
        "scheduler": (str, None, None),
        "num_inference_steps": (int, None, POSITIVE),
        "num_images": (int, 16, POSITIVE),
        "seed": (int, None, SEED),
        "prompts": (list, [], STRINGS),
        "negative_prompt": (str, "", None),
        "guidance_scale": (float, None, NON_NEGATIVE),  # 7.5 for text-to-image, 4.0 for classes
        "classes": (list, [], STRINGS),
        "every_n_steps": (int, None, POSITIVE),
    },
    "objective": {
        "name": (str, "ddpm", None),
        "loss": (str, "mse", ("mse", "l1", "huber")),
        "huber_delta": (float, 1.0, NON_NEGATIVE),
        "noise_offset": (float, 0.0, NON_NEGATIVE),
    },
    "loss_weighting": {"name": (str, "none", None)},
    "timestep_sampler": {"name": (str, "uniform", None)},
    "ema": {
        "enabled": (bool, False, None),
        "decay": (float, 0.9999, UNIT),
        "inv_gamma": (float, 1.0, NON_NEGATIVE),
        "power": (float, 2 / 3, NON_NEGATIVE),
        "warmup": (bool, False, None),
        "update_every": (int, 1, POSITIVE),
        "on_cpu": (bool, False, None),
    },
    "validation": {
        "every_n_steps": (int, None, POSITIVE),
        "num_batches": (int, 4, POSITIVE),
        "fraction": (float, 0.1, FRACTION),
        "split": (str, None, None),
    },
    "evaluation": {
        "metrics": (list, ["swd"], STRINGS),
        "every_n_steps": (int, None, POSITIVE),
        "num_samples": (int, 256, POSITIVE),
        "batch_size": (int, None, POSITIVE),
        "scheduler": (str, None, None),
        "num_inference_steps": (int, None, POSITIVE),
        "seed": (int, 0, SEED),
        "reference": (str, None, None),
    },
    "attention": {"processor": (str, REQUIRED, None), "layers": (str, "*", None)},
    "adapters": {"name": (str, REQUIRED, None)},
}
OPTIONAL_SECTIONS = {"attention", "adapters"}
PROVENANCE = "provenance"  # written into output_dir/recipe.toml, ignored when read
# section -> (registry kind, key naming the component); extra keys go to its factory
COMPONENTS = {
    "dataset": ("datasets", "name"),
    "model": ("models", "name"),
    "noise_scheduler": ("schedulers", "name"),
    "optimizer": ("optimizers", "name"),
    "lr_schedule": ("lr_schedules", "name"),
    "sampling": ("schedulers", "scheduler"),
    "loss_weighting": ("loss_weightings", "name"),
    "timestep_sampler": ("timestep_samplers", "name"),
    "objective": ("objectives", "name"),
    "attention": ("attention_processors", "processor"),
    "adapters": ("adapters", "name"),
}


@dataclass
class Recipe:
    """A validated recipe: its file, its tables with defaults filled in, its resolved components."""

    path: str
    data: dict[str, Any]
    entries: dict[str, Entry] = field(default_factory=dict)  # section (adapters.N) -> entry

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.data[section]

    def kwargs(self, section: str, table: dict | None = None) -> dict[str, Any]:
        """The keys of a component table that go to its factory."""
        table = self.data[section] if table is None else table
        return {k: v for k, v in table.items() if k not in SCHEMA[base(section)]}

    def where(self, section: str) -> str:
        """How messages name a section of this recipe."""
        return f"{self.path}: [{section}]"


def base(section: str) -> str:
    """The schema section of a table name: 'adapters.0' -> 'adapters'."""
    return section.split(".")[0]


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value parsed as TOML, or the raw text if it is not TOML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise DifftoolError(f"--set '{text}': expected SECTION.KEY=VALUE, e.g. --set run.max_steps=20")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def read_text(path: str | Path) -> str:
    """The recipe file's text: UTF-8 (a byte-order mark is allowed), as TOML requires."""
    file = Path(path)
    if file.is_dir():
        found = sorted(p.name for p in file.glob("*.toml") if p.is_file())
        hint = (f"give one of its recipes, e.g. {', '.join(str(file / n) for n in found[:3])}"
                if found else "it holds no .toml files; give a recipe file, e.g. recipes/quickstart.toml")
        raise DifftoolError(f"recipe {path} is a folder, not a file; {hint}")
    if not file.is_file():
        raise DifftoolError(f"recipe file not found: {path} (recipes/ holds examples, e.g. recipes/quickstart.toml)")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise DifftoolError(f"cannot read the recipe {path}: {exc.strerror or exc}") from exc
    bom = b"\xef\xbb\xbf" if raw.startswith(b"\xef\xbb\xbf") else b""
    try:
        return raw[len(bom):].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = len(bom) + exc.start
        line = raw[:offset].count(b"\n") + 1
        raise DifftoolError(
            f"{path} is not UTF-8 text: byte {offset} (line {line}) is {raw[offset:offset + 1]!r}; TOML "
            "recipes must be UTF-8, so save it as UTF-8 (from your editor, or `iconv -f latin1 -t utf-8`)"
        ) from exc


def read(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The recipe file's tables with the --set overrides applied."""
    try:
        data = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise DifftoolError(f"{path}: invalid TOML: {exc}") from exc
    for text in overrides:
        override(data, text)
    return data


def override(data: dict[str, Any], text: str) -> None:
    """Apply one --set SECTION.KEY=VALUE; a number picks a table of an array of tables
    (--set adapters.0.r=8)."""
    keys, value = parse_override(text)
    table: Any = data
    for depth, key in enumerate(keys):
        if isinstance(table, list):
            key = index(table, keys, depth, text)
        elif not isinstance(table, dict):
            raise DifftoolError(f"--set '{text}': '{'.'.join(keys[:depth])}' is not a table")
        if depth == len(keys) - 1:
            table[key] = value
        else:
            table = table.setdefault(key, {}) if isinstance(table, dict) else table[key]


def index(tables: list, keys: list[str], depth: int, text: str) -> int:
    """The position keys[depth] names in the array of tables keys[:depth]."""
    key, name = keys[depth], ".".join(keys[:depth])
    if key.isascii() and key.isdigit() and int(key) < len(tables):
        return int(key)
    if not tables:
        raise DifftoolError(f"--set '{text}': '{name}' is an empty array; add its first table to the recipe")
    rest = ".".join(keys[depth + 1:] if key.isdigit() else keys[depth:])
    raise DifftoolError(f"--set '{text}': '{name}' is an array of {len(tables)} table(s); pick one by its "
                        f"index, e.g. {name}.0{'.' + rest if rest else ''}")


def check_value(section: str, key: str, value: Any, spec: tuple) -> str | None:
    """A problem with one engine key's value, or None."""
    kind, _, constraint = spec
    type_ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        type_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not type_ok:
        return f"[{section}] {key} = {value!r} must be {TYPE_NAMES[kind]}"
    if constraint == STRINGS and not all(isinstance(item, str) for item in value):
        return f"[{section}] {key} = {value!r} must be {constraint}"
    if constraint == FOLDER and not value.strip():
        return f"[{section}] {key} = {value!r} must name {constraint}"
    if constraint == SEED and not 0 <= value <= MAX_SEED:
        return f"[{section}] {key} = {value!r} must be {constraint}"
    if isinstance(constraint, tuple) and value not in constraint:
        return f"[{section}] {key} = {value!r} must be one of {', '.join(map(repr, constraint))}{suggest(str(value), constraint)}"
    if (constraint == POSITIVE and value < 1 or constraint == NON_NEGATIVE and value < 0
            or constraint == FRACTION and not 0 <= value < 1 or constraint == UNIT and not 0 <= value <= 1):
        return f"[{section}] {key} = {value!r} must be {constraint}"
    return None


def fill_section(section: str, table: Any, problems: list[str]) -> dict[str, Any]:
    """The table with defaults added, its engine keys' types and values checked."""
    if not isinstance(table, dict):
        problems.append(f"[{section}] must be a table, not {type(table).__name__}")
        return {}
    filled = dict(table)
    schema = SCHEMA[base(section)]
    if base(section) not in COMPONENTS:  # component sections' other keys are checked by their factory
        # [evaluation]'s sub-tables ([evaluation.fid]) configure its metrics: check_evaluation
        sub_tables = section == "evaluation"
        problems += [f"[{section}] unknown key '{k}'{suggest(k, schema)}" for k in table
                     if k not in schema and not (sub_tables and isinstance(table[k], dict))]
    for key, spec in schema.items():
        if key not in table:
            if spec[1] is REQUIRED:
                problems.append(f"[{section}] missing required key '{key}'")
            else:
                filled[key] = spec[1]
        elif problem := check_value(section, key, table[key], spec):
            problems.append(problem)
    return filled


def validate(data: dict[str, Any], path: str) -> Recipe:
    """Check every section and key, fill defaults and resolve every named component."""
    from difftool.plugins import registry

    problems: list[str] = []
    known = [*SCHEMA, PROVENANCE]
    for section in data:
        if section not in known:
            problems.append(f"unknown section [{section}]{suggest(section, known)}")
    filled: dict[str, Any] = {}
    for section in SCHEMA:
        if section == "adapters":
            adapters = data.get(section, [])
            if not isinstance(adapters, list):
                problems.append("[[adapters]] must be an array of tables ([[adapters]] name = ...)")
                adapters = []
            filled[section] = [fill_section(f"adapters.{i}", t, problems) for i, t in enumerate(adapters)]
        elif section not in OPTIONAL_SECTIONS or section in data:
            filled[section] = fill_section(section, data.get(section, {}), problems)
    default_scheduler(data, filled)
    sampling = filled["sampling"]
    if sampling.get("scheduler") is None:
        sampling["scheduler"] = filled["noise_scheduler"].get("name")
    recipe = Recipe(path, filled)
    # names first, and the keys and values checked so far: a mistake here is reported at once,
    # before the factories' modules (torch, diffusers: seconds) are imported to check their keys
    for section, table in component_tables(recipe):
        kind, name_key = COMPONENTS[base(section)]
        if isinstance(table.get(name_key), str):
            try:
                recipe.entries[section] = registry(kind).get(table[name_key])
            except DifftoolError as exc:
                problems.append(f"[{section}] {exc}")
    problems += check_learning_rates(recipe)
    problems += check_labels(recipe)
    refuse(path, problems)
    for section, table in component_tables(recipe):
        if section in recipe.entries:
            try:
                recipe.entries[section].check(list(recipe.kwargs(section, table)), f"[{section}]",
                                              also=SCHEMA[base(section)])
            except DifftoolError as exc:
                message = str(exc)
                problems.append(message if message.startswith("[") else f"[{section}] {message}")
    problems += check_param_groups(recipe)
    problems += check_evaluation(recipe)
    refuse(path, problems)
    return recipe


def refuse(path: str, problems: list[str]) -> None:
    """One error listing every problem found, if there is one."""
    if problems:
        head = f"{path}: " + ("" if len(problems) == 1 else f"{len(problems)} problems:\n  - ")
        raise DifftoolError(head + "\n  - ".join(problems))


def default_scheduler(data: dict[str, Any], filled: dict[str, Any]) -> None:
    """A [noise_scheduler] that names none gets the objective's (flow-euler for flow matching):
    the objective's factory may carry it as its `scheduler` attribute."""
    from difftool.plugins import registry

    given = data.get("noise_scheduler")
    objective = filled["objective"].get("name")
    if isinstance(given, dict) and "name" in given or not isinstance(objective, str) or objective == "ddpm":
        return
    try:
        factory = registry("objectives").get(objective).load()
    except DifftoolError:
        return  # reported with the other components
    filled["noise_scheduler"]["name"] = getattr(factory, "scheduler", None) or SCHEMA["noise_scheduler"]["name"][1]


def check_labels(recipe: Recipe) -> list[str]:
    """Class labels: dropout and [sampling] classes need [dataset] label_column."""
    dataset, sampling = recipe["dataset"], recipe["sampling"]
    if dataset.get("label_column") is not None:
        return []
    problems = []
    if dataset.get("label_dropout"):
        problems.append(f"[dataset] label_dropout = {dataset['label_dropout']} drops class labels, and the run has "
                        "none; set label_column to the dataset's label column (an imagefolder's class subfolders "
                        "give `label`), or remove label_dropout")
    if sampling.get("classes"):
        problems.append(f"[sampling] classes = {sampling['classes']!r} names classes of a class-conditional model, "
                        "and this run is unconditional; set [dataset] label_column, or remove classes")
    return problems


def check_evaluation(recipe: Recipe) -> list[str]:
    """[evaluation]: each of its metrics must be registered, and each [evaluation.NAME] table
    must configure one of them with keys its factory accepts. The metrics' entries are kept as
    recipe.entries["evaluation.NAME"], the evaluation scheduler's (if set) as "evaluation"."""
    from difftool.plugins import registry

    table = recipe["evaluation"]
    names = table["metrics"] if isinstance(table.get("metrics"), list) else []
    problems = []
    if isinstance(table.get("scheduler"), str):
        try:
            recipe.entries["evaluation"] = registry("schedulers").get(table["scheduler"])
        except DifftoolError as exc:
            problems.append(f"[evaluation] scheduler: {exc}")
    if not names and isinstance(table.get("metrics"), list):
        problems.append("[evaluation] metrics = [] names no metric; list at least one, e.g. [\"swd\"] "
                        "(`difftool list metrics` shows them)")
    for name in names:
        if not isinstance(name, str):
            continue
        try:
            entry = registry("metrics").get(name)
            entry.check(list(metric_kwargs(recipe, name)), f"[evaluation.{name}]")
            recipe.entries[f"evaluation.{name}"] = entry
        except DifftoolError as exc:
            message = str(exc)
            problems.append(message if message.startswith("[") else f"[evaluation] metrics: {message}")
    for key, value in table.items():
        if isinstance(value, dict) and key not in names:
            problems.append(f"[evaluation.{key}] configures metric '{key}', which [evaluation] metrics does not "
                            f"list{suggest(key, names)}; add it to metrics = [...] or remove the table")
    return problems


def metric_kwargs(recipe: Recipe, name: str) -> dict[str, Any]:
    """The [evaluation.NAME] table: the keyword arguments of the metric NAME."""
    table = recipe["evaluation"].get(name)
    return dict(table) if isinstance(table, dict) else {}


def component_tables(recipe: Recipe):
    """(section, table) for every table that names a component."""
    for section in COMPONENTS:
        if section == "adapters":
            yield from ((f"adapters.{i}", t) for i, t in enumerate(recipe.data["adapters"]))
        elif section in recipe.data:
            yield section, recipe.data[section]


def param_groups(recipe: Recipe) -> list:
    """[[optimizer.param_groups]], or [] where it is not a list (a problem reported already)."""
    groups = recipe["optimizer"].get("param_groups")
    return groups if isinstance(groups, list) else []


def check_param_groups(recipe: Recipe) -> list[str]:
    """Each [[optimizer.param_groups]] needs `modules` and keys the optimizer accepts."""
    problems = []
    entry = recipe.entries.get("optimizer")
    for i, group in enumerate(param_groups(recipe)):
        where = f"[[optimizer.param_groups]] #{i + 1}"
        if not isinstance(group, dict) or not isinstance(group.get("modules"), (str, list)):
            problems.append(f"{where} needs modules = \"pattern\" (e.g. \"down_blocks.*\") or a list of patterns")
            continue
        if entry is not None:
            try:
                entry.check([k for k in group if k != "modules"], where)
            except DifftoolError as exc:
                problems.append(str(exc))
    return problems


def check_learning_rates(recipe: Recipe) -> list[str]:
    """`lr`, where a recipe sets it ([optimizer] or a param group), must be a number > 0: the
    optimizers take 0 silently (nothing trains) and refuse a negative one only mid-build. No
    upper bound, since some (Prodigy, D-Adaptation) want lr = 1.0."""
    tables = [("[optimizer]", recipe["optimizer"])]
    tables += [(f"[[optimizer.param_groups]] #{i + 1}", group)
               for i, group in enumerate(param_groups(recipe)) if isinstance(group, dict)]
    return [
        f"{where} lr = {table['lr']!r} must be a positive number, e.g. 1e-4"
        for where, table in tables
        if "lr" in table and not (isinstance(table["lr"], (int, float)) and not isinstance(table["lr"], bool)
                                  and table["lr"] > 0 and math.isfinite(table["lr"]))
    ]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'SECTION.KEY': value}; tables nest with dots, arrays of tables by index (adapters.0.r)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        items = ((str(i), item) for i, item in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else key))
    return flat


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for each key of two flattened recipes whose values differ."""
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
            for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    return validate(read(path, overrides), str(path))


def dump(recipe: Recipe, provenance: dict[str, Any]) -> str:
    """The resolved recipe as TOML, with a [provenance] table of versions."""
    import tomli_w

    def clean(table: dict) -> dict:  # engine keys first, unset (None) ones left out
        return {k: v for k, v in sorted(table.items(), key=lambda kv: kv[0] not in SCHEMA[section]) if v is not None}

    data = {}
    for section, tables in recipe.data.items():
        if section == "adapters":
            if tables:
                data[section] = [clean(t) for t in tables]
        else:
            data[section] = clean(tables)
    return tomli_w.dumps({**data, PROVENANCE: provenance})
