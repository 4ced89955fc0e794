"""What `--data` names, resolved once, usable from Python as from the command line: a folder of class folders, a folder
with `train/`, `val/` and `test/` folders of them, a CSV, a dataset saved by `datasets` or its parquet files, or a Hub
dataset id. A [`DataSource`] gives the images of a split, the training and held-out images of a run, the names that
record which images a run used, and the images an adapter has not seen."""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import (
    IMAGE_SUFFIXES,
    SPLITS,
    DatasetImage,
    LabeledImages,
    base_novel,
    drop_unreadable,
    few_shot,
    from_hf_dataset,
    has_splits,
    hf_image_column,
    hold_out,
    load_data,
    load_split,
    select_classes,
)
from .storage import read_json

#: Training images per class on data without splits, unless told (CoOp's largest few-shot setting)
DEFAULT_SHOTS = 16
#: A Hugging Face dataset's split names, by the split they serve here.
HF_SPLITS = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}


def is_hf_dataset(data: str) -> bool:
    """A folder written by `save_to_disk` or holding a dataset's parquet files (and no class folders of images), or a
    Hub dataset id that is no path here."""
    path = Path(data)
    if path.is_dir():
        if _saved_dataset(path):
            return True
        images = any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.glob("*/*"))
        return not images and (any(path.glob("*.parquet")) or any(path.glob("data/*.parquet")))
    # owner/name, the owner starting with a letter or digit: a bare word, ./x or ../x is a mistyped folder
    is_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", data) is not None
    return not path.exists() and is_id


def load_hf_dataset(data: str, config: str | None) -> Any:
    """The dataset (or dataset dict) a folder or Hub id names.

    Raises:
        `ValueError` without `datasets` installed, `OSError` when it cannot be loaded.
    """
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"--data {data}: no such folder or CSV here; as a Hugging Face dataset it needs `pip install datasets`."
        ) from None
    folder = Path(data)
    try:
        if _saved_dataset(folder):
            return datasets.load_from_disk(data)
        return datasets.load_dataset(data, config)
    except OSError as exc:  # not found (DatasetNotFoundError), offline (ConnectionError): maybe a mistyped path
        if not folder.is_dir():
            message = f"--data {data}: no such folder or CSV here, and not loadable as a Hugging Face dataset: {exc}"
            raise OSError(message) from None
        raise OSError(f"--data {data}: cannot be read as a Hugging Face dataset: {_damage(folder, exc)}") from None
    except Exception as exc:  # pyarrow's, json's and datasets' errors of a damaged file name no file
        raise OSError(f"--data {data}: cannot be read as a Hugging Face dataset: {_damage(folder, exc)}") from None


def _damage(folder: Path, exc: Exception) -> str:
    """Why the dataset in `folder` did not load: the first of its files that does not read whole, or its splits saved
    without rows (which `datasets` cannot load back), else `exc` itself."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.suffix not in (".arrow", ".parquet", ".json") or not path.is_file():
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".parquet":
                pq.read_metadata(path)
            else:
                with pa.memory_map(str(path)) as source:
                    pa.ipc.open_stream(source).read_all()
        except Exception as error:  # whatever the format's reader raises
            return f"{path} is damaged ({type(error).__name__}: {error}); write the dataset again."
    empty = sorted(p.parent.name for p in folder.glob("*/state.json") if (read_json(p) or {}).get("_data_files") == [])
    if empty:
        return f"its splits {empty} have no rows, which datasets cannot load back; save the dataset without them."
    return f"{type(exc).__name__}: {exc}"


def _saved_dataset(folder: Path) -> bool:
    """Whether `folder` was written by `datasets`' `save_to_disk` (a `DatasetDict` or one `Dataset`)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "dataset_info.json").is_file()


