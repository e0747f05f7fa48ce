"""The optimizer factories. Each names its keys, so that a recipe's unknown key is refused with a
suggestion before anything is built; the defaults are the libraries' own, except where their
authors recommend otherwise for diffusion models (said at each)."""

from __future__ import annotations

import contextlib
import io
import os

import torch
from rich.console import Console
from rich.markup import escape

from difftool.errors import DifftoolError
from difftool.registry import BUILTIN_PLUGIN

# LR schedules of difftool's that keep the learning rate constant once warmed up
CONSTANT_SCHEDULES = {"constant", "constant-with-warmup"}
BNB_FIX = "pip install 'difftool-optimizers[bnb]'"


def note(text: str) -> None:
    """A warning on stderr, printed once per run (by the main process, where several train)."""
    if os.environ.get("RANK", "0") == "0":
        Console(stderr=True).print(f"[yellow]{escape(text)}[/]", soft_wrap=True, highlight=False)


def prodigy(params, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999), beta3: float | None = None,
            eps: float = 1e-8, weight_decay: float = 0.01, decouple: bool = True, use_bias_correction: bool = True,
            safeguard_warmup: bool = True, d0: float = 1e-6, d_coef: float = 1.0, growth_rate: float = float("inf"),
            slice_p: int = 1):
    """Prodigy (Mishchenko & Defazio 2024): Adam whose step size `d` it estimates as it goes;
    `lr` scales that estimate and should stay 1.0 (`d_coef` is the knob to turn instead).
    Defaults: prodigyopt's, but for what its authors recommend for diffusion models
    (use_bias_correction, safeguard_warmup, weight_decay 0.01)."""
    from prodigyopt import Prodigy

    if lr < 0.1:
        note(f"[optimizer] name = 'prodigy' with lr = {lr}: Prodigy estimates the step size itself and lr "
             "multiplies that estimate, so this run takes steps about 1/lr times smaller than Prodigy's; "
             "leave lr at 1.0 (to take smaller or larger steps, set d_coef, e.g. 0.5 or 2)")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
        return Prodigy(params, lr=lr, betas=tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay,
                       decouple=decouple, use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup,
                       d0=d0, d_coef=d_coef, growth_rate=growth_rate, slice_p=slice_p)


def adamw_schedulefree(params, lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                       weight_decay: float = 0.0, warmup_steps: int = 100, r: float = 0.0,
                       weight_lr_power: float = 2.0, foreach: bool | None = None):
    """Schedule-free AdamW (Defazio et al. 2024): it trains at an interpolation of two weight
    sequences and evaluates at their running average, so it needs no decaying LR schedule.
    Defaults: schedulefree's, but for a 100-step linear warm-up (its authors recommend one).

    It has train() and eval() modes; difftool switches them (see the register_optimizers hook's
    contract). It is returned in train mode, ready for the first step."""
    from schedulefree import AdamWScheduleFree

    extra = {} if foreach is None else {"foreach": foreach}  # None: the library decides
    optimizer = AdamWScheduleFree(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                  warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, **extra)
    optimizer.train()
    return optimizer


def adamw_8bit(params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
               weight_decay: float = 0.01, min_8bit_size: int = 4096):
    """bitsandbytes' AdamW8bit: AdamW whose two moment estimates are kept in 8 bits, blockwise
    quantised (Dettmers et al. 2022); tensors smaller than `min_8bit_size` keep 32-bit states.
    Defaults: bitsandbytes'. Refused, naming why, where bitsandbytes cannot run it."""
    bnb = import_bitsandbytes()
    check_runs_here(bnb)
    return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                               min_8bit_size=min_8bit_size)


def import_bitsandbytes():
    """bitsandbytes, or a DifftoolError saying why it cannot be imported and how to fix that."""
    try:
        import bitsandbytes
    except ModuleNotFoundError as exc:
        if exc.name != "bitsandbytes":
            raise DifftoolError(
                f"[optimizer] name = 'adamw-8bit': bitsandbytes cannot be imported: it needs {exc.name}, which is "
                f"not installed; reinstall it with {BNB_FIX}, or use name = 'adamw'") from exc
        raise DifftoolError(
            "[optimizer] name = 'adamw-8bit' needs bitsandbytes, which is not installed (it is an optional extra, "
            f"about 40 MB): {BNB_FIX} (bitsandbytes 0.50.2 or later also runs it on a CPU), or use name = 'adamw'"
        ) from exc
    except Exception as exc:  # a broken install: a native library that does not load, say
        raise DifftoolError(
            f"[optimizer] name = 'adamw-8bit': bitsandbytes cannot be imported ({type(exc).__name__}: "
            f"{str(exc)[:300]}); reinstall it ({BNB_FIX}; `python -m bitsandbytes` diagnoses it), "
            "or use name = 'adamw'") from exc
    return bitsandbytes


def check_runs_here(bnb) -> None:
    """One 8-bit AdamW step on a probe tensor on the device training will use (CUDA where it is
    available, as Accelerate chooses, else the CPU): a bitsandbytes that cannot run its 8-bit
    optimizer there is refused now, by `difftool check` too, not at the first training step.
    bitsandbytes 0.50 runs it on the CPU (dequantise, AdamW step, requantise); earlier ones
    needed a GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    version = getattr(bnb, "__version__", "(unknown version)")
    probe = torch.zeros(4096, device=device, requires_grad=True)
    try:
        optimizer = bnb.optim.AdamW8bit([probe], min_8bit_size=probe.numel())
        probe.grad = torch.ones_like(probe)
        optimizer.step()
        eight_bit = optimizer.state[probe]["state1"].dtype == torch.uint8
        problem = None if eight_bit else "its optimizer state is not 8-bit there"
    except Exception as exc:
        problem = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    if problem is None:
        return
    if device == "cpu":
        raise DifftoolError(
            f"[optimizer] name = 'adamw-8bit': no CUDA GPU is visible and bitsandbytes {version} cannot run its "
            f"8-bit AdamW on the CPU ({problem}); upgrade it (pip install -U 'bitsandbytes>=0.50.2', which runs "
            "it on a CPU), train on a CUDA GPU, or use name = 'adamw'")
    raise DifftoolError(
        f"[optimizer] name = 'adamw-8bit': bitsandbytes {version} cannot run its 8-bit AdamW on this GPU "
        f"({problem}); install a bitsandbytes built for this CUDA version (`python -m bitsandbytes` diagnoses "
        "it), or use name = 'adamw'")


def warn_about_schedule(state) -> None:
    """Schedule-free AdamW with an LR schedule that decays: allowed (schedulefree takes the LR a
    schedule sets), but it is the decay the optimizer exists to replace, so say so."""
    optimizer = getattr(state.optimizer, "optimizer", state.optimizer)  # under Accelerate's wrapper
    if not type(optimizer).__module__.startswith("schedulefree") or not state.accelerator.is_main_process:
        return
    entry = state.recipe.entries["lr_schedule"]
    if entry.plugin == BUILTIN_PLUGIN and entry.name in CONSTANT_SCHEDULES:
        return
    note(f"{state.recipe.where('lr_schedule')} name = '{entry.name}' is not a constant schedule: schedule-free "
         "AdamW averages its weights instead of decaying the learning rate, and a decay on top shrinks its late "
         "steps for nothing; set name = 'constant' and warm up with "
         "[optimizer] warmup_steps")
