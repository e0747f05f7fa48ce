"""The tutorial's preprocessing (resize, random horizontal flip, scale to [-1, 1]) on PIL + torch.

Everything random happens in the training process, from torch's checkpointed RNG or from
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from difftool.errors import DifftoolError
from difftool.images import DECODE_ERRORS, to_rgb


class ImageDataset(torch.utils.data.Dataset):
    """Rows with an `image` column, as {"images": float tensor (3, size, size) in [-1, 1]}, plus
    {"captions": str} from `caption_column` when given. With `center_crop`, images are resized
    on their shorter side and cropped to a square; without it, squashed to a square.

    With `cache`, each image is decoded and resized once and kept as uint8 (4 bytes less per
    value than float); later epochs read it from memory. With `shared`, the cache lives in
    shared memory, so DataLoader workers fill and read one cache between them.
    """

    def __init__(self, rows, image_size: int, cache: bool = True, shared: bool = False,
                 center_crop: bool = False, caption_column: str | None = None):
        self.rows = undecoded(rows)
        self.image_size, self.center_crop, self.caption_column = image_size, center_crop, caption_column
        self.cache = self.filled = None
        if cache:
            self.cache = torch.zeros(len(rows), 3, image_size, image_size, dtype=torch.uint8)
            self.filled = torch.zeros(len(rows), dtype=torch.bool)
            if shared:
                self.cache.share_memory_()
                self.filled.share_memory_()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.cache is not None and self.filled[index]:
            pixels = self.cache[index]
        else:
            pixels = decode(self.rows[index]["image"], self.image_size, self.center_crop)
            if self.cache is not None:
                self.cache[index] = pixels
                self.filled[index] = True
        item = {"images": pixels.float() / 127.5 - 1.0}
        if self.caption_column is not None:
            item["captions"] = self.rows[index][self.caption_column] or ""
        return item


def decode(value, size: int, center_crop: bool = False) -> torch.Tensor:
    """A PIL image, or datasets' undecoded {"path", "bytes"}, as uint8 (3, size, size): squashed
    to the square, or with `center_crop` resized on its shorter side and cropped at the centre.
    Any mode becomes RGB by `difftool.images.to_rgb`'s rules; an image that cannot be decoded
    is an `UnreadableImage` naming its file."""
    try:
        if isinstance(value, Image.Image):
            return _pixels(value, size, center_crop)
        # as datasets does: the bytes when a row holds them (its path may then be a bare name)
        with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as image:
            return _pixels(image, size, center_crop)
    except DECODE_ERRORS as exc:
        raise UnreadableImage(
            f"[dataset] {_name(value)} is not a readable image ({type(exc).__name__}: {exc}); "
            "remove or replace it"
        ) from exc


def _pixels(image: Image.Image, size: int, center_crop: bool) -> torch.Tensor:
    # a JPEG not yet decoded is decoded at the smallest 1/2, 1/4 or 1/8 scale that is still at
    # least `size` (much faster for large photos); other formats ignore this
    image.draft("RGB", (size, size))
    image = to_rgb(image)
    box = None
    if center_crop:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        box = (left, top, left + side, top + side)
    # bilinear with PIL's antialiasing, as torchvision's Resize does on PIL images
    image = image.resize((size, size), Image.BILINEAR, box=box)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _name(value) -> str:
    """The file behind a row's image, for messages."""
    if isinstance(value, dict):
        return value.get("path") or "an image stored in the dataset (as bytes)"
    return getattr(value, "filename", "") or "an image of the dataset (in memory)"


class UnreadableImage(DifftoolError):
    """A dataset image that cannot be decoded.

    A DataLoader worker's exception comes back to the training process rebuilt from one string,
    "Caught ... Original Traceback ...\n<type>: <message>"; this keeps the message alone."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def undecoded(rows):
    """A datasets.Dataset whose `image` column datasets would decode, made to hand over the
    file instead, so that `decode` can use JPEG draft mode; other rows as they are."""
    features = getattr(rows, "features", None) or {}
    feature = features.get("image")
    if getattr(feature, "decode", False) and type(feature).__name__ == "Image":
        import datasets

        return rows.cast_column("image", datasets.Image(decode=False))
    return rows


class EpochShuffle(torch.utils.data.Sampler):
    """A random order of `size` rows that depends only on (seed, epoch)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (torch's global RNG)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
