"""Built-in image datasets: the Hugging Face Hub and local image folders."""

from pathlib import Path

from difftool.errors import DifftoolError, hub_unreachable


def huggingface(path: str, split: str = "train", name: str | None = None,
                image_column: str = "image", revision: str | None = None):
    """`datasets.load_dataset(path, name, split=split)`, its image column renamed to `image`."""
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


def imagefolder(path: str):
    """Every image under the local folder `path` (datasets' imagefolder), each checked first."""
    import datasets
    from PIL import Image

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DifftoolError(f"[dataset] path = '{path}': no such folder; point it at a folder of images")
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in extensions and f.is_file())
    if not files:
        raise DifftoolError(f"[dataset] path = '{path}' holds no image files (looked for {', '.join(sorted(extensions)[:6])}, ...)")
    for file in files:
        try:
            with Image.open(file) as image:
                image.verify()
        except Exception as exc:
            raise DifftoolError(
                f"[dataset] {file} is not a readable image ({type(exc).__name__}: {exc}); "
                "remove or replace it"
            ) from exc
    return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
