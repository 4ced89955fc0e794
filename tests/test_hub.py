"""Hub round trip over a real socket: a local server speaks the Hub API; pushes and loads run in fresh processes with
the real `huggingface_hub` client pointed at it (HF_ENDPOINT), as a user's would be."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hub_server import client_env, serve
from huggingface_hub import ModelCard
from PIL import Image
from routes import METHODS, adapted

TOKEN = "hf_test_write_token"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server, state, endpoint = serve({TOKEN})
    yield state, client_env(endpoint, tmp_path_factory.mktemp("hf-home"))
    server.shutdown()


def python(code: str, env: dict, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=cwd
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def cli(env: dict, *args, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "peft_prompt_clip", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def head(state, repo_id: str) -> dict[str, bytes]:
    repo = state.repos[repo_id]
    return repo["commits"][repo["branches"]["main"]]


@pytest.fixture(scope="module")
def adapter(clip_dir, tmp_path_factory):
    """A saved class-specific adapter, away from its initialisation, with evaluation results beside it."""
    from peft import get_peft_model
    from transformers import CLIPModel

    from peft_prompt_clip import PromptEmbeddingConfig

    folder = tmp_path_factory.mktemp("adapter")
    config = PromptEmbeddingConfig(n_ctx=4, class_specific=True, class_names=["cat", "dog", "red car"])
    model = get_peft_model(CLIPModel.from_pretrained(clip_dir), config)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).normal_(0, 1)
    model.save_pretrained(folder)
    results = {
        "split": "test",
        "zero-shot": {"top1": 0.5, "top5": 1.0, "n": 6},
        "learned prompt": {"top1": 0.8333, "top5": 1.0, "n": 6},
    }
    (folder / "eval_results.json").write_text(json.dumps(results))
    return folder


OUTPUTS = """
import torch, peft_prompt_clip
from peft import PeftModel
from transformers import AutoTokenizer, CLIPModel
model = PeftModel.from_pretrained(CLIPModel.from_pretrained({clip!r}).eval(), {adapter!r}, revision={revision!r})
tokens = AutoTokenizer.from_pretrained({clip!r})(["cat.", "dog.", "red car."], padding=True, return_tensors="pt")
with torch.no_grad():
    features = model.get_text_features(**tokens)
