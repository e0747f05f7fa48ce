"""The built-in `swd` metric: the sliced Wasserstein distance between Laplacian-pyramid patch
descriptors of generated and reference images (Karras et al. 2018, "Progressive Growing of
GANs", appendix D), reported x1e3 per pyramid level and averaged over the levels.

Each image (uint8, converted to float32 in [0, 1]; the scale cancels out in the per-channel
normalisation) gets a Laplacian pyramid built with the 5x5 binomial filter
[1, 4, 6, 4, 1] / 16 (reflected borders), from its full size down to the last level of at
least `min_resolution` px, the coarsest level being the low-pass image itself. From every
level, `descriptors_per_image` random `patch_size` x `patch_size` neighbourhoods (3 * 7 * 7 =
147 values each) go into a per-level reservoir of at most `max_descriptors` descriptors
(uniform reservoir sampling), so memory stays bounded however many images are seen.

All randomness comes from the metric's own CPU generators (one per side, one for the
projection directions, one for the subsampling), derived from `seed`: results do not depend
on how the images are batched, and torch's global RNG (which training uses) is never drawn.
The two sides' generators are seeded alike, so a set of images compared with itself (in the
same order) gives exactly 0.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from difftool.errors import DifftoolError
from difftool.metrics import Metric

CHANNELS = 3
# How many projection directions are sorted at once: bounds compute()'s memory to
# 2 x chunk x max_descriptors floats (128 MiB each at the defaults).
DIRECTION_CHUNK = 256


def swd(device=None, descriptors_per_image: int = 128, max_descriptors: int = 131072, patch_size: int = 7,
        min_resolution: int = 16, directions: int = 512, repeats: int = 4, seed: int = 0) -> SlicedWasserstein:
    """The `swd` metric, computing on `device` (None: the CPU)."""
    for name, value, minimum in (("descriptors_per_image", descriptors_per_image, 1),
                                 ("max_descriptors", max_descriptors, 1),
                                 ("patch_size", patch_size, 3),
                                 ("min_resolution", min_resolution, 1),
                                 ("directions", directions, 1),
                                 ("repeats", repeats, 1),
                                 ("seed", seed, 0)):
        check_int(name, value, minimum)
    if patch_size % 2 == 0:
        raise DifftoolError(f"swd: patch_size must be odd (got {patch_size}); the paper uses 7.")
    if min_resolution < patch_size:
        raise DifftoolError(
            f"swd: min_resolution ({min_resolution}) must be at least patch_size ({patch_size}), "
            "so that every pyramid level holds a whole patch; the paper uses min_resolution = 16, patch_size = 7.")
    return SlicedWasserstein(
        device=as_device(device), descriptors_per_image=descriptors_per_image, max_descriptors=max_descriptors,
        patch_size=patch_size, min_resolution=min_resolution, directions=directions, repeats=repeats, seed=seed)


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise a DifftoolError unless `value` is an int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DifftoolError(f"swd: {name} must be an integer (got {value!r}).")
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise DifftoolError(f"swd: {name} must be {what} (got {value}).")


def as_device(device: Any) -> torch.device:
    """`device` as a torch.device (None: the CPU)."""
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DifftoolError(
            f"swd: device {device!r} is not a torch device ({exc}); use e.g. 'cpu' or 'cuda'.") from None


def stream_seed(seed: int, stream: str) -> int:
    """The seed of one of the metric's random streams, derived from `seed` so that the streams
    (descriptors, directions, subsample) are independent of each other."""
    digest = hashlib.sha256(f"difftool-swd/{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def level_sizes(height: int, width: int, min_resolution: int) -> list[tuple[int, int]]:
    """The (height, width) of each pyramid level: the full size, then halved (rounding up)
    while the next level's shorter side is at least `min_resolution`."""
    sizes = [(height, width)]
    while True:
        half = ((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2)
        if min(half) < min_resolution:
            return sizes
        sizes.append(half)


def level_name(height: int, width: int) -> str:
    """A level's name in state keys and results: "32", or "32x48" for a non-square level."""
    return str(height) if height == width else f"{height}x{width}"


def binomial_kernel(device: torch.device) -> torch.Tensor:
    """The 5x5 binomial filter outer([1, 4, 6, 4, 1]) / 256, shaped (1, 1, 5, 5) for conv2d."""
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device) / 16
    return torch.outer(taps, taps)[None, None]


