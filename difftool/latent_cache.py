"""Disk caches of what the frozen encoders of a text-to-image model make, so that epochs (and
runs) after the first skip them: the VAE's latent distributions and the text encoders' prompt
embeddings.

An entry is found by two digests: one of the encoders (their classes, configs, weights and the
dtype they encode in; for text, the tokenizers too), naming the cache's folder, and one of the
exact input (the preprocessed pixels handed to the VAE and their shape, so the dataset,
resolution, bucket, crop, flip and any other preprocessing are all part of the key; or a caption's text), naming the file. A
changed encoder or a changed input can therefore never meet a stale entry. Entries are written
atomically, one file each, so processes of a distributed run and runs side by side share a
cache safely, and an interrupted run keeps what it encoded.
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


def module_digest(modules, extra=()) -> str:
    """A digest of each module's class, config, weights and dtype (None where one is absent), and
    of `extra`, anything else the encoding depends on (JSON-able)."""
    digest = hashlib.blake2b(digest_size=16)
    for module in modules:
        if module is None:
            digest.update(b"none")
            continue
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else module.config  # transformers'
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps([type(module).__name__, config, str(module.dtype)], sort_keys=True,
                                 default=str).encode())
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if extra:  # (none leaves the digests of caches written before there was any as they were)
        digest.update(json.dumps(list(extra), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def vae_digest(vae) -> str:
    """A digest of the VAE's class, config, weights and dtype, and of its tiling, which changes
    what it encodes (slicing only splits the batch, so it is left out)."""
    if not getattr(vae, "use_tiling", False):
        return module_digest([vae])
    tiling = [getattr(vae, "tile_sample_min_size", None), getattr(vae, "tile_overlap_factor", None)]
    return module_digest([vae], [{"tiling": tiling}])


def tokenizer_rules(tokenizer) -> list | None:
    """What a tokenizer turns text into ids by: its class, its rules (a fast tokenizer's whole
    serialisation: vocabulary, merges, normalisation; else its vocabulary) and its length limit."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return [type(tokenizer).__name__, rules, tokenizer.model_max_length, tokenizer.padding_side]


def text_digest(encoders, tokenizers, extra=()) -> str:
    """A digest of the text encoders (class, config, weights, dtype), their tokenizers and `extra`
    (how the encoders' outputs are put together: the pipeline's class)."""
    return module_digest(encoders, [*(tokenizer_rules(t) for t in tokenizers), *extra])


def pixel_digests(pixels: torch.Tensor) -> list[str]:
    """A digest of each image's exact values and shape (any dtype, any device). A 32x64 and a
    64x32 image (an aspect-ratio bucket and its mirror) can hold the same bytes, so the shape
    is part of the digest: as blake2b's personalisation, which makes each shape's digests a
    separate hash. A square image's digest is kept as it was before buckets (values alone,
    and no non-square shape's personalisation is empty), so caches written then stay valid."""
    values = pixels.detach().cpu().contiguous()
    height, width = values.shape[-2:]
    person = b"" if height == width else "x".join(map(str, values.shape[1:])).encode()[:16]
    return [hashlib.blake2b(image.view(torch.uint8).numpy().tobytes(), digest_size=16, person=person).hexdigest()
            for image in values]


def text_digests(prompts: list[str]) -> list[str]:
    """A digest of each prompt's exact text."""
    return [hashlib.blake2b(prompt.encode("utf-8"), digest_size=16).hexdigest() for prompt in prompts]


class DiskCache:
    """Entries (named tensors) by digest under `folder`, one safetensors file each. Entries are
    read from disk each time (the OS keeps recent files in memory), so a large dataset's cache
    takes disk, not the run's memory.

    It is only a cache: an entry that cannot be read (damaged, say) is computed again and
    rewritten, and when entries cannot be written (a full disk) the run says so once and goes
    on computing them. `what` names the entries in that message ("latent", "text embedding")."""

    what = "cache"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.writable = True

    def fetch(self, digests: list[str], compute) -> list[dict]:
        """The entry of each digest: read, or, for those not cached yet, `compute(indices)` (a
        list of entries, one per index) and stored."""
        found = {i: entry for i, d in enumerate(digests) if (entry := self.load(d)) is not None}
        missing = [i for i in range(len(digests)) if i not in found]
        if missing:
            for i, entry in zip(missing, compute(missing)):
                found[i] = self.store(digests[i], entry)
        return [found[i] for i in range(len(digests))]

    def path(self, digest: str) -> Path:
        return self.folder / digest[:2] / f"{digest}.safetensors"

    def load(self, digest: str) -> dict | None:
        """The cached entry, or None if there is none or it cannot be read."""
        from safetensors.torch import load_file

        path = self.path(digest)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except Exception:  # damaged: computed again, and the entry rewritten
            return None

    def store(self, digest: str, entry: dict) -> dict:
        """Write the entry (its tensors moved to the CPU); returns it as written."""
        from safetensors.torch import save_file

        entry = {name: tensor.detach().cpu().contiguous() for name, tensor in entry.items()}
        if not self.writable:
            return entry
        path = self.path(digest)
        try:
            with writing(f"a {self.what} cache entry", path):
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as partial:
                    save_file(entry, str(partial))
                    usual_mode(partial, 0o666)  # safetensors writes owner-only
        except WriteFailed as exc:
            self.writable = False
            note = (f"{exc}; the run goes on without caching {self.what}s (set [dataset] latent_cache_dir "
                    "elsewhere to cache them)")
            Console(stderr=True).print(f"[yellow]{escape(note)}[/]", highlight=False, soft_wrap=True)
        return entry


class LatentCache(DiskCache):
    """VAE latent distributions by pixel digest, under `folder`/latents/{vae digest}/."""

    what = "latent"

    def __init__(self, folder: Path, vae):
        super().__init__(Path(folder) / "latents" / vae_digest(vae))

    def encode(self, pixels: torch.Tensor, encode) -> torch.Tensor:
        """`encode(pixels)` for the batch, computed only for images not cached yet."""
        entries = self.fetch(pixel_digests(pixels), lambda missing: [{"latent": latent}
                                                                     for latent in encode(pixels[missing])])
        return torch.stack([entry["latent"] for entry in entries]).to(pixels.device)


class TextCache(DiskCache):
    """Prompt embeddings by text digest, under `folder`/text/{digest of the text encoders and
    tokenizers}/: one entry per distinct prompt (the empty one of caption dropout too), each the
    named tensors the encoders make of it, without the batch dimension.

    On disk beside the latents rather than in memory: an entry is large (77 x 768 values for SD
    1.5, 333 x 4096 for SD3 with its T5: 2.7 MB in fp16), a captioned dataset has about one
    distinct prompt per image, so in memory the cache of a large dataset would outgrow the RAM
    that the text encoders it saves running already take; on disk it is also reused by later
    runs with the same encoders, as the latents are, and shares their atomic writes and repairs."""

    what = "text embedding"

    def __init__(self, folder: Path, encoders, tokenizers, extra=()):
        super().__init__(Path(folder) / "text" / text_digest(encoders, tokenizers, extra))

    def encode(self, prompts: list[str], encode) -> list[dict]:
        """`encode(prompts)` (a list of {name: tensor}, one per prompt) for the prompts, computed
        only for those not cached yet."""
        return self.fetch(text_digests(prompts), lambda missing: encode([prompts[i] for i in missing]))