features = features if isinstance(features, torch.Tensor) else features.pooler_output
print(features.flatten().tolist())
"""


def outputs(env, clip_dir, adapter, revision=None) -> list[float]:
    result = python(OUTPUTS.format(clip=str(clip_dir), adapter=str(adapter), revision=revision), env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_push_then_load_by_repo_id_in_a_fresh_process(hub, clip_dir, adapter, tmp_path):
    state, env = hub
    result = cli({**env, "HF_TOKEN": TOKEN}, "push", "--adapter", adapter, "--repo", "user/coop-demo")
    assert "pushed" in result.stdout
    files = head(state, "user/coop-demo")
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "eval_results.json", "README.md"}
    assert files["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()

    local = outputs(env, clip_dir, adapter)
    assert outputs(env, clip_dir, "user/coop-demo") == local  # bit-identical through the Hub

    # the base model was a local folder: no path is pushed (it means nothing elsewhere), so the CLI asks for it
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "image.png")
    predict = ("predict", "--adapter", "user/coop-demo", tmp_path / "image.png", "--top-k", "2")
    result = cli(env, *predict, check=False)
    assert result.returncode == 2 and "does not name its base model; pass --model" in result.stderr
    result = cli(env, *predict, "--model", clip_dir)
    assert re.match(r".*image.png: (cat|dog|red car) [01]\.\d{3}, (cat|dog|red car) [01]\.\d{3}\n", result.stdout)

    # cached: loads again with HF_HUB_OFFLINE=1
    assert outputs({**env, "HF_HUB_OFFLINE": "1"}, clip_dir, "user/coop-demo") == local


def test_model_card(hub, adapter, clip_dir, tmp_path):
    state, env = hub
    files = {p.name: p.read_bytes() for p in clip_dir.iterdir() if p.is_file()}
    state.repos["tiny/clip"] = {"branches": {"main": "2" * 40}, "commits": {"2" * 40: files}}
    cli(
        {**env, "HF_TOKEN": TOKEN}, "push", "--adapter", adapter, "--repo", "user/card", "--dataset", "tiny/images",
        "--base-model", "tiny/clip",
    )  # fmt: skip
    (tmp_path / "README.md").write_bytes(head(state, "user/card")["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "tiny/clip" and "base_model:adapter:tiny/clip" in card.data.tags
    assert card.data.pipeline_tag is None  # the Hub's widget cannot load this adapter: none is offered
    tags = {"peft-prompt-clip", "prompt-learning", "coop", "class-specific-context", "zero-shot-image-classification"}
    assert tags | {"transformers"} <= set(card.data.tags)
    assert card.data.datasets == ["tiny/images"] and card.data.metrics == ["accuracy"]
    (index,) = card.data.to_dict()["model-index"]
    metrics = {m["name"]: m["value"] for m in index["results"][0]["metrics"]}
    # the adapter is credited with its own accuracy only; the base model's zero-shot is in the text's table
    assert (
        metrics == {"top-1 accuracy, learned prompt": 0.8333}
        and index["results"][0]["dataset"]["type"] == "tiny/images"
    )
    assert "| learned prompt | 0.8333 | 1.0000 |" in card.text and "| zero-shot | 0.5000 | 1.0000 |" in card.text

    # the usage snippet runs as written (with an image.jpg beside it)
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "image.jpg")
    result = python(snippet, env, cwd=tmp_path)
    assert re.search(r"\[\[\('(cat|dog|red car)', [01]\.\d+", result.stdout)


def test_a_local_base_model_is_left_out_of_the_card_not_sent(hub, adapter, clip_dir, tmp_path):
    """No local path reaches the Hub: not the base model's or tokenizer's folder, not the evaluated data's."""
    state, env = hub
    local = tmp_path / "adapter"
    shutil.copytree(adapter, local)
    config = json.loads((local / "adapter_config.json").read_text())
    (local / "adapter_config.json").write_text(json.dumps({**config, "tokenizer_name_or_path": str(clip_dir)}))
    results = json.loads((local / "eval_results.json").read_text())
    data = f"{tmp_path}/photos, its 'test' split"
    (local / "eval_results.json").write_text(json.dumps({**results, "data": data}))
    result = cli({**env, "HF_TOKEN": TOKEN}, "push", "--adapter", local, "--repo", "user/local-base")
    assert "is not a Hub model id, so the card names no base model" in result.stderr
    pushed = head(state, "user/local-base")
    for name, content in pushed.items():
        assert str(tmp_path).encode() not in content and str(clip_dir).encode() not in content, name
    shared = json.loads(pushed["adapter_config.json"])
    assert shared["base_model_name_or_path"] is None and shared["tokenizer_name_or_path"] is None
    assert json.loads(pushed["eval_results.json"])["data"] == "photos, its 'test' split"
    (tmp_path / "README.md").write_bytes(pushed["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and not any(t.startswith("base_model:") for t in card.data.tags)
    assert 'AutoModel.from_pretrained("BASE_MODEL_ID")' in card.text
    # the test server refuses what the Hub refuses: a card naming a local path as its base model
    bad = card.content.replace("library_name: peft", f"library_name: peft\nbase_model: {clip_dir}")
    upload = f"""
from huggingface_hub import HfApi
api = HfApi(token={TOKEN!r})
api.upload_file(path_or_fileobj={bad.encode()!r}, path_in_repo="README.md", repo_id="user/local-base")
"""
    result = python(upload, env, check=False)
    assert result.returncode != 0 and "is not valid: use a model id" in result.stderr


def test_peft_push_to_hub_and_revisions(hub, clip_dir, adapter):
    state, env = hub
    push = f"""
import torch, peft_prompt_clip
from peft import PeftModel
from transformers import CLIPModel
model = PeftModel.from_pretrained(CLIPModel.from_pretrained({str(clip_dir)!r}), {str(adapter)!r}, is_trainable=True)
model.push_to_hub("user/peft-push", token={TOKEN!r})
with torch.no_grad():
    next(p for p in model.parameters() if p.requires_grad).add_(1.0)
model.push_to_hub("user/peft-push", token={TOKEN!r})
"""
    python(push, env)
    repo = state.repos["user/peft-push"]
    first = next(sha for sha in repo["commits"] if sha not in ("0" * 40, repo["branches"]["main"]))
    old, new = outputs(env, clip_dir, "user/peft-push", revision=first), outputs(env, clip_dir, "user/peft-push")
    assert old == outputs(env, clip_dir, adapter) and new != old
    # the CLI loads a revision too: the context moved by 1.0 in every coordinate, so its distances to words differ
    by_revision = cli(env, "interpret", "--adapter", "user/peft-push", "--revision", first, "--top-k", "1")
    latest = cli(env, "interpret", "--adapter", "user/peft-push", "--top-k", "1")
    assert by_revision.stdout != latest.stdout


def test_the_documented_python_route_pushes_this_packages_card(hub, clip_dir, adapter, tmp_path):
    """docs/hub.md: `model.push_to_hub` sends PEFT's generic card; `save_pretrained` + `push_adapter` sends ours."""
    state, env = hub
    push = f"""
import peft_prompt_clip
from peft import PeftModel
from transformers import CLIPModel
from peft_prompt_clip.hub import push_adapter
model = PeftModel.from_pretrained(CLIPModel.from_pretrained({str(clip_dir)!r}), {str(adapter)!r})
model.push_to_hub("user/peft-route", token={TOKEN!r})
model.save_pretrained({str(tmp_path / "saved")!r})
push_adapter({str(tmp_path / "saved")!r}, "user/our-route", token={TOKEN!r})
"""
    python(push, env)

    def card(repo: str) -> str:
        return state.repos[repo]["commits"][state.repos[repo]["branches"]["main"]]["README.md"].decode()

    ours, peft_card = card("user/our-route"), card("user/peft-route")
    assert "import peft_prompt_clip" in ours and "pipeline_tag" not in ours and "- prompt-learning" in ours
    # PEFT's push_to_hub (transformers' PushToHubMixin) uploads transformers' blank card, which takes no model tags:
    # save_pretrained's card has them (test_every_card_peft_writes_carries_the_methods_tags), this one cannot
    assert "import peft_prompt_clip" not in peft_card and "- peft-prompt-clip" not in peft_card


@pytest.mark.parametrize(
    "args, message",
    [
        (("eval", "--adapter", "user/missing", "--data", "."), "No Hub repo 'user/missing'"),
        (("predict", "--adapter", "user/empty", "x.png"), "has no adapter_config.json"),
        (("push", "--adapter", "{adapter}", "--repo", "user/x"), "needs a Hugging Face token"),
    ],
)
def test_hub_mistakes_are_one_line(hub, adapter, args, message):
    state, env = hub
    state.repos.setdefault("user/empty", {"branches": {"main": "0" * 40}, "commits": {"0" * 40: {}}})
    result = cli(env, *[a.format(adapter=adapter) for a in args], check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_width_mismatch_through_the_hub(hub, adapter, tmp_path):
    from peft_prompt_clip.tiny import save_tiny_clip

    state, env = hub
    cli({**env, "HF_TOKEN": TOKEN}, "push", "--adapter", adapter, "--repo", "user/narrow")
    wide = save_tiny_clip(tmp_path / "wide", hidden=48)
    result = cli(env, "predict", "--adapter", "user/narrow", "--model", wide, "x.png", check=False)
    assert result.returncode == 2 and "text width 32" in result.stderr


@pytest.mark.parametrize("method", METHODS)
def test_every_card_peft_writes_carries_the_methods_tags(clip_dir, method, tmp_path):
    """`save_pretrained`'s card (PEFT's) is tagged with this package, prompt learning and the adapter's own method
    (a MaPLe card is not also `coop`), read back with huggingface_hub's `ModelCard`."""
    model = adapted(method, clip_dir)
    model.save_pretrained(tmp_path)
    tags = set(ModelCard.load(tmp_path / "README.md").data.tags)
    own = {"coop": "coop", "csc": "coop", "kgcoop": "coop", "cocoop": "cocoop", "ivlp": "ivlp", "promptsrc": "ivlp",
           "maple": "maple", "tcp": "tcp"}[method]  # fmt: skip
    assert {"peft-prompt-clip", "prompt-learning", own, "transformers", "zero-shot-image-classification"} <= tags
    assert not tags & ({"coop", "cocoop", "ivlp", "maple", "tcp"} - {own}), tags
    assert ("class-specific-context" in tags) == (method == "csc")
