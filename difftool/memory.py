"""How much memory a training step needs at the least, known before any is spent.

The model runs once on PyTorch's meta device (shapes only: no memory, no arithmetic) with a
batch of the recipe's size, and the outputs of its convolutions are added up. Backward needs
each of them (the normalisation or activation after a convolution keeps its input), and every
implementation of a convolution writes its whole output, so the sum is a floor, not a guess.
(An estimate of the whole peak from the meta device came out 4 to 19 times too high on this
project's UNets, because there attention is written out as full matrices that the real fused
kernels never hold; the floor leaves attention out and is never too high.)
"""

from __future__ import annotations

import os


def available() -> tuple[int, str] | None:
    """(bytes, what) of memory a run on this machine can use: the GPU's, else the RAM's."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "this GPU has"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    except (ValueError, OSError, AttributeError):
        return None


def convolution_bytes(model, batch_size: int, image_size: int, channels: int) -> float | None:
    """The bytes of every convolution output in one forward pass of `model` (sample, timestep),
    or (sample, timestep, class_labels=zeros) where it needs labels, over a float32 batch, counted
    on the meta device; infinite where a tensor of the pass would have more elements than 64 bits
    count; None if the model cannot run there."""
    import torch
    from torch.func import functional_call
    from torch.utils._python_dispatch import TorchDispatchMode

    class Convolutions(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.convolution:
                Convolutions.total += out.numel() * out.element_size()
            return out

    meta = {name: torch.empty_like(value, device="meta")
            for name, value in [*model.named_parameters(), *model.named_buffers()]}
    sample = torch.empty(batch_size, channels, image_size, image_size, device="meta")
    timesteps = torch.zeros(batch_size, dtype=torch.long, device="meta")
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta")
    for extra in ({}, {"class_labels": labels}):  # a class-conditional model (a DiT always is) needs labels
        Convolutions.total = 0
        try:
            with Convolutions():
                functional_call(model, meta, (sample, timesteps), extra)
        except RuntimeError as exc:
            if "overflow" in str(exc):  # "Storage size calculation overflowed"
                return float("inf")
        except Exception:  # an operation the meta device lacks, or a model that needs other inputs
            pass
        else:
            return Convolutions.total
    return None


def too_big(model, batch_size: int, image_size: int, channels: int) -> str | None:
    """Why one training step of `model` at this batch and image size cannot fit in memory, or None."""
    floor, memory = convolution_bytes(model, batch_size, image_size, channels), available()
    if floor is None or memory is None or floor <= memory[0]:
        return None
    need = "more than 16 EiB" if floor == float("inf") else f"at least {floor / 2**30:,.1f} GiB"
    return (f"one training step at image_size = {image_size} and batch_size = {batch_size} needs "
            f"{need} for its activations, and {memory[1]} {memory[0] / 2**30:,.1f} GiB")
