"""The tutorial's preprocessing (resize, random horizontal flip, scale to [-1, 1]) on PIL + torch,
and the class labels of class-conditional training.

Everything random happens in the training process, from torch's checkpointed RNG or from
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import io
import numbers
import sys

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

    With `labels` = {"column": str, "names": list[str]} (see `class_names`), also
    {"labels": int}: the index in `names` of the row's value in that column (a class name, or
    already a class index, as a ClassLabel column holds); any other value is a `BadLabel`.
    """

    def __init__(self, rows, image_size: int, cache: bool = True, shared: bool = False,
                 center_crop: bool = False, caption_column: str | None = None, labels: dict | None = None):
        self.rows = undecoded(rows)
        self.image_size, self.center_crop, self.caption_column = image_size, center_crop, caption_column
        self.label_column = self.label_names = self.label_index = None
        if labels is not None:
            self.label_column, self.label_names = labels["column"], list(labels["names"])
            self.label_index = {name: index for index, name in enumerate(self.label_names)}
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
        if self.label_column is not None:
            item["labels"] = self.label(index)
        return item

    def label(self, index: int) -> int:
        """The class index of row `index`'s label."""
        value = self.rows[index][self.label_column]
        if isinstance(value, str):
            found = self.label_index.get(value)
        elif _is_int(value) and 0 <= value < len(self.label_names):
            found = int(value)
        else:
            found = None
        if found is None:
            names = self.label_names
            shown = ", ".join(map(repr, names[:10])) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
            raise BadLabel(
                f"[dataset] row {_row_number(self.rows, index)} has {self.label_column} = {value!r}, which is not "
                f"one of the classes [{shown}]; give it one of these names, or a class index from 0 to "
                f"{len(names) - 1} (every split must use the classes of the training rows)"
            )
        return found


def class_names(rows, column: str, where: str) -> list[str]:
    """The class names of the label column `column` of dataset `rows` (a datasets.Dataset, a
    sequence of dict rows, or a torch Subset of either, whose whole dataset is read, so that
    training and held-out rows share one list): a ClassLabel feature's names; else, of the
    column's values, the sorted strings, or for integers >= 0, "0" to str(the largest).
    Anything else, a missing column or fewer than 2 classes is a DifftoolError naming `where`."""
    while isinstance(rows, torch.utils.data.Subset):
        rows = rows.dataset
    datasets = sys.modules.get("datasets")  # loaded already if `rows` is a datasets.Dataset
    if datasets is not None and isinstance(rows, datasets.Dataset):
        if column not in rows.column_names:
            raise _no_label_column(column, where, rows.column_names)
        feature = rows.features[column]
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint", "string", "large_string")):
            names = _names_of(rows.unique(column), column, where)  # one pass over the column, no images decoded
        else:
            raise DifftoolError(f"{where} label_column = '{column}' holds {feature}, not class labels; labels "
                                "are class names (strings) or class indices (integers >= 0)")
    else:
        values = []
        for index in range(len(rows)):
            row = rows[index]
            if column not in row:
                raise _no_label_column(column, where, list(row), "" if index == 0 else f" (row {index})")
            values.append(row[column])
        names = _names_of(values, column, where)
    if len(names) < 2:
        raise DifftoolError(
            f"{where} class-conditional training needs at least 2 classes; label_column = '{column}' has "
            f"{len(names)} ({names}); add images of another class (an imagefolder: one subfolder per class), "
            "or leave label_column out to train without labels"
        )
    return names


def _names_of(values, column: str, where: str) -> list[str]:
    """Class names from a label column's values: sorted unique strings, or "0".."max" for ints >= 0."""
    values = list(values)
    if values and all(isinstance(value, str) for value in values):
        return sorted(set(values))
    if values and all(_is_int(value) and value >= 0 for value in values):
        return [str(index) for index in range(int(max(values)) + 1)]
    odd = [value for value in values if not isinstance(value, str) and not (_is_int(value) and value >= 0)]
    if odd:
        found = f"{odd[0]!r} ({type(odd[0]).__name__})"
    else:
        found = "both strings and integers" if values else "no values"
    raise DifftoolError(
        f"{where} label_column = '{column}' holds {found}; labels must be all class names (strings) "
        "or all class indices (integers >= 0)"
    )


def _no_label_column(column: str, where: str, columns, row: str = "") -> DifftoolError:
    return DifftoolError(
        f"{where} label_column = '{column}': the rows{row} have no such column (they have {list(columns)}); "
        "set label_column to one of them; an imagefolder gets a `label` column from class subfolders "
        "(path/CLASS/image.png); synthetic-butterflies gives one with labels = true"
    )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _row_number(rows, index: int) -> int:
    """The index in the whole dataset of row `index` of `rows`, through any Subsets."""
    while isinstance(rows, torch.utils.data.Subset):
        rows, index = rows.dataset, rows.indices[index]
    return int(index)


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


class DataError(DifftoolError):
    """A problem found while a DataLoader worker reads a row.

    A DataLoader worker's exception comes back to the training process rebuilt from one string,
    "Caught ... Original Traceback ...\n<type>: <message>"; this keeps the message alone."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class UnreadableImage(DataError):
    """A dataset image that cannot be decoded."""


class BadLabel(DataError):
    """A row whose label is not one of the classes."""


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


def shuffled_tags(caption: str, keep: int = 0) -> str:
    """A tag-style caption ("1girl, red hair, smiling") with its comma-separated tags after the
    first `keep` in a random order (torch's global RNG, so a resumed run draws the same
    orders), rejoined with ", ". A caption of one tag comes back as it is."""
    tags = [tag.strip() for tag in caption.split(",")]
    head, tail = tags[:keep], tags[keep:]
    if len(tail) < 2:
        return caption
    return ", ".join(head + [tail[i] for i in torch.randperm(len(tail)).tolist()])


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2 (torch's global RNG)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
