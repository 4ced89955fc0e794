"""Sharing adapters on the Hugging Face Hub: a model card that says what the adapter is, and a push of the adapter's
files (loading by repo id is `load_prompt_model` / `PeftModel.from_pretrained`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, get_token

from .loading import CONFIG_NAME, WEIGHTS_NAME, resolve_adapter

RESULTS_NAME = "eval_results.json"


def model_card(folder: str | Path, repo_id: str, datasets: list[str] | None = None) -> str:
    """
    The `README.md` of an adapter: YAML metadata (library, base model, task, tags, datasets, metrics) followed by what
    the adapter learned, its results when `eval_results.json` is present, and a usage snippet that runs as written.
    """
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    results = json.loads((folder / RESULTS_NAME).read_text()) if (folder / RESULTS_NAME).is_file() else None
    base = config.get("base_model_name_or_path") or "openai/clip-vit-base-patch32"
    method = "CoOp with class-specific context (CSC)" if config.get("class_specific") else "CoOp"
    tags = ["prompt-learning", "coop", "peft-prompt-clip", "clip"]
    if config.get("class_specific"):
        tags.append("class-specific-context")
    header: dict[str, Any] = {
        "library_name": "peft",
        "base_model": base,
        "pipeline_tag": "zero-shot-image-classification",
        "tags": tags,
    }
    if datasets:
        header["datasets"] = list(datasets)
    table = ""
    if results and "zero-shot" in results:
        header["metrics"] = ["accuracy"]
        table = "\n## Results\n\n| prompt | top-1 | top-5 |\n| --- | ---: | ---: |\n" + "".join(
            f"| {name} | {results[name]['top1']:.4f} | {results[name]['top5']:.4f} |\n"
            for name in ("zero-shot", "learned prompt")
        )
        table += f"\nOn the `{results.get('split', 'test')}` split, {results['learned prompt']['n']} images.\n"
    yaml = "\n".join(_yaml_line(k, v) for k, v in header.items())
    position = config.get("class_token_position", "end")
    names = config.get("class_names") or []
    classes = f"{len(names)} classes: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}." if names else ""
    return f"""---
{yaml}
---

# {repo_id}

A prompt adapter for `{base}`, learned with [peft-prompt-clip](https://pypi.org/project/peft-prompt-clip/):
{method}, {config.get("n_ctx")} learned context vectors (class token at the {position}) that replace the
hand-written words of CLIP's prompt. {classes}
{table}
## Usage

```python
import peft_prompt_clip  # registers the adapter type with PEFT
from peft import PeftModel
from PIL import Image
from transformers import AutoProcessor, CLIPModel

model = PeftModel.from_pretrained(CLIPModel.from_pretrained("{base}"), "{repo_id}")
processor = AutoProcessor.from_pretrained("{base}")
classifier = peft_prompt_clip.PromptClassifier(model, processor, model.peft_config["default"].class_names)
print(classifier.predict([Image.open("image.jpg")], top_k=3))
```

or `peft-prompt-clip predict --adapter {repo_id} image.jpg`.
"""


def _yaml_line(key: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{key}:\n" + "\n".join(f"- {json.dumps(v)}" for v in value)
    return f"{key}: {json.dumps(value)}"


def push_adapter(
    adapter: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    datasets: list[str] | None = None,
    commit_message: str = "Upload prompt adapter",
) -> str:
    """
    Upload a saved adapter (`adapter_config.json`, `adapter_model.safetensors`, `eval_results.json` if present) and
    its model card to the Hub repo `repo_id`, creating the repo if needed. Returns the commit URL.

    Args:
        adapter (`str` or `Path`): the folder written by `save_pretrained` or `peft-prompt-clip train`.
        repo_id (`str`): `user/name` or `org/name`.
        private (`bool`, *optional*, defaults to `False`): create the repo private.
        token (`str`, *optional*): a write token; by default the one `hf auth login` saved or `HF_TOKEN`.
        datasets (`list[str]`, *optional*): dataset ids for the card's metadata.
    """
    folder = Path(resolve_adapter(str(adapter)))
    token = token or get_token()
    if not token:
        raise ValueError("Pushing needs a Hugging Face token with write access: run `hf auth login`, set HF_TOKEN, "
                         "or pass --token.")  # fmt: skip
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
        for name in (CONFIG_NAME, WEIGHTS_NAME, RESULTS_NAME)
        if (folder / name).is_file()
    ]
    card = model_card(folder, repo_id, datasets).encode()
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    return api.create_commit(repo_id, operations, commit_message=commit_message).commit_url
