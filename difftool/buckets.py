"""Aspect-ratio buckets: the set of training resolutions, each image's bucket, the resize and
crop that bring an image to its target size, and the batch order of a bucketed run.

A bucket is a (height, width) whose sides are multiples of `bucket_step`, between `bucket_min`
and `bucket_max`, and whose area is at most image_size² (never more pixels than the square
run, so a bucketed batch needs no more memory). For each allowed width the height is the
largest step multiple that keeps the area within image_size², and each bucket comes in both
orientations, as kohya-ss's sd-scripts make them. An image goes to the bucket whose aspect
ratio is nearest its own (in log ratio, so 2:1 and 1:2 are equally far from 1:1; ties go to the
larger bucket). It is resized, keeping its aspect, to the smallest size that covers the bucket,
then cropped to it: at the centre, or at an offset drawn from a crop seed.

Everything random is a function of (seed, epoch) and a row's index, so a resumed run sees the
same batches and crops as an uninterrupted one. This module reads no image: difftool.data
reads the sizes and pixels.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from difftool.errors import DifftoolError

Size = tuple[int, int]  # (height, width), as torch's image shapes and SDXL's size ids are ordered


@dataclass(frozen=True)
class Settings:
    """The bucket set of a run: sides multiples of `step` in [smallest, largest], area at most
    image_size²."""

    image_size: int
    step: int
    smallest: int
    largest: int

    def buckets(self) -> list[Size]:
        return bucket_set(self.image_size, self.step, self.smallest, self.largest)


def settings(table: dict, where: str) -> Settings | None:
    """The [dataset] table's bucket settings, checked (None when buckets are off). bucket_min
    and bucket_max default to image_size / 2 and image_size * 2 (rounded to bucket_step)."""
    if table.get("random_crop") and table.get("center_crop"):
        raise DifftoolError(f"{where} center_crop = true and random_crop = true: an image is cropped at its "
                            "centre or at a random offset, not both; set one of them to false")
    if not table.get("buckets"):
        return None
    size, step = table["image_size"], table["bucket_step"]
    if size % step:
        raise DifftoolError(f"{where} image_size = {size} must be a multiple of bucket_step = {step}, so that the "
                            f"square bucket is image_size x image_size; use image_size = {max(step, size // step * step)}")
    smallest = table.get("bucket_min") or max(step, math.ceil(size / 2 / step) * step)
    largest = table.get("bucket_max") or size * 2 // step * step
    for key, value in (("bucket_min", smallest), ("bucket_max", largest)):
        if value % step:
            raise DifftoolError(f"{where} {key} = {value} must be a multiple of bucket_step = {step}; use "
                                f"{max(step, value // step * step)}")
    if not smallest <= size <= largest:
        raise DifftoolError(f"{where} bucket_min = {smallest} and bucket_max = {largest} must hold image_size = "
                            f"{size} between them (bucket_min <= image_size <= bucket_max)")
    return Settings(size, step, smallest, largest)


def check_factor(chosen: Settings, factor: int, where: str) -> None:
    """Every bucket side must divide by the model's down-sampling `factor` (VAE x UNet, or a
    transformer's patches): bucket_step must be a multiple of it, since every side is a
    multiple of bucket_step."""
    if chosen.step % factor:
        raise DifftoolError(f"{where} bucket_step = {chosen.step} makes buckets this model cannot take: every bucket "
                            f"side must be divisible by {factor}, the model's down-sampling factor; set bucket_step "
                            f"to a multiple of {factor} (e.g. {factor * max(1, round(chosen.step / factor))})")


def bucket_set(image_size: int, step: int, smallest: int, largest: int) -> list[Size]:
    """The buckets (height, width), sorted by aspect ratio (tallest first)."""
    area, found = image_size * image_size, set()
    for width in range(smallest, largest + 1, step):
        height = min(largest, area // width // step * step)
        if height >= smallest:
            found |= {(height, width), (width, height)}
    return sorted(found, key=lambda bucket: (bucket[1] / bucket[0], bucket[0]))


def nearest(buckets: list[Size], size: Size) -> Size:
    """The bucket whose aspect ratio is nearest that of an image of `size` (height, width)."""
    ratio = math.log(size[1] / size[0])
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1], b))


def assign(sizes: list[Size], buckets: list[Size]) -> list[Size]:
    """Each image's bucket."""
    return [nearest(buckets, size) for size in sizes]