def select(data: LabeledImages, which: str | None) -> LabeledImages:
    """The classes `which` of `data`: all (None or "all"), "base" or "novel" (CoCoOp's halves), or comma-separated
    names."""
    if which is None or which == "all":
        return data
    base, novel = base_novel(data.class_names)
    names = {"base": base, "novel": novel}.get(which) or [n.strip() for n in which.split(",") if n.strip()]
    return select_classes(data, names)


@dataclass
class Part:
    """One split of a source: how to load it, where it comes from (in words), and the split's own name."""

    load: Callable[[], LabeledImages]
    where: str
    name: str


@dataclass
class TrainingData:
    """A run's images: training, held-out (None: none), the names of both (see [`DataSource.image_names`]), and what
    was used, in words."""

    train: LabeledImages
    val: LabeledImages | None
    names: list[str]
    notes: list[str] = field(default_factory=list)


class DataSource:
    """
    The images that `data` names, resolved once into its parts by the split they serve ("train", "val", "test"), or
    one part "all" for data that is one set (a folder of class folders, a CSV, a dataset without splits).

    Args:
        data (`str`): a folder, a CSV file, a dataset folder or a Hub dataset id.
        dataset_config (`str`, *optional*): the Hub dataset's configuration.
        image_column, label_column (`str`, *optional*): a dataset's columns (by default found by their types).
        classes (`str`, *optional*): the classes used (see [`select`]).
    """

    def __init__(
        self,
        data: str,
        dataset_config: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
        classes: str | None = None,
    ) -> None:
        self.data = data
        self.dataset_config = dataset_config
        self.image_column = image_column
        self.label_column = label_column
        self.classes = classes
        self.parts = self._parts()

    @property
    def key(self) -> str:
        """The source as a run's log records it: a local source by its absolute path, a Hub dataset by its id."""
        return str(Path(self.data).resolve()) if Path(self.data).exists() else self.data

    def _parts(self) -> dict[str, Part]:
        source = Path(self.data)
        if is_hf_dataset(self.data):
            found = load_hf_dataset(str(source.resolve()) if source.exists() else self.data, self.dataset_config)
            if not hasattr(found, "keys") or hasattr(found, "features"):  # one dataset, no splits
                where = f"{self.data} (all of it: it has no splits)"
                return {"all": Part(functools.partial(self._rows, found, where), where, "all")}
            names = {part: next((n for n in HF_SPLITS[part] if n in found), None) for part in HF_SPLITS}
            if not any(names.values()):
                raise ValueError(
                    f"{self.data} has the splits {list(found)}, none of which is train, validation or test; save it "
                    "with those split names."
                )
            wheres = {name: f"{self.data}, its {name!r} split" for name in names.values() if name is not None}
            return {
                part: Part(functools.partial(self._rows, found[name], wheres[name]), wheres[name], name)
                for part, name in names.items()
                if name is not None
            }
        if has_splits(source):
            return {
                split: Part(functools.partial(load_split, source, split), str(source / split), split)
                for split in SPLITS
                if (source / split).is_dir()
            }
        where = f"{source} (all of it: it has no train/val/test folders)"
        return {"all": Part(functools.partial(load_data, source), where, "all")}

    def _rows(self, dataset: Any, where: str) -> LabeledImages:
        try:
            return from_hf_dataset(dataset, self.image_column, self.label_column)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def split(self, split: str | None = None, training: bool = False) -> tuple[LabeledImages, str, str]:
        """The images of `split` (default: test; data without splits: all of it, never split behind the user's back)
        of the chosen classes, where they came from, and the name of the split used ("all" without splits). For
        `training`, every chosen class must have images.

        Raises:
            `FileNotFoundError` for a split the data lacks; `ValueError` for classes without images (training).
        """
        if "all" in self.parts:
            part = self.parts["all"]
        elif (split or "test") in self.parts:
            part = self.parts[split or "test"]
        else:
            raise FileNotFoundError(f"{self.data} has no {split or 'test'!r} split; it has {sorted(self.parts)}.")
        data = select(part.load(), self.classes)
        empty = data.empty_classes()
        if empty and training:
            raise ValueError(f"{part.where} has no images of the classes {empty}; leave them out with --classes.")
        return data, part.where, part.name

    def training(self, shots: int | None, val_shots: int | None, seed: int) -> TrainingData:
        """A run's training images (`shots` per class; by default all of a training split, and of data without splits
        [`DEFAULT_SHOTS`], at most half the smallest class's images) and its held-out images for choosing the epoch
        kept (`val_shots` per class, by default min(shots, 4) as CoOp's few-shot validation sets): from the data's
        validation split, else from the images not among the shots; none when there are none, with a word on why."""
        pool, where, split = self.split("train", training=True)
        chosen = ""
        if shots is None and split == "all":  # one set of images: some are left for validation and for eval
            shots = max(1, min(DEFAULT_SHOTS, min(pool.counts()) // 2))
            chosen = (
                f"; {shots} a class by default on data without splits ({DEFAULT_SHOTS} at most, half the smallest "
                "class's images), so that the held-out images and `eval` on the same data have images it never saw; "
                "--shots N to choose"
            )
        train, rest = hold_out(pool, shots, seed=seed) if shots is not None else (pool, None)
        wanted = val_shots if val_shots is not None else min(shots or 4, 4)
        if wanted < 0:
            raise ValueError(f"--val-shots must be 0 (no validation) or more, got {wanted}.")
        val, val_where, spent, val_split = None, "", [], split
        if wanted and "val" in self.parts:
            part = self.parts["val"]
            found, val_split = part.load(), part.name
            missing = [name for name in train.class_names if name not in found.class_names]
            if missing:
                raise ValueError(f"The validation split {part.where} has no images of the classes {missing}.")
            val, val_where = (
                few_shot(select_classes(found, train.class_names), wanted, seed=seed),
                f"from {part.where}",
            )
        elif wanted and rest is not None and any(rest.counts()):
            spent = rest.empty_classes()
            val, val_where = few_shot(rest, wanted, seed=seed), "held out from the images not among the shots"
        elif val_shots:
            hint = "train on fewer --shots" if shots is not None else "give --shots (all images train by default)"
            raise ValueError(
                f"--val-shots {val_shots}: {self.data} has no validation split and no images left beside the "
                f"training shots; add a validation split (a val/ folder), or {hint}."
            )
        train = drop_unreadable(train)  # opens only the images in use: 16 shots of ImageNet, not its 1.28 M images
        per_class = f" ({shots} shots per class at most)" if shots is not None else ""
        notes = [f"train: {len(train)} images of {len(train.class_names)} classes{per_class} from {where}{chosen}"]
        if val is not None:
            val = drop_unreadable(val)
            none_left = f"; none of {spent}, all of whose images are training shots" if spent else ""
            notes.append(
                f"validation: {len(val)} images ({wanted} per class at most) {val_where}{none_left}, to choose the "
                "epoch kept (--val-shots 0: none)"
            )
        else:
            why = (
                "--val-shots 0" if wanted == 0 else "every image is a training shot, and there is no validation split"
            )
            notes.append(f"validation: none ({why}); the adapter is the last epoch's")
        names = self.image_names(train, split) + (self.image_names(val, val_split) if val is not None else [])
        return TrainingData(train, val, names, notes)

    def image_names(self, data: LabeledImages, split: str) -> list[str]:
        """The images of `data` by their absolute paths (whichever folder or CSV named them), or as rows of `split`
        of the dataset (in its configuration): how a run's log records the images it used."""
        dataset = f"{self.key} {self.dataset_config or ''}:{split}"
        return [
            f"{dataset} row {image.index}" if isinstance(image, DatasetImage) else str(Path(image).resolve())
            for image in data.images
        ]

    def unseen(self, data: LabeledImages, where: str, log: Any, split: str) -> tuple[LabeledImages, str]:
        """The images of `data` (of `split`, from `where`) that an adapter was not trained or validated on, by its
        training `log`: all of them for a test split, all but those for data without splits (or a split it learned
        from).

        Raises:
            `ValueError` when every image of a class was seen.
        """
        try:
            seen = set(log["data"]["images"])
        except (KeyError, TypeError):  # no log, or an older or hand-edited one: nothing to leave out
            return data, where
        unseen = [i for i, name in enumerate(self.image_names(data, split)) if name not in seen]
        if len(unseen) == len(data):
            return data, where
        left = data.subset(unseen)
        spent = left.empty_classes()
        if spent:
            raise ValueError(
                f"Every image of the classes {spent} in {self.data} trained or validated this adapter; evaluate on "
                "images it has not seen (another folder, or a test/ folder)."
            )
        return left, f"{where}, less the {len(data) - len(unseen)} images the adapter was trained and validated on"


def unlabeled_images(
    data: str, dataset_config: str | None = None, image_column: str | None = None
) -> tuple[list[Path | DatasetImage], str]:
    """
    The images of `data` for learning without labels (absolute paths, or a dataset's rows; those that do not open are
    left out with a warning naming them), and what was used in words: every image file under a folder, flat or nested
    (class folders' names are not used: the note says so), the paths of a CSV with a `path` column (relative to the
    CSV's folder; other columns, labels included, not used), or the image column of a Hugging Face dataset (a folder
    or Hub id; its `train` split if it has splits; `image_column` by default its first `Image` column; other columns,
    labels included, not used).
    """
    if is_hf_dataset(data):
        files, note = _unlabeled_rows(data, dataset_config, image_column)
    else:
        files, note = _unlabeled_files(Path(data).resolve() if Path(data).exists() else Path(data), data)
    readable = drop_unreadable(LabeledImages(["images"], files, [0] * len(files))).images  # no labels: one class
    return readable, note


def _unlabeled_rows(data: str, config: str | None, image_column: str | None) -> tuple[list[DatasetImage], str]:
    found = load_hf_dataset(str(Path(data).resolve()) if Path(data).exists() else data, config)
    where = data
    if hasattr(found, "keys") and not hasattr(found, "features"):  # splits: the training images
        split = "train" if "train" in found else next(iter(found), None) if len(found) == 1 else None
        if split is None:
            raise ValueError(f"{data} has the splits {list(found)} and none is 'train'; save the images as one.")
        found, where = found[split], f"{data}, its {split!r} split"
    try:
        column = hf_image_column(found, image_column)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    others = [c for c in found.column_names if c != column]
    ignored = f"; its other columns ({', '.join(others)}) are not used" if others else ""
    images = found.select_columns([column])
    rows = [DatasetImage(images, i, column) for i in range(len(images))]
    if not rows:
        raise ValueError(f"{data} has no rows.")
    return rows, f"unlabeled images: {len(rows)} rows of {where}, column {column!r}{ignored}"


def _unlabeled_files(path: Path, data: str) -> tuple[list[Path], str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"{data} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        nested = any(p.parent != path for p in files)
        ignored = "; the folders they are in are not used as labels" if nested else ""
        return files, f"unlabeled images: {len(files)} image files under {data}{ignored}"
    if path.suffix.lower() == ".csv" and path.is_file():
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text ({exc.reason}); save the CSV as UTF-8.") from None
        if not rows or "path" not in rows[0] or not all(r.get("path") for r in rows):
            raise ValueError(f"{path} needs a header with a 'path' column and a path on every row.")
        files = [Path(r["path"]) if Path(r["path"]).is_absolute() else path.parent / r["path"] for r in rows]
        others = [c for c in rows[0] if c != "path"]
        ignored = f"; its other columns ({', '.join(others)}) are not used" if others else ""
        return files, f"unlabeled images: {len(files)} paths from {data}{ignored}"
    raise FileNotFoundError(f"--data {data}: no folder of images or CSV of paths there.")
