"""The tutorial's preprocessing (resize, random horizontal flip, scale to [-1, 1]) on PIL + torch,
and the class labels of class-conditional training.

Everything random happens in the training process, from torch's checkpointed RNG or from
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import io
import math
import numbers
import sys

import numpy as np
import torch
from PIL import Image, ImageOps

from difftool.buckets import centre_offset, cover, crop_seed, random_offset
from difftool.errors import DifftoolError
from difftool.images import DECODE_ERRORS, to_rgb


class ImageDataset(torch.utils.data.Dataset):
    """Rows with an `image` column, as {"images": float tensor (3, size, size) in [-1, 1]}, plus
    {"captions": str} from `caption_column` when given. With `center_crop`, images are resized
    on their shorter side and cropped to a square; without it, squashed to a square.

    With `targets` (one (height, width) per row: its aspect-ratio bucket, difftool.buckets),
    each image is instead resized, keeping its aspect, to the smallest size that covers its
    target, and cropped to it at the centre. With `random_crop`, the crop's offset is drawn
    (without targets, images are resized on their shorter side to image_size and cropped to
    the square): from the crop seed the sampler hands over with the index, as (index,
    crop_seed), a function of (seed, epoch, index) (difftool.buckets.crop_seed), so a resumed
    run crops as an uninterrupted one; a plain index gets the centre (validation).

    With `geometry`, every item also says where its pixels came from, as SDXL's size
    conditioning needs, in int64 tensors of 2: "original_sizes" (height, width of the file), "resized_sizes" (the
    size it was resized to before cropping: image_size x image_size when squashed) and
    "crop_top_lefts" (top, left of the crop in the resized image).

    Masks: rows with a `mask` column (a PIL image, datasets' {"path", "bytes"}, a file path, or
    None: the whole image counts) also give "masks", float (1, H, W) in [0, 1]: the mask's
    grayscale (white = 1), resized and cropped exactly as its image. A mask whose size is not
    its image's is a `BadMask` naming both files.

    With `cache`, each image (and mask) is decoded and resized once and kept as uint8 (4 bytes
    less per value than float); later epochs read it from memory. With random_crop it is kept
    uncropped (`sizes`, each row's (height, width), lays the cache out; read from the files'
    headers when not given), and cropped at each read. With `shared`, the cache lives in shared
    memory, so DataLoader workers fill and read one cache between them.

    With `labels` = {"column": str, "names": list[str]} (see `class_names`), also
    {"labels": int}: the index in `names` of the row's value in that column (a class name, or
    already a class index, as a ClassLabel column holds); any other value is a `BadLabel`.
    """

    def __init__(self, rows, image_size: int, cache: bool = True, shared: bool = False,
                 center_crop: bool = False, caption_column: str | None = None, labels: dict | None = None,
                 targets: list | None = None, random_crop: bool = False, sizes: list | None = None,
                 geometry: bool = False):
        self.rows = undecoded(rows)
        self.image_size, self.center_crop, self.caption_column = image_size, center_crop, caption_column
        self.targets = None if targets is None else [tuple(target) for target in targets]
        self.random_crop, self.masked, self.with_geometry = random_crop, has_column(self.rows, "mask"), geometry
        columns = column_names(self.rows)  # rows of other kinds may each have a loss_weight or not
        self.weighted = columns is None or "loss_weight" in columns
        self.label_column = self.label_names = self.label_index = None
        if labels is not None:
            self.label_column, self.label_names = labels["column"], list(labels["names"])
            self.label_index = {name: index for index, name in enumerate(self.label_names)}
        self.cache = self.filled = self.geometry = None  # geometry: each cached row's load() numbers
        if cache:
            channels = 4 if self.masked else 3
            if random_crop:
                sizes = image_sizes(self.rows) if sizes is None else sizes
                kept = [cover(tuple(size), self.target(i)) for i, size in enumerate(sizes)]
            else:
                kept = [self.target(i) for i in range(len(self.rows))]
            self.shapes = [(channels, *size) for size in kept]
            self.offsets = np.cumsum([0] + [math.prod(shape) for shape in self.shapes]).tolist()
            self.cache = torch.zeros(self.offsets[-1], dtype=torch.uint8)
            self.filled = torch.zeros(len(rows), dtype=torch.bool)
            self.geometry = torch.zeros(len(rows), 6, dtype=torch.int64)  # original, resized, crop offset
            if shared:
                for tensor in (self.cache, self.filled, self.geometry):
                    tensor.share_memory_()

    def __len__(self) -> int:
        return len(self.rows)

    def target(self, index: int) -> tuple[int, int]:
        """The (height, width) row `index` is cropped to."""
        return self.targets[index] if self.targets is not None else (self.image_size, self.image_size)

    def load(self, index: int) -> tuple[torch.Tensor, list[int]]:
        """Row `index` decoded: (uint8 (3 or 4 with the mask, H, W) pixels, [original height,
        width, resized height, width, crop top, left]). The pixels are cropped, but with
        random_crop only resized (the crop is drawn at each read)."""
        row = self.rows[index]
        value, mask = row["image"], row.get("mask") if self.masked else None
        if self.targets is None and not self.random_crop:  # the square, squashed or centre-cropped
            pixels = decode(value, self.image_size, self.center_crop)
            # the file's size is only needed for SDXL's ids and masks: not read otherwise
            needed = self.with_geometry or self.masked
            original = header_size(value) if needed else (0, 0)
            resized, offset = square_geometry(original, self.image_size, self.center_crop) if needed else ((0, 0), (0, 0))
            if self.masked:
                pixels = torch.cat([pixels, read_mask(mask, value, original, lambda image: _pixels(
                    image, self.image_size, self.center_crop, mask=True))])
            return pixels, [*original, *resized, *offset]
        target = self.target(index)

        def covered(image: Image.Image):  # the upright size first: a JPEG's draft shrinks the image
            return upright_size(image), _covered(image, target)

        original, pixels = read(value, covered)
        if self.masked:
            pixels = torch.cat([pixels, read_mask(mask, value, original, lambda image: _covered(image, target, True))])
        resized = tuple(pixels.shape[1:])
        offset = centre_offset(resized, target)
        if not self.random_crop:
            pixels = pixels[:, offset[0]:offset[0] + target[0], offset[1]:offset[1] + target[1]].contiguous()
        return pixels, [*original, *resized, *offset]

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if self.cache is not None and self.filled[index]:
            start, shape = self.offsets[index], self.shapes[index]
            pixels = self.cache[start:start + math.prod(shape)].view(shape)
            geometry = self.geometry[index].tolist()
        else:
            pixels, geometry = self.load(index)
            if self.cache is not None:
                start = self.offsets[index]
                self.cache[start:start + pixels.numel()] = pixels.reshape(-1)
                self.geometry[index] = torch.tensor(geometry)
                self.filled[index] = True
        original, resized, offset = geometry[0:2], geometry[2:4], geometry[4:6]
        if self.random_crop:
            target = self.target(index)
            offset = centre_offset(resized, target) if seed is None else random_offset(resized, target, seed)
            pixels = pixels[:, offset[0]:offset[0] + target[0], offset[1]:offset[1] + target[1]]
        item = {"images": pixels[:3].float() / 127.5 - 1.0}
        if self.with_geometry:
            item.update(original_sizes=torch.tensor(original), resized_sizes=torch.tensor(resized),
                        crop_top_lefts=torch.tensor(offset))
        if self.masked:
            item["masks"] = pixels[3:].float() / 255.0
        if self.caption_column is None and self.label_column is None and not self.weighted:
            return item  # no column but the image's: the row is not read (its pixels may be cached)
        row = self.rows[index]
        if self.caption_column is not None:
            item["captions"] = row[self.caption_column] or ""
        if self.label_column is not None:
            item["labels"] = self.label(index, row[self.label_column])
        if self.weighted and "loss_weight" in row:
            item["loss_weights"] = loss_weight(row["loss_weight"], self.rows, index)
        return item

    def label(self, index: int, value) -> int:
        """The class index of `value`, row `index`'s label."""
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


