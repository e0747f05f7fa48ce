"""Built-in image datasets: the Hugging Face Hub and local image folders."""

from pathlib import Path

from difftool.errors import DifftoolError, hub_unreachable


def huggingface(path: str, split: str = "train", name: str | None = None,
                image_column: str = "image", revision: str | None = None):
    """`datasets.load_dataset(path, name, split=split)`, its image column renamed to `image`.
    The other columns stay as they are: `[dataset] label_column` names the one holding class
    labels (a ClassLabel, class names or class indices) for class-conditional training."""
    import datasets

    try:
        dataset = datasets.load_dataset(path, name, split=split, revision=revision)
    except (ConnectionError, OSError) as exc:
        raise hub_unreachable(f"the dataset '{path}'", exc) from exc
    except ValueError as exc:  # unknown split or config
        raise DifftoolError(f"[dataset] '{path}': {exc}") from exc
    if image_column not in dataset.column_names:
        raise DifftoolError(
            f"[dataset] '{path}' has no column '{image_column}' (it has {dataset.column_names}); "
            "set image_column to the one holding the images"
        )
    return dataset if image_column == "image" else dataset.rename_column(image_column, "image")


# the metadata files datasets' folder-based builders read beside the images
# (FolderBasedBuilder.METADATA_FILENAMES in datasets 5.x)
METADATA_FILENAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
# bytes at the end of a JPEG searched for its end-of-image marker: trailing data longer than
# this costs a decode at 1/8 scale, never a wrong refusal
JPEG_TAIL = 4096


def imagefolder(path: str):
    """Every image under the local folder `path` (datasets' imagefolder). First, every image file
    is checked and every metadata file read, so that a bad one is named before training starts.

    Class subfolders (path/butterfly/1.png, path/emoji/2.png) give a `label` ClassLabel column
    for `[dataset] label_column = "label"`, its names those of the folders holding the images,
    sorted. datasets adds it only when there are at least 2 such folders, every image lies at
    the same depth (none directly in `path`), and there is no metadata file (whose columns are
    used instead). Folders named like splits (train, validation, val, dev, test, eval, ...) are
    splits, not classes.

    Captions: a metadata file's column (`text` for `[dataset] caption_column`), or, in a folder
    without one, a caption file beside each image: NAME.txt or NAME.caption, UTF-8, read into a
    `text` column."""
    import datasets

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DifftoolError(f"[dataset] path = '{path}': no such folder; point it at a folder of images")
    patterns, images, metadata = _data_files(folder, path)  # exactly the files datasets will read
    for file in metadata:
        images |= set(_named_images(file))
    if not images:
        extensions = ", ".join(sorted(_image_extensions())[:6])
        raise DifftoolError(f"[dataset] path = '{path}' holds no image files (looked for {extensions}, ...)")
    for file in sorted(images):
        _check_image(file)
    captions = None if metadata else _caption_files(images, path)
    try:
        # the patterns found above, so that datasets does not search the folder for splits again
        dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), data_files=patterns, split="train")
    except (ValueError, TypeError, KeyError, datasets.exceptions.DatasetsError) as exc:  # ArrowInvalid: ValueError
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
        raise DifftoolError(f"[dataset] path = '{path}': datasets could not read the folder "
                            f"({type(exc).__name__}: {exc}{cause}); check "
                            f"{', '.join(map(str, metadata)) or 'its images'}") from exc
    if not captions:
        return dataset
    # each row's own file, in datasets' order, without decoding the images
    files = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    return dataset.add_column("text", [captions[Path(file["path"]).resolve()] for file in files])


# caption files beside the images, as kohya-ss/sd-scripts and most fine-tuning trainers read them
CAPTION_SUFFIXES = (".txt", ".caption")


def _caption_files(images: set[Path], path: str) -> dict[Path, str] | None:
    """{image: its caption} from a NAME.txt (or NAME.caption) beside each image, or None when no
    image has one. Every image must have one then, and each must be UTF-8 text; its lines are
    joined by spaces. A folder with a metadata file reads its captions from there instead."""
    found = {}
    for image in images:
        beside = [image.with_suffix(suffix) for suffix in CAPTION_SUFFIXES if image.with_suffix(suffix).is_file()]
        if beside:
            found[image.resolve()] = beside[0]
    if not found:
        return None
    missing = sorted(image for image in images if image.resolve() not in found)
    if missing:
        shown = ", ".join(str(image) for image in missing[:3])
        raise DifftoolError(f"[dataset] path = '{path}': {len(found)} images have a caption file and {len(missing)} "
                            f"have none ({shown}{', ...' if len(missing) > 3 else ''}); write a NAME.txt beside each "
                            "image (an empty one for no caption), or remove the caption files to train without them")
    captions = {}
    for image, file in found.items():
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DifftoolError(f"[dataset] caption file {file} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                                f"position {exc.start}); save it as UTF-8") from exc
        except OSError as exc:
            raise DifftoolError(f"[dataset] caption file {file} cannot be read ({exc.strerror or exc})") from exc
        captions[image] = " ".join(text.split())
    return captions