def blur(planes: torch.Tensor, kernel: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Filter single-channel planes (B, 1, H, W) with `kernel`, borders mirrored; with
    `stride` 2 only every other row and column is computed (output ceil(H / 2))."""
    return F.conv2d(F.pad(planes, (2, 2, 2, 2), mode="reflect"), kernel, stride=stride)


def pyramid_down(planes: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Blur and keep every other pixel: (B, 1, H, W) -> (B, 1, ceil(H / 2), ceil(W / 2))."""
    return blur(planes, kernel, stride=2)


def pyramid_up(planes: torch.Tensor, size: tuple[int, int], kernel: torch.Tensor) -> torch.Tensor:
    """Back to `size`: put the pixels on the even rows and columns of zeros, then blur with
    4 x the kernel (the zeros are 3/4 of the pixels)."""
    spread = planes.new_zeros(planes.shape[0], 1, *size)
    spread[..., ::2, ::2] = planes
    return blur(spread, kernel * 4)


def laplacian_pyramid(images: torch.Tensor, sizes: list[tuple[int, int]], kernel: torch.Tensor) -> list[torch.Tensor]:
    """The Laplacian pyramid of float images (N, C, H, W): one (N, C, h, w) band-pass level per
    size but the last, which is the low-pass image itself."""
    n, channels = images.shape[:2]
    current = images.reshape(n * channels, 1, *images.shape[2:])
    levels = []
    for _ in sizes[1:]:
        low = pyramid_down(current, kernel)
        levels.append(current - pyramid_up(low, tuple(current.shape[-2:]), kernel))
        current = low
    levels.append(current)
    return [level.reshape(n, channels, *level.shape[-2:]) for level in levels]


def extract_patches(level: torch.Tensor, image: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                    patch_size: int) -> torch.Tensor:
    """The patches of `level` (N, C, h, w) at (image, top, left), as descriptors (K, C * p * p)
    laid out channel, row, column."""
    channels = level.shape[1]
    windows = level.unfold(2, patch_size, 1).unfold(3, patch_size, 1)  # a view: (N, C, h', w', p, p)
    return windows.permute(0, 2, 3, 1, 4, 5)[image, top, left].reshape(len(image), channels * patch_size ** 2)


class Reservoir:
    """A uniform random sample of at most `capacity` descriptors out of all those offered
    (Algorithm R, vectorised over a batch: the later descriptor wins a contested slot, exactly
    as if they had been offered one at a time)."""

    def __init__(self, capacity: int, width: int, device: torch.device):
        self.capacity = capacity
        self.buffer = torch.empty(0, width, device=device)  # grows geometrically up to capacity
        self.filled = 0
        self.seen = 0

    @property
    def data(self) -> torch.Tensor:
        """The descriptors kept, (min(seen, capacity), width)."""
        return self.buffer[:self.filled]

    @data.setter
    def data(self, descriptors: torch.Tensor) -> None:
        self.buffer = descriptors
        self.filled = len(descriptors)

    def plan(self, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the next len(uniforms) descriptors offered (one uniform [0, 1) float64 draw
        each, CPU): which of them to store and in which slots."""
        count = len(uniforms)
        ordinal = torch.arange(self.seen, self.seen + count, dtype=torch.int64)
        drawn = torch.minimum((uniforms * (ordinal + 1)).long(), ordinal)  # uniform in [0, ordinal]
        slots = torch.where(ordinal < self.capacity, ordinal, drawn)
        kept = slots < self.capacity
        size = min(self.capacity, self.seen + count)
        winner = torch.full((size,), -1, dtype=torch.int64)
        winner.scatter_reduce_(0, slots[kept], torch.arange(count)[kept], reduce="amax")
        written = (winner >= 0).nonzero().squeeze(1)
        return winner[written], written

    def store(self, count: int, slots: torch.Tensor, descriptors: torch.Tensor) -> None:
        """Put `descriptors` in `slots` (from `plan`), `count` descriptors having been offered."""
        self.filled = min(self.capacity, self.seen + count)
        if self.filled > len(self.buffer):
            grown = min(self.capacity, max(self.filled, 2 * len(self.buffer)))
            self.buffer = torch.cat([self.buffer, self.buffer.new_empty(grown - len(self.buffer), self.buffer.shape[1])])
        self.buffer[slots.to(self.buffer.device)] = descriptors
        self.seen += count


class Side:
    """What the metric keeps of one side, reference or generated: the image size, one
    reservoir per pyramid level, and the side's own generator."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.size: tuple[int, int] | None = None
        self.reservoirs: dict[str, Reservoir] = {}


class SlicedWasserstein(Metric):
    """Sliced Wasserstein distance between Laplacian-pyramid patch descriptors, x1e3."""

    min_samples = 1

    def __init__(self, device: torch.device, descriptors_per_image: int, max_descriptors: int, patch_size: int,
                 min_resolution: int, directions: int, repeats: int, seed: int):
        self.device = device
        self.descriptors_per_image = descriptors_per_image
        self.max_descriptors = max_descriptors
        self.patch_size = patch_size
        self.min_resolution = min_resolution
        self.directions = directions
        self.repeats = repeats
        self.seed = seed
        self.kernel = binomial_kernel(device)
        self.reference = Side(stream_seed(seed, "descriptors"))
        self.generated = Side(stream_seed(seed, "descriptors"))

    def settings(self) -> dict[str, Any]:
        """What the reference state depends on (directions and repeats only matter to compute)."""
        return {"descriptors_per_image": self.descriptors_per_image, "max_descriptors": self.max_descriptors,
                "patch_size": self.patch_size, "min_resolution": self.min_resolution, "seed": self.seed}

    @property
    def width(self) -> int:
        """Values per descriptor: C * p * p (147 for 7x7 RGB patches)."""
        return CHANNELS * self.patch_size ** 2

    def update_reference(self, images: torch.Tensor) -> None:
        """Add the descriptors of a batch of reference images (uint8, (N, 3, H, W))."""
        self.add(self.reference, images, "reference")

    def update(self, images: torch.Tensor, prompts: list[str] | None = None) -> None:
        """Add the descriptors of a batch of generated images (uint8, (N, 3, H, W))."""
        self.add(self.generated, images, "generated")

    def reset(self) -> None:
        """Forget the generated images, re-seeding their generator so that the same images
        evaluated again give the same value; keep the reference."""
        self.generated = Side(stream_seed(self.seed, "descriptors"))

    @torch.no_grad()
    def add(self, side: Side, images: torch.Tensor, what: str) -> None:
        """Offer each level's descriptors of `images` to `side`'s reservoirs."""
        size = self.check_images(images, what)
        if side.size is not None and side.size != size:
            advice = ("reset() forgets the generated images" if side is self.generated
                      else "a metric holds one reference: make a new one for another size")
            raise DifftoolError(
                f"swd: the {what} images changed size from {describe_size(side.size)} to {describe_size(size)}; "
                f"give images of one size ({advice}).")
        count = len(images)
        if count == 0:
            return
        side.size = size
        sizes = level_sizes(*size, self.min_resolution)
        # Drawn image by image (positions and reservoir draws for every level), so that the
        # stream, and hence the result, does not depend on how the images are batched.
        uniforms = torch.rand((count, len(sizes), self.descriptors_per_image, 3), generator=side.generator,
                              dtype=torch.float64)
        pixels = images.to(self.device, torch.float32) / 255
        for index, (level, (height, width)) in enumerate(zip(laplacian_pyramid(pixels, sizes, self.kernel), sizes)):
            reservoir = side.reservoirs.setdefault(
                level_name(height, width), Reservoir(self.max_descriptors, self.width, self.device))
            draws = uniforms[:, index].reshape(-1, 3)
            chosen, slots = reservoir.plan(draws[:, 2].contiguous())
            top = (draws[chosen, 0] * (height - self.patch_size + 1)).long()
            left = (draws[chosen, 1] * (width - self.patch_size + 1)).long()
            image = chosen // self.descriptors_per_image
            descriptors = extract_patches(level, *(t.to(self.device) for t in (image, top, left)), self.patch_size)
            reservoir.store(len(draws), slots, descriptors)

    def check_images(self, images: Any, what: str) -> tuple[int, int]:
        """The (H, W) of a batch, or a DifftoolError saying what is wrong with it."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != CHANNELS:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DifftoolError(f"swd: the {what} images must be a uint8 tensor (N, 3, H, W) (got {shape}).")
        if images.dtype != torch.uint8:
            raise DifftoolError(f"swd: the {what} images must be uint8 (0-255) (got {images.dtype}).")
        height, width = images.shape[2:]
        if min(height, width) < self.patch_size:
            raise DifftoolError(
                f"swd: the {what} images ({height}x{width} px) are smaller than a patch ({self.patch_size} px); "
                "use larger images or a smaller patch_size.")
        return height, width

    def reference_state(self) -> dict[str, torch.Tensor]:
        """The reference's descriptors and counters: "level_<res>" (M, C * p * p) float32 and
        "seen_<res>" (int64, descriptors offered) per level, "size" (H, W) and "generator"
        (the reference generator's state, so that more reference images can follow)."""
        side = self.reference
        state = {"size": torch.tensor(side.size or (0, 0), dtype=torch.int64),
                 "generator": side.generator.get_state()}
        for name, reservoir in side.reservoirs.items():
            state[f"level_{name}"] = reservoir.data
            state[f"seen_{name}"] = torch.tensor(reservoir.seen, dtype=torch.int64)
        return state

    def load_reference_state(self, state: dict) -> None:
        """Restore what `reference_state` returned."""
        if "size" not in state or "generator" not in state:
            raise DifftoolError(f"swd: this is not an swd reference state (keys: {sorted(state)}); "
                                "delete the cached file and evaluate the reference again.")
        side = Side(stream_seed(self.seed, "descriptors"))
        side.generator.set_state(state["generator"].cpu())
        height, width = (int(v) for v in state["size"])
        side.size = (height, width) if height else None
        for key in state:
            if not key.startswith("level_"):
                continue
            name = key[len("level_"):]
            data = state[key]
            if data.ndim != 2 or data.shape[1] != self.width:
                raise DifftoolError(
                    f"swd: the reference state's {key} has shape {tuple(data.shape)}, not (M, {self.width}) "
                    f"for patch_size {self.patch_size}; delete the cached file and evaluate the reference again.")
            if f"seen_{name}" not in state:
                raise DifftoolError(f"swd: the reference state has {key} but no seen_{name}; delete the cached "
                                    "file and evaluate the reference again.")
            reservoir = Reservoir(self.max_descriptors, self.width, self.device)
            reservoir.data = data.to(self.device, torch.float32).clone()
            reservoir.seen = int(state[f"seen_{name}"])
            side.reservoirs[name] = reservoir
        self.reference = side

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """{"swd": the mean over levels, "swd_<res>": each level's}, all x1e3, comparing equal
        numbers of descriptors per level."""
        reference, generated = self.reference, self.generated
        if reference.size is None:
            raise DifftoolError("swd: no reference images were given; call update_reference() with the reference "
                                "images (or load_reference_state()) before compute().")
        if generated.size is None:
            raise DifftoolError("swd: no generated images were given; call update() with the generated images "
                                "before compute().")
        if reference.size != generated.size:
            raise DifftoolError(
                f"swd: the generated images are {describe_size(generated.size)} and the reference's "
                f"{describe_size(reference.size)}; generate images of the reference's size, or evaluate against "
                "a reference of the generated images' size.")
        directions = self.projection_directions()
        subsample = torch.Generator().manual_seed(stream_seed(self.seed, "subsample"))
        values = {}
        for name, ours in generated.reservoirs.items():
            a, b = ours.data, reference.reservoirs[name].data
            count = min(len(a), len(b))
            a, b = (take(d, count, subsample) for d in (a, b))
            values[f"swd_{name}"] = sliced_wasserstein(normalise(a), normalise(b), directions) * 1e3
        return {"swd": sum(values.values()) / len(values), **values}

    def projection_directions(self) -> torch.Tensor:
        """`repeats` sets of `directions` random unit vectors, (repeats, C * p * p, directions),
        the same at every compute()."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, "directions"))
        vectors = torch.randn((self.repeats, self.width, self.directions), generator=generator)
        return (vectors / vectors.norm(dim=1, keepdim=True)).to(self.device)


def describe_size(size: tuple[int, int]) -> str:
    """"32 px" for a square size, "32x48 px" otherwise."""
    return f"{level_name(*size)} px"


def take(descriptors: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` of the rows, chosen at random without replacement (all of them, in order, when
    there are exactly `count`)."""
    if len(descriptors) == count:
        return descriptors
    rows = torch.randperm(len(descriptors), generator=generator)[:count]
    return descriptors[rows.to(descriptors.device)]


def normalise(descriptors: torch.Tensor) -> torch.Tensor:
    """Descriptors with each colour channel brought to mean 0 and std 1 over the whole set."""
    planes = descriptors.reshape(len(descriptors), CHANNELS, -1)
    std, mean = torch.std_mean(planes, dim=(0, 2), correction=0, keepdim=True)
    return ((planes - mean) / std.clamp_min(1e-8)).reshape(len(descriptors), -1)  # a flat set stays finite


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """The mean over all (repeats, directions) of mean |sorted(a . d) - sorted(b . d)|, for
    equally many descriptors a, b (n, D) and directions (repeats, D, K)."""
    rows = directions.transpose(1, 2).reshape(-1, a.shape[1])  # (repeats * K, D)
    # numpy's sort lets go of the GIL, so a's and b's projections are sorted side by side
    with ThreadPoolExecutor(max_workers=min(2, torch.get_num_threads())) as pool:
        total = sum(sorted_projection_gap(a, b, chunk, pool) for chunk in rows.split(DIRECTION_CHUNK))
    return total / (len(a) * len(rows))


def sorted_projection_gap(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor, pool: Executor) -> float:
    """The sum over `directions` (k, D) and ranks of |sorted(a . d) - sorted(b . d)|; on the
    CPU, `pool` sorts."""
    if a.device.type != "cpu":
        gap = (directions @ a.T).sort(dim=1).values - (directions @ b.T).sort(dim=1).values
        return gap.abs_().sum(dtype=torch.float64).item()
    # On the CPU numpy's sort is about 10x faster than torch's, and its matmul about 1.5x for
    # these shapes; the two are all of compute()'s time.
    array_a, array_b = (directions.numpy() @ d.numpy().T for d in (a, b))  # (k, n) each
    list(pool.map(sort_rows, (array_a, array_b)))
    np.subtract(array_a, array_b, out=array_a)
    return float(np.abs(array_a, out=array_a).sum(dtype=np.float64))


def sort_rows(array: np.ndarray) -> None:
    """Sort each row of `array` in place."""
    array.sort(axis=1)