def loss_weight(value, rows, index: int) -> float:
    """A row's `loss_weight` (the factor its loss is multiplied by in training and validation:
    difftool.engine.loss_weights) as a float; None (a row of a column others fill) is 1. A value
    that is not a finite number >= 0 is a `BadLossWeight` naming the row."""
    if value is None:
        return 1.0
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and 0 <= value < float("inf"):
        return float(value)
    raise BadLossWeight(f"[dataset] row {_row_number(rows, index)} has loss_weight = {value!r}; a loss weight is a "
                        "finite number >= 0 (1 counts the row as usual, 0 leaves it out of the loss)")


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
    return read(value, lambda image: _pixels(image, size, center_crop))


def read(value, function):
    """`function(image)` of a PIL image, datasets' undecoded {"path", "bytes"}, or a file path,
    opened lazily (nothing decoded until `function` asks); an image that cannot be decoded is
    an `UnreadableImage` naming its file."""
    try:
        if isinstance(value, Image.Image):
            return function(value)
        if isinstance(value, str):
            value = {"path": value, "bytes": None}
        # as datasets does: the bytes when a row holds them (its path may then be a bare name)
        with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as image:
            return function(image)
    except DECODE_ERRORS as exc:
        raise UnreadableImage(
            f"[dataset] {_name(value)} is not a readable image ({type(exc).__name__}: {exc}); "
            "remove or replace it"
        ) from exc