def folders(classes: dict, max_per_class: int | None = None, seed: int = 0) -> list[dict]:
    """One class per local folder of images: `classes` maps each class name to its folder, and
    each image becomes a row {"image", "label": its class name} (so `[dataset] label_column =
    "label"`). With `max_per_class`, each class keeps a seeded random subset of that many images,
    e.g. to balance a large folder against a small one. Images are checked before training and
    read when first used."""
    import random

    if not isinstance(classes, dict) or len(classes) < 2:
        raise DifftoolError("[dataset] classes must map at least two class names to folders, e.g. "
                            'classes = { butterfly = "data/butterflies", emoji = "data/emoji" }')
    if max_per_class is not None and max_per_class < 1:
        raise DifftoolError(f"[dataset] max_per_class = {max_per_class} must be a positive number of images")
    extensions, rows = _image_extensions(), []
    for name, path in classes.items():
        folder = Path(str(path)).expanduser()
        if not isinstance(path, str) or not folder.is_dir():
            raise DifftoolError(f"[dataset] classes.{name} = {path!r}: no such folder; point it at a folder of images")
        files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
        if not files:
            raise DifftoolError(f"[dataset] classes.{name} = '{path}' holds no image files")
        if max_per_class is not None and len(files) > max_per_class:
            files = sorted(random.Random(f"{seed}:{name}").sample(files, max_per_class))
        for file in files:
            _check_image(file)
        rows += [{"image": {"path": str(file), "bytes": None}, "label": name} for file in files]
    return rows


def _data_files(folder: Path, path: str) -> tuple[dict, set[Path], list[Path]]:
    """(the data_files patterns of each split, image files, metadata files of the train split),
    found by datasets' own functions, as `load_dataset("imagefolder", data_dir=folder)` finds them."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    base = folder.resolve().as_posix()
    try:
        patterns = {str(split): list(globs) for split, globs in get_data_patterns(base).items()}
    except EmptyDatasetError:
        return {}, set(), []
    files = DataFilesDict.from_patterns(patterns, base_path=base)
    if "train" not in files:
        raise DifftoolError(f"[dataset] path = '{path}' is split into {', '.join(files)} folders but has no "
                            "train split; rename the one to train on to train/ (datasets takes folders named "
                            "like train, validation/val/dev or test/eval for splits: rename class folders "
                            "named so)")
    extensions, images, metadata = _image_extensions(), set(), []
    for name in files["train"]:  # sorted as datasets sorts them
        file = Path(name)
        if file.suffix.lower() in extensions or Path(file.stem).suffix.lower() in extensions:
            images.add(file)
        elif file.name in METADATA_FILENAMES:
            metadata.append(file)
    kinds = {file.suffix for file in metadata}
    if len(kinds) > 1:
        raise DifftoolError(f"[dataset] path = '{path}' mixes metadata formats ({', '.join(map(str, metadata))}); "
                            "datasets reads one kind: keep only .jsonl, .csv or .parquet files")
    return patterns, images, sorted(metadata)


def _image_extensions() -> set[str]:
    """The file extensions datasets' imagefolder takes for images."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return set(ImageFolder.EXTENSIONS)


def _check_image(file: Path) -> None:
    """Refuse an image that will not decode, cheaply: a PNG's chunks and checksums are read
    (`verify`), a JPEG must end with its end-of-image marker or else decode (at 1/8 scale),
    and other formats, rare in datasets, are decoded."""
    from PIL import Image

    from difftool.images import DECODE_ERRORS

    try:
        with Image.open(file) as image:
            if image.format == "PNG":
                image.verify()
            elif image.format in ("JPEG", "MPO"):
                if not _ends_with_eoi(image.fp):
                    image.draft(image.mode, (1, 1))  # 1/8 scale: all the data is still read
                    image.load()
            else:
                image.load()
    except DECODE_ERRORS as exc:
        raise DifftoolError(
            f"[dataset] {file} is not a readable image ({type(exc).__name__}: {exc}); remove or replace it"
        ) from exc


