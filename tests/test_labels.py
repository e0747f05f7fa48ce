"""Class labels for class-conditional training: the class names of a label column, the labels
ImageDataset hands over, and the datasets that have them (imagefolder's class subfolders,
synthetic-butterflies with labels = true)."""

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from difftool.builtins.synthetic import synthetic_butterflies
from difftool.data import BadLabel, ImageDataset, class_names
from difftool.errors import DifftoolError
from difftool.plugins import registry

WHERE = "recipe.toml: [dataset]"
RED, BLUE = (200, 30, 30), (30, 30, 200)


def square(colour, size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def names_error(rows, column: str = "label") -> str:
    with pytest.raises(DifftoolError) as info:
        class_names(rows, column, WHERE)
    return str(info.value)


# class_names

def test_a_class_label_feature_gives_its_names_in_order():
    features = datasets.Features({"label": datasets.ClassLabel(names=["moth", "butterfly", "bee"])})
    rows = datasets.Dataset.from_dict({"label": [1, 1, 0]}, features=features)
    assert class_names(rows, "label", WHERE) == ["moth", "butterfly", "bee"]  # unused "bee" too


def test_strings_give_their_sorted_unique_values():
    rows = [{"label": "orange"}, {"label": "blue"}, {"label": "orange"}, {"label": "black"}]
    assert class_names(rows, "label", WHERE) == ["black", "blue", "orange"]
    assert class_names(datasets.Dataset.from_list(rows), "label", WHERE) == ["black", "blue", "orange"]


def test_integers_name_every_index_up_to_the_largest():
    rows = [{"label": 3}, {"label": 0}, {"label": np.int64(1)}]
    assert class_names(rows, "label", WHERE) == ["0", "1", "2", "3"]
    table = datasets.Dataset.from_dict({"label": [3, 0, 1]})
    assert class_names(table, "label", WHERE) == ["0", "1", "2", "3"]


def test_a_subset_reads_its_whole_dataset():
    rows = [{"label": "blue"}, {"label": "orange"}, {"label": "white"}]
    subset = torch.utils.data.Subset(torch.utils.data.Subset(rows, [0, 1]), [0])
    assert class_names(subset, "label", WHERE) == ["blue", "orange", "white"]
    features = datasets.Features({"label": datasets.ClassLabel(names=["a", "b"])})
    table = datasets.Dataset.from_dict({"label": [0, 1]}, features=features)
    assert class_names(torch.utils.data.Subset(table, [1]), "label", WHERE) == ["a", "b"]


@pytest.mark.parametrize("rows", [
    [{"image": None, "text": "a"}],
    datasets.Dataset.from_dict({"image": [None], "text": ["a"]}),
], ids=["list", "datasets"])
def test_a_missing_column_is_named_with_the_fix(rows):
    message = names_error(rows, "species")
    assert message.startswith(WHERE) and "'species'" in message
    assert "['image', 'text']" in message and "set label_column to one of them" in message
    assert "path/CLASS/image.png" in message and "labels = true" in message


def test_one_class_is_refused():
    message = names_error([{"label": "blue"}, {"label": "blue"}])
    assert message.startswith(WHERE) and "needs at least 2 classes" in message and "['blue']" in message
    assert "needs at least 2 classes" in names_error([{"label": 0}])


@pytest.mark.parametrize("values, shown", [
    ([True, False], "True (bool)"), ([0.5, 1.5], "0.5 (float)"), ([1, -1], "-1 (int)"),
    (["a", 1], "both strings and integers"), (["a", None], "None (NoneType)"),
], ids=["bool", "float", "negative", "mixed", "none"])
def test_values_that_are_not_labels_are_refused(values, shown):
    message = names_error([{"label": value} for value in values])
    assert message.startswith(WHERE) and shown in message and "integers >= 0" in message


def test_a_column_of_another_type_is_refused():
    rows = datasets.Dataset.from_dict({"label": [0.5, 1.5]})
    message = names_error(rows)
    assert message.startswith(WHERE) and "holds Value('float64'), not class labels" in message


# ImageDataset

def test_image_dataset_gives_the_index_of_each_label():
    rows = [{"image": square(RED), "label": "red"}, {"image": square(BLUE), "label": "blue"}]
    names = class_names(rows, "label", WHERE)
    assert names == ["blue", "red"]
    for cache in (False, True):
        labelled = ImageDataset(rows, 8, cache=cache, labels={"column": "label", "names": names})
        plain = ImageDataset(rows, 8, cache=cache)
        for _ in range(2):  # from the cache the second time
            assert [labelled[i]["labels"] for i in range(2)] == [1, 0]
            assert all(torch.equal(labelled[i]["images"], plain[i]["images"]) for i in range(2))
        assert set(plain[0]) == {"images"}


def test_integer_labels_are_used_as_they_are():
    rows = [{"image": square(RED), "label": 2}, {"image": square(BLUE), "label": np.int64(0)}]
    labelled = ImageDataset(rows, 8, cache=False, labels={"column": "label", "names": class_names(rows, "label", WHERE)})
    assert [labelled[i]["labels"] for i in range(2)] == [2, 0]
    assert all(type(labelled[i]["labels"]) is int for i in range(2))


@pytest.mark.parametrize("value", ["purple", 3, -1, None])
def test_a_label_that_is_not_a_class_is_named(value):
    rows = [{"image": square(RED), "label": "red"}] * 3 + [{"image": square(BLUE), "label": value}]
    subset = torch.utils.data.Subset(rows, [3, 0])
    labelled = ImageDataset(subset, 8, cache=False, labels={"column": "label", "names": ["blue", "red", "white"]})
    assert labelled[1]["labels"] == 1
    with pytest.raises(BadLabel) as info:
        labelled[0]
    message = str(info.value)
    assert f"row 3 has label = {value!r}," in message  # the row of the whole dataset
    assert "['blue', 'red', 'white']" in message and "from 0 to 2" in message


def test_a_bad_label_from_a_worker_keeps_its_message():
    message = "[dataset] row 3 has label = 'purple', which is not one of the classes ['a', 'b']; ..."
    rebuilt = BadLabel(f"Caught BadLabel in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                       f"last):\n  File \"x.py\", line 1, in f\ndifftool.data.BadLabel: {message}\n")
    assert str(rebuilt) == message


