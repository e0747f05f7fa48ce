"""The `difftool` command line (typer + rich)."""

from __future__ import annotations

import math
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from difftool import __version__
from difftool.errors import DifftoolError, Interrupted


class Commands(TyperGroup):
    """The command group, turning Ctrl-C inside a command into difftool's interruption (exit
    130 with a message; typer itself exits 130 silently, or, in older versions, 1 "Aborted!")."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted("interrupted") from None


app = typer.Typer(cls=Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train diffusion models from TOML recipes; components come from plugins.")
console = Console()
errors = Console(stderr=True)
options = {"debug": False}
SET_HELP = "Override a recipe value, e.g. --set run.max_steps=20 (parsed as TOML)."
MAX_SEED = 2**32 - 1  # numpy's seeds, and so the run's, are 0 .. 2**32 - 1


def finite(value: Optional[float]) -> Optional[float]:
    """Refuse nan and inf, which the options' min and max let through."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def show_version(value: bool) -> None:
    if value:
        console.print(f"difftool {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True, help="Show the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    options["debug"] = debug


@app.command()
def run(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="A TOML recipe, e.g. recipes/quickstart.toml."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    force: bool = typer.Option(False, help="Resume from a checkpoint even if the recipe changed its model, data or optimizer."),
) -> None:
    """Train from a recipe."""
    from difftool import recipe as recipes
    from difftool.engine import train

    output_dir = train(recipes.load(recipe, set_), force=force)
    console.print(f"[green]done[/]: pipeline and samples in {output_dir}")


@app.command()
def check(recipe: Path = typer.Argument(..., metavar="RECIPE", help="A TOML recipe."),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Validate a recipe and build its components (all but the dataset, which is read only for a
    class-conditional run's classes), without training."""
    from difftool import build
    from difftool import recipe as recipes
    from difftool.adapters import check_fusable
    from difftool.evaluation import check_recipe as check_evaluation
    from difftool.evaluation import evaluation_scheduler
    from difftool.trackers import check_installed as check_tracker

    from difftool.sharding import check_launch

    loaded = recipes.load(recipe, set_)
    check_tracker(loaded["run"]["log_with"], loaded.where("run"))
    check_launch()  # an FSDP or DeepSpeed launch that run would refuse
    classes = None
    if loaded["dataset"]["label_column"] is not None:
        classes = build.class_names(loaded, build.rows(loaded, loaded.kwargs("dataset")))
    model = build.model(loaded, num_classes=None if classes is None else len(classes))
    applied = build.adapters(loaded, model)
    build.gradient_checkpointing(loaded, model)
    if loaded["run"]["fuse_adapters"]:
        check_fusable(applied, loaded)
    noise_scheduler = build.noise_scheduler(loaded, model)
    objective = build.objective(loaded, noise_scheduler)
    sampler = build.sampling_scheduler(loaded, noise_scheduler)
    build.lr_schedule(loaded, build.optimizer(loaded, model), num_training_steps=1)
    schedulers = build.scheduler_roles(model, noise_scheduler, sampler, evaluation_scheduler(
        loaded, noise_scheduler, sampler) if loaded["evaluation"]["scheduler"] is not None else None)
    build.check_objective(loaded, objective, schedulers, build.component(loaded, "timestep_sampler"),
                          build.component(loaded, "loss_weighting"))
    build.check_guidance(loaded, build.is_latent(model), classes)
    build.ema(loaded, model)
    build.check_memory(loaded, model)
    check_evaluation(loaded, model, build.is_latent(model))
    table = Table("section", "component", "plugin", title=f"{recipe} is valid")
    for section, entry in loaded.entries.items():
        table.add_row(section, entry.name, entry.plugin)
    console.print(table)
    if loaded["dataset"]["buckets"]:  # the images' sizes are read from their headers: nothing is decoded
        counts = build.bucket_distribution(loaded, build.rows(loaded, loaded.kwargs("dataset")))
        buckets = Table("bucket (height x width)", "aspect (w/h)", "images",
                        title=f"aspect-ratio buckets: {sum(counts.values())} images in {len(counts)} buckets")
        for (height, width), count in counts.items():
            buckets.add_row(f"{height} x {width}", f"{width / height:.2f}", str(count))
        console.print(buckets)


@app.command("list")
def list_components(kind: Optional[str] = typer.Argument(None, help="models, schedulers, datasets, ...")) -> None:
    """List the components a recipe can name, and the plugin that gives each."""
    from difftool.plugins import registries
    from difftool.registry import KINDS, suggest

    if kind is None:
        table = Table("kind", "components")
        for name, registry in registries().items():
            table.add_row(name, str(len(registry.entries)))
    else:
        matches = [k for k in KINDS if kind in (k, k.rstrip("s"), KINDS[k][0])]
        if not matches:
            raise DifftoolError(f"unknown kind '{kind}'{suggest(kind, KINDS)}; kinds: {', '.join(KINDS)}")
        table = Table("name", "description", "plugin", title=matches[0])
        for name, entry in registries()[matches[0]].visible():
            table.add_row(name, escape(entry.description or ""), entry.plugin)
    console.print(table)
    report_failures()


plugins_app = typer.Typer(invoke_without_command=True, no_args_is_help=False)
app.add_typer(plugins_app, name="plugins")


@plugins_app.callback()
def plugins(context: typer.Context) -> None:
    """Show installed plugins: version, hooks implemented, components registered, clashes."""
    if context.invoked_subcommand is None:
        show_plugins()


@plugins_app.command("new")
def new_plugin(
    name: str = typer.Argument(..., help="The component's name, e.g. cosine-ddim; the package is difftool-NAME."),
    kind: str = typer.Option("scheduler", help="What the plugin adds: scheduler or dataset."),
    directory: Path = typer.Option(Path("."), "--dir", help="Where to write the package folder."),
) -> None:
    """Write a minimal, working, tested plugin package to start from."""
    from difftool.scaffold import new_plugin as write

    if directory.exists() and not directory.is_dir():
        raise DifftoolError(f"--dir {directory} is a file; give a folder to write the package into")
    try:
        folder = write(name, kind, directory)
    except OSError as exc:
        raise DifftoolError(f"--dir {directory}: cannot write the package there ({exc.strerror or exc}); "
                            "choose a folder you can write to") from exc
    console.print(f"[green]wrote[/] {folder}: `pip install -e {folder}`, then `python -m pytest {folder / 'tests'}`")


def show_plugins() -> None:
    """The table of plugins, then clashes and failures."""
    from difftool.plugins import plugin_version, pm, registries

    components: dict[str, dict[str, list[str]]] = {}  # plugin -> kind -> names
    for kind, registry in registries().items():
        for name, entry in registry.visible():
            components.setdefault(entry.plugin, {}).setdefault(kind, []).append(name)
    table = Table("plugin", "version", "hooks", "components")
    table.columns[2].no_wrap = True
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        registered = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in components.get(name, {}).items())
        table.add_row(name, plugin_version(name), "\n".join(hooks), registered)
    console.print(table)
    for registry in registries().values():
        for claimants in registry.clashes():
            names = ", ".join(f"'{e.qualified_name}'" for e in claimants)
            console.print(f"[yellow]clash[/]: {registry.kind} '{claimants[0].name}' is registered by {names}")
    report_failures()


def report_failures() -> None:
    """Say which plugins failed to load or register, and why."""
    from difftool.plugins import failures

    for failure in failures:
        errors.print(f"[yellow]plugin '{failure.plugin}' failed ({failure.stage}): {escape(failure.error)}[/]", highlight=False, soft_wrap=True)
    if failures:
        errors.print("[yellow]fix or uninstall it, or skip plugins with DIFFTOOL_LOAD_PLUGINS=name1,name2[/]")


@app.command()
def sample(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="The output_dir of a finished run."),
    scheduler: Optional[str] = typer.Option(None, help="Any registered scheduler (default: the run's [sampling] one)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Inference steps (default: the run's)."),
    num_images: Optional[int] = typer.Option(None, min=1, help="Images in the grid (default: the run's)."),
    seed: Optional[int] = typer.Option(None, min=0, max=MAX_SEED, help="Seed of the starting noise, 0 to 2**32-1 (default: the run's)."),
    out: Optional[Path] = typer.Option(None, help="Grid PNG to write (default: RUN_DIR/samples/sample-SCHEDULER-STEPS.png)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    prompt: Optional[str] = typer.Option(None, help="Text-to-image runs: the prompt (default: the run's [sampling] prompts)."),
    negative_prompt: Optional[str] = typer.Option(None, help="Text-to-image runs: what to guide away from."),
    guidance_scale: Optional[float] = typer.Option(None, min=0.0, callback=finite, help="Classifier-free guidance scale (default: the run's; else 7.5 for text-to-image, 4 for classes)."),
    classes: list[str] = typer.Option([], "--class", help="Class-conditional runs: a class to draw, by name (repeatable; default: the run's [sampling] classes, else all), one row each."),
    image: Optional[Path] = typer.Option(None, help="Inpaint this image (with --mask)."),
    mask: Optional[Path] = typer.Option(None, help="Mask for --image: white is repainted, black kept."),
    strength: float = typer.Option(1.0, min=0.0, max=1.0, callback=finite, help="Inpainting: how far to noise the masked area (1 = fully)."),
    refiner: Optional[Path] = typer.Option(None, help="SDXL inpainting: a refiner folder that finishes the base's denoising."),
    denoising_end: float = typer.Option(0.8, min=0.0, max=1.0, callback=finite, help="SDXL with --refiner: fraction of the steps the base does."),
) -> None:
    """Generate a grid of images from a finished run with any registered scheduler; text-to-image
    runs take a prompt and guidance, and inpaint with --image and --mask; class-conditional runs
    take --class and guidance."""
    from difftool.runs import sample_run
    from difftool.sampling import Prompting

    prompting = Prompting(prompt, negative_prompt, guidance_scale, image, mask, strength, refiner, denoising_end, classes)
    path = sample_run(run_dir, scheduler, steps, num_images, seed, out, overwrite, prompting)
    console.print(f"[green]wrote[/] {path}")


@app.command("eval")
def eval_(
    run_dir: Optional[Path] = typer.Argument(None, metavar="RUN_DIR", help="The output_dir of a finished run."),
    metric: list[str] = typer.Option([], "--metric", help="A registered metric (repeatable; default: the run's [evaluation] metrics, else swd)."),
    num_samples: Optional[int] = typer.Option(None, min=1, help="Images to generate (default: the run's [evaluation] num_samples, 256)."),
    scheduler: Optional[str] = typer.Option(None, help="Any registered scheduler (default: the run's [evaluation], then [sampling] one)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Inference steps (default: the run's)."),
    reference: Optional[Path] = typer.Option(None, help="A folder of real images to compare with (default: the run's dataset)."),
    seed: Optional[int] = typer.Option(None, min=0, max=MAX_SEED, help="Seed of the first sample; sample i uses seed + i (default: the run's, 0)."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Images generated (or read) per batch (default: the run's [dataset] batch_size)."),
    images: Optional[Path] = typer.Option(None, help="Evaluate this folder of images (made by any program) instead of a run; needs --reference."),
    image_size: Optional[int] = typer.Option(None, min=8, help="With --images: the size to compare at (default: the first image's)."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the result (values and settings) to this JSON file."),
) -> None:
    """Measure sample quality: generate from a finished run and compare with its dataset (or
    --reference), or measure a folder of --images; prints a table and writes the result as JSON."""
    import time

    from difftool import evaluation, files

    asked = evaluation.Asked(metric, num_samples, scheduler, steps, reference, seed, batch_size)
    started = time.perf_counter()
    report = lambda text: errors.print(escape(text), highlight=False)  # noqa: E731 (progress on stderr)
    if json_file is not None and json_file.suffix.lower() != ".json":
        raise DifftoolError(f"--json {json_file}: give a file name ending in .json, e.g. result.json")
    if (images is None) == (run_dir is None):
        raise DifftoolError("give either RUN_DIR (a finished run) or --images FOLDER (with --reference), not "
                            f"{'both' if images else 'neither'}")
    if images is not None:
        values, settings = evaluation.evaluate_images(images, asked, image_size, report)
        written = []
    else:
        values, settings = evaluation.evaluate_run(run_dir, asked, report)
        written = [run_dir / evaluation.EVALUATIONS / evaluation.result_name(settings)]
    if json_file is not None:
        written.append(json_file)
    text = evaluation.result_text(values, settings, time.perf_counter() - started)
    for path in written:
        files.write_text(path, text, "the evaluation's result")
    table = Table("metric", "value")
    for name, value in evaluation.table_rows(values):
        table.add_row(name, value)
    console.print(f"{settings['num_samples']} samples vs {escape(settings['reference'] or 'their prompts')}",
                  soft_wrap=True, highlight=False)
    console.print(table)
    for path in written:
        console.print(f"[green]wrote[/] {path}")


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., metavar="RECIPE", help="A TOML recipe, the base of every run."),
    grid: list[str] = typer.Option([], "--grid", help="SECTION.KEY=V1,V2,... (repeatable): one run per combination; values parsed as TOML, e.g. --grid model.block_out_channels=[32,64],[64,64]."),
    seeds: int = typer.Option(1, min=1, help="Seeds per combination: the recipe's run.seed, +1, ... (default 1: its seed only)."),
    out: Optional[Path] = typer.Option(None, help="Folder of the runs and sweep.json (default: the recipe's output_dir + '-sweep')."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Train one run per combination of --grid values (and per seed), one after another; run it
    again to skip the finished runs and resume the others."""
    from difftool.sweep import sweep as run_sweep

    if not grid and seeds == 1:
        raise DifftoolError("give what to sweep: --grid SECTION.KEY=V1,V2 (repeatable) and/or --seeds N")
    done = run_sweep(recipe, grid, seeds, out, set_, report=lambda line: console.print(line, highlight=False))
    console.print(f"[green]done[/]: {len(done.runs)} runs in {done.out}; "
                  f"`difftool compare {done.out}` shows them side by side", highlight=False)


@app.command()
def compare(
    run_dir: list[Path] = typer.Argument(..., metavar="RUN_OR_SWEEP_DIR...", help="Run folders, or folders of runs (a sweep's)."),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="Also write the rows to this CSV file."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Also write the rows to this JSON file."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Draw loss, val_loss and metrics against steps into this PNG."),
    last: int = typer.Option(20, min=1, help="Steps whose mean loss is the final training loss."),
) -> None:
    """Compare runs side by side: one row per setting (seeds averaged, mean ± std), with the
    recipe keys that differ, final loss, best val_loss, metrics, wall time and images/s."""
    from difftool import compare as comparing

    for path, suffix, option in ((csv_file, ".csv", "--csv"), (json_file, ".json", "--json")):
        if path is not None:  # a mistyped name is refused before anything is read or replaced
            comparing.check_report_path(path, suffix, option)
    if plot_file is not None:
        comparing.plot_format(plot_file)
    report = comparing.compare(run_dir, last)
    console.print(comparing.table(report))
    written = []
    if csv_file is not None:
        comparing.write_csv(report, csv_file)
        written.append(csv_file)
    if json_file is not None:
        comparing.write_json(report, json_file)
        written.append(json_file)
    if plot_file is not None:
        comparing.plot(report, plot_file)
        written.append(plot_file)
    for path in written:
        console.print(f"[green]wrote[/] {path}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="The output_dir of a finished text-to-image LoRA run."),
    format_: str = typer.Option("kohya", "--format", help="The key names to write: kohya (AUTOMATIC1111, ComfyUI)."),
    output: Optional[Path] = typer.Option(None, "--output", help="The file to write (default: RUN_DIR/NAME.FORMAT.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Replace --output if it exists."),
) -> None:
    """Write a finished run's LoRA for other programs: --format kohya gives the key names that
    AUTOMATIC1111 and ComfyUI load (lora_unet_*, lora_te_* / lora_te1_*, lora_te2_*)."""
    from difftool.export import export as export_lora

    path = export_lora(run_dir, format_, output, force)
    console.print(f"[green]wrote[/] {path}")


@app.command()
def push(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="The output_dir of a finished run."),
    repo_id: str = typer.Option(..., "--repo-id", help="The Hub model repository, NAMESPACE/NAME (created if it does not exist)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps its visibility)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be uploaded (paths and sizes); write and upload nothing."),
    with_logs: bool = typer.Option(False, "--with-logs", help="Also upload logs/ (TensorBoard logs: the Hub shows them as training metrics)."),
) -> None:
    """Upload a finished run (model, model card, recipe, samples, metrics; not its checkpoints)
    to the Hugging Face Hub in one commit; a run without a model card gets one first."""
    from difftool.hub import push as push_run

    push_run(run_dir, repo_id, private, dry_run, with_logs, report=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: user errors as one message and a non-zero exit, tracebacks only with --debug.

    typer runs in standalone mode, so it handles usage errors itself (its message, exit status
    2), --help and --version (0), and always ends in SystemExit, which passes through here;
    only what a command raises reaches the handlers below.
    """
    try:
        app(args=argv, prog_name="difftool")
    except DifftoolError as exc:
        fail(str(exc), exc.exit_code)
    except Exception as exc:
        fail(f"internal error: {type(exc).__name__}: {exc} (please report it; --debug shows where)", 1)


def fail(message: str, code: int) -> None:
    """Print the error (and, with --debug, its traceback) and exit with `code`."""
    if options["debug"]:
        traceback.print_exc()
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)
