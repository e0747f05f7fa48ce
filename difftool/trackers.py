"""The run's experiment trackers (Accelerate's): that the one a recipe names is installed, and
sample grids sent to every tracker that takes images."""

from __future__ import annotations

from difftool.errors import DifftoolError

# run.log_with -> (Accelerate's availability check, the package to install)
PACKAGES = {
    "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "wandb": ("is_wandb_available", "wandb"),
    "mlflow": ("is_mlflow_available", "mlflow"),
    "comet_ml": ("is_comet_ml_available", "comet-ml"),
    "aim": ("is_aim_available", "aim"),
    "clearml": ("is_clearml_available", "clearml"),
    "dvclive": ("is_dvclive_available", "dvclive"),
}
# How each tracker's `log_images` takes one image: Accelerate passes the values on to the
# tracker's own API, whose shapes differ (TensorBoard a batch, W&B a list, Aim and ClearML one).
# comet_ml, mlflow and dvclive have no `log_images` in Accelerate: their grids stay in samples/.
IMAGE_FORMS = {
    "tensorboard": lambda pixels: (pixels[None], {"dataformats": "NHWC"}),
    "wandb": lambda pixels: ([pixels], {}),
    "swanlab": lambda pixels: ([pixels], {}),
    "aim": lambda pixels: (pixels, {}),
    "clearml": lambda pixels: (pixels, {}),
}


def check_installed(log_with: str, where: str) -> None:
    """Refuse a tracker whose package is missing (Accelerate would drop it with a warning, and
    the run would log nowhere)."""
    if log_with not in PACKAGES:
        return
    import accelerate.utils

    check, package = PACKAGES[log_with]
    if not getattr(accelerate.utils, check)():
        raise DifftoolError(f"{where} log_with = '{log_with}' needs the {package} package, which is not installed: "
                            f"pip install {package} (or set log_with = \"tensorboard\" or \"none\")")


def log_images(accelerator, name: str, picture, step: int) -> list[str]:
    """Send one PIL image to every tracker that takes images; returns their names."""
    import numpy as np

    pixels = np.asarray(picture.convert("RGB"))
    sent = []
    for tracker in accelerator.trackers:
        form = IMAGE_FORMS.get(tracker.name) or getattr(tracker, "image_form", None)
        if form is None:
            continue
        value, kwargs = form(pixels)
        tracker.log_images({name: value}, step=step, **kwargs)
        sent.append(tracker.name)
    return sent
