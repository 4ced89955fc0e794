"""Data: image folders, CSV, HF-style datasets, K-shot sampling, splits, base/novel, and awkward image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from peft_prompt_clip.data import (
    LabeledImages,
    base_novel,
    drop_unreadable,
    few_shot,
    from_hf_dataset,
    hold_out,
    load_csv,
    load_image_folder,
    load_split,
    open_image,
    random_resized_crop_flip,
    select_classes,
    split_data,
)


def write_images(folder, n, size=(12, 10), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(
            folder / f"{i}.png"
        )


def test_image_folder_class_names(tmp_path):
    write_images(tmp_path / "golden_retriever", 3)
    write_images(tmp_path / "cat", 2)
    data = load_image_folder(tmp_path)
    assert data.class_names == ["cat", "golden retriever"]
    assert data.counts() == [2, 3]
    (tmp_path / "classnames.txt").write_text("cat tabby cat\ngolden_retriever\n")
    assert load_image_folder(tmp_path).class_names == ["tabby cat", "golden retriever"]
    (tmp_path / "classnames.json").write_text(json.dumps({"cat": "kitty"}))
    assert load_image_folder(tmp_path).class_names == ["kitty", "golden retriever"]


def test_empty_class_or_folder_is_a_clear_error(tmp_path):
    write_images(tmp_path / "cat", 2)
    (tmp_path / "dog").mkdir()
    with pytest.raises(ValueError, match=r"Classes without images .*\['dog'\]"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="has no class folders"):
        load_image_folder(tmp_path / "dog")
    with pytest.raises(FileNotFoundError, match="No data folder"):
        load_image_folder(tmp_path / "nowhere")


def test_csv_manifest(tmp_path):
    write_images(tmp_path / "img", 4)
    (tmp_path / "m.csv").write_text("path,label\nimg/0.png,cat\nimg/1.png,dog\nimg/2.png,cat\n")
    data = load_csv(tmp_path / "m.csv")
    assert data.class_names == ["cat", "dog"] and data.labels == [0, 1, 0]
    assert data.images[0] == tmp_path / "img" / "0.png"
    (tmp_path / "bad.csv").write_text("file,class\n")
    with pytest.raises(ValueError, match="header 'path,label'"):
        load_csv(tmp_path / "bad.csv")


def hf_dataset(n: int = 12, names=("airplane", "ship", "truck")):
    """A `datasets.Dataset` with an `Image` column "img" and a `ClassLabel` column "kind" (labels 0, 1, 2, 0, ...)."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=list(names))})
    images = [Image.fromarray(np.full((6, 8, 3), 20 * i, np.uint8)) for i in range(n)]
    return datasets.Dataset.from_dict({"img": images, "kind": [i % len(names) for i in range(n)]}, features=features)


def test_hf_dataset_decodes_only_the_images_used(monkeypatch):
    import datasets

    decoded = []
    decode = datasets.Image.decode_example
    monkeypatch.setattr(
        datasets.Image, "decode_example", lambda self, *a, **k: decoded.append(1) or decode(self, *a, **k)
    )
    data = from_hf_dataset(hf_dataset())  # the columns found by their types
    assert data.class_names == ["airplane", "ship", "truck"] and data.labels == [0, 1, 2] * 4
    shots = few_shot(data, 2, seed=1)
    assert decoded == []  # labels come from their column alone; drawing shots decodes nothing
    assert all(open_image(image).size == (8, 6) for image in shots.images) and len(decoded) == 6
    assert [open_image(i).getpixel((0, 0))[0] for i in shots.images] == [20 * i.index for i in shots.images]
    again = from_hf_dataset(hf_dataset(), shots=2, seed=1)
    assert [i.index for i in shots.images] == [i.index for i in again.images]
    with pytest.raises(ValueError, match=r"no label column 'label'; its columns are \['img', 'kind'\]"):
        from_hf_dataset(hf_dataset(), label_column="label")


def test_a_stream_is_read_only_as_far_as_the_shots_need():
    import datasets

    read = []

    def rows():
        for i in range(1000):
            read.append(i)
            yield {"img": np.full((6, 8, 3), i % 250, np.uint8), "kind": i % 3}

    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b", "c"])})
    stream = datasets.IterableDataset.from_generator(rows, features=features)
    data = from_hf_dataset(stream, shots=2)
    assert data.counts() == [2, 2, 2] and len(read) <= 10  # six rows wanted, not a thousand read
    assert [open_image(i).getpixel((0, 0))[0] for i in data.images] == [0, 3, 1, 4, 2, 5]
    unknown = datasets.IterableDataset.from_generator(rows)  # no features: the columns come from the first row
    assert from_hf_dataset(unknown, "img", "kind", shots=1).class_names == ["0", "1", "2"]


