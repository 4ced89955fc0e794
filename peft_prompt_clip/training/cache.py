"""What a run computes once per image and then reads: the image tower's inputs (each image decoded and preprocessed
once, for prompted image towers that run on them every step) and the frozen image tower's features (for loss terms
that compare with them), each row stored the first time it is computed.

A table of more than [`MEMORY_BYTES`] on the CPU (the inputs of about 3,500 images at 224 x 224) is a file in the
run's output folder instead, mapped into memory (the operating system keeps what fits in RAM and reads the rest back
from disk): its space is reserved when it is made, so a full disk is an error at that moment, and the file is removed
once mapped (only the mapping holds it), so that nothing is left behind. Where the system cannot reserve space
(`os.posix_fallocate`: not on macOS or Windows), every table stays in memory. Each process of a distributed run keeps
its own tables.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import LabeledImages, image_batches

#: The largest table kept in memory (bytes); a larger one on the CPU is a file of the output folder, mapped
MEMORY_BYTES = 2 * 2**30


def _mapped(folder: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` backed by a file of `folder` whose space is reserved, removed once mapped."""
    count = math.prod(shape)
    size = count * dtype.itemsize
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".image-cache-") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, size)
        except OSError as error:
            raise OSError(
                f"No room for the run's image cache ({size / 2**30:.1f} GiB) in {folder}: {error.strerror}. Free "
                "disk space there, or choose an output folder on a larger disk."
            ) from error
        return torch.from_file(file.name, shared=True, size=count, dtype=dtype).view(shape)


class RowCache:
    """
    Rows of a per-image table (one row per image, all of one shape), stored as they are first computed.

    Args:
        count (`int`): the images.
        folder (`str` or `Path`): where a table larger than [`MEMORY_BYTES`] on the CPU is mapped from.
    """

    def __init__(self, count: int, folder: str | Path) -> None:
        self.count = count
        self.folder = Path(folder)
        self.table: torch.Tensor | None = None
        self.known = torch.zeros(count, dtype=torch.bool)
        self.mapped = False  # the table is a file's mapping (larger than MEMORY_BYTES)

    def has(self, indices: Sequence[int]) -> bool:
        """Whether every row of `indices` is stored."""
        return bool(self.known[list(indices)].all())

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """The stored rows of `indices` (see [`has`])."""
        return self.table[list(indices)]

    def put(self, indices: Sequence[int], rows: torch.Tensor) -> None:
        """Store `rows` as those of `indices`; the first rows decide the table's shape, dtype and device."""
        if self.table is None:
            shape, dtype = (self.count, *rows.shape[1:]), rows.dtype
            large = math.prod(shape) * dtype.itemsize > MEMORY_BYTES
            self.mapped = rows.device.type == "cpu" and large and hasattr(os, "posix_fallocate")
            self.table = _mapped(self.folder, shape, dtype) if self.mapped else rows.new_empty(shape)
        self.table[list(indices)] = rows.detach()
        self.known[list(indices)] = True


class InputCache:
    """
    The image tower's inputs of `data`'s images (the processor's outputs, unaugmented), each image decoded and
    preprocessed the first time it is asked for and read from then on.

    Args:
        processor: the model's processor.
        data ([`LabeledImages`]): the images.
        folder (`str` or `Path`): where a table too large for memory is mapped from (see [`RowCache`]).
    """

    def __init__(self, processor: Any, data: LabeledImages, folder: str | Path) -> None:
        self.processor = processor
        self.data = data
        self.folder = folder
        self.tables: dict[str, RowCache] = {}

    def has(self, indices: Sequence[int]) -> bool:
        """Whether the inputs of every image of `indices` are stored."""
        return bool(self.tables) and all(table.has(indices) for table in self.tables.values())

    def batches(
        self, batches: Sequence[Sequence[int]], num_workers: int = 0, pin_memory: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The inputs of each batch of indices in `batches`, in order: stored, or decoded by `num_workers` worker
        processes ahead of use (see [`image_batches`]) and stored."""
        stored = [self.has(batch) for batch in batches]
        decoded = image_batches(
            self.processor,
            self.data,
            [b for b, s in zip(batches, stored, strict=True) if not s],
            None,
            num_workers,
            pin_memory,
        )
        for batch, known in zip(batches, stored, strict=True):
            if known:
                yield {key: table.get(batch) for key, table in self.tables.items()}
                continue
            inputs = next(decoded)
            for key, value in inputs.items():
                self.tables.setdefault(key, RowCache(len(self.data), self.folder)).put(batch, value)
            yield inputs
