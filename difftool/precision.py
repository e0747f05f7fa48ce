"""`mixed_precision = "auto"`: the fastest precision this machine runs well."""

from __future__ import annotations

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
