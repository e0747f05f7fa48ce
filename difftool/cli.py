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
    """Validate a recipe and build its components (all but the dataset), without training."""
    from difftool import build
    from difftool import recipe as recipes
    from difftool.adapters import check_fusable

    loaded = recipes.load(recipe, set_)
    model = build.model(loaded)
    applied = build.adapters(loaded, model)
    if loaded["run"]["fuse_adapters"]:
        check_fusable(applied, loaded)
    build.sampling_scheduler(loaded, build.noise_scheduler(loaded, model))
    build.lr_schedule(loaded, build.optimizer(loaded, model), num_training_steps=1)
    for section in ("loss_weighting", "timestep_sampler"):
        build.component(loaded, section)
    build.ema(loaded, model)
    build.check_memory(loaded, model)
    table = Table("section", "component", "plugin", title=f"{recipe} is valid")
    for section, entry in loaded.entries.items():
        table.add_row(section, entry.name, entry.plugin)
    console.print(table)


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
            table.add_row(name, entry.description, entry.plugin)
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
    guidance_scale: Optional[float] = typer.Option(None, min=0.0, callback=finite, help="Classifier-free guidance scale (default: the run's, 7.5)."),
    image: Optional[Path] = typer.Option(None, help="Inpaint this image (with --mask)."),
    mask: Optional[Path] = typer.Option(None, help="Mask for --image: white is repainted, black kept."),
    strength: float = typer.Option(1.0, min=0.0, max=1.0, callback=finite, help="Inpainting: how far to noise the masked area (1 = fully)."),
    refiner: Optional[Path] = typer.Option(None, help="SDXL inpainting: a refiner folder that finishes the base's denoising."),
    denoising_end: float = typer.Option(0.8, min=0.0, max=1.0, callback=finite, help="SDXL with --refiner: fraction of the steps the base does."),
) -> None:
    """Generate a grid of images from a finished run with any registered scheduler; text-to-image
    runs take a prompt and guidance, and inpaint with --image and --mask."""
    from difftool.sampling import Prompting, sample_run

    prompting = Prompting(prompt, negative_prompt, guidance_scale, image, mask, strength, refiner, denoising_end)
    path = sample_run(run_dir, scheduler, steps, num_images, seed, out, overwrite, prompting)
    console.print(f"[green]wrote[/] {path}")


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
