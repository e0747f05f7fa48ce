"""Every image mode decodes to the RGB picture it shows (difftool.images.to_rgb, through
data.decode), and imagefolder names every bad image or metadata line before training starts.

Each mode's test image is written to a real file in a format that stores that mode, reopened
with PIL and decoded at its own size (so the resize is an identity), then compared with a
reference computed with numpy from the source pixels."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftool import data
from difftool.errors import DifftoolError
from difftool.plugins import registry

SIDE = 8  # test images are SIDE x SIDE, decoded at SIDE: no resampling
RNG = np.random.default_rng(0)
RAMP = (np.arange(SIDE * SIDE).reshape(SIDE, SIDE) * 4).astype(np.uint8)  # 0..252
ALPHA = np.linspace(0, 255, SIDE * SIDE).round().reshape(SIDE, SIDE).astype(np.uint8)  # 0 and 255 included
COLOURS = RNG.integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)
PALETTE = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
INDICES = np.arange(SIDE * SIDE, dtype=np.uint8).reshape(SIDE, SIDE)
SIXTEEN = np.linspace(0, 65535, SIDE * SIDE).round().reshape(SIDE, SIDE).astype(np.uint16)


def image(mode: str, pixels: np.ndarray) -> Image.Image:
    """A PIL image of `mode` holding exactly `pixels` (rows of raw values, as the mode stores them)."""
    return Image.frombytes(mode, (pixels.shape[1], pixels.shape[0]), np.ascontiguousarray(pixels).tobytes())


def rounded(values) -> np.ndarray:
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5)


def grey(values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.float64)[..., None], 3, axis=-1)


def over_white(rgb, alpha) -> np.ndarray:
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255
    return rounded(np.asarray(rgb, dtype=np.float64) * a + 255 * (1 - a))


def scaled_16(values) -> np.ndarray:
    return grey(rounded(np.clip(np.asarray(values, dtype=np.float64), 0, 65535) / 257))


def palette_image(mode: str = "P", alpha=None) -> Image.Image:
    pixels = INDICES if alpha is None else np.stack([INDICES, alpha], axis=-1)
    result = image(mode, pixels)
    result.putpalette(PALETTE.ravel().tolist())
    return result


def cmyk_reference(cmyk) -> np.ndarray:
    cmyk = np.asarray(cmyk, dtype=np.float64)
    return rounded((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255)


CMYK = RNG.integers(0, 256, (SIDE, SIDE, 4)).astype(np.uint8)
YCBCR = RNG.integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)
HSV = RNG.integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)
INTS = np.linspace(-5000, 70000, SIDE * SIDE).round().reshape(SIDE, SIDE).astype(np.int32)
UNIT_FLOATS = np.linspace(0, 1, SIDE * SIDE).reshape(SIDE, SIDE).astype(np.float32)
WIDE_FLOATS = np.linspace(-10, 300, SIDE * SIDE).reshape(SIDE, SIDE).astype(np.float32)


def ycbcr_reference(pixels) -> np.ndarray:
    y, cb, cr = (pixels[..., i].astype(np.float64) for i in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)], -1)
    return rounded(np.clip(rgb, 0, 255))


def neutral_lab_reference(lightness) -> np.ndarray:
    """sRGB grey of CIE L* (stored as 0..255 for 0..100), a* = b* = 0."""
    f = (lightness / 255 * 100 + 16) / 116
    y = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    return grey(rounded(np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055) * 255))


def hsv_reference(pixels) -> np.ndarray:
    return rounded(np.array([[colorsys.hsv_to_rgb(*(p / 255)) for p in row] for row in pixels.astype(np.float64)]) * 255)


# id: (the image, the format whose file stores its mode or None for modes no format stores,
#      the mode the file reopens as, the reference RGB, the tolerance in levels)
CASES = {
    "1": lambda: (Image.fromarray(RAMP % 12 < 6), "PNG", "1", grey((RAMP % 12 < 6) * 255), 0),
    "L": lambda: (image("L", RAMP), "PNG", "L", grey(RAMP), 0),
    "P": lambda: (palette_image(), "PNG", "P", PALETTE[INDICES], 0),
    "RGB": lambda: (image("RGB", COLOURS), "PNG", "RGB", COLOURS, 0),
    "RGBX": lambda: (image("RGBX", np.dstack([COLOURS, RAMP])), None, "RGBX", COLOURS, 0),
    "LA": lambda: (image("LA", np.stack([RAMP, ALPHA], -1)), "PNG", "LA", over_white(grey(RAMP), ALPHA), 1),
    "RGBA": lambda: (image("RGBA", np.dstack([COLOURS, ALPHA])), "PNG", "RGBA", over_white(COLOURS, ALPHA), 1),
    "PA": lambda: (palette_image("PA", ALPHA), "TIFF", "PA", over_white(PALETTE[INDICES], ALPHA), 1),
    "La": lambda: (image("La", np.stack([np.minimum(RAMP, ALPHA), ALPHA], -1)), None, "La",
                   grey(np.minimum(RAMP, ALPHA).astype(np.float64) + 255 - ALPHA), 0),
    "RGBa": lambda: (image("RGBa", np.dstack([np.minimum(COLOURS, ALPHA[..., None]), ALPHA])), None, "RGBa",
                     np.minimum(COLOURS, ALPHA[..., None]).astype(np.float64) + 255 - ALPHA[..., None], 0),
    "P-transparency": lambda: (palette_image(), "PNG", "P", np.where((INDICES == 5)[..., None], 255, PALETTE[INDICES]), 0),
    "L-transparency": lambda: (image("L", RAMP), "PNG", "L", grey(np.where(RAMP == 40, 255, RAMP)), 0),
    "RGB-transparency": lambda: (image("RGB", COLOURS), "PNG", "RGB",
                                 np.where((COLOURS == COLOURS[2, 3]).all(-1)[..., None], 255, COLOURS), 0),
    "I;16": lambda: (Image.fromarray(SIXTEEN), "PNG", "I;16", scaled_16(SIXTEEN), 0),
    "I;16B": lambda: (image("I;16B", SIXTEEN.astype(">u2")), "TIFF", "I;16B", scaled_16(SIXTEEN), 0),
    "I;16L": lambda: (image("I;16L", SIXTEEN.astype("<u2")), None, "I;16L", scaled_16(SIXTEEN), 0),
    "I;16N": lambda: (image("I;16N", SIXTEEN.astype("=u2")), None, "I;16N", scaled_16(SIXTEEN), 0),
    "I": lambda: (image("I", INTS.astype("=i4")), "TIFF", "I", scaled_16(INTS), 0),
    "F-unit": lambda: (image("F", UNIT_FLOATS), "TIFF", "F", grey(rounded(UNIT_FLOATS.astype(np.float64) * 255)), 1),
    "F-wide": lambda: (image("F", WIDE_FLOATS), "TIFF", "F", grey(rounded(np.clip(WIDE_FLOATS, 0, 255))), 1),
    "CMYK": lambda: (image("CMYK", CMYK), "TIFF", "CMYK", cmyk_reference(CMYK), 1),
    "YCbCr": lambda: (image("YCbCr", YCBCR), "TIFF", "YCbCr", ycbcr_reference(YCBCR), 1),
    "LAB": lambda: (image("LAB", np.dstack([RAMP, np.zeros_like(RAMP), np.zeros_like(RAMP)])), "TIFF", "LAB",
                    neutral_lab_reference(RAMP.astype(np.float64)), 2),  # Pillow's own Lab maths: within 2
    "HSV": lambda: (image("HSV", HSV), None, "HSV", hsv_reference(HSV), 1),
}
TRANSPARENCY = {"P-transparency": 5, "L-transparency": 40, "RGB-transparency": tuple(int(v) for v in COLOURS[2, 3])}


def as_rgb(pixels: torch.Tensor) -> np.ndarray:
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, SIDE, SIDE)
    return pixels.permute(1, 2, 0).numpy().astype(np.float64)


@pytest.mark.parametrize("case", CASES)
def test_each_mode_decodes_to_the_rgb_it_shows(case, tmp_path):
    source, fmt, mode, reference, tolerance = CASES[case]()
    decoded = []
    if fmt is None:
        assert source.mode == mode  # no format stores this mode: decoded as the PIL image a dataset might hold
        decoded.append(data.decode(source, SIDE))
    else:
        path = tmp_path / f"image.{fmt.lower()}"
        source.save(path, fmt, **({"transparency": TRANSPARENCY[case]} if case in TRANSPARENCY else {}))
        with Image.open(path) as reopened:
            assert reopened.mode == mode  # the file really holds the mode under test
            decoded.append(data.decode(reopened, SIDE))
        decoded.append(data.decode({"path": str(path), "bytes": None}, SIDE))
        decoded.append(data.decode({"path": None, "bytes": path.read_bytes()}, SIDE))
    for pixels in decoded:
        assert np.abs(as_rgb(pixels) - np.asarray(reference, dtype=np.float64)).max() <= tolerance


def test_cmyk_jpeg_decodes_by_pils_conversion(tmp_path):
    path = tmp_path / "cmyk.jpg"
    image("CMYK", RNG.integers(0, 256, (16, 16, 4)).astype(np.uint8)).save(path, quality=95)
    with Image.open(path) as reopened:
        assert reopened.mode == "CMYK"
        stored = np.asarray(reopened)  # what the lossy file holds, the source of the reference
    pixels = data.decode({"path": str(path), "bytes": None}, 16).permute(1, 2, 0).numpy()
    assert np.abs(pixels - cmyk_reference(stored)).max() <= 1


def test_a_16_bit_png_gradient_is_not_white(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    eight_bit = np.tile(np.linspace(0, 255, 64), (64, 1))
    pixels = data.decode({"path": str(tmp_path / "deep.png"), "bytes": None}, 64).float()
    assert abs(pixels.mean().item() - eight_bit.mean()) < 1.0  # 127.5, not the 255 of a saturated image
    assert pixels[:, :, 0].max() == 0 and pixels[:, :, -1].min() == 255


def test_a_transparent_area_becomes_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (200, 0, 0, 255)  # opaque red on the left
    rgba[:, 8:] = (0, 0, 0, 0)  # fully transparent, black underneath, on the right
    Image.fromarray(rgba).save(tmp_path / "cutout.png")
    pixels = data.decode({"path": str(tmp_path / "cutout.png"), "bytes": None}, 16)
    assert (pixels[:, :, 8:] == 255).all()
    assert (pixels[:, :, :8] == torch.tensor([200, 0, 0], dtype=torch.uint8)[:, None, None]).all()


def upright_picture() -> Image.Image:
    """16 wide, 32 tall: red above, blue below."""
    pixels = np.zeros((32, 16, 3), np.uint8)
    pixels[:16] = (255, 0, 0)
    pixels[16:] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_an_exif_rotated_jpeg_comes_out_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored picture is shown turned 90 degrees clockwise
    stored = upright_picture().transpose(Image.Transpose.ROTATE_90)  # as a phone held sideways stores it
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert stored.size == (32, 16)
    pixels = data.decode({"path": str(tmp_path / "phone.jpg"), "bytes": None}, 16).float()
    red, blue = pixels[:, :6].mean(dim=(1, 2)), pixels[:, 10:].mean(dim=(1, 2))  # top rows, bottom rows
    assert red[0] > 200 and red[2] < 50, red
    assert blue[2] > 200 and blue[0] < 50, blue


def test_inpainting_inputs_are_made_rgb_the_same_way(tmp_path):
    from difftool.sampling import open_image

    gradient = np.tile(np.linspace(0, 65535, 16).round().astype(np.uint16), (16, 1))
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    picture = np.asarray(open_image(tmp_path / "deep.png", "RGB", 16)).astype(np.float64)
    assert abs(picture.mean() - 127.5) < 2
    mask = np.zeros((16, 16, 4), np.uint8)
    mask[:, :8] = (0, 0, 0, 255)  # opaque black: keep; transparent: white, painted
    Image.fromarray(mask).save(tmp_path / "mask.png")
    opened = open_image(tmp_path / "mask.png", "L", 16)
    assert opened.mode == "L"
    assert np.asarray(opened)[:, :7].max() == 0 and np.asarray(opened)[:, 9:].min() == 255


# imagefolder: every bad file named before training

def photo(path: Path, seed: int = 0, size=(96, 64)) -> bytes:
    """A smooth random-colour JPEG at `path`; returns its bytes."""
    coarse = np.random.default_rng(seed).random((4, 6, 3)) * 255
    Image.fromarray(coarse.astype(np.uint8)).resize(size, Image.BICUBIC).save(path, quality=95)
    return path.read_bytes()


def folder_of_photos(folder: Path, count: int = 3) -> Path:
    folder.mkdir()
    for i in range(count):
        photo(folder / f"{i}.jpg", seed=i)
    return folder


def build_imagefolder(folder: Path):
    return registry("datasets").get("imagefolder").build({"path": str(folder)}, "[dataset]")


def refusal(folder: Path) -> str:
    with pytest.raises(DifftoolError) as info:
        build_imagefolder(folder)
    return str(info.value)


def test_a_truncated_jpeg_among_good_ones_is_named(tmp_path):
    folder = folder_of_photos(tmp_path / "photos")
    whole = photo(tmp_path / "whole.jpg", seed=9)
    (folder / "cut.jpg").write_bytes(whole[: int(len(whole) * 0.6)])
    with Image.open(folder / "cut.jpg") as cut:
        cut.verify()  # verify() alone lets it through
    message = refusal(folder)
    assert f"{folder / 'cut.jpg'} is not a readable image" in message
    assert "truncated" in message and "remove or replace it" in message


def test_a_truncated_png_is_named(tmp_path):
    folder = folder_of_photos(tmp_path / "photos")
    Image.fromarray(COLOURS).resize((64, 64)).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: int(len(whole) * 0.6)])
    message = refusal(folder)
    assert f"{folder / 'cut.png'} is not a readable image" in message and "remove or replace it" in message


@pytest.mark.parametrize("trailer", [b"\x00\x00", b"camera maker data " * 500], ids=["short", "beyond-the-tail"])
def test_a_jpeg_with_harmless_trailing_bytes_is_accepted(tmp_path, trailer):
    folder = folder_of_photos(tmp_path / "photos", count=1)
    whole = photo(tmp_path / "whole.jpg", seed=9)
    (folder / "trailer.jpg").write_bytes(whole + trailer)
    rows = build_imagefolder(folder)
    assert len(rows) == 2
    images = data.ImageDataset(rows, 32, cache=False)
    assert all(images[i]["images"].shape == (3, 32, 32) for i in range(2))


def captioned(folder: Path, metadata: str, name: str = "metadata.jsonl") -> Path:
    """`folder` with 3 photos and the given metadata file beside them."""
    folder_of_photos(folder)
    (folder / name).write_text(metadata)
    return folder / name


GOOD_LINE = '{"file_name": "0.jpg", "text": "a photo"}\n'
BAD_JSONL = {
    "bad JSON": (GOOD_LINE * 2 + '{"file_name": "2.jpg", "text": "unclosed}\n', "line 3 is not valid JSON"),
    "missing image": (GOOD_LINE + '{"file_name": "gone.jpg", "text": "x"}\n', "line 2: file_name 'gone.jpg' names a missing image"),
    "no file_name": (GOOD_LINE * 2 + '{"text": "no file"}\n', "line 3 has no file_name"),
    "not an object": (GOOD_LINE + '["0.jpg", "text"]\n', "line 2 is a JSON list, not an object"),
    "type change": (GOOD_LINE + '{"file_name": "1.jpg", "text": 5}\n', "line 2: 'text' holds a JSON number where line 1 has a JSON string"),
    "outside": (GOOD_LINE + '{"file_name": "../0.jpg", "text": "x"}\n', "line 2: file_name '../0.jpg' must be a path relative"),
}


@pytest.mark.parametrize("case", BAD_JSONL)
def test_a_bad_metadata_jsonl_line_is_named(tmp_path, case):
    text, expected = BAD_JSONL[case]
    metadata = captioned(tmp_path / "photos", text)
    message = refusal(tmp_path / "photos")
    assert message.startswith(f"[dataset] {metadata} ")
    assert expected in message


BAD_CSV = {
    "missing image": ("file_name,text\n0.jpg,a\ngone.jpg,b\n", "line 3: file_name 'gone.jpg' names a missing image"),
    "no file_name column": ("name,text\n0.jpg,a\n", "has no file_name column"),
    "empty file_name": ("file_name,text\n0.jpg,a\n,b\n", "line 3 has no file_name"),
    "extra field": ("file_name,text\n0.jpg,a, b\n", "line 2 has more fields than the header"),
}


@pytest.mark.parametrize("case", BAD_CSV)
def test_a_bad_metadata_csv_row_is_named(tmp_path, case):
    text, expected = BAD_CSV[case]
    metadata = captioned(tmp_path / "photos", text, "metadata.csv")
    message = refusal(tmp_path / "photos")
    assert message.startswith(f"[dataset] {metadata} ") and expected in message


def test_a_metadata_parquet_row_naming_a_missing_image_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = folder_of_photos(tmp_path / "photos")
    pq.write_table(pa.table({"file_name": ["0.jpg", "gone.jpg"], "text": ["a", "b"]}), folder / "metadata.parquet")
    message = refusal(folder)
    assert message.startswith(f"[dataset] {folder / 'metadata.parquet'} row 2: file_name 'gone.jpg' names a missing image")
    assert message.endswith("add the image or remove the row")


def test_a_folder_split_without_train_is_named(tmp_path):
    (tmp_path / "photos").mkdir()
    folder_of_photos(tmp_path / "photos" / "test")  # datasets reads photos/test/ as a test split
    assert "has no train split; rename the one to train on to train/" in refusal(tmp_path / "photos")


def test_metadata_in_a_subfolder_names_images_beside_it(tmp_path):
    metadata = captioned(tmp_path / "photos", GOOD_LINE)
    (tmp_path / "photos" / "more").mkdir()
    photo(tmp_path / "photos" / "more" / "m.jpg")
    (tmp_path / "photos" / "more" / "metadata.jsonl").write_text('{"file_name": "0.jpg", "text": "not here"}\n')
    message = refusal(tmp_path / "photos")
    assert f"{tmp_path / 'photos' / 'more' / 'metadata.jsonl'} line 1: file_name '0.jpg'" in message
    (tmp_path / "photos" / "more" / "metadata.jsonl").write_text('{"file_name": "m.jpg", "text": "here"}\n\n')
    rows = build_imagefolder(tmp_path / "photos")
    assert sorted(rows["text"]) == ["a photo", "here"] and metadata.is_file()


def test_good_captioned_metadata_loads(tmp_path):
    captioned(tmp_path / "photos", "".join(json.dumps({"file_name": f"{i}.jpg", "text": f"photo {i}"}) + "\n" for i in range(3)))
    rows = build_imagefolder(tmp_path / "photos")
    assert sorted(rows["text"]) == ["photo 0", "photo 1", "photo 2"]


def test_decode_names_the_file_it_cannot_read(tmp_path):
    whole = photo(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes(whole[: int(len(whole) * 0.6)])
    with pytest.raises(DifftoolError) as info:
        data.decode({"path": str(tmp_path / "cut.jpg"), "bytes": None}, 32)
    assert str(info.value).startswith(f"[dataset] {tmp_path / 'cut.jpg'} is not a readable image (OSError: image file is truncated")
    assert str(info.value).endswith("remove or replace it")
    with pytest.raises(DifftoolError, match=r"an image stored in the dataset \(as bytes\) is not a readable image"):
        data.decode({"path": None, "bytes": b"not an image"}, 32)


def test_decode_reads_a_rows_bytes_before_its_path(tmp_path):
    whole = photo(tmp_path / "whole.jpg")
    # a Hub dataset's row: a bare file name that is no file here, and the bytes
    pixels = data.decode({"path": "0001.jpg", "bytes": whole}, 32)
    assert torch.equal(pixels, data.decode({"path": str(tmp_path / "whole.jpg"), "bytes": None}, 32))


def test_a_loader_worker_hands_back_the_message_alone(tmp_path):
    whole = photo(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes(whole[: int(len(whole) * 0.6)])
    rows = [{"image": {"path": str(tmp_path / "cut.jpg"), "bytes": None}}]
    with pytest.raises(DifftoolError) as in_process:
        data.ImageDataset(rows, 32, cache=False)[0]
    loader = torch.utils.data.DataLoader(data.ImageDataset(rows, 32, cache=False), num_workers=1)
    with pytest.raises(DifftoolError) as from_worker:
        next(iter(loader))
    assert str(from_worker.value) == str(in_process.value)
    assert "Traceback" not in str(from_worker.value)


def test_a_run_over_a_truncated_jpeg_stops_before_training_and_names_it(cli, tiny_recipe, tmp_path):
    folder = folder_of_photos(tmp_path / "photos")
    whole = photo(tmp_path / "whole.jpg", seed=9)
    (folder / "cut.jpg").write_bytes(whole[: int(len(whole) * 0.6)])
    dataset = f'dataset={{name="imagefolder", path="{folder.as_posix()}", image_size=32, batch_size=2}}'
    code, out, err = cli("run", tiny_recipe(), "--set", dataset)
    assert code == 1
    assert "cut.jpg is not a readable image" in " ".join(err.split())  # the console may wrap
    assert "Traceback" not in err and "internal error" not in err
    run = tmp_path / "run"
    assert not run.exists() or not any(run.rglob("*"))
