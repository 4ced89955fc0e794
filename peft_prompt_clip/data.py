"""Labelled images for few-shot prompt learning: image folders, CSV manifests and Hugging Face datasets, K-shot
sampling, splits, base/novel classes, and CoOp's augmentation without torchvision."""

from __future__ import annotations

import csv
import json
import math
import operator
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .progress import progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class LabeledImages:
    """
    Images with integer labels and the class names they index.

    Args:
        class_names (`list[str]`): the classes, in label order.
        images (`list`): image sources: file paths, or images in memory (PIL images or arrays).
        labels (`list[int]`): one label per image.
    """

    class_names: list[str]
    images: list[Any] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels.")
        bad = sorted({y for y in self.labels if not 0 <= y < len(self.class_names)})
        if bad:
            raise ValueError(f"Labels {bad} are outside the {len(self.class_names)} classes.")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> LabeledImages:
        return LabeledImages(self.class_names, [self.images[i] for i in indices], [self.labels[i] for i in indices])

    def counts(self) -> list[int]:
        counts = [0] * len(self.class_names)
        for y in self.labels:
            counts[y] += 1
        return counts

    def empty_classes(self) -> list[str]:
        """The classes without images."""
        return [name for name, n in zip(self.class_names, self.counts(), strict=True) if not n]


def class_name_from_folder(name: str) -> str:
    """`"golden_retriever"` -> `"golden retriever"`."""
    return name.replace("_", " ").strip()


