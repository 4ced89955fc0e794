"""The route matrix: every method (tests/routes.py, one line each) through every way in and out of the package: PEFT's
save and load, transformers' loader and pipeline, the Hub by repo id, `low_cpu_mem_usage`, `torch.compile` after
switching adapters, `disable_adapter` / `unload`, two threads, resume, and two real processes. Each route is compared
with the main one, `PromptClassifier` on the model the adapter was made in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hub_server import client_env, serve
from peft import PeftModel, get_peft_model
from PIL import Image
from routes import CLASSES, DTYPE, METHODS, TRANSFORMERS_5, adapted, settings, train
from safetensors.torch import load_file
from test_distributed import LAUNCH_TWO, TWO_PROCESSES_ENV
from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import (
    PromptClassifier,
    PromptEmbeddingConfig,
    PromptEncoder,
    load_prompt_model,
    prompt_options,
)
from peft_prompt_clip.layer import find_prompt_layer

ROUTES_SCRIPT = Path(__file__).parent / "routes.py"
FIXTURES = Path(__file__).parent / "fixtures" / "adapters-0.1.0"
PIXELS = torch.rand(4, 3, 30, 30, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def processor(clip_dir):
    return AutoProcessor.from_pretrained(clip_dir)


@pytest.fixture(scope="module", params=list(METHODS))
def saved(request, clip_dir, tmp_path_factory, processor):
    """(method, its adapted model, the folder it is saved in, the classifier's logits on `PIXELS`)."""
    model = adapted(request.param, clip_dir)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder, logits(model, processor)


def logits(model, processor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return PromptClassifier(model, processor, CLASSES, **kwargs).logits(PIXELS)


def base_clip(clip_dir) -> CLIPModel:
    return CLIPModel.from_pretrained(clip_dir).eval()


def test_saved_keys_follow_peft_convention(saved):
    method, _, folder, _ = saved
    keys = load_file(folder / "adapter_model.safetensors")
    assert keys and not [k for k in keys if ".default" in k], sorted(keys)  # no adapter name inside a key


def test_peft_round_trip_is_exact(saved, clip_dir, processor):
    _, _, folder, expected = saved
    again = PeftModel.from_pretrained(base_clip(clip_dir), folder)
    assert torch.equal(logits(again, processor), expected)
    named = load_prompt_model(base_clip(clip_dir), str(folder), adapter_name="other")
    assert torch.equal(logits(named, processor), expected)


def test_transformers_loader(saved, clip_dir, processor):
    """`from_pretrained(<adapter folder>)` and `load_adapter` load every tensor (the meta-net and the coupling maps
    once stayed at their initial values, silently)."""
    _, _, folder, expected = saved
    loaded = CLIPModel.from_pretrained(str(folder)).eval()
    torch.testing.assert_close(logits(loaded, processor), expected, atol=1e-5, rtol=0)
    clip = base_clip(clip_dir)
    clip.load_adapter(str(folder), adapter_name="mine")
    torch.testing.assert_close(logits(clip, processor), expected, atol=1e-5, rtol=0)
    # the README's word on transformers' adapter switches: they need PEFT 0.22 from transformers 5.24 on
    import peft

    from_524 = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (5, 24)
    if from_524 and tuple(int(v) for v in peft.__version__.split(".")[:2]) < (0, 22):
        with pytest.raises(ValueError, match=r"version >= 0\.22\.0"):
            clip.active_adapters()
    else:
        assert clip.active_adapters() == ["mine"]


def test_transformers_pipeline(saved, processor):
    from transformers import pipeline

    method, model, folder, expected = saved
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 30, 3), dtype=np.uint8)) for i in (0, 1)]
    pipe = pipeline("zero-shot-image-classification", model=str(folder))
    run = lambda: pipe(images, candidate_labels=CLASSES, hypothesis_template="{}.")  # noqa: E731
    if model.peft_config["default"].conditional:  # its class features need the image: the pipeline cannot say so
        with pytest.raises(ValueError, match="is conditional"):
            run()
        return
    with torch.no_grad():
        ours = PromptClassifier(model, processor, CLASSES).logits(**processor(images=images, return_tensors="pt"))
    for probs, result in zip(ours.softmax(-1), run(), strict=True):
        scores = {row["label"]: row["score"] for row in result}
        torch.testing.assert_close(torch.tensor([scores[n] for n in CLASSES]), probs, atol=1e-5, rtol=0)


