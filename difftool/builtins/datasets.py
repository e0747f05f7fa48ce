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
    `text` column.

    Loss masks: an image NAME_mask.EXT beside NAME.EXT (any image extensions) is the mask of
    NAME.EXT, not a training image; the images get a `mask` column (None for an image without
    one: all of it counts). Each mask must have its image's size, and a NAME_mask file with no
    NAME image beside it is refused."""
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
    masks = _mask_files(images)
    if masks:
        images -= set(masks.values())
        # the images and metadata files alone, so that datasets does not take the masks for images
        patterns = {**patterns, "train": [str(file) for file in sorted(images | set(metadata))]}
    for file in sorted(images | set(masks.values())):
        _check_image(file)
    for image, mask in sorted(masks.items()):
        _check_mask_size(image, mask)
    captions = None if metadata else _caption_files(images, path)
    try:
        # the patterns found above, so that datasets does not search the folder for splits again
        dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), data_files=patterns, split="train")
    except (ValueError, TypeError, KeyError, datasets.exceptions.DatasetsError) as exc:  # ArrowInvalid: ValueError
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
        raise DifftoolError(f"[dataset] path = '{path}': datasets could not read the folder "
                            f"({type(exc).__name__}: {exc}{cause}); check "
                            f"{', '.join(map(str, metadata)) or 'its images'}") from exc
    if not captions and not masks:
        return dataset
    # each row's own file, in datasets' order, without decoding the images
    files = [Path(file["path"]).resolve() for file in dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    if captions:
        dataset = dataset.add_column("text", [captions[file] for file in files])
    if masks:
        found = {image.resolve(): mask for image, mask in masks.items()}
        column = [{"path": str(found[file]), "bytes": None} if file in found else None for file in files]
        dataset = dataset.add_column("mask", column).cast_column("mask", datasets.Image())
    return dataset


MASK_SUFFIX = "_mask"  # NAME_mask.png beside NAME.jpg is NAME.jpg's loss mask


def _mask_files(images: set[Path]) -> dict[Path, Path]:
    """{image: its mask} for each NAME_mask.EXT among the image files that has a NAME.EXT image
    (any image extension) in its folder; a NAME_mask file without one is an error naming it."""
    stems = {}
    for file in images:
        if not file.stem.endswith(MASK_SUFFIX):
            stems.setdefault((file.parent, file.stem), []).append(file)
    masks = {}
    for file in sorted(images):
        if not file.stem.endswith(MASK_SUFFIX):
            continue
        owners = stems.get((file.parent, file.stem[:-len(MASK_SUFFIX)]), [])
        if not owners:
            raise DifftoolError(f"[dataset] {file} is named as a loss mask (NAME{MASK_SUFFIX}.EXT) but there is no image "
                                f"{file.stem[:-len(MASK_SUFFIX)]}.* beside it; add that image, or rename the file if it "
                                "is a training image")
        if len(owners) > 1:
            raise DifftoolError(f"[dataset] {file} is the loss mask of {len(owners)} images "
                                f"({', '.join(sorted(map(str, owners)))}); give each image its own name")
        masks[owners[0]] = file
    return masks


def _check_mask_size(image: Path, mask: Path) -> None:
    """A mask must be the size of its image, both upright (read from the headers)."""
    from PIL import Image

    from difftool.data import upright_size

    with Image.open(image) as picture, Image.open(mask) as masked:
        (height, width), (mask_height, mask_width) = upright_size(picture), upright_size(masked)
        if (height, width) != (mask_height, mask_width):
            raise DifftoolError(f"[dataset] the mask {mask} is {mask_width}x{mask_height} but its image {image} is "
                                f"{width}x{height}; a mask must have its image's size (white where the loss counts, "
                                "black where it does not): resize the mask to it")


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


def dreambooth(instance_dir: str, instance_prompt: str, class_prompt: str | None = None,
               class_dir: str | None = None, num_class_images: int = 100, prior_loss_weight: float = 1.0,
               with_prior_preservation: bool | None = None, generate_images=None) -> list[dict]:
    """DreamBooth (Ruiz et al. 2022), named as diffusers' train_dreambooth.py names it: the images
    in `instance_dir`, each captioned `instance_prompt` ("a photo of sks dog"), and, with prior
    preservation, `num_class_images` images of `class_prompt` ("a photo of a dog") from
    `class_dir`, their loss weighted by `prior_loss_weight`. Rows: {"image", "text", and with
    prior preservation "loss_weight"} (1 for instance rows), so `[dataset] caption_column` is
    "text". An instance image NAME.EXT with a NAME_mask.EXT beside it gets that loss mask (a
    `mask` column, as an imagefolder's); class images count whole.

    with_prior_preservation defaults to whether a class_prompt is given; asked for without one,
    it is refused. class_dir defaults to a folder under difftool's cache keyed by the base model,
    the image size and the class prompt (`generate_images.folder_for`). When class_dir holds
    fewer than num_class_images images, `generate_images` (the context argument: the recipe's
    base model) tops it up before training, one file at a time; a rerun keeps what an
    interrupted one made. Of more, the first num_class_images by name are used.

    As kohya-ss/sd-scripts mixes regularisation images, instance and class rows are one dataset,
    shuffled together, each kind repeated in turn up to the larger count, so an epoch holds as
    many of each. diffusers' script instead gives each batch an instance and a class half and
    takes loss = instance loss + prior_loss_weight * class loss; here the batch mean of the
    weighted per-sample losses is, in expectation, half that (Adam's steps do not depend on the
    scale of the loss, but set an SGD learning rate twice diffusers' to match)."""
    import math

    instance_folder = Path(instance_dir).expanduser()
    if not instance_folder.is_dir():
        raise DifftoolError(f"[dataset] instance_dir = '{instance_dir}': no such folder; point it at the folder of "
                            "the subject's images")
    extensions = _image_extensions()
    instances = sorted(f for f in instance_folder.iterdir() if f.is_file() and f.suffix.lower() in extensions)
    if not instances:
        raise DifftoolError(f"[dataset] instance_dir = '{instance_dir}' holds no image files")
    if not isinstance(instance_prompt, str) or not instance_prompt.strip():
        raise DifftoolError("[dataset] instance_prompt must name the subject, with its identifier, e.g. "
                            'instance_prompt = "a photo of sks dog"')
    masks = _mask_files(set(instances))  # NAME_mask.png beside NAME.png: its loss mask, as in an imagefolder
    mask_files = set(masks.values())
    instances = [f for f in instances if f not in mask_files]
    for file in instances + sorted(masks.values()):
        _check_image(file)
    for image, mask in sorted(masks.items()):
        _check_mask_size(image, mask)
    instance_rows = [{"image": {"path": str(f), "bytes": None}, "text": instance_prompt} for f in instances]
    if masks:
        for row, file in zip(instance_rows, instances):
            row["mask"] = {"path": str(masks[file]), "bytes": None} if file in masks else None
    if with_prior_preservation is None:
        with_prior_preservation = bool(class_prompt)
    if not with_prior_preservation:
        return instance_rows
    if not isinstance(class_prompt, str) or not class_prompt.strip():
        raise DifftoolError("[dataset] with_prior_preservation = true needs class_prompt, the prompt of the class "
                            'images (e.g. class_prompt = "a photo of a dog" for instance_prompt = "a photo of sks '
                            'dog"); set it, or set with_prior_preservation = false to train on the instance images '
                            "alone")
    if isinstance(num_class_images, bool) or not isinstance(num_class_images, int) or num_class_images < 1:
        raise DifftoolError(f"[dataset] num_class_images = {num_class_images!r} must be a positive number of images")
    if (isinstance(prior_loss_weight, bool) or not isinstance(prior_loss_weight, (int, float))
            or not math.isfinite(prior_loss_weight) or prior_loss_weight < 0):
        raise DifftoolError(f"[dataset] prior_loss_weight = {prior_loss_weight!r} must be a number >= 0 (diffusers' "
                            "default is 1.0)")
    from difftool.class_images import image_files

    if class_dir is not None:
        folder = Path(class_dir).expanduser()
        if folder.exists() and not folder.is_dir():
            raise DifftoolError(f"[dataset] class_dir = '{class_dir}' is a file; point it at a folder for the class "
                                "images (it is created and filled when it has too few)")
    elif generate_images is not None:
        folder = generate_images.folder_for(class_prompt)
    else:
        raise DifftoolError("[dataset] class_dir is needed: nothing here can generate class images; point it at a "
                            "folder of class images")
    if generate_images is not None:  # in every process: the main one generates, the others wait for it
        generate_images(class_prompt, num_class_images, folder)
    found = image_files(folder)
    if len(found) < num_class_images:
        raise DifftoolError(f"[dataset] {folder} holds {len(found)} class images and num_class_images = "
                            f"{num_class_images}; add images, or lower num_class_images")
    classes = found[:num_class_images]
    for file in classes:
        _check_image(file)
    class_rows = [{"image": {"path": str(f), "bytes": None}, "text": class_prompt, "loss_weight": float(prior_loss_weight),
                   **({"mask": None} if masks else {})} for f in classes]  # a class image counts whole
    for row in instance_rows:
        row["loss_weight"] = 1.0
    count = max(len(instance_rows), len(class_rows))
    return [row for i in range(count) for row in (instance_rows[i % len(instance_rows)], class_rows[i % len(class_rows)])]


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
