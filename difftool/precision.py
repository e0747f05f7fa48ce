"""`mixed_precision = "auto"`: the fastest precision this machine runs well; `allow_tf32`."""

from __future__ import annotations

import contextlib
import functools
import time

import torch


def resolve(wanted: str) -> str:
    """'auto' becomes fp16 on CUDA, bf16 on a CPU whose bf16 matmuls outrun fp32 ones (native
    bf16, e.g. AVX-512 BF16 or AMX), else 'no'; other values are kept."""
    if wanted != "auto":
        return wanted
    if torch.cuda.is_available():
        return "fp16"
    return "bf16" if cpu_bf16_is_faster() else "no"


@functools.cache
def cpu_bf16_is_faster(size: int = 128, repeats: int = 8) -> bool:
    """Time a small matmul in both precisions (a few ms): CPUs without native bf16 emulate it,
    hundreds of times slower, and no flag says so portably."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, dtype=dtype)
        a @ a  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            a @ a
        timings[dtype] = time.perf_counter() - started
    return timings[torch.bfloat16] < timings[torch.float32]


def effective(mixed_precision: str, device_type: str) -> str:
    """The precision a run computes in: fp16 autocast needs a GPU, so on a CPU an fp16 run is
    fp32 ("no"), and the frozen parts of a text-to-image model stay fp32 with it."""
    return "no" if mixed_precision == "fp16" and device_type == "cpu" else mixed_precision


@contextlib.contextmanager
def tf32(allowed: bool):
    """`run.allow_tf32`: fp32 matmuls may use TF32 (a 10-bit mantissa, fp32's range) where the
    hardware has it (CUDA GPUs from Ampere on), for the run, restored afterwards. cuDNN
    convolutions already use TF32 by default. This CPU has none: nothing changes here.

    torch's documented switch, `set_float32_matmul_precision("high")`, is used rather than its
    newer per-backend `fp32_precision` settings: once those are set, code that reads the
    precision with the older getter (torch.compile does) raises."""
    saved = torch.get_float32_matmul_precision()
    if allowed:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def tf32_on() -> bool:
    """Whether fp32 matmuls may use TF32 now."""
    return torch.get_float32_matmul_precision() != "highest"