def test_low_cpu_mem_usage(saved, clip_dir, processor):
    from peft import set_peft_model_state_dict

    _, model, folder, expected = saved
    loaded = PeftModel.from_pretrained(base_clip(clip_dir), folder, low_cpu_mem_usage=True)
    assert torch.equal(logits(loaded, processor), expected)
    empty = get_peft_model(base_clip(clip_dir), model.peft_config["default"], low_cpu_mem_usage=True)
    assert any(p.is_meta for p in empty.parameters())
    set_peft_model_state_dict(empty, load_file(folder / "adapter_model.safetensors"), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in empty.parameters())
    assert torch.equal(logits(empty, processor), expected)


def test_compile_after_switching_adapters(saved, clip_dir, processor):
    """Compiled with a CoOp adapter active, then given the method's: compiled and eager forwards agree (the hooks a
    method needs are in place before anything is compiled, and run eagerly), or, where dynamo runs a tower's layers
    without their hooks (transformers 4) and the method writes tokens past the input, the forward says so."""
    method, model, folder, _ = saved
    peft_model = get_peft_model(base_clip(clip_dir), PromptEmbeddingConfig(n_ctx=2))
    compiled = torch.compile(peft_model, backend="eager")  # dynamo's tracing and guards, without code generation
    texts = processor.tokenizer([f"{c}." for c in CLASSES], padding=True, return_tensors="pt")
    with torch.no_grad():
        compiled(**texts, pixel_values=PIXELS)
        peft_model.load_adapter(str(folder), adapter_name=method)
        peft_model.set_adapter(method)
        condition = None
        if model.peft_config["default"].conditional:  # each image's own prompts: one image, its class prompts
            condition = PromptEncoder(peft_model, processor).image_features({"pixel_values": PIXELS[:1]})
        with prompt_options(condition=condition):
            eager = peft_model(**texts, pixel_values=PIXELS)
            if find_prompt_layer(model).writes_deep("default") and not TRANSFORMERS_5:  # deep prompts, TCP's tokens
                with pytest.raises(RuntimeError, match="Upgrade to transformers >= 5, or run this model uncompiled"):
                    compiled(**texts, pixel_values=PIXELS)
                return
            fast = compiled(**texts, pixel_values=PIXELS)
    for key in ("text_embeds", "image_embeds"):
        torch.testing.assert_close(fast[key], eager[key], atol=1e-6, rtol=0)


def test_disable_and_unload_are_exact(saved, clip_dir, processor):
    method, _, folder, expected = saved
    base = logits(base_clip(clip_dir), processor)
    model = PeftModel.from_pretrained(base_clip(clip_dir), folder)
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapter changes the outputs
    with model.disable_adapter():
        assert torch.equal(logits(model, processor), base)
    assert torch.equal(logits(model.unload(), processor), base)


def test_two_threads(saved, processor):
    _, model, _, expected = saved
    results, errors = {}, []

    def run(index: int) -> None:
        try:
            for _ in range(3):
                results.setdefault(index, []).append(logits(model, processor))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert all(torch.equal(r, expected) for runs in results.values() for r in runs)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server, state, endpoint = serve({"hf_write"})
    yield client_env(endpoint, tmp_path_factory.mktemp("hf-home"))
    server.shutdown()


HUB_ROUND_TRIP = """
import sys, torch, peft_prompt_clip
from huggingface_hub import HfApi
from peft import PeftModel
from transformers import AutoProcessor, CLIPModel
from peft_prompt_clip import PromptClassifier
clip, folder, repo = sys.argv[1:4]
HfApi(token="hf_write").create_repo(repo, exist_ok=True)
HfApi(token="hf_write").upload_folder(repo_id=repo, folder_path=folder, allow_patterns=["adapter_*"])
model = PeftModel.from_pretrained(CLIPModel.from_pretrained(clip).eval(), repo)
pixels = torch.rand(4, 3, 30, 30, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = PromptClassifier(model, AutoProcessor.from_pretrained(clip), ["cat", "dog", "red car"]).logits(pixels)
print(logits.flatten().tolist())
"""