def test_few_shot_split_and_classes():
    data = LabeledImages(["a", "b", "c"], list(range(30)), [i % 3 for i in range(30)])
    shots = few_shot(data, 4, seed=1)
    assert shots.counts() == [4, 4, 4]
    assert few_shot(data, 4, seed=1).images == shots.images and few_shot(data, 4, seed=2).images != shots.images
    train, val, test = split_data(data, (0.6, 0.2, 0.2), seed=1)
    assert (train.counts(), val.counts(), test.counts()) == ([6] * 3, [2] * 3, [2] * 3)
    assert not set(train.images) & set(test.images)
    assert base_novel(["a", "b", "c"]) == (["a", "b"], ["c"])
    only = select_classes(data, ["c", "a"])
    assert only.class_names == ["c", "a"] and set(only.labels) == {0, 1} and only.counts() == [10, 10]
    with pytest.raises(ValueError, match=r"Unknown classes \['z'\]"):
        select_classes(data, ["z"])


def test_hold_out_gives_the_shots_and_the_rest():
    data = LabeledImages(["a", "b"], list(range(20)), [i % 2 for i in range(20)])
    shots, rest = hold_out(data, 4, seed=3)
    assert shots.images == few_shot(data, 4, seed=3).images  # the same shots with or without a held-out part
    assert sorted(shots.images + rest.images) == list(range(20)) and rest.counts() == [6, 6]
    assert rest.images == sorted(rest.images)


def test_load_split_with_and_without_split_folders(tmp_path):
    write_images(tmp_path / "flat" / "cat", 5)
    write_images(tmp_path / "flat" / "dog", 5)
    with pytest.raises(ValueError, match="no train/val/test folders, so it has no 'test' split: use all of it"):
        load_split(tmp_path / "flat", "test")  # never split behind the user's back
    write_images(tmp_path / "split" / "train" / "cat", 2)
    write_images(tmp_path / "split" / "test" / "cat", 1)
    assert len(load_split(tmp_path / "split", "test")) == 1
    with pytest.raises(FileNotFoundError, match="no 'val' folder"):
        load_split(tmp_path / "split", "val")


def test_awkward_images_open_as_rgb_or_are_skipped_by_name(tmp_path):
    folder = tmp_path / "cat"
    write_images(folder, 1)
    Image.new("CMYK", (8, 6), (10, 20, 30, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((6, 8), 40000, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("P", (8, 6)).save(folder / "palette.gif")
    rotated = Image.new("RGB", (8, 6))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(folder / "exif.jpg", exif=exif)
    (folder / "truncated.png").write_bytes((folder / "0.png").read_bytes()[:40])
    (folder / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"Skipped 2 unreadable image\(s\): .*empty.jpg.*; .*truncated.png") as record:
        data = drop_unreadable(load_image_folder(tmp_path))
    assert len(record) == 1
    assert len(data) == 5
    assert all(open_image(p).mode == "RGB" for p in data.images)
    assert open_image(folder / "exif.jpg").size == (6, 8)
    assert open_image(folder / "deep.png").getpixel((0, 0)) == (156, 156, 156)


def test_only_unreadable_images_is_a_clear_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="None of the 1 images could be read"):
        drop_unreadable(load_image_folder(tmp_path))
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "dog" / "ok.png")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"Classes without readable images: \['cat'\]"):
        drop_unreadable(load_image_folder(tmp_path))


def test_augmentation_is_seeded_and_changes_the_image():
    import random

    image = Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(48, 64, 3))
    a = random_resized_crop_flip(image, random.Random("s-1"))
    b = random_resized_crop_flip(image, random.Random("s-1"))
    c = random_resized_crop_flip(image, random.Random("s-2"))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != image.size or not np.array_equal(np.asarray(a), np.asarray(image))
    assert not (a.size == c.size and np.array_equal(np.asarray(a), np.asarray(c)))


def test_real_hf_imagefolder_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_images(tmp_path / "imgs" / "cat", 2)
    write_images(tmp_path / "imgs" / "red_car", 3)
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path / "imgs"), split="train", cache_dir=str(tmp_path / "c")
    )
    data = from_hf_dataset(ds)
    assert data.class_names == ["cat", "red_car"] and sorted(data.labels) == [0, 0, 1, 1, 1]
    assert all(open_image(image).mode == "RGB" for image in data.images)


def test_zero_size_image_is_refused():
    with pytest.raises(ValueError, match="zero-size image"):
        open_image(Image.new("RGB", (0, 0)))
