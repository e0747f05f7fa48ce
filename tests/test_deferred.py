"""difftool.deferred: diffusers' UNet, transformer and hooks packages (and scipy.stats) run their
`__init__` only when a name is looked up on them, and then everything they define is there.

Each check runs in a fresh interpreter, since the test process has imported them all already."""

import os
import subprocess
import sys

PROBE = """
import sys
import difftool
from diffusers import UNet2DModel

model = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
model.to("cpu")
print("loaded:", " ".join(name for name in ("peft", "diffusers.models.unets.unet_2d_condition",
      "diffusers.models.transformers.transformer_sd3", "scipy.stats._distn_infrastructure") if name in sys.modules))

import diffusers.models.unets as unets
import scipy.stats
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, StableDiffusionPipeline
from diffusers.hooks import apply_group_offloading
from diffusers.models.transformers import Transformer2DModel
from diffusers.models.unets import UNet2DConditionModel

assert unets.UNet2DModel is UNet2DModel and "UNet2DConditionModel" in dir(unets)
assert abs(scipy.stats.norm.cdf(0.0) - 0.5) < 1e-12
assert StableDiffusionPipeline.__name__ == "StableDiffusionPipeline"
print("asked for:", "peft" in sys.modules, "diffusers.models.unets.unet_2d_condition" in sys.modules)
"""


def probe(defer: str) -> list[str]:
    env = {**os.environ, "DIFFTOOL_DEFER_IMPORTS": defer}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line.startswith(("loaded:", "asked for:"))]


def test_a_unet_imports_without_the_other_models_peft_or_scipy_and_every_name_is_there_when_asked():
    loaded, asked = probe("1")
    assert loaded.strip() == "loaded:"
    assert asked == "asked for: True True"


def test_the_switch_turns_it_off():
    loaded, asked = probe("0")
    assert "peft" in loaded.split() and "diffusers.models.unets.unet_2d_condition" in loaded.split()
    assert asked == "asked for: True True"