def test_hub_by_repo_id(saved, hub, clip_dir):
    method, _, folder, expected = saved
    command = [sys.executable, "-c", HUB_ROUND_TRIP, str(clip_dir), str(folder), f"user/{method}"]
    result = subprocess.run(command, capture_output=True, text=True, env=hub, timeout=300)
    assert result.returncode == 0, result.stderr
    got = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1])).view_as(expected)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_is_bit_identical(method, clip_dir, tmp_path, monkeypatch):
    import peft_prompt_clip.training.trainer as trainer_module

    full = train(method, clip_dir, tmp_path / "full")
    save = trainer_module.save_checkpoint

    def save_then_die(path, params, optimizer, epoch, *rest):
        save(path, params, optimizer, epoch, *rest)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(method, clip_dir, tmp_path / "cut")
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    resumed = train(method, clip_dir, tmp_path / "cut", resume=True)
    trained = {n: p for n, p in full.named_parameters() if p.requires_grad}
    assert trained
    for name, param in resumed.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, trained[name]), name
    clip = base_clip(clip_dir)  # every tensor trained: none left at its start
    for name, param in get_peft_model(clip, settings(method, clip)[0]).named_parameters():
        if param.requires_grad:
            assert not torch.equal(param, trained[name]), name


def test_two_real_processes_match_one(clip_dir, tmp_path):
    """Every method trained in two gloo processes equals one process, within 1e-6 (in float64; float32 keeps about 7
    digits of the gradients summed in another order, and 9 steps amplify that to ~1e-6); both ranks ran."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, str(ROUTES_SCRIPT), str(clip_dir), str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [*LAUNCH_TWO, str(ROUTES_SCRIPT), str(clip_dir), str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env={**env, **TWO_PROCESSES_ENV},
        timeout=900,
    )
    assert two.returncode == 0, two.stderr
    ranks = sorted((tmp_path / "two" / "ranks").iterdir())
    assert [json.loads(r.read_text())["processes"] for r in ranks] == [2, 2]
    atol = 1e-6 if DTYPE == torch.float64 else 1e-5
    for method in METHODS:
        a, b = (load_file(tmp_path / run / method / "adapter_model.safetensors") for run in ("one", "two"))
        assert list(a) == list(b)
        for key in a:
            gap = float((b[key] - a[key]).abs().max())
            assert gap <= atol, f"{method}: {key} differs by {gap:.3g}"


@pytest.mark.parametrize("kind", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_adapters_of_release_0_1_0_still_load(kind, clip_dir, processor):
    """Saved by release 0.1.0 (module tensors keyed with the adapter name; tests/fixtures/make_release_adapters.py),
    read by PEFT's loader and ours under any adapter name: every tensor of the file lands in the model, and the
    logits are the release's own (where the tiny CLIP is the one they were made with: transformers 5 builds it)."""
    saved = load_file(FIXTURES / kind / "adapter_model.safetensors")
    tail = lambda key: key[key.index("prompt_embedding_") :].replace(".default", "")  # noqa: E731
    expected = load_file(FIXTURES / kind / "expected_logits.safetensors")["logits"]
    for name in ("default", "other"):
        for model in (
            load_prompt_model(base_clip(clip_dir), str(FIXTURES / kind), adapter_name=name),
            PeftModel.from_pretrained(base_clip(clip_dir), FIXTURES / kind, adapter_name=name),
        ):
            loaded = {tail(k).replace(f".{name}", ""): v for k, v in model.state_dict().items() if "prompt_emb" in k}
            assert {k: v.tolist() for k, v in loaded.items()} == {tail(k): v.tolist() for k, v in saved.items()}
            if TRANSFORMERS_5:  # float32 logits of about 5: the installed releases' kernels move them by 2.4e-6
                torch.testing.assert_close(logits(model, processor), expected, atol=1e-5, rtol=0)


def test_class_specific_context_travels_by_name(clip_dir, processor):
    """A caller's class order need not be the adapter's: each prompt gets its own class's context, found by name;
    without names, a class-specific adapter that saved them refuses to guess."""
    model = adapted("csc", clip_dir)
    encoder = PromptEncoder(model, processor)
    order = ["red car", "cat", "dog"]
    tokens = encoder.tokenize([f"{c}." for c in order])
    with torch.no_grad():
        mine = encoder.class_features(encoder.tokenize([f"{c}." for c in CLASSES]), class_names=CLASSES)
        theirs = encoder.class_features(tokens, class_names=order)
    torch.testing.assert_close(theirs, mine[[2, 0, 1]], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pass class_names"):
        encoder.class_features(tokens)
