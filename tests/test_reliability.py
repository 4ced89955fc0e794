"""Reliability round 2: untrusted adapter configs control no regex and no blocking open, results are written
atomically and never through a link, one bad image is a warning (or a one-line error), an overflowing context is
refused, and an interrupted save is refused at load."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from peft import get_peft_model
from PIL import Image
from routes import METHODS, adapted
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

import peft_prompt_clip.storage as storage
from peft_prompt_clip import InvalidAdapterError, PromptEmbeddingConfig, load_prompt_model
from peft_prompt_clip.data import drop_unreadable, load_image_folder, open_image
from peft_prompt_clip.storage import save_adapter
from peft_prompt_clip.tiny import clip_config
from peft_prompt_clip.variants import variants_of


@pytest.fixture
def adapter(clip_dir, tmp_path):
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4))
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_pattern_in_target_modules_is_refused_not_run(clip_dir, adapter):
    edit_config(adapter, target_modules="(.*)*X")  # catastrophic backtracking, were it a regex over module names
    with pytest.raises(InvalidAdapterError, match="target_modules must be a module name .* patterns are not"):
        load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(adapter))
    edit_config(adapter, target_modules="text_model.embeddings")  # a plain name still works
    load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(adapter))


def test_a_fifo_as_the_lock_file_does_not_block_loading(clip_dir, adapter):
    (adapter / storage.LOCK_NAME).unlink(missing_ok=True)
    os.mkfifo(adapter / storage.LOCK_NAME)
    outcome = []

    def load():
        try:
            load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(adapter))
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "loading blocked on a FIFO"
    assert outcome and "is not a regular file" in str(outcome[0])


def test_eval_results_replace_a_link_and_never_write_through_it(clip_dir, adapter, tmp_path):
    from peft_prompt_clip.cli import main

    images = write_image_folder(tmp_path / "images", per_class=5)
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    (adapter / "eval_results.json").symlink_to(target)
    assert main(["eval", "--adapter", str(adapter), "--data", str(images), "--model", str(clip_dir)]) == 0
    assert target.read_text() == "precious"
    results = adapter / "eval_results.json"
    assert not results.is_symlink() and "learned prompt" in json.loads(results.read_text())


def test_bad_images_are_named_and_skipped(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "images", per_class=3)
    bomb = folder / "cat" / "bomb.png"
    Image.new("L", (200, 200)).save(bomb)
    exif = folder / "dog" / "exif.jpg"
    Image.new("RGB", (8, 8)).save(exif)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the 200 x 200 image is now 4x past the limit
    with pytest.raises(ValueError, match="refused, too many pixels"):
        open_image(bomb)

    real = __import__("PIL.ImageOps", fromlist=["exif_transpose"]).exif_transpose

    def damaged(image, *args, **kwargs):  # what a corrupt EXIF block does inside Pillow
        if getattr(image, "filename", "").endswith("exif.jpg") or image.size == (8, 8):
            raise struct.error("unpack requires a buffer of 12 bytes")
        return real(image, *args, **kwargs)

    monkeypatch.setattr("peft_prompt_clip.data.ImageOps.exif_transpose", damaged)
    with pytest.raises(ValueError, match="damaged EXIF metadata"):
        open_image(exif)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = drop_unreadable(load_image_folder(folder))
    message = " ".join(str(w.message) for w in caught)
    assert "Skipped 2 unreadable image(s)" in message and "bomb.png" in message and "exif.jpg" in message
    assert len(kept) == 9


def test_an_overflowing_context_is_refused(clip_dir, adapter):
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: torch.full_like(v, 3e38) for k, v in tensors.items()}, weights)
    edit_config(adapter, weights_sha256=None)
    with pytest.raises(InvalidAdapterError, match="shared context can write a token .* times the longest text embed"):
        load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(adapter))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_tensor_of_every_method_is_bounded(method, clip_dir, tmp_path):
    """Each tensor of each method's adapter (contexts, vision prompts, MaPLe's maps, CoCoOp's meta-net, TCP's map),
    made huge but finite in the file, is refused at load, naming its part; as learned, the adapter loads."""
    model = adapted(method, clip_dir)
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = {key: t.clone() for key, t in load_file(weights).items()}  # not views of the file rewritten below
    edit_config(tmp_path / "adapter", weights_sha256=None)
    load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path / "adapter"))
    parts = variants_of(model.peft_config["default"])
    for key in tensors:
        save_file({**tensors, key: torch.full_like(tensors[key], 1e30)}, weights)
        title = next(v.title for v in parts if key.endswith(v.store) or f"{v.store}." in key)
        with pytest.raises(InvalidAdapterError, match=rf"{re.escape(title)} can write a token of length"):
            load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path / "adapter"))


def test_vision_prompts_are_at_most_the_image_towers_own_length(clip_dir):
    model = CLIPModel.from_pretrained(clip_dir)
    positions = model.vision_model.embeddings.position_embedding.num_embeddings
    get_peft_model(model, PromptEmbeddingConfig(n_ctx=2, vision_n_ctx=positions))
    too_many = f"vision_n_ctx={positions + 1} is more than the image tower's own {positions}"
    with pytest.raises(ValueError, match=too_many):
        get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=2, vision_n_ctx=positions + 1))
    longer_texts = CLIPModel(clip_config(max_positions=64))  # MaPLe's vision tokens are its text tokens
    with pytest.raises(ValueError, match=too_many):
        get_peft_model(longer_texts, PromptEmbeddingConfig(n_ctx=positions + 1, coupled=True))


def test_a_save_interrupted_between_the_renames_is_refused(clip_dir, adapter, monkeypatch):
    model = get_peft_model(
        CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4, class_names=["x", "y"])
    )
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).normal_()
    real, calls = os.replace, []

    def die_before_the_config(src, dst):
        calls.append(dst)
        if str(dst).endswith("adapter_config.json"):
            raise KeyboardInterrupt  # the process stops after the weights moved, before the config
        real(src, dst)

    monkeypatch.setattr(storage.os, "replace", die_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, adapter)
    monkeypatch.undo()
    assert [c.name for c in calls][-2:] == [
        "adapter_model.safetensors",
        "adapter_config.json",
    ]  # new weights, old config
    with pytest.raises(InvalidAdapterError, match="come from different saves"):
        load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(adapter))
    save_adapter(model, adapter)  # saved again: the pair loads, and the digest does not stay on the model
    loaded = load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(adapter))
    assert loaded.peft_config["default"].class_names == ["x", "y"]
    assert loaded.peft_config["default"].weights_sha256 is None


def test_bad_values_are_clear_errors(clip_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoProcessor

    from peft_prompt_clip import PromptClassifier, PromptTrainer, TrainingArguments, evaluate
    from peft_prompt_clip.cli import main
    from peft_prompt_clip.data import LabeledImages
    from peft_prompt_clip.interpret import nearest_words

    images = write_image_folder(tmp_path / "images", per_class=5)
    assert main(["train", "--model", str(clip_dir), "--data", str(images), "--output", str(tmp_path / "o"),
                 "--shots", "0"]) == 2  # fmt: skip
    assert "shots must be at least 1" in capsys.readouterr().err
    for name in ("lr", "kg_weight", "momentum"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            TrainingArguments(output_dir="o", **{name: float("nan")})
    (images / "classnames.json").write_text(json.dumps({"cat": None, "dog": "dog", "red_car": "car"}))
    with pytest.raises(ValueError, match="must map folder names to class names"):
        load_image_folder(images)

    processor = AutoProcessor.from_pretrained(clip_dir)
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=4))
    one_class = LabeledImages(["cat"], [np.zeros((30, 30, 3), np.uint8)] * 2, [0, 0])
    with pytest.raises(ValueError, match="at least two classes"):
        PromptTrainer(model, processor, one_class, TrainingArguments(output_dir=str(tmp_path / "one")))
    classifier = PromptClassifier(model, processor, ["cat", "dog"])
    with pytest.raises(ValueError, match="got no images"):
        evaluate(classifier, LabeledImages(["cat", "dog"], [], []))
    with pytest.raises(ValueError, match="predict\\(\\) got no images"):
        classifier.predict([])
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        classifier.predict([np.zeros((30, 30, 3), np.uint8)], top_k=-1)
    for empty in (Image.new("RGB", (0, 4)), np.zeros((5, 0, 3), np.uint8)):  # was a ZeroDivisionError
        with pytest.raises(ValueError, match=r"without pixels \(width or height 0\) at positions \[1\]"):
            classifier.predict([np.zeros((30, 30, 3), np.uint8), empty])
    with pytest.raises(ValueError, match="k must be between 1 and the vocabulary size"):
        nearest_words(model, processor.tokenizer, k=100_000)


def test_a_class_specific_adapter_predicts_with_each_class_its_own_context(clip_dir, tmp_path, capsys):
    from peft_prompt_clip.cli import main

    config = PromptEmbeddingConfig(n_ctx=2, class_specific=True, class_names=["cat", "dog", "red car"])
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir), config)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).normal_()
    save_adapter(model, tmp_path / "csc")
    image = tmp_path / "x.png"
    Image.new("RGB", (30, 30)).save(image)

    def scores(*classes):
        assert main(["predict", "--adapter", str(tmp_path / "csc"), *classes, str(image)]) == 0
        top = capsys.readouterr().out.split(": ", 1)[1].strip().split(", ")
        return {part.rsplit(" ", 1)[0]: float(part.rsplit(" ", 1)[1]) for part in top}

    assert scores() == scores("--classes", "red car,dog,cat")  # reordered: each class keeps its own context
    assert main(["predict", "--adapter", str(tmp_path / "csc"), "--classes", "cat,bird", str(image)]) == 2
    assert "it has none for ['bird']" in capsys.readouterr().err


def test_untrusted_class_names_are_printed_escaped(clip_dir, tmp_path, capsys):
    from peft_prompt_clip.cli import main

    names = ["cat\n\x1b[31mRED", "dog"]
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir), PromptEmbeddingConfig(n_ctx=2, class_names=names))
    save_adapter(model, tmp_path / "a")
    image = tmp_path / "x.png"
    Image.new("RGB", (30, 30)).save(image)
    assert main(["predict", "--adapter", str(tmp_path / "a"), str(image)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and len(out.strip().splitlines()) == 1 and "cat\\n\\x1b[31mRED" in out


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    from peft_prompt_clip import cli, commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "train", interrupted)
    assert cli.main(["train", "--model", "m", "--data", "d", "--output", "o"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "--resume continues" in err


def test_every_file_of_an_adapter_folder_has_one_mode(clip_dir, tmp_path):
    from transformers import AutoProcessor

    from peft_prompt_clip import PromptTrainer, TrainingArguments
    from peft_prompt_clip.data import LabeledImages

    model = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=2))
    data = LabeledImages(["cat", "dog"], [np.zeros((30, 30, 3), np.uint8)] * 4, [0, 1, 0, 1])
    args = TrainingArguments(output_dir=str(tmp_path), epochs=1, augment=False)
    PromptTrainer(model, AutoProcessor.from_pretrained(clip_dir), data, args).train()
    names = ("adapter_config.json", "adapter_model.safetensors", "checkpoint.safetensors")
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in names}
    assert len(set(modes.values())) == 1 and modes["adapter_config.json"] == storage.file_mode(), modes


def test_misleading_messages_name_the_real_problem(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    import peft_prompt_clip.loading as loading
    from peft_prompt_clip.data import load_csv

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "bom.csv").write_bytes("\ufeffpath,label\na.png,cat\na.png,dog\n".encode())
    assert load_csv(tmp_path / "bom.csv").class_names == ["cat", "dog"]
    (tmp_path / "short.csv").write_text("path,label\na.png,cat\na.png\n")
    with pytest.raises(ValueError, match=r"short.csv: lines \[3\] lack a path or a label"):
        load_csv(tmp_path / "short.csv")
    (tmp_path / "latin.csv").write_bytes("path,label\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.csv is not UTF-8 text"):
        load_csv(tmp_path / "latin.csv")

    def fails_with(cls):
        error = cls.__new__(cls)
        Exception.__init__(error, "not found")

        def download(*args, **kwargs):
            raise error

        monkeypatch.setattr(loading, "hf_hub_download", download)

    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    for cls in (RepositoryNotFoundError, LocalEntryNotFoundError):
        fails_with(cls)
        with pytest.raises(FileNotFoundError, match="No adapter folder at 'out/nothing' \\(the folder 'out' has no"):
            loading.resolve_adapter("out/nothing")
    with pytest.raises(FileNotFoundError, match="offline: HF_HUB_OFFLINE is set or there is no network"):
        loading.resolve_adapter("user/not-cached")
    for bad in (dict(init_seed=2**64), dict(suffix_token_ids=[2**40])):
        with pytest.raises(ValueError, match="init_seed must be between|suffix_token_ids must be"):
            PromptEmbeddingConfig(**bad)


def test_models_of_no_supported_family_and_damaged_weights_are_one_line(clip_dir, tmp_path, capsys):
    from transformers import BertConfig, BertModel, CLIPTextModel

    from peft_prompt_clip.cli import main

    images = write_image_folder(tmp_path / "images", per_class=4)
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    ).save_pretrained(tmp_path / "bert")
    CLIPTextModel.from_pretrained(clip_dir).save_pretrained(tmp_path / "text-only")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for p in clip_dir.iterdir():
        (damaged / p.name).write_bytes(p.read_bytes())
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    expected = {"bert": "No text embeddings module", "text-only": "has no image tower", "damaged": "error:"}
    for name, message in expected.items():
        code = main(["train", "--model", str(tmp_path / name), "--data", str(images), "--output", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (name, err)


def test_review_findings(clip_dir, tmp_path, tokenizer, monkeypatch):
    from transformers import AutoProcessor

    from peft_prompt_clip import PromptClassifier, PromptEncoder, prompt_options

    # an adapter of another name is saved into the folder itself, and loads back
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir).eval(), PromptEmbeddingConfig(n_ctx=2), "coop")
    save_adapter(model, tmp_path / "named")
    assert (tmp_path / "named" / "adapter_config.json").is_file() and not (tmp_path / "named" / "coop").exists()
    load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path / "named"))
    # a new save removes the results of the adapter it replaces
    (tmp_path / "named" / "eval_results.json").write_text("{}")
    save_adapter(model, tmp_path / "named")
    assert not (tmp_path / "named" / "eval_results.json").exists()

    # a forward interrupted by Ctrl-C leaves no call state for the next one
    inputs = tokenizer(["cat.", "dog."], padding=True, return_tensors="pt")
    base = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        expected = base.get_text_features(**inputs)
        expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
        layer0 = model.base_model.model.text_model.encoder.layers[0]
        hook = layer0.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            model.get_text_features(**inputs)
        hook.remove()
        with prompt_options(enabled=False):
            out = model.get_text_features(**inputs)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        encoder = PromptEncoder(model, tokenizer, share_prefix=False)
        shared = PromptEncoder(model, tokenizer).class_features(
            encoder.tokenize(["cat.", "dog."], enabled=False), enabled=False
        )
        torch.testing.assert_close(shared, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5, rtol=0)

    # a class-specific adapter scores any subset of its classes with each class's own context
    names = ["cat", "dog", "red car"]
    csc = get_peft_model(
        CLIPModel.from_pretrained(clip_dir).eval(),
        PromptEmbeddingConfig(n_ctx=2, class_specific=True, class_names=names),
    )
    with torch.no_grad():
        next(p for p in csc.parameters() if p.requires_grad).normal_()
    processor = AutoProcessor.from_pretrained(clip_dir)
    full = PromptClassifier(csc, processor, names).class_features()
    subset = PromptClassifier(csc, processor, ["red car", "cat"]).class_features()
    torch.testing.assert_close(subset, full[[2, 0]], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"it has none for \['bird'\]"):
        PromptClassifier(csc, processor, ["cat", "bird"]).class_features()

    # a folder read-only to the reader still loads (the lock cannot be opened for writing there)
    import errno as errno_module

    def read_only(self, *args, **kwargs):
        raise OSError(errno_module.EROFS, "Read-only file system")

    monkeypatch.setattr(storage.FileLock, "acquire", read_only)
    load_prompt_model(CLIPModel.from_pretrained(clip_dir), str(tmp_path / "named"))
    monkeypatch.undo()


def test_a_push_with_the_hub_unreachable_is_one_line_whatever_the_transport(clip_dir, adapter, monkeypatch, capsys):
    """A refused port, through the client huggingface_hub really uses (httpx2 in 2.x, httpx in 1.x)."""
    import socket

    from peft_prompt_clip.cli import main

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert main(["push", "--adapter", str(adapter), "--repo", "user/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("peft-prompt-clip push: error: Could not create the Hub repo 'user/x'"), err
    assert not any("Traceback" in line for line in err)


def test_hugging_face_datasets_that_do_not_load_say_which_file_column_or_rows(tmp_path):
    """Damaged files, an empty split, rows without a class, and a column of no images: each a one-line error that
    names the file, split, column or rows, and the way out."""
    import datasets

    from peft_prompt_clip.data import from_hf_dataset
    from peft_prompt_clip.sources import DataSource, unlabeled_images

    images = [Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(4)]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"]), "n": datasets.Value("int32")}
    )

    def saved(name, labels=(0, 1, 0, 1), test_rows=4, **columns):
        rows = {"image": images, "label": list(labels), "n": [1, 2, 3, 4], **columns}
        data = datasets.Dataset.from_dict(rows, features=None if columns else features)
        datasets.DatasetDict({"train": data, "test": data.select(range(test_rows))}).save_to_disk(tmp_path / name)
        return str(tmp_path / name)

    def fails(source, match, **kwargs):
        with pytest.raises((OSError, ValueError), match=match):
            DataSource(source, **kwargs).split("test")

    fails(saved("unlabeled", labels=(0, 1, 0, -1)), r"'test' split: 1 row\(s\) have no class in the label column "
          r"'label' \(rows \[3\]: \['-1'\]; -1 is datasets' 'no label'\); use a split with labels")  # fmt: skip
    fails(saved("none", label=["x", None, "y", "x"]), r"1 row\(s\) have no class in the label column 'label' "
          r"\(rows \[1\]: \['None'\]")  # fmt: skip
    ints = saved("ints")
    fails(ints, r"column 'n' holds int32 values, not images or image paths; its columns are \{'image': 'Image', "
          r"'label': 'ClassLabel', 'n': 'int32'\}\. Name the image column", image_column="n")  # fmt: skip
    with pytest.raises(ValueError, match=r"'train' split: The dataset's column 'label' holds ClassLabel values"):
        unlabeled_images(ints, image_column="label")
    truncated = saved("truncated")
    arrow = next((tmp_path / "truncated" / "test").glob("*.arrow"))
    with open(arrow, "r+b") as f:
        f.truncate(arrow.stat().st_size // 2)
    fails(truncated, f"cannot be read as a Hugging Face dataset: {re.escape(str(arrow))} is damaged")
    info = tmp_path / saved("info") / "test" / "dataset_info.json"
    info.write_text("{not json")
    fails(str(tmp_path / "info"), f"{re.escape(str(info))} is damaged \\(JSONDecodeError")
    (tmp_path / "parquet").mkdir()
    rows = {"image": images, "label": [0, 1, 0, 1], "n": [1, 2, 3, 4]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "parquet" / "train.parquet")
    (tmp_path / "parquet" / "test.parquet").write_bytes(b"PAR1 not parquet")
    fails(str(tmp_path / "parquet"), f"{re.escape(str(tmp_path / 'parquet' / 'test.parquet'))} is damaged")
    # datasets 5.2 saves a split without rows but cannot load it back (5.0 cannot save it)
    with contextlib.suppress(ZeroDivisionError):
        empty = saved("empty", test_rows=0)
        try:
            loaded = datasets.load_from_disk(empty)
        except IndexError:
            fails(empty, r"its splits \['test'\] have no rows, which datasets cannot load back; save the dataset")
        else:
            with pytest.raises(ValueError, match="The dataset has no rows"):
                from_hf_dataset(loaded["test"])
    # a row that is no image, reached anyway (a stream names no column types): named and skipped, not a crash
    with pytest.raises(ValueError, match="not an image: a int value"):
        open_image(3)


def test_class_names_and_templates_are_text_with_one_place_for_the_name(clip_dir, tokenizer):
    from transformers import AutoProcessor

    from peft_prompt_clip import PromptClassifier
    from peft_prompt_clip.config import check_class_names
    from peft_prompt_clip.encoder import PromptEncoder

    with pytest.raises(ValueError, match=r"repeats 'cat' \(positions 0 and 2, spaces aside\)"):
        check_class_names(["cat", "dog", " cat "])  # the tokenizer reads them as one word: identical scores
    with pytest.raises(ValueError, match=r"no valid text \(a lone surrogate\) at positions \[1\]"):
        check_class_names(["cat", "d\ud800og"])
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = AutoProcessor.from_pretrained(clip_dir)
    for template in ("{} {}", "a {0}", "a {name}", "no slot", "a {", "{}}"):
        with pytest.raises(ValueError, match="Every template needs one '{}' for the class name"):
            PromptClassifier(model, processor, ["cat", "dog"], [template])
    PromptClassifier(model, processor, ["cat", "dog"], ["a {{braced}} {}."]).class_features()
    for size in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive number of prompts, or None"):
            PromptClassifier(model, processor, ["cat", "dog"], chunk_size=size)
    # a special token spelled inside a class name is its characters, not the end of the text
    tokens = PromptEncoder(model, processor).tokenize(["a cat.", f"a cat{tokenizer.eos_token}."])
    ends = (tokens["input_ids"] == tokenizer.eos_token_id) & tokens["attention_mask"].bool()
    assert ends.sum(dim=-1).tolist() == [1, 1]
    assert tokens["attention_mask"].sum(dim=-1).tolist()[1] > tokens["attention_mask"].sum(dim=-1).tolist()[0] + 1


def test_a_huge_value_echoed_in_an_error_is_cut_to_one_readable_line(clip_dir, tmp_path, capsys):
    from peft_prompt_clip.cli import main

    images = write_image_folder(tmp_path / "images", per_class=2)
    argv = ["train", "--model", str(clip_dir), "--data", str(images), "--output", str(tmp_path / "o")]
    assert main([*argv, "--ctx-init", " " * 2_000_000]) == 2
    line = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert len(line) < 1100 and "left out" in line, len(line)
    assert line.startswith("peft-prompt-clip train: error: ctx_init must be non-empty words")


def test_eval_never_leaves_new_results_beside_an_old_report(tmp_path, monkeypatch):
    import peft_prompt_clip.report as report

    results = {"zero-shot": {"top1": 0.5, "top5": 1.0, "n": 2, "per_class": {"a": 0.5, "b": 0.5},
                             "confusion": [[0, 0, 1], [1, 0, 1]]}}  # fmt: skip
    results["learned prompt"] = results["zero-shot"]
    out = tmp_path / "eval_results.json"
    page = report.save_results(out, results, None, "first")
    assert "first" in page.read_text()

    def killed(*args):  # the process dies once the results are written, before the report is
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        report.save_results(out, {**results, "split": "new"}, None, "second")
    assert json.loads(out.read_text())["split"] == "new" and not page.exists()  # no stale report beside them
    monkeypatch.undo()
    # a report that cannot be drawn writes nothing: the results and report before it stay
    report.save_results(out, results, None, "third")
    with pytest.raises(KeyError):
        report.save_results(out, {"split": "broken"}, None, "fourth")
    assert "split" not in json.loads(out.read_text()) and "third" in page.read_text()
