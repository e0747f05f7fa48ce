"""The metric contract, and the on-disk cache of reference statistics.

A metric compares generated images with reference images. Both arrive in batches, as uint8
tensors of shape (N, 3, H, W), so that 10,000 images never need to be in memory at once: a
metric keeps statistics (features, sums, descriptors), never the images. What it learns from
the reference is its *reference state*, a dict of tensors, which `ReferenceCache` stores on
disk keyed by the reference data's fingerprint, the image size and the metric's settings, so
that a second evaluation against the same data skips that pass.

This module imports no torch at import time (it is reached by `difftool list`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from difftool.errors import DifftoolError



class Metric:
    """Base class of metrics (a metric may also be any object with these attributes).

    Lifecycle: `update_reference` with every reference batch, or `load_reference_state` with
    what `reference_state` returned earlier; then `update` with every generated batch; then
    `compute`. `reset` forgets the generated images (not the reference), so one metric object
    can evaluate a run again and again during training.
    """

    #: the fewest generated images (and reference images) it can be computed from
    min_samples: int = 1
    #: whether it compares with reference images (False: e.g. a CLIP score against prompts)
    needs_reference: bool = True
    #: whether `update` needs the prompts of the images (text-to-image runs only)
    needs_prompts: bool = False

    def settings(self) -> dict[str, Any]:
        """What the reference state depends on besides the data and the image size (e.g. the
        feature network's weights): part of the cache key. JSON-serialisable."""
        return {}

    def update_reference(self, images) -> None:
        """Take one batch of reference images (uint8, (N, 3, H, W))."""
        raise NotImplementedError

    def reference_state(self) -> dict:
        """What it has gathered from the reference, as a dict of tensors (for the cache)."""
        raise NotImplementedError

    def load_reference_state(self, state: dict) -> None:
        """Restore what `reference_state` returned (instead of seeing the reference again)."""
        raise NotImplementedError

    def update(self, images, prompts: list[str] | None = None) -> None:
        """Take one batch of generated images (uint8, (N, 3, H, W)), with their prompts when
        `needs_prompts`."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """The values, by name (e.g. {"swd": 41.2, "swd_32": 38.0}), from what it has seen."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the generated images seen so far; keep the reference."""
        raise NotImplementedError


METHODS = ("update", "compute", "reset", "update_reference", "reference_state", "load_reference_state")


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def folder_fingerprint(folder: Path) -> list:
    """What identifies a folder of files cheaply: each file's relative path, size and mtime."""
    entries = []
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            stat = path.stat()
            entries.append([path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    return sorted(entries)


def cache_dir() -> Path:
    """The folder of cached reference statistics: reference/ in difftool's cache folder
    ($DIFFTOOL_CACHE_DIR, default ~/.cache/difftool)."""
    from difftool.files import cache_root

    return cache_root() / "reference"


class ReferenceCache:
    """Reference states on disk, one safetensors file per (metric, settings, data, size)."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else cache_dir()

    def path(self, metric_name: str, metric, data_fingerprint: str, image_size: int, kwargs: dict) -> Path:
        key = fingerprint(metric_name, kwargs, metric.settings(), data_fingerprint, image_size)
        return self.folder / f"{metric_name.replace(':', '-')}-{image_size}px-{key}.safetensors"

    def load(self, path: Path, metric) -> bool:
        """Give `metric` the state cached at `path`; False where there is none (or it is damaged,
        in which case it is recomputed and replaced)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            return False
        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError, KeyError):
            return False
        metric.load_reference_state(state)
        return True

    def save(self, path: Path, metric) -> None:
        """Store the metric's reference state at `path` (atomically; a cache that cannot be
        written is only a missed speed-up, so that is not an error)."""
        from safetensors.torch import save_file

        from difftool.files import atomic_path

        state = {name: tensor.detach().cpu().contiguous() for name, tensor in metric.reference_state().items()}
        try:
            with atomic_path(path) as tmp:
                save_file(state, tmp)
        except OSError:
            pass