def distribution(assigned: list[Size]) -> dict[Size, int]:
    """{bucket: number of images}, by aspect ratio (tallest first)."""
    counts = Counter(assigned)
    return {bucket: counts[bucket] for bucket in sorted(counts, key=lambda b: (b[1] / b[0], b[0]))}


def cover(size: Size, target: Size) -> Size:
    """The smallest size with the aspect of `size` that covers `target`: the image is resized to
    it before it is cropped to `target` (one side equal to the target's, up to rounding)."""
    (height, width), (rows, columns) = size, target
    scale = max(rows / height, columns / width)
    return max(rows, round(height * scale)), max(columns, round(width * scale))


def centre_offset(resized: Size, target: Size) -> Size:
    """(top, left) of a centred crop of `target` out of `resized`."""
    return (resized[0] - target[0]) // 2, (resized[1] - target[1]) // 2


def random_offset(resized: Size, target: Size, crop_seed: int) -> Size:
    """(top, left) of a crop of `target` out of `resized`, uniform over the possible offsets,
    drawn from a generator seeded by `crop_seed` (crop_seed(seed, epoch, index)), so the same
    row in the same epoch gets the same crop wherever and whenever it is read."""
    generator = torch.Generator().manual_seed(crop_seed)
    top = int(torch.randint(resized[0] - target[0] + 1, (1,), generator=generator))
    left = int(torch.randint(resized[1] - target[1] + 1, (1,), generator=generator))
    return top, left


def crop_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of row `index`'s random crop in `epoch` of a run seeded `seed`."""
    return ((seed * 100_003 + epoch) * 1_000_003 + index) % 2**63


class BucketBatches(torch.utils.data.Sampler):
    """Batches of row indices, each batch from one bucket (`assigned[i]` is row i's bucket).

    The order depends only on (seed, epoch): the rows are shuffled (as difftool.data.EpochShuffle
    does), grouped by bucket keeping that order, each bucket cut into batches of `batch_size`
    (its last batch may be smaller: no image is dropped), and the batches shuffled. Unshuffled
    (validation), buckets and rows keep their order. With `crops`, each index comes as
    (index, crop_seed) for the dataset's random crop.

    A DataLoader takes it as its batch_sampler. Under Accelerate, `prepare` deals whole batches
    to the processes (BatchSamplerShard treats a batch sampler without a `batch_size` attribute
    as one of variable-length batches, so it never splices rows of two batches, that is of two
    buckets, into one), and `skip_first_batches` skips whole batches on resume. Accelerate
    reaches a wrapped batch sampler's epoch through `.sampler.set_epoch`: `sampler` is this
    object itself."""

    def __init__(self, assigned: list[Size], batch_size: int, seed: int, shuffle: bool = True, crops: bool = False):
        self.assigned, self.per_batch, self.seed = list(assigned), batch_size, seed
        self.shuffle, self.crops, self.epoch = shuffle, crops, 0

    @property
    def sampler(self):
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(count / self.per_batch) for count in Counter(self.assigned).values())

    def batches(self) -> list[list[int]]:
        """This epoch's batches of row indices."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        size = len(self.assigned)
        order = torch.randperm(size, generator=generator).tolist() if self.shuffle else range(size)
        groups: dict[Size, list[int]] = {}
        for index in order:
            groups.setdefault(self.assigned[index], []).append(index)
        keys = list(groups) if self.shuffle else sorted(groups, key=lambda b: (b[1] / b[0], b[0]))
        batches = [group[start:start + self.per_batch] for key in keys
                   for group in [groups[key]] for start in range(0, len(group), self.per_batch)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self):
        for batch in self.batches():
            yield [(i, crop_seed(self.seed, self.epoch, i)) for i in batch] if self.crops else batch