def load_image_folder(root: str | Path) -> LabeledImages:
    """
    Images in `root/<class>/*.jpg`. Class names come from the folder names (`_` becomes a space), unless `root` has a
    `classnames.txt` (lines `folder name`, or `folder`) or `classnames.json` (`{"folder": "name"}`).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"No data folder at {root}.")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class folders: expected {root}/<class name>/<image files>.")
    names = {f.name: class_name_from_folder(f.name) for f in folders}
    names.update(_class_name_mapping(root))
    data = LabeledImages([names[f.name] for f in folders])
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        data.images += files
        data.labels += [label] * len(files)
    _check_classes(data, str(root))
    return data


def _class_name_mapping(root: Path) -> dict[str, str]:
    if (root / "classnames.json").is_file():
        try:
            mapping = json.loads((root / "classnames.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{root / 'classnames.json'} is not valid UTF-8 JSON ({exc}).") from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) and v.strip() for v in mapping.values()):
            raise ValueError(
                f"{root / 'classnames.json'} must map folder names to class names (non-empty strings), e.g. "
                '{"n01440764": "tench"}.'
            )
        return {str(k): v for k, v in mapping.items()}
    if (root / "classnames.txt").is_file():
        mapping = {}
        try:
            lines = (root / "classnames.txt").read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{root / 'classnames.txt'} is not UTF-8 text ({exc.reason}).") from None
        for line in lines:
            folder, _, name = line.strip().partition(" ")
            if folder:
                mapping[folder] = name.strip() or class_name_from_folder(folder)
        return mapping
    return {}


def load_csv(path: str | Path) -> LabeledImages:
    """A CSV manifest with a header `path,label`; relative paths are relative to the CSV's folder."""
    path = Path(path)
    try:  # utf-8-sig: a byte-order mark (Excel's UTF-8 CSV) is not part of the header
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason}); save the CSV as UTF-8.") from None
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise ValueError(f"{path} needs a header 'path,label' and at least one row.")
    short = [i + 2 for i, r in enumerate(rows) if not r.get("path") or not r.get("label")]
    if short:
        raise ValueError(f"{path}: lines {short[:5]} lack a path or a label; every row needs 'path,label'.")
    names = sorted({r["label"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    images = [Path(r["path"]) if Path(r["path"]).is_absolute() else path.parent / r["path"] for r in rows]
    return LabeledImages(names, images, [index[r["label"]] for r in rows])


@dataclass(frozen=True)
class DatasetImage:
    """An image of a Hugging Face dataset, decoded only when opened (see [`open_image`]): row `index` of `dataset`,
    a dataset of the image column alone."""

    dataset: Any = field(repr=False)
    index: int
    column: str

    def load(self) -> Any:
        return self.dataset[self.index][self.column]

    def __str__(self) -> str:
        return f"row {self.index} of the dataset's {self.column!r} column"


def from_hf_dataset(
    dataset: Any,
    image_column: str | None = None,
    label_column: str | None = None,
    shots: int | None = None,
    seed: int = 1,
) -> LabeledImages:
    """
    A Hugging Face `datasets.Dataset` (any with an image column and a label column, `imagefolder` included), or a
    streaming `IterableDataset`. Class names come from the label column's `ClassLabel` names, else from the sorted
    label values. No image is decoded here: the labels are read from their column alone, and each image is decoded
    when it is used, so `few_shot(from_hf_dataset(ds), 16)` of ImageNet decodes 16 images per class, not 1.28 M.

    Args:
        dataset: the dataset (one split: `dataset["train"]` of a `DatasetDict`).
        image_column (`str`, *optional*): by default the first column of the `Image` type, else `"image"`.
        label_column (`str`, *optional*): by default the first `ClassLabel` column, else `"label"`.
        shots (`int`, *optional*): at most this many images per class: drawn with `seed` from a dataset; from a
            stream, the first of each class in the stream's order, reading no further once every class of its
            `ClassLabel` has them (shuffle the stream, `ds.shuffle(seed, buffer_size)`, for a random draw). A stream
            without `shots`, or without a `ClassLabel` column, is read whole.
        seed (`int`, *optional*, defaults to 1): the draw of `shots`.
    """
    if hasattr(dataset, "keys") and not hasattr(dataset, "features"):  # a DatasetDict: one dataset per split
        raise ValueError(
            f"This is a DatasetDict with the splits {list(dataset.keys())}; pass one of them, e.g. "
            f"from_hf_dataset(dataset[{next(iter(dataset.keys()), 'train')!r}])."
        )
    features, columns, kinds = _columns(dataset)
    image_column = _image_column(features, columns, kinds, image_column)
    label_column = label_column or next((c for c in columns if kinds.get(c) == "ClassLabel"), "label")
    if label_column not in columns:
        raise ValueError(
            f"The dataset has no label column {label_column!r}; its columns are {columns}. Name it (--label-column; "
            "label_column=)."
        )
    names = list(features[label_column].names) if hasattr(features.get(label_column), "names") else None
    if not hasattr(dataset, "__len__"):  # a stream: read row by row, only as far as needed
        return _from_stream(dataset, image_column, label_column, names, shots)
    labels = list(dataset[label_column])  # the label column alone: no image is decoded
    unlabeled = [i for i, y in enumerate(labels) if not _has_class(y, names)]
    if unlabeled:
        raise ValueError(
            f"{len(unlabeled)} row(s) have no class in the label column {label_column!r} (rows {unlabeled[:5]}: "
            f"{sorted({repr(labels[i]) for i in unlabeled})}; -1 is datasets' 'no label'); use a split with labels, "
            f"or drop those rows (dataset.filter(lambda row: row[{label_column!r}] is not None and "
            f"row[{label_column!r}] >= 0))."
        )
    if names is None:
        names = sorted({str(y) for y in labels})
        index = {name: i for i, name in enumerate(names)}
        labels = [index[str(y)] for y in labels]
    if not labels:
        raise ValueError("The dataset has no rows.")
    images = dataset.select_columns([image_column])
    data = LabeledImages(names, [DatasetImage(images, i, image_column) for i in range(len(labels))], labels)
    return few_shot(data, shots, seed) if shots is not None else data


def hf_image_column(dataset: Any, image_column: str | None = None) -> str:
    """The image column of a Hugging Face dataset: `image_column` (checked to hold images or image paths), by default
    its first `Image` column, else `"image"`.

    Raises:
        `ValueError`: naming the columns, when the column is missing or holds no images.
    """
    return _image_column(*_columns(dataset), image_column)


def _columns(dataset: Any) -> tuple[Any, list[str], dict[str, str]]:
    """A dataset's features, its column names and each column's feature type by name."""
    features = dataset.features or {}  # a stream may not know its features: its first row names the columns
    columns = getattr(dataset, "column_names", None) or list(features) or list(next(iter(dataset), {}))
    return features, columns, {name: type(feature).__name__ for name, feature in features.items()}


def _image_column(features: Any, columns: list[str], kinds: dict[str, str], image_column: str | None) -> str:
    column = image_column or next((c for c in columns if kinds.get(c) == "Image"), "image")
    if column not in columns:
        raise ValueError(
            f"The dataset has no image column {column!r}; its columns are {columns}. Name it (--image-column; "
            "image_column=)."
        )
    dtype = getattr(features.get(column), "dtype", None)
    if column in features and kinds[column] != "Image" and dtype not in ("string", "large_string"):
        described = {c: kinds[c] if kinds[c] != "Value" else features[c].dtype for c in columns if c in kinds}
        raise ValueError(
            f"The dataset's column {column!r} holds {described[column]} values, not images or image paths; its "
            f"columns are {described}. Name the image column (--image-column; image_column=)."
        )
    return column


def _has_class(label: Any, names: list[str] | None) -> bool:
    """Whether a row's `label` names a class: not None, and with `ClassLabel` `names` one of their indices (datasets
    marks a row without a label -1)."""
    return label is not None and (names is None or 0 <= label < len(names))


def _from_stream(
    stream: Any, image_column: str, label_column: str, names: list[str] | None, shots: int | None
) -> LabeledImages:
    shots = _checked_shots(shots) if shots is not None else None
    kept: dict[Any, list[Any]] = {}
    for row in stream.select_columns([image_column, label_column]):
        label = row[label_column]
        if not _has_class(label, names):
            raise ValueError(f"The stream has a row without a class in its label column {label_column!r}: {label!r}.")
        images = kept.setdefault(label, [])
        if shots is None or len(images) < shots:
            images.append(row[image_column])
        if shots is not None and names is not None and len(kept) == len(names):
            if all(len(v) >= shots for v in kept.values()):
                break
    if names is None:
        names = sorted(str(y) for y in kept)
        kept = {names.index(str(y)): images for y, images in kept.items()}
    data = LabeledImages(names)
    for label in sorted(kept):
        data.images += kept[label]
        data.labels += [label] * len(kept[label])
    _check_classes(data, "the stream")
    return data


def load_data(source: str | Path) -> LabeledImages:
    """A folder of class folders, or a `.csv` manifest."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        return load_csv(source)
    return load_image_folder(source)


SPLITS = ("train", "val", "test")


def has_splits(source: str | Path) -> bool:
    """Whether `source` is a folder with split folders (`train/`, `val/`, `test/`)."""
    return Path(source).is_dir() and any((Path(source) / s).is_dir() for s in SPLITS)


def load_split(source: str | Path, split: str) -> LabeledImages:
    """
    The split folder `source/<split>/<class>/...` of a data source with split folders. A source without them is never
    split silently: take all of it with [`load_data`], or split it with [`split_data`] (e.g. `split_data(
    load_data(source), (0.6, 0.2, 0.2), seed)`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    source = Path(source)
    if (source / split).is_dir():
        return load_image_folder(source / split)
    if has_splits(source):
        raise FileNotFoundError(f"{source} has split folders but no {split!r} folder.")
    raise ValueError(
        f"{source} has no train/val/test folders, so it has no {split!r} split: use all of it (load_data), or split "
        "it yourself (split_data(load_data(source), (0.6, 0.2, 0.2), seed))."
    )


def hold_out(data: LabeledImages, shots: int, seed: int = 1) -> tuple[LabeledImages, LabeledImages]:
    """`few_shot(data, shots, seed)` and the images it left out, in their order: held-out images of the same classes,
    never among the shots."""
    chosen = _few_shot_indices(data, shots, seed)
    taken = set(chosen)
    return data.subset(chosen), data.subset([i for i in range(len(data)) if i not in taken])


def _check_classes(data: LabeledImages, where: str) -> None:
    if not len(data):
        raise ValueError(f"No images found in {where} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    empty = data.empty_classes()
    if empty:
        raise ValueError(f"Classes without images in {where}: {empty}. Add images or remove those folders.")


def few_shot(data: LabeledImages, shots: int, seed: int = 1) -> LabeledImages:
    """At most `shots` images per class, drawn with `seed` (a class with fewer keeps all of them)."""
    return data.subset(_few_shot_indices(data, shots, seed))


def _checked_shots(shots: Any) -> int:
    if isinstance(shots, bool) or not hasattr(shots, "__index__") or operator.index(shots) < 1:
        raise ValueError(f"shots must be at least 1 (an integer), got {shots!r}.")
    return operator.index(shots)


def _few_shot_indices(data: LabeledImages, shots: int, seed: int) -> list[int]:
    if not isinstance(data, LabeledImages):
        hint = " (a Hugging Face dataset: from_hf_dataset(dataset, shots=K))" if hasattr(data, "features") else ""
        raise TypeError(f"few_shot() takes LabeledImages, got a {type(data).__name__}{hint}.")
    shots = _checked_shots(shots)
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_class.setdefault(y, []).append(i)
    chosen = []
    for y in sorted(by_class):
        items = by_class[y]
        chosen += sorted(rng.sample(items, min(shots, len(items))))
    return chosen


def split_data(
    data: LabeledImages, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 1
) -> tuple[LabeledImages, ...]:
    """Stratified split into parts of the given fractions (per class, shuffled with `seed`)."""
    if not math.isclose(sum(fractions), 1.0) or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}.")
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_class.setdefault(y, []).append(i)
    for y in sorted(by_class):
        items = by_class[y][:]
        rng.shuffle(items)
        bounds = [round(sum(fractions[: k + 1]) * len(items)) for k in range(len(fractions))]
        start = 0
        for k, end in enumerate(bounds):
            parts[k] += items[start:end]
            start = end
    return tuple(data.subset(sorted(p)) for p in parts)


def select_classes(data: LabeledImages, names: Sequence[str]) -> LabeledImages:
    """Only the images of `names`, relabelled `0..len(names)-1` in that order."""
    unknown = [n for n in names if n not in data.class_names]
    if unknown:
        raise ValueError(f"Unknown classes {unknown}; the data has {data.class_names}.")
    old = {data.class_names.index(n): i for i, n in enumerate(names)}
    keep = [i for i, y in enumerate(data.labels) if y in old]
    return LabeledImages(list(names), [data.images[i] for i in keep], [old[data.labels[i]] for i in keep])


def base_novel(class_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """CoCoOp's base-to-novel protocol: the first half of the classes (rounded up) are base, the rest novel."""
    half = math.ceil(len(class_names) / 2)
    return list(class_names[:half]), list(class_names[half:])


def open_image(source: Any) -> Image.Image:
    """An RGB PIL image from a path or an image in memory; EXIF orientation applied, 16-bit/CMYK/palette converted."""
    if isinstance(source, DatasetImage):
        source = source.load()
    image = source if isinstance(source, Image.Image) else None
    if image is None and isinstance(source, (str, Path)):
        try:
            with warnings.catch_warnings():
                # Pillow only warns up to twice its pixel limit; any image past the limit is refused, not decoded
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(source) as opened:
                    opened.load()
                    image = opened.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"refused, too many pixels to decode safely ({exc})") from None
    elif image is None:
        if not hasattr(source, "__array_interface__"):
            raise ValueError(f"not an image: a {type(source).__name__} value")
        image = Image.fromarray(source)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # a damaged EXIF block raises struct.error, SyntaxError, ...
        raise ValueError(f"damaged EXIF metadata ({type(exc).__name__}: {exc})") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if image.width == 0 or image.height == 0:
        raise ValueError("zero-size image")
    return image.convert("RGB")


def drop_unreadable(data: LabeledImages) -> LabeledImages:
    """The images that open; the others are skipped with one warning that names them."""
    keep, bad = [], []
    for i, source in enumerate(progress(data.images, desc="checking images")):
        try:
            if isinstance(source, (str, Path, DatasetImage)):
                open_image(source)
            keep.append(i)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            bad.append(f"{source} ({type(exc).__name__}: {exc})")
    if bad:
        warnings.warn(f"Skipped {len(bad)} unreadable image(s): " + "; ".join(bad), stacklevel=2)
    if not keep:
        raise ValueError(f"None of the {len(data)} images could be read (see the warning for each file).")
    kept = data.subset(keep)
    lost = [name for name in kept.empty_classes() if name not in data.empty_classes()]
    if lost:
        raise ValueError(f"Classes without readable images: {lost}. Add images or remove those folders.")
    return kept


def random_resized_crop_flip(
    image: Image.Image, generator: random.Random, scale: tuple[float, float] = (0.08, 1.0)
) -> Image.Image:
    """CoOp's training augmentation (torchvision's RandomResizedCrop + RandomHorizontalFlip), with PIL."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * generator.uniform(*scale)
        ratio = math.exp(generator.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = generator.randint(0, width - w), generator.randint(0, height - h)
            image = image.crop((left, top, left + w, top + h))
            break
    if generator.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def image_inputs(
    processor: Any, data: LabeledImages, indices: Sequence[int], augment_seed: str | None = None
) -> dict[str, torch.Tensor]:
    """The image tower's inputs for `indices`, made by `processor` (its own resize/crop/normalise; `pixel_values`,
    plus `pixel_attention_mask` and `spatial_shapes` for SigLIP 2); augmented when `augment_seed` is given, with one
    random stream per (seed, index), so that any process or resumed run draws the same crops."""
    images = []
    for i in indices:
        image = open_image(data.images[i])
        if augment_seed is not None:
            image = random_resized_crop_flip(image, random.Random(f"{augment_seed}-{i}"))
        images.append(image)
    return dict(processor(images=images, return_tensors="pt"))


def default_workers() -> int:
    """Worker processes for image decoding and augmentation by default: with CUDA, half the CPUs, at most 4, so that
    the GPU never waits for PIL; on CPU none, since the towers use every core (on 2 cores one worker changed an
    augmented epoch by -20% to +14% over four measurements of benchmarks/default_run.py: no reliable gain)."""
    return min(4, (os.cpu_count() or 1) // 2) if torch.cuda.is_available() else 0


class _BatchInputs(torch.utils.data.Dataset):
    """Item `k`: the image tower's inputs for batch `k` of indices (see [`image_batches`])."""

    def __init__(self, processor: Any, data: LabeledImages, batches: Sequence[Sequence[int]], seed: str | None):
        self.processor, self.data, self.batches, self.seed = processor, data, batches, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return image_inputs(self.processor, self.data, self.batches[k], augment_seed=self.seed)


def image_batches(
    processor: Any,
    data: LabeledImages,
    batches: Sequence[Sequence[int]],
    augment_seed: str | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """The image tower's inputs (see [`image_inputs`]) for each batch of indices in `batches`, in order: decoded,
    augmented and transformed by `num_workers` worker processes ahead of use (a `DataLoader`, two batches prefetched
    per worker), or in this process with 0. The inputs are the same whatever the worker count: each image's
    augmentation draws from a stream of its own per (seed, index)."""
    if num_workers == 0 or len(batches) < 2:
        for batch in batches:
            yield image_inputs(processor, data, batch, augment_seed=augment_seed)
        return
    dataset = _BatchInputs(processor, data, batches, augment_seed)
    workers = min(num_workers, len(batches))
    yield from torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory)
