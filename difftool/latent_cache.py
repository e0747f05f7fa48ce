"""A disk cache of VAE latent distributions, so epochs (and runs) after the first skip the VAE.

An entry is found by two digests: one of the VAE (its config, its weights and the dtype it
encodes in), naming the cache's folder, and one of the exact preprocessed pixels handed to it
(so the dataset, resolution, crop, flip and any other preprocessing are all part of the key),
naming the file. A changed VAE or a changed image can therefore never meet a stale entry.
Entries are written atomically, one file each, so processes of a distributed run and runs
side by side share a cache safely, and an interrupted run keeps what it encoded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rich.console import Console
from rich.markup import escape

from difftool.files import WriteFailed, atomic_path, cache_root, usual_mode, writing


def default_folder() -> Path:
    """difftool's cache folder (difftool.files.cache_root)."""
    return cache_root()


def vae_digest(vae) -> str:
    """A digest of the VAE's class, config, weights and dtype."""
    digest = hashlib.blake2b(digest_size=16)
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    digest.update(json.dumps([type(vae).__name__, config, str(vae.dtype)], sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pixel_digests(pixels: torch.Tensor) -> list[str]:
    """A digest of each image's exact values (any dtype, any device)."""
    values = pixels.detach().cpu().contiguous()
    return [hashlib.blake2b(image.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest() for image in values]


class LatentCache:
    """Latent distributions by pixel digest, under `folder`/latents/{vae digest}/. Entries are
    read from disk each time (the OS keeps recent files in memory), so a large dataset's cache
    takes disk, not the run's memory.

    It is only a cache: an entry that cannot be read (damaged, say) is encoded again and
    rewritten, and when entries cannot be written (a full disk) the run says so once and goes
    on encoding with the VAE."""

    def __init__(self, folder: Path, vae):
        self.folder = Path(folder) / "latents" / vae_digest(vae)
        self.writable = True

    def encode(self, pixels: torch.Tensor, encode) -> torch.Tensor:
        """`encode(pixels)` for the batch, computed only for images not cached yet."""
        digests = pixel_digests(pixels)
        found = {i: latent for i, d in enumerate(digests) if (latent := self.load(d)) is not None}
        missing = [i for i in range(len(digests)) if i not in found]
        if missing:
            for i, latent in zip(missing, encode(pixels[missing])):
                found[i] = self.store(digests[i], latent)
        return torch.stack([found[i] for i in range(len(digests))]).to(pixels.device)

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def load(self, digest: str) -> torch.Tensor | None:
        """The cached entry, or None if there is none or it cannot be read."""
        from safetensors.torch import load_file

        path = self.path(digest)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["latent"]
        except Exception:  # damaged: encoded again, and the entry rewritten
            return None

    def store(self, digest: str, latent: torch.Tensor) -> torch.Tensor:
        from safetensors.torch import save_file

        latent = latent.detach().cpu().contiguous()
        if not self.writable:
            return latent
        path = self.path(digest)
        try:
            with writing("a latent cache entry", path):
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as partial:
                    save_file({"latent": latent}, str(partial))
                    usual_mode(partial, 0o666)  # safetensors writes owner-only
        except WriteFailed as exc:
            self.writable = False
            note = f"{exc}; the run goes on without caching latents (set [dataset] latent_cache_dir elsewhere to cache them)"
            Console(stderr=True).print(f"[yellow]{escape(note)}[/]", highlight=False, soft_wrap=True)
        return latent
