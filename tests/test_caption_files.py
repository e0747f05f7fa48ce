"""Captions from NAME.txt / NAME.caption files beside the images of an imagefolder dataset."""

import json

import numpy as np
import pytest
from PIL import Image

from difftool.builtins.datasets import imagefolder
from difftool.errors import DifftoolError


def images(folder, names):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def test_each_image_gets_the_caption_beside_it(tmp_path):
    folder = images(tmp_path / "data", ["b.png", "a.png", "c.jpg"])
    (folder / "a.txt").write_text("a red butterfly\n", encoding="utf-8")
    (folder / "b.caption").write_text("blue wings,\n  spotted\n", encoding="utf-8")
    (folder / "c.txt").write_bytes("\ufeffcafé au lait".encode("utf-8"))  # a BOM, as Notepad writes
    rows = imagefolder(str(folder))
    assert sorted(rows["text"]) == ["a red butterfly", "blue wings, spotted", "café au lait"]
    # the caption follows its own image, whatever order datasets lists them in
    pixels = {name: np.asarray(Image.open(folder / name).convert("RGB")) for name in ("a.png", "b.png", "c.jpg")}
    for row in rows:
        name = {"a red butterfly": "a.png", "blue wings, spotted": "b.png", "café au lait": "c.jpg"}[row["text"]]
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), pixels[name])


def test_a_folder_without_caption_files_has_no_text_column(tmp_path):
    assert "text" not in imagefolder(str(images(tmp_path / "data", ["a.png", "b.png"]))).column_names


def test_an_image_without_a_caption_file_is_named(tmp_path):
    folder = images(tmp_path / "data", ["a.png", "b.png"])
    (folder / "a.txt").write_text("a caption")
    with pytest.raises(DifftoolError, match=r"1 images have a caption file and 1 have none \(.*b\.png\)"):
        imagefolder(str(folder))


def test_a_caption_file_that_is_not_utf8_is_named(tmp_path):
    folder = images(tmp_path / "data", ["a.png"])
    (folder / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DifftoolError, match=r"caption file .*a\.txt is not UTF-8 text \(byte 0xe9 at position 3\)"):
        imagefolder(str(folder))


def test_a_metadata_file_wins_over_caption_files(tmp_path):
    folder = images(tmp_path / "data", ["a.png"])
    (folder / "a.txt").write_text("from the file")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from metadata"}) + "\n")
    assert imagefolder(str(folder))["text"] == ["from metadata"]


def test_the_cli_reports_a_bad_caption_file_in_one_line(tmp_path, cli):
    folder = images(tmp_path / "data", ["a.png"])
    (folder / "a.txt").write_bytes(b"\xff\xfe")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[run]\noutput_dir = "{(tmp_path / "run").as_posix()}"\n\n'
                      f'[dataset]\nname = "imagefolder"\npath = "{folder.as_posix()}"\nimage_size = 8\n')
    code, out, err = cli("run", str(recipe))
    assert code != 0 and "is not UTF-8 text" in err and "Traceback" not in err


def test_shuffled_tags_keep_the_leading_ones_and_every_tag():
    import torch

    from difftool.data import shuffled_tags

    caption = "sks dog,  on a beach ,sunset, film grain, wide shot"
    torch.manual_seed(0)
    orders = {shuffled_tags(caption, keep=1) for _ in range(50)}
    assert len(orders) > 10  # 4 tags after the first: 24 orders
    for order in orders:
        tags = order.split(", ")
        assert tags[0] == "sks dog"
        assert sorted(tags) == sorted(["sks dog", "on a beach", "sunset", "film grain", "wide shot"])
    assert shuffled_tags("one tag only") == "one tag only"
    assert shuffled_tags("a, b", keep=1) == "a, b"  # nothing left to shuffle
    torch.manual_seed(3)
    first = [shuffled_tags(caption) for _ in range(5)]
    torch.manual_seed(3)
    assert [shuffled_tags(caption) for _ in range(5)] == first  # the global RNG: resumed runs draw the same


@pytest.mark.skipif(__import__("importlib").util.find_spec("difftool_lora") is None, reason="needs difftool-lora")
def test_a_text_to_image_run_trains_on_shuffled_tags_without_caching_them(tmp_path, monkeypatch):
    from difftool import build, data, engine
    from difftool import recipe as recipes
    from difftool.tiny_models import write_pipeline
    from test_text_to_image import sd_recipe

    seen = []
    monkeypatch.setattr(engine, "shuffled_tags", lambda caption, keep: seen.append((caption, keep)) or
                        data.shuffled_tags(caption, keep))
    pipeline = write_pipeline(tmp_path / "tiny-sd")
    recipe = recipes.load(sd_recipe(tmp_path, pipeline, run={"max_steps": 2}, dataset={"shuffle_tags": True, "keep_tags": 1}))
    assert build.text_cache(recipe, None) is None
    engine.train(recipe)
    assert len(seen) == 2 * recipe["dataset"]["batch_size"] and all(keep == 1 for _, keep in seen)
    assert not (tmp_path / "latent-cache" / "text").exists()
