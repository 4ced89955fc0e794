"""Learning without labels: a teacher's class probabilities of unlabeled images, computed once (and kept on disk, so
that a killed pass resumes), which a student's prompts learn (`TrainingArguments.distill_weight`, PromptKD) or whose
most confident guesses become labels (self-training, UPL)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .classifier import PromptClassifier
from .data import DatasetImage, LabeledImages, image_batches
from .progress import progress
from .storage import atomic_path, read_json, write_json

#: Images per call of the teacher, and per file of its cache
CHUNK = 64


def _image_key(image: Any, crop: str | None = None) -> bytes:
    """What identifies an image source in a cache's fingerprint: a file by its absolute path, size and modification
    time (a file replaced under the same name is another image), a dataset's row by the dataset's fingerprint (of its
    content, as `datasets` computes it) and index, an image in memory by its pixels; and of an augmented crop, the
    name of the random stream it is drawn from."""
    crop_key = b"" if crop is None else f"|crop {crop}".encode()
    if isinstance(image, DatasetImage):
        return f"{image.dataset._fingerprint}|{image.index}|{image.column}".encode() + crop_key
    if isinstance(image, str | Path):
        path = Path(image).resolve()
        stat = path.stat() if path.exists() else None
        return f"{path}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode() + crop_key
    return np.asarray(image).tobytes() + crop_key


class Teacher:
    """
    What a student learns from without labels: a classifier's logits of images, by the student's class names (the
    link between two models, which may be of different families).

    Args:
        classifier ([`PromptClassifier`]): the teacher's classifier of the classes: a larger model's zero-shot
            prompt(s) (`use_adapter=False`, or a model without an adapter), or a prompt adapter's learned prompt.
        name (`str`): what the teacher is, in words (its model, adapter and templates); part of its cache's
            fingerprint.

    Example (a larger CLIP's zero-shot prompt teaching a small model's prompt adapter):

    ```py
    teacher = Teacher(PromptClassifier(big_model, big_processor, class_names), "big-clip, 'a photo of a {}.'")
    logits = teacher.logits(images, cache="teacher-cache")  # once per image; a killed pass resumes
    data = pseudo_labeled(images, class_names, logits)  # the labels: the teacher's guesses
    args = TrainingArguments("student", label_weight=0.0, distill_weight=1.0)
    PromptTrainer(student, student_processor, data, args, teacher_logits=logits).train()
    ```
    """

    def __init__(self, classifier: PromptClassifier, name: str) -> None:
        self.classifier = classifier
        self.name = name

    @property
    def class_names(self) -> list[str]:
        return list(self.classifier.class_names)

    def fingerprint(self) -> str:
        """What a cache of this teacher's logits must match: the teacher and its classes."""
        return hashlib.sha256(json.dumps([self.name, self.class_names]).encode()).hexdigest()

    def owns(self, cache: str | Path) -> bool:
        """Whether the folder `cache` holds a cache of this teacher's logits."""
        record = read_json(Path(cache) / "teacher.json")
        return isinstance(record, dict) and record.get("fingerprint") == self.fingerprint()

    @torch.no_grad()
    def logits(
        self,
        images: Sequence[Any],
        cache: str | Path | None = None,
        num_workers: int = 0,
        augment_seed: str | None = None,
    ) -> torch.Tensor:
        """
        The teacher's logits `(images, classes)` (float32, on the CPU) of `images` (paths, PIL images or arrays),
        computed in chunks of [`CHUNK`] with a progress bar. With `augment_seed`, of the images' augmented crops, the
        same a student's training draws with that seed (image `i` from the stream `"{augment_seed}-{i}"`; a cached
        view's seed is from [`view_seeds`]), so that each view is taught by the teacher's probabilities of itself.

        With `cache` (a folder kept for this teacher), each chunk's logits are written there atomically as it
        finishes, each row under its image's key (a file's absolute path, size and modification time, or an image's
        pixels): a pass that was killed resumes with the images it had not reached, a second run reads every image it
        has seen (any order, images added or removed) without running the teacher, and a replaced file is run again.
        A cache of another teacher is an error, not reused.
        """
        if not len(images):
            raise ValueError("The teacher got no images.")
        crops = [None if augment_seed is None else f"{augment_seed}-{i}" for i in range(len(images))]
        keys = [hashlib.sha256(_image_key(image, crop)).hexdigest() for image, crop in zip(images, crops, strict=True)]
        folder = None if cache is None else Path(cache)
        known: dict[str, torch.Tensor] = {}
        if folder is not None:
            _claim_cache(folder, self.fingerprint(), self.name)
            wanted = set(keys)
            for path in sorted(folder.glob("logits-*.safetensors")):  # the rows of these images alone
                known.update((key, row) for key, row in _read_chunk(path).items() if key in wanted)
        missing = [i for i, key in enumerate(keys) if key not in known]
        # the images' labels are the teacher's to give: a placeholder until then
        data = LabeledImages(self.class_names, list(images), [0] * len(images))
        batches = [missing[k : k + CHUNK] for k in range(0, len(missing), CHUNK)]
        inputs = image_batches(self.classifier.processor, data, batches, augment_seed, num_workers=num_workers)
        written = len(list(folder.glob("logits-*.safetensors"))) if folder is not None else 0
        for n, batch_inputs in enumerate(progress(inputs, total=len(batches), desc="teacher")):
            batch = batches[n]
            logits = self.classifier.logits(**batch_inputs).float().cpu()
            known.update({keys[i]: row for i, row in zip(batch, logits, strict=True)})
            if folder is not None:
                metadata = {"keys": json.dumps([keys[i] for i in batch])}
                with atomic_path(folder / f"logits-{written + n:09d}.safetensors") as tmp:
                    save_file({"logits": logits.contiguous()}, str(tmp), metadata)
        return torch.stack([known[key] for key in keys])


