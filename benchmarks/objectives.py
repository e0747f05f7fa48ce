"""Objectives and guidance, measured with SWD on real data at 32 px.

`flow`: DDPM against flow matching (uniform t, and SD3's logit-normal t), the same UNet
(recipes/quickstart.toml's), data (the 64 real butterflies), optimiser and number of steps,
each evaluated during training with the same SWD settings (64 samples, 20 sampling steps);
the table gives each evaluation's training minutes, so equal wall time can be read off.

`guidance`: a class-conditional UNet on butterflies against emoji (64 of each), trained with
label dropout, then 64 samples per class at several guidance scales: each class's SWD against
its own images, and against the other class's (the larger, the better the classes separate).

Run by hand: `python -m benchmarks.objectives [flow] [guidance] [--steps N] [--out runs/objectives]
[--data ../shared/data] [--run runs/butterflies-vs-emoji]` (`--run`: measure that run's model
rather than training one).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.quality import COMMON, CONFIGS, curve, scale

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

OBJECTIVES = {
    "ddpm": "",
    "flow-matching": """
[objective]
name = "flow-matching"
""",
    "flow-matching, logit-normal t": """
[objective]
name = "flow-matching"

[timestep_sampler]
name = "logit-normal"
""",
}


def unconditional(name: str, output_dir: Path, data: Path, steps: int, every: int) -> str:
    """The quality benchmark's quickstart configuration with an objective (a flow-matching run
    samples with flow-euler in as many steps as DDPM's DPM-Solver++)."""
    lr, warmup, model = CONFIGS["quickstart"]
    text = COMMON.format(output_dir=output_dir.as_posix(), max_steps=steps, every=every,
                         data=(data / "smithsonian-butterflies-64").as_posix())
    if name != "ddpm":
        text = text.replace('name = "ddpm"\n', 'name = "flow-euler"\n').replace(
            'scheduler = "dpm-solver++"\nnum_inference_steps = 20\nthresholding = true\nsample_max_value = 1.0\n',
            'scheduler = "flow-euler"\nnum_inference_steps = 20\n')
    return (text + model + OBJECTIVES[name] + f'\n[optimizer]\nname = "adamw"\nlr = {lr}\n\n[lr_schedule]\n'
            f'name = "cosine"\nnum_warmup_steps = {warmup}\n')


def flow(args) -> None:
    from difftool import recipe as recipes
    from difftool.engine import train

    every = max(1, args.steps // args.evaluations)
    print("| objective | seed | step | training minutes | SWD |")
    print("|---|---|---|---|---|")
    for name in OBJECTIVES:
        folder = args.out / f"{name.replace(',', '').replace(' ', '-')}-seed{args.seed}"
        path = args.out / f"{folder.name}.toml"
        path.write_text(unconditional(name, folder, args.data, every * args.evaluations, every)
                        .replace("seed = 0\n", f"seed = {args.seed}\n", 1))
        started = time.perf_counter()
        train(recipes.load(path))
        for step, minutes, value in curve(folder):
            print(f"| {name} | {args.seed} | {step} | {minutes:.2f} | {value:.1f} |", flush=True)
        print(f"<!-- {name}: {time.perf_counter() - started:.0f} s in all -->", flush=True)


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "butterflies-vs-emoji.toml"


def class_images(rows: list[dict], name: str, size: int = 32):
    """The training images of one class as uint8 (N, 3, size, size)."""
    from difftool.data import decode

    return torch.stack([decode(row["image"], size) for row in rows if row["label"] == name])


def guidance(args) -> None:
    from difftool import recipe as recipes
    from difftool.builtins.datasets import folders
    from difftool.builtins.swd import swd
    from difftool.engine import train
    from difftool.evaluation import to_uint8
    from difftool.plugins import registry
    from difftool.runs import load_run, saved_recipe
    from difftool.sampling import generate, sampling_scheduler

    butterflies, emoji = args.data / "smithsonian-butterflies-64", args.data / "noto-emoji-64"
    folder = args.run
    if folder is None:  # train recipes/butterflies-vs-emoji.toml for --steps
        folder = args.out / "guidance"
        classes = f'{{ butterfly = "{butterflies.as_posix()}", emoji = "{emoji.as_posix()}" }}'
        started = time.perf_counter()
        train(recipes.load(RECIPE, [f'run.output_dir="{folder.as_posix()}"', f"run.max_steps={args.steps}",
                                    'run.log_with="none"', "run.overwrite_output_dir=true", f"dataset.classes={classes}"]))
        print(f"<!-- class-conditional run: {time.perf_counter() - started:.0f} s -->")
    rows = folders({"butterfly": str(butterflies), "emoji": str(emoji)}, max_per_class=64)
    references = {name: class_images(rows, name) for name in ("butterfly", "emoji")}
    unet, training_scheduler, _ = load_run(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = unet.to(device).eval()
    sampling = saved_recipe(folder)["sampling"]
    overrides = {k: v for k, v in sampling.items() if k in ("thresholding", "sample_max_value")}
    scheduler = sampling_scheduler(registry("schedulers").get("dpm-solver++"), dict(training_scheduler.config),
                                   overrides, "benchmark")
    print("| guidance scale | class | SWD vs its own class | SWD vs the other class |")
    print("|---|---|---|---|")
    for scale_value in args.scales:
        for label, name in enumerate(("butterfly", "emoji")):
            images = generate(unet, scheduler, 64, 20, 1000 + label, 32, device, labels=torch.full((64,), label),
                              guidance_scale=scale_value, null_label=2)
            generated = to_uint8(images)
            values = []
            for reference in (name, "emoji" if name == "butterfly" else "butterfly"):
                metric = swd()
                metric.update_reference(references[reference])
                metric.update(generated)
                values.append(metric.compute()["swd"])
            print(f"| {scale_value:g} | {name} | {values[0]:.1f} | {values[1]:.1f} |", flush=True)
        picture = generate(unet, scheduler, 16, 20, 0, 32, device, labels=torch.tensor([0] * 8 + [1] * 8),
                           guidance_scale=scale_value, null_label=2)
        from difftool.sampling import grid

        grid(picture, rows=2).save(args.out / f"guidance-{scale_value:g}.png")
    floor = {name: scale(images, 32)[0] for name, images in references.items()}
    print(f"SWD floor (32 of a class against its other 32): butterfly {floor['butterfly']:.1f}, emoji {floor['emoji']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["flow", "guidance"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--evaluations", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="flow: the runs' seed")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--out", type=Path, default=Path("runs/objectives"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--run", type=Path, help="guidance: measure this finished butterflies-vs-emoji run instead of training one")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"{cpu}; {gpu}; torch {torch.__version__}")
    for part in args.parts:
        {"flow": flow, "guidance": guidance}[part](args)


if __name__ == "__main__":
    main()