def header_size(value) -> tuple[int, int]:
    """(height, width) of an image upright, from its file's header (nothing is decoded)."""
    return read(value, upright_size)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of an image as shown: turned by its EXIF orientation, as to_rgb turns it
    (a phone's portrait JPEG is often stored landscape)."""
    turned = image.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap the sides
    return (image.width, image.height) if turned else (image.height, image.width)


def read_mask(mask, image, size: tuple[int, int], function) -> torch.Tensor:
    """`function(mask as grayscale PIL image)` of the mask of `image` (of `size`, height and
    width), or full (255: the whole image counts) where the row has none; a mask of another
    size is a `BadMask` naming both files."""
    if mask is None:
        return torch.full((1, *function(Image.new("L", (size[1], size[0]))).shape[1:]), 255, dtype=torch.uint8)

    def checked(opened: Image.Image) -> torch.Tensor:
        height, width = upright_size(opened)
        if (height, width) != tuple(size):
            raise BadMask(f"[dataset] the mask {_name(mask)} is {width}x{height} but its image "
                          f"{_name(image)} is {size[1]}x{size[0]}; a mask must have its image's size (white where "
                          "the loss counts, black where it does not): resize the mask to it")
        return function(opened)

    return read(mask, checked)


def square_geometry(original: tuple[int, int], size: int, center_crop: bool):
    """(resized size, crop offset) of `decode`'s square: squashed, nothing cropped; or resized on
    the shorter side and cropped at the centre (offsets in the resized image)."""
    if not center_crop:
        return (size, size), (0, 0)
    height, width = original
    scale = size / min(height, width)
    top, left = (height - min(original)) // 2, (width - min(original)) // 2
    return (round(height * scale), round(width * scale)), (round(top * scale), round(left * scale))


def _pixels(image: Image.Image, size: int, center_crop: bool, mask: bool = False) -> torch.Tensor:
    # a JPEG not yet decoded is decoded at the smallest 1/2, 1/4 or 1/8 scale that is still at
    # least `size` (much faster for large photos); other formats ignore this
    image = _mode(image, (size, size), mask)
    box = None
    if center_crop:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        box = (left, top, left + side, top + side)
    # bilinear with PIL's antialiasing, as torchvision's Resize does on PIL images
    image = image.resize((size, size), Image.BILINEAR, box=box)
    return _tensor(image)


def _covered(image: Image.Image, target: tuple[int, int], mask: bool = False) -> torch.Tensor:
    """The image resized (bilinear, antialiased), keeping its aspect, to cover `target` (height,
    width): difftool.buckets.cover."""
    height, width = cover(upright_size(image), target)
    return _tensor(_mode(image, (width, height), mask).resize((width, height), Image.BILINEAR))


def _mode(image: Image.Image, size: tuple[int, int], mask: bool) -> Image.Image:
    """An image as RGB (by to_rgb's rules; a JPEG drafted at the smallest scale still at least
    `size`, width x height), or a mask as grayscale ("L"), both upright (EXIF orientation)."""
    if mask:
        return ImageOps.exif_transpose(image).convert("L")
    image.draft("RGB", size)
    return to_rgb(image)


def _tensor(image: Image.Image) -> torch.Tensor:
    """uint8 (channels, height, width) of an RGB or L image."""
    values = np.array(image)
    return torch.from_numpy(values if values.ndim == 3 else values[:, :, None]).permute(2, 0, 1)


def column_names(rows) -> list[str] | None:
    """The columns of a datasets.Dataset (through any Subsets), or None for other rows."""
    while isinstance(rows, torch.utils.data.Subset):
        rows = rows.dataset
    return getattr(rows, "column_names", None)


def has_column(rows, column: str) -> bool:
    """Whether the rows have `column` (the first row's keys, for rows that are not a
    datasets.Dataset)."""
    columns = column_names(rows)
    if columns is not None:
        return column in columns
    while isinstance(rows, torch.utils.data.Subset):
        rows = rows.dataset
    return len(rows) > 0 and column in rows[0]


def image_sizes(rows) -> list[tuple[int, int]]:
    """(height, width) of each row's image, read from the files' headers without decoding; where
    the rows have masks, each is checked to have its image's size (a `BadMask` names both)."""
    images, masks = _column(rows, "image"), _column(rows, "mask") if has_column(rows, "mask") else None
    sizes = [header_size(image) for image in images]
    if masks is not None:
        for image, mask, size in zip(images, masks, sizes):
            if mask is not None:
                read_mask(mask, image, size, lambda opened: None)
    return sizes


def _column(rows, column: str) -> list:
    """Every row's value in `column`, images undecoded; a datasets.Dataset's read as one column."""
    indices = None
    while isinstance(rows, torch.utils.data.Subset):
        indices = [rows.indices[i] for i in (indices if indices is not None else range(len(rows)))]
        rows = rows.dataset
    rows = undecoded(rows)
    if getattr(rows, "column_names", None) is not None:
        values = rows[column]
    else:
        values = [rows[i].get(column) for i in (indices if indices is not None else range(len(rows)))]
        indices = None
    return values if indices is None else [values[i] for i in indices]


def _name(value) -> str:
    """The file behind a row's image, for messages."""
    if isinstance(value, str):
        return value
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


class BadMask(DataError):
    """A mask that does not fit its image."""


class BadLabel(DataError):
    """A row whose label is not one of the classes."""


class BadLossWeight(DataError):
    """A row whose loss_weight is not a finite number >= 0."""


def undecoded(rows):
    """A datasets.Dataset whose `image` (and `mask`) column datasets would decode, made to hand
    over the file instead, so that `decode` can use JPEG draft mode; other rows as they are."""
    features = getattr(rows, "features", None) or {}
    for column in ("image", "mask"):
        feature = features.get(column)
        if getattr(feature, "decode", False) and type(feature).__name__ == "Image":
            import datasets

            rows = rows.cast_column(column, datasets.Image(decode=False))
    return rows


class EpochShuffle(torch.utils.data.Sampler):
    """A random order of `size` rows that depends only on (seed, epoch). With `crops`, each index
    comes as (index, crop seed) for ImageDataset's random crop (difftool.buckets.crop_seed)."""

    def __init__(self, size: int, seed: int, crops: bool = False):
        self.size, self.seed, self.epoch, self.crops = size, seed, 0, crops

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return iter([(i, crop_seed(self.seed, self.epoch, i)) for i in order] if self.crops else order)


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
    return flip_batch(images)[0]


def flip_batch(images: torch.Tensor, masks: torch.Tensor | None = None, crop_top_lefts: torch.Tensor | None = None,
               resized_sizes: torch.Tensor | None = None):
    """(images, masks, crop_top_lefts) with each image mirrored left-right with probability 1/2
    (one draw per image from torch's global RNG, as random_flip), its mask with it, and its
    crop's left offset mirrored: the crop of a mirrored image starts at resized width - left -
    crop width, where the mirrored crop window lies in the mirrored resized image. (diffusers'
    SDXL LoRA example takes the cropped image's width - left instead, which is not where that
    window lies.) Absent parts stay None."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if masks is not None:
        masks = torch.where(flip.to(masks.device)[:, None, None, None], masks.flip(-1), masks)
    if crop_top_lefts is not None and resized_sizes is not None:
        left = crop_top_lefts[:, 1]
        mirrored = resized_sizes[:, 1].to(left.device) - left - images.shape[-1]
        crop_top_lefts = torch.stack([crop_top_lefts[:, 0], torch.where(flip.to(left.device), mirrored, left)], 1)
    return images, masks, crop_top_lefts