# imagefolder

def write_classes(folder: Path, classes: dict[str, list[tuple]]) -> Path:
    for name, colours in classes.items():
        (folder / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            square(colour).save(folder / name / f"{i}.png")
    return folder


def build_imagefolder(folder: Path):
    return registry("datasets").get("imagefolder").build({"path": str(folder)}, "[dataset]")


def test_imagefolder_class_subfolders_give_a_class_label_column(tmp_path):
    folder = write_classes(tmp_path / "images", {"emoji": [BLUE, BLUE], "butterfly": [RED]})
    rows = build_imagefolder(folder)
    assert rows.features["label"] == datasets.ClassLabel(names=["butterfly", "emoji"])
    names = class_names(rows, "label", WHERE)
    assert names == ["butterfly", "emoji"]
    labelled = ImageDataset(rows, 8, cache=False, labels={"column": "label", "names": names})
    for i in range(len(labelled)):
        item = labelled[i]
        red = item["images"][0].mean() > item["images"][2].mean()
        assert item["labels"] == (0 if red else 1)
    assert sorted(labelled[i]["labels"] for i in range(3)) == [0, 1, 1]


def test_imagefolder_with_one_subfolder_has_no_labels(tmp_path):
    folder = write_classes(tmp_path / "images", {"butterfly": [RED, BLUE]})
    rows = build_imagefolder(folder)
    assert rows.column_names == ["image"]
    assert "path/CLASS/image.png" in names_error(rows)


def test_imagefolder_names_a_bad_image_in_a_class_subfolder(tmp_path):
    folder = write_classes(tmp_path / "images", {"butterfly": [RED], "emoji": [BLUE]})
    (folder / "emoji" / "cut.png").write_bytes((folder / "emoji" / "0.png").read_bytes()[:40])
    with pytest.raises(DifftoolError, match="cut.png is not a readable image"):
        build_imagefolder(folder)


# synthetic-butterflies

def test_synthetic_labels_name_the_colour_and_leave_the_images_alone():
    plain = synthetic_butterflies(count=12, seed=3, size=16)
    labelled = synthetic_butterflies(count=12, seed=3, size=16, captions=True, labels=True)
    assert all(set(row) == {"image"} for row in plain)
    assert [row["image"].tobytes() for row in plain] == [row["image"].tobytes() for row in labelled]
    assert all(row["text"] == f"a {row['label']} butterfly" for row in labelled)
    only = synthetic_butterflies(count=12, seed=3, size=16, labels=True)
    assert [row["label"] for row in only] == [row["label"] for row in labelled] and "text" not in only[0]
    names = class_names(only, "label", WHERE)
    assert len(names) >= 2 and set(names) <= {"orange", "blue", "yellow", "white", "brown", "black"}
