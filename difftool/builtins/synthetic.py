"""Embedded, offline, deterministic generator of butterfly-like RGB images.

Used to train small diffusion models without any dataset download: image ``i``
depends only on ``(seed, i)``, so results are reproducible and prefix-stable.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

_SUPERSAMPLE = 2
# Wing base colours: oranges, blues, yellows, whites, browns, blacks.
_BASES = np.array([
    (236, 120, 24), (245, 160, 40), (214, 84, 20), (40, 100, 215), (70, 160, 235),
    (25, 60, 160), (248, 214, 40), (240, 236, 120), (250, 250, 244), (236, 232, 215),
    (130, 78, 38), (165, 110, 60), (40, 34, 34), (20, 24, 40),
])
# Contrast colours for bands, eyespots and border dots.
_ACCENTS = np.array([
    (255, 255, 255), (250, 220, 30), (245, 130, 20), (40, 140, 240), (220, 40, 50), (120, 210, 230),
])
# Palette slots of the per-image label map.
_BASE, _EDGE, _FORE_ACCENT, _HIND_ACCENT, _WHITE, _BODY = range(1, 7)


# The colour word of each wing base colour, for captions.
_BASE_NAMES = ["orange"] * 3 + ["blue"] * 3 + ["yellow"] * 2 + ["white"] * 2 + ["brown"] * 2 + ["black"] * 2


def synthetic_butterflies(count: int = 1000, seed: int = 0, size: int = 64, captions: bool = False,
                          labels: bool = False, shapes: list | None = None) -> list[dict]:
    """`count` butterfly-like RGB images of `size` px, as rows {"image": PIL.Image}; with
    `captions`, also {"text": "a blue butterfly"}, and with `labels`, also {"label": "blue"}, the
    class label of class-conditional training (`[dataset] label_column = "label"`): both name
    the wings' base colour, one of orange, blue, yellow, white, brown and black.

    With `shapes` ([[width, height], ...]: images of several aspect ratios, for `[dataset]
    buckets`), image i is drawn at the longer side of shapes[i % len(shapes)] instead of `size`
    and cropped at its centre to that shape."""
    if count < 1:
        raise ValueError(f"count must be >= 1 (got {count}); pass a positive number of images.")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels (got {size}); pass size=8 or larger.")
    if shapes is not None and not (shapes and all(isinstance(s, (list, tuple)) and len(s) == 2 and all(
            isinstance(side, int) and side >= 8 for side in s) for s in shapes)):
        raise ValueError(f"shapes = {shapes!r} must be a list of [width, height] pairs of integers >= 8, "
                         "e.g. [[48, 32], [32, 48]].")
    rows = []
    for i in range(count):
        width, height = shapes[i % len(shapes)] if shapes else (size, size)
        image = draw_butterfly(np.random.default_rng([seed, i]), max(width, height))
        left, top = (image.width - width) // 2, (image.height - height) // 2
        rows.append({"image": image.crop((left, top, left + width, top + height)) if shapes else image})
    if captions or labels:
        for i, row in enumerate(rows):
            colour = _colour_word(seed, i)
            if captions:
                row["text"] = f"a {colour} butterfly"
            if labels:
                row["label"] = colour
    return rows


def _colour_word(seed: int, index: int) -> str:
    """The colour word of image `index`'s wing base colour: the base colour is the first draw of
    each image's generator."""
    return _BASE_NAMES[np.random.default_rng([seed, index]).integers(len(_BASES))]


