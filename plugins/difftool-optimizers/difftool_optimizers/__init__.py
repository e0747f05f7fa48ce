"""difftool-optimizers: the `prodigy`, `adamw-schedulefree` and `adamw-8bit` optimizers.

The factories live in difftool_optimizers.factories, imported on first use, so that
`difftool list` imports neither torch nor the optimizer libraries.
"""

import difftool

__version__ = "0.1.0"


@difftool.hookimpl
def register_optimizers(register):
    register("prodigy", "difftool_optimizers.factories:prodigy",
             "Prodigy (prodigyopt): Adam that estimates its own step size; keep lr = 1.0")
    register("adamw-schedulefree", "difftool_optimizers.factories:adamw_schedulefree",
             "schedule-free AdamW (Meta's schedulefree): no LR decay needed; samples and saves its averaged weights")
    register("adamw-8bit", "difftool_optimizers.factories:adamw_8bit",
             "AdamW with 8-bit states (bitsandbytes, the optional bnb extra): a quarter of AdamW's optimizer memory")


@difftool.hookimpl
def on_train_start(state):
    from difftool_optimizers.factories import warn_about_schedule

    warn_about_schedule(state)
