"""Any image PIL opens, as the RGB picture it shows.

`PIL.Image.convert("RGB")` alone is wrong for some modes: a 16-bit greyscale PNG comes out
white, and the colour under transparent pixels is whatever the encoder left there. `to_rgb`
applies these rules, in this order:

- EXIF orientation first (`PIL.ImageOps.exif_transpose`), as diffusers' DreamBooth examples
  do, so that phone photos are upright.
- 16-bit integer modes ("I;16", "I;16L", "I;16B", "I;16N"): 0..65535 scaled to 0..255
  (v / 257, rounded), not clipped.
- "I" (32-bit integer, what 16-bit greyscale PNGs and TIFFs open as in some Pillow versions):
  clipped to 0..65535, then scaled as 16-bit.
- "F" (32-bit float): if every value lies in [0, 1], 0..1 maps to 0..255; otherwise the values
  are taken on the 0..255 scale and clipped. NaN counts as 0.
- Transparency ("RGBA", "RGBa", "LA", "La", "PA", and any mode with a `transparency` entry in
  `image.info`, such as "P", "L" or "RGB" PNGs with a tRNS chunk): composited over white,
  weighted by alpha, since the colour under fully transparent pixels is arbitrary.
- Everything else ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", ...): PIL's
  own conversion to RGB.

`DECODE_ERRORS` are the exceptions PIL raises on a broken or truncated file.
"""

from __future__ import annotations

import struct

import numpy as np
from PIL import Image, ImageOps

# what PIL raises on a broken file: OSError (truncated data, decoder errors,
# UnidentifiedImageError), SyntaxError and struct.error (bad headers), EOFError, ValueError
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

_HIGH_DEPTH = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_ALPHA = {"RGBA", "LA", "PA"}
_PREMULTIPLIED = {"RGBa", "La"}


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` upright and in RGB, by the rules above; `image` itself is left as it is."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_DEPTH:
        image = _eight_bit(image)
    if image.mode in _PREMULTIPLIED:
        return _premultiplied_over_white(image)
    if image.mode in _ALPHA or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba)  # rgb * a/255 + white * (1 - a/255)
        return white
    return image.convert("RGB")


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image as "L", or "LA" where it names a transparent value."""
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0)
        if values.size and values.min() >= 0 and values.max() <= 1:
            values = values * 255
        grey = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
    else:
        grey = ((np.clip(values, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int) and image.mode != "F":
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1))  # "LA"
    return Image.fromarray(grey)


def _premultiplied_over_white(image: Image.Image) -> Image.Image:
    """An "RGBa" or "La" image over white: a premultiplied colour c gives c + 255 - alpha."""
    channels = np.asarray(image).astype(np.int16)
    colour, alpha = channels[..., :-1], channels[..., -1:]
    over = np.clip(colour + 255 - alpha, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(over, 3, axis=-1) if over.shape[-1] == 1 else over)
