"""Trackers: sample grids reach every tracker that takes images, and a tracker that is not
installed is refused before anything runs."""

from pathlib import Path

import numpy as np
import pytest
from accelerate.tracking import GeneralTracker
from accelerate.utils import is_wandb_available
from PIL import Image

import difftool
from difftool import recipe as recipes
from difftool.engine import train

FAST = ["--set", "run.max_steps=2"]


class Recording(GeneralTracker):
    """A tracker written for the test: it keeps the images it is given."""

    name = "recording"
    requires_logging_directory = False
    image_form = staticmethod(lambda pixels: ([pixels], {}))

    def __init__(self):
        super().__init__()
        self.images = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        pass

    def log(self, values, step=None, **kwargs):
        pass

    def log_images(self, values, step=None, **kwargs):
        self.images += [(name, step, image) for name, images in values.items() for image in images]


class AddsTracker:
    def __init__(self):
        self.tracker = Recording()

    @difftool.hookimpl
    def on_train_start(self, state):
        state.accelerator.trackers.append(self.tracker)


def test_sample_grids_go_to_every_tracker_that_takes_images(plugin, tiny_recipe):
    recorder = plugin(AddsTracker(), "adds-tracker").tracker
    output_dir = train(recipes.load(tiny_recipe(), ['run.log_with="none"']))
    assert [(name, step) for name, step, _ in recorder.images] == [("samples", 2), ("samples", 4)]
    grid = np.asarray(Image.open(Path(output_dir) / "samples" / "0001.png").convert("RGB"))
    assert np.array_equal(recorder.images[-1][2], grid)  # the saved grid, as (H, W, 3) uint8


def test_tensorboard_gets_the_sample_grids(tiny_recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = train(recipes.load(tiny_recipe(), ["run.max_steps=2"]))
    (events,) = (Path(output_dir) / "logs").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["images"]
    assert tags, "no image in the TensorBoard log"
    image = accumulator.Images(tags[0])[-1]
    assert (image.width, image.height) == (64, 64)  # the 2 x 2 grid of 32 px samples


@pytest.mark.skipif(is_wandb_available(), reason="wandb is installed here")
@pytest.mark.parametrize("command", ["check", "run"])
def test_a_tracker_that_is_not_installed_is_refused(cli, tiny_recipe, tmp_path, command):
    output_dir = tmp_path / "never"
    code, out, err = cli(command, tiny_recipe(output_dir=output_dir), "--set", 'run.log_with="wandb"', *FAST)
    assert code == 1, out + err
    assert "log_with = 'wandb' needs the wandb package, which is not installed: pip install wandb" in err
    assert "Traceback" not in err and not output_dir.exists()