def _claim_cache(folder: Path, fingerprint: str, name: str) -> None:
    """Use `folder` as the cache of this teacher's logits: new, or one it wrote."""
    record = folder / "teacher.json"
    if os.path.lexists(record):
        kept = read_json(record)
        if not isinstance(kept, dict) or kept.get("fingerprint") != fingerprint:
            raise ValueError(f"{folder} caches another teacher's logits; give a new cache folder, or delete it.")
        return
    if folder.exists() and any(p.suffix not in (".lock", ".tmp") for p in folder.iterdir()):  # not a claim's leftovers
        raise ValueError(f"{folder} is not empty and holds no teacher cache; give a new or empty folder.")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(record, {"fingerprint": fingerprint, "teacher": name})


def _read_chunk(path: Path) -> dict[str, torch.Tensor]:
    """A cached chunk's logits by image key; none when it is unreadable (its images are then run again)."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = json.loads((f.metadata() or {}).get("keys", "[]"))
            logits = f.get_tensor("logits")
    except (OSError, SafetensorError, ValueError):
        return {}
    if not isinstance(keys, list) or len(keys) != len(logits):
        return {}
    return dict(zip(keys, logits, strict=True))


def pseudo_labeled(
    images: Sequence[Any], class_names: list[str], logits: torch.Tensor, per_class: int | None = None
) -> LabeledImages:
    """
    `images` labelled by a teacher's `logits` (its most probable class). With `per_class`, only the `per_class`
    images it is most confident of for each class are kept (UPL's selection, Huang et al. 2022: balanced, and fewer
    wrong labels than all of its guesses), in their original order.
    """
    if tuple(logits.shape) != (len(images), len(class_names)):
        raise ValueError(
            f"logits must be (images, classes) = {(len(images), len(class_names))}, got {tuple(logits.shape)}."
        )
    confidence, labels = logits.float().softmax(-1).max(-1)
    keep = range(len(images))
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be at least 1, got {per_class}.")
        chosen: list[int] = []
        for y in range(len(class_names)):
            mine = (labels == y).nonzero().flatten()
            order = confidence[mine].argsort(descending=True, stable=True)
            chosen += mine[order[:per_class]].tolist()
        keep = sorted(chosen)
    return LabeledImages(list(class_names), [images[i] for i in keep], [int(labels[i]) for i in keep])


def process_state() -> Any:
    """Accelerate's state of this process, made as the trainer's `Accelerator` will make it: on the CPU when
    `ACCELERATE_USE_CPU` says so. Made first with accelerate's defaults instead, it would stay that way (a singleton),
    and two CPU processes launched together would each train alone."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def load_teacher(
    source: str, class_names: list[str] | None, templates: Sequence[str], revision: str | None = None
) -> Teacher:
    """
    The teacher `source` names: a prompt adapter (a folder or Hub repo with `adapter_config.json`; its base model is
    loaded too, and it classifies with its learned prompt), or else a model (folder or Hub id), which classifies with
    the zero-shot prompt(s) `templates`. `class_names` default to the adapter's; given, they must be its (in any
    order its prompts allow: a class-specific adapter knows only its own classes).
    """
    from .loading import WEIGHTS_NAME, load_base_model, load_prompt_model, read_adapter_config, resolve_adapter
    from .storage import file_sha256

    try:
        folder = resolve_adapter(source, revision=revision)
    except FileNotFoundError:  # no prompt adapter there: a model
        folder = None
    device = process_state().device
    if folder is None:
        if revision is not None:
            raise ValueError(f"--revision is for a teacher adapter on the Hub; {source} is a model (or not found).")
        if not class_names:
            raise ValueError(f"The teacher {source} is a model, which knows no classes: pass --classes.")
        model, processor = load_base_model(source)
        classifier = PromptClassifier(model.to(device), processor, class_names, list(templates), use_adapter=False)
        return Teacher(classifier, f"{source}, zero-shot with {len(templates)} template(s): {list(templates)}")
    config = read_adapter_config(folder)
    own = config.class_names
    if class_names and own and sorted(class_names) != sorted(own):
        raise ValueError(
            f"The teacher adapter {source} was learned for the classes {own}, not {class_names}; drop --classes to "
            "use its classes, or give a teacher of these classes."
        )
    names = class_names or own
    if not names:
        raise ValueError(f"The teacher adapter {source} records no class names: pass --classes.")
    if not config.base_model_name_or_path:
        raise ValueError(f"The teacher adapter {source} does not name its base model.")
    base, processor = load_base_model(config.base_model_name_or_path)
    model = load_prompt_model(base, folder).to(device)
    weights = file_sha256(Path(folder) / WEIGHTS_NAME)[:16]  # a retrained or updated adapter is another teacher
    return Teacher(PromptClassifier(model, processor, names), f"{source} (a {config.method} adapter, {weights})")