def draw_butterfly(rng: np.random.Generator, size: int) -> Image.Image:
    """One butterfly drawn with `rng`."""
    n = size * _SUPERSAMPLE
    y = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1  # -1 top .. 1 bottom
    x = (np.arange(n // 2, dtype=np.float32) + 0.5) / (n / 2)  # right half: 0 centre .. 1 edge
    base = np.clip(_BASES[rng.integers(len(_BASES))] + rng.uniform(-18, 18, 3), 0, 255)
    palette = np.stack([
        255 - rng.uniform(0, 22, 3),  # light, slightly tinted background
        base,
        base * rng.uniform(0.1, 0.35),  # darker wing border
        *_ACCENTS[rng.choice(len(_ACCENTS), 2, replace=False)],
        (250, 250, 245),  # white border dots
        rng.uniform(15, 50, 3),  # body
    ]).astype(np.uint8)
    s, oy = rng.uniform(0.8, 1.0), rng.uniform(-0.08, 0.08)
    hind = -rng.uniform(20, 60), rng.uniform(0.3, 0.45) * s, rng.uniform(0.22, 0.3) * s
    fore = rng.uniform(25, 55), rng.uniform(0.48, 0.62) * s, rng.uniform(0.2, 0.28) * s
    labels = np.zeros((n, n // 2), np.uint8)
    _wing(labels, x, y, (0.03, oy + 0.08), hind, rng, fore=False)
    _wing(labels, x, y, (0.03, oy - 0.04), fore, rng, fore=True)
    _body(labels, x, y, s, oy, rng)
    half = palette.take(labels, axis=0)
    full = np.concatenate([half[:, ::-1], half], axis=1)
    return Image.fromarray(full).reduce(_SUPERSAMPLE)  # box-filter anti-aliasing


def _norm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise Euclidean norm (faster than np.hypot for float32)."""
    return np.sqrt(a * a + b * b)


def _crop(
    labels: np.ndarray, x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """View of `labels` plus broadcastable x/y axes for the box (cx, cy) +- (rx, ry)."""
    xs = slice(*np.searchsorted(x, (cx - rx, cx + rx)))
    ys = slice(*np.searchsorted(y, (cy - ry, cy + ry)))
    return labels[ys, xs], x[None, xs], y[ys, None]


def _wing(
    labels: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    root: tuple[float, float],
    shape: tuple[float, float, float],
    rng: np.random.Generator,
    fore: bool,
) -> None:
    """Paint one scalloped elliptical wing (angle in degrees, semi-axes a, b).

    Layers: base colour, a forewing band or hindwing eyespot, dark border, border dots.
    """
    deg, a, b = shape
    c, sn = math.cos(math.radians(deg)), -math.sin(math.radians(deg))
    cx, cy = root[0] + 0.8 * a * c, root[1] + 0.8 * a * sn
    rx, ry = 1.1 * math.hypot(a * c, b * sn), 1.1 * math.hypot(a * sn, b * c)
    view, x, y = _crop(labels, x, y, cx, cy, rx, ry)
    u = ((x - cx) * c + (y - cy) * sn) / a
    v = ((y - cy) * c - (x - cx) * sn) / b
    d = _norm(u, v)
    phi = np.arccos(u / (d + 1e-6))  # |polar angle|; only even functions of it are used
    r = 1 + rng.uniform(0.02, 0.06) * np.cos(rng.integers(5, 10) * phi)
    wing = d < r
    accent = _FORE_ACCENT if fore else _HIND_ACCENT
    np.putmask(view, wing, _BASE)
    if rng.random() < 0.75:
        if fore:
            band = np.abs(u - rng.uniform(0.2, 0.55)) < rng.uniform(0.1, 0.2)
            np.putmask(view, wing & band, accent)
        else:
            e, er = _norm(u - rng.uniform(0.1, 0.4), v), rng.uniform(0.25, 0.4)
            np.putmask(view, e < er, accent)
            np.putmask(view, e < er * 0.5, _EDGE)
    bw = rng.uniform(0.14, 0.26)
    border = wing & (d > r - bw)
    np.putmask(view, border, _EDGE)
    if rng.random() < 0.6:
        ring = np.abs(d - r + bw / 2) < bw * 0.35
        dots = border & ring & (np.cos(rng.integers(5, 9) * phi) > 0.7)
        np.putmask(view, dots, accent if rng.random() < 0.5 else _WHITE)


def _body(
    labels: np.ndarray, x: np.ndarray, y: np.ndarray, s: float, oy: float, rng: np.random.Generator
) -> None:
    """Paint the dark body, head and clubbed antennae (scale `s`, vertical offset `oy`)."""
    view, bx, by = _crop(labels, x, y, 0.0, oy + 0.06 * s, 0.05 * s, 0.42 * s)
    np.putmask(view, _norm(bx / (0.05 * s), (by - oy - 0.06 * s) / (0.42 * s)) < 1, _BODY)
    top = oy - 0.36 * s
    tx, ty = rng.uniform(0.15, 0.3) * s, -rng.uniform(0.25, 0.4) * s
    view, ax, ay = _crop(labels, x, y, tx / 2, top + ty / 2, tx / 2 + 0.07, -ty / 2 + 0.07)
    ay = ay - top
    t = np.clip((ax * tx + ay * ty) / (tx * tx + ty * ty), 0, 1)
    antenna = _norm(ax - t * tx, ay - t * ty) < 0.015
    club = _norm(ax - tx, ay - ty) < 0.035 * s
    head = _norm(ax, ay) < 0.065 * s
    np.putmask(view, antenna | club | head, _BODY)