def _ends_with_eoi(fp) -> bool:
    """Whether a JPEG's last JPEG_TAIL bytes after its first scan starts hold the end-of-image
    marker FF D9, which cannot occur inside entropy-coded data. `fp` is PIL's file, left just
    after the start-of-scan header by Image.open."""
    scan = fp.tell()
    end = fp.seek(0, 2)
    fp.seek(max(scan, end - JPEG_TAIL))
    return b"\xff\xd9" in fp.read()


def _named_images(metadata: Path) -> list[Path]:
    """The images a metadata file's rows name, after checking every row as datasets will read it:
    a JSON object per line (jsonl) or a row under a header (csv), each with a `file_name`
    relative to the metadata file's folder, naming a file that exists."""
    if metadata.suffix == ".jsonl":
        rows = _jsonl_rows(metadata)
    elif metadata.suffix == ".csv":
        rows = _csv_rows(metadata)
    else:
        rows = _parquet_rows(metadata)
    images = []
    for where, row in rows:
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            raise DifftoolError(f"[dataset] {metadata} {where} has no file_name (it has {sorted(row)}); "
                                "give each row the image's file name, relative to this file's folder")
        relative = Path(name)
        if "://" in name or relative.is_absolute() or ".." in relative.parts:
            raise DifftoolError(f"[dataset] {metadata} {where}: file_name '{name}' must be a path relative to "
                                "this file's folder, inside it")
        image = metadata.parent / relative
        if not image.is_file():
            raise DifftoolError(f"[dataset] {metadata} {where}: file_name '{name}' names a missing image "
                                f"({image}); add the image or remove the {where.split()[0]}")
        images.append(image)
    return images


def _jsonl_rows(metadata: Path):
    """("line N", object) for each non-blank line; a line that is not a JSON object, or whose
    value for a key has another JSON type than on an earlier line, is an error naming it."""
    import json

    types: dict[str, tuple[str, int]] = {}
    with open(metadata, encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # datasets skips blank lines too
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DifftoolError(f"[dataset] {metadata} line {number} is not valid JSON ({exc.msg} at column "
                                    f"{exc.colno}); fix the line: each line is one JSON object") from exc
            if not isinstance(row, dict):
                raise DifftoolError(f"[dataset] {metadata} line {number} is a JSON {type(row).__name__}, not an "
                                    'object; each line is one object such as {"file_name": "0001.png", "text": "..."}')
            for key, value in row.items():
                kind = _json_type(value)
                if kind is None:
                    continue  # null fits any type
                first, first_line = types.setdefault(key, (kind, number))
                if kind != first:  # Arrow refuses a column that changes type
                    raise DifftoolError(f"[dataset] {metadata} line {number}: '{key}' holds a JSON {kind} where "
                                        f"line {first_line} has a JSON {first}; give it one type on every line")
            yield f"line {number}", row


def _json_type(value) -> str | None:
    """The JSON type of `value` as Arrow tells them apart (None for null, which fits any)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    return {int: "number", float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def _csv_rows(metadata: Path):
    """("line N", row) for each row under the header; a row with more fields than the header
    is an error naming its line."""
    import csv

    with open(metadata, newline="", encoding="utf-8-sig") as lines:
        reader = csv.DictReader(lines)
        if "file_name" not in (reader.fieldnames or []):
            raise DifftoolError(f"[dataset] {metadata} has no file_name column (its header is "
                                f"{reader.fieldnames}); name the images in a file_name column")
        for row in reader:
            if None in row:
                raise DifftoolError(f"[dataset] {metadata} line {reader.line_num} has more fields than the header "
                                    f"({len(reader.fieldnames)}); quote values that hold commas")
            yield f"line {reader.line_num}", row


def _parquet_rows(metadata: Path):
    """("row N", {"file_name": ...}) for each row of a metadata.parquet."""
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(metadata).names
        names = pq.read_table(metadata, columns=["file_name"]).column(0).to_pylist() if "file_name" in columns else None
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DifftoolError(f"[dataset] {metadata} is not a readable Parquet file ({type(exc).__name__}: {exc}); "
                            "fix or remove it") from exc
    if names is None:
        raise DifftoolError(f"[dataset] {metadata} has no file_name column (it has {columns}); "
                            "name the images in a file_name column")
    for number, name in enumerate(names, start=1):
        yield f"row {number}", {"file_name": name}
