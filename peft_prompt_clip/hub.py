"""Sharing adapters on the Hugging Face Hub: a model card that says what the adapter is, and a push of the adapter's
files (loading by repo id is `load_prompt_model` / `PeftModel.from_pretrained`)."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token

from .config import printable
from .loading import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, resolve_adapter
from .report import RESULTS_NAME
from .storage import read_json

#: A Hub repo id: `name` or `owner/name`
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def hub_model_id(name: str | None) -> str | None:
    """`name` when it is a Hub model id (`name` or `owner/name`) and not a local path; else None."""
    if not name or os.path.exists(name) or ".." in name or not REPO_ID.fullmatch(name):
        return None
    return name


def model_card(
    folder: str | Path, repo_id: str, datasets: list[str] | None = None, base_model: str | None = None
) -> str:
    """
    The `README.md` of an adapter, built with `huggingface_hub`'s `ModelCard`: metadata (library, base model and its
    `base_model:adapter:<id>` tag, tags, datasets, a `model-index` with the learned prompt's accuracy when
    `eval_results.json` is present; the zero-shot accuracy is the base model's, in the text's table) followed by
    what the adapter learned, its results and a usage snippet that runs as written.

    Args:
        folder (`str` or `Path`): the adapter's folder.
        repo_id (`str`): the repo the card is for.
        datasets (`list[str]`, *optional*): Hub dataset ids the adapter was learned or evaluated on.
        base_model (`str`, *optional*): the Hub id of the base model; by default the adapter's
            `base_model_name_or_path` when that is a Hub id. A local path is never written (the Hub rejects it): the
            field is then left out, with a warning.
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    results = read_json(folder / RESULTS_NAME)
    if base_model is not None and hub_model_id(base_model) is None:
        raise ValueError(
            f"base_model must be a Hub model id such as 'openai/clip-vit-base-patch32', got {base_model!r}."
        )
    base = _base_model_id(config, base_model)
    if base is None:
        warnings.warn(
            f"The adapter's base model {config.base_model_name_or_path!r} is not a Hub model id, so the card names no "
            "base model (the Hub accepts ids only); pass base_model= (CLI: --base-model) with the base model's id.",
            stacklevel=2,
        )
    invalid = [d for d in datasets or [] if not REPO_ID.fullmatch(d)]
    if invalid:
        raise ValueError(f"datasets must be Hub dataset ids such as 'tanganke/eurosat', got {invalid}.")
    method = config.method
    tags = [*config.card_tags, "transformers"]
    deep = []
    if config.prompt_depth > 1:
        deep.append(f"learned tokens in the first {config.prompt_depth} layers of the text tower")
    if config.vision_n_ctx:
        how = "each a map of that layer's text tokens" if config.coupled else "learned"
        layers = config.vision_prompt_depth
        deep.append(f"{config.vision_n_ctx} vision tokens in the first {layers} layers of the image tower ({how})")
    depth = f" ({'; '.join(deep)})" if deep else ""
    tags += [f"base_model:adapter:{base}"] if base else []
    table, evaluations = "", []
    if results and "zero-shot" in results:
        split = results.get("split", "test")
        split = None if split == "all" else split  # data without splits: its images, less those trained on
        dataset = datasets[0] if datasets else "local"
        evaluations = [
            EvalResult(
                task_type="zero-shot-image-classification",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=split,
                metric_type="accuracy",
                metric_name="top-1 accuracy, learned prompt",
                metric_value=round(results["learned prompt"]["top1"], 4),
            )
        ]  # this adapter's result only: the base model's zero-shot accuracy is in the card's table, not credited here
        table = "\n## Results\n\n| prompt | top-1 | top-5 |\n| --- | ---: | ---: |\n" + "".join(
            f"| {name} | {results[name]['top1']:.4f} | {results[name]['top5']:.4f} |\n"
            for name in ("zero-shot", "learned prompt")
        )
        where = f"the `{split}` split" if split else "held-out images"
        table += f"\nOn {where}, {results['learned prompt']['n']} images.\n"
    data = ModelCardData(
        library_name="peft", base_model=base, tags=tags,  # no pipeline_tag: the Hub's widget cannot load this adapter
        datasets=list(datasets) if datasets else None, metrics=["accuracy"] if evaluations else None,
        model_name=repo_id, eval_results=evaluations or None,
    )  # fmt: skip
    names = [printable(n) for n in config.class_names or []]
    classes = f"{len(names)} classes: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}." if names else ""
    load = base or "BASE_MODEL_ID"  # a local path means nothing to the card's readers (and the Hub refuses it)
    position = config.class_token_position.value
    body = f"""
# {repo_id}

A prompt adapter for `{load}`, learned with [peft-prompt-clip](https://pypi.org/project/peft-prompt-clip/):
{method}, {config.n_ctx} learned context vectors (class token at the {position}){depth} that replace the
hand-written words of CLIP's prompt. {classes}
{table}
## Usage

```python
import peft_prompt_clip  # registers the adapter type with PEFT
from peft import PeftModel
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = PeftModel.from_pretrained(AutoModel.from_pretrained("{load}"), "{repo_id}")
processor = AutoProcessor.from_pretrained("{load}")
classifier = peft_prompt_clip.PromptClassifier(model, processor, model.peft_config["default"].class_names)
print(classifier.predict([Image.open("image.jpg")], top_k=3))
```

or `peft-prompt-clip predict --adapter {repo_id} image.jpg`.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push_adapter(
    adapter: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    datasets: list[str] | None = None,
    commit_message: str = "Upload prompt adapter",
    base_model: str | None = None,
) -> str:
    """
    Upload a saved adapter (`adapter_config.json`, `adapter_model.safetensors`, `eval_results.json` if present) and
    its model card to the Hub repo `repo_id`, creating the repo if needed. Returns the commit URL. No local path is
    sent: a base model or tokenizer named by a local folder becomes the base model's Hub id (`base_model`) or is left
    out, and the evaluated data is named without its folders.

    Args:
        adapter (`str` or `Path`): the folder written by `save_pretrained` or `peft-prompt-clip train`.
        repo_id (`str`): `user/name` or `org/name`.
        private (`bool`, *optional*, defaults to `False`): create the repo private.
        token (`str`, *optional*): a write token; by default the one `hf auth login` saved or `HF_TOKEN`.
        datasets (`list[str]`, *optional*): dataset ids for the card's metadata.
        commit_message (`str`, *optional*): the commit's message.
        base_model (`str`, *optional*): the base model's Hub id for the card (see [`model_card`]).
    """
    folder = Path(resolve_adapter(str(adapter)))
    token = token or get_token()
    if not token:
        raise ValueError("Pushing needs a Hugging Face token with write access: run `hf auth login`, set HF_TOKEN, "
                         "or pass --token.")  # fmt: skip
    card = model_card(folder, repo_id, datasets, base_model).encode()  # checks base_model and datasets first
    base = _base_model_id(read_adapter_config(folder), base_model)
    operations = [
        CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=_shared_config(folder, base)),
        CommitOperationAdd(path_in_repo=WEIGHTS_NAME, path_or_fileobj=str(folder / WEIGHTS_NAME)),
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card),
    ]
    results = read_json(folder / RESULTS_NAME)
    if isinstance(results, dict):
        results = {**results, "data": _no_local_paths(str(results.get("data", "")))}
        operations.append(
            CommitOperationAdd(path_in_repo=RESULTS_NAME, path_or_fileobj=json.dumps(results, indent=2).encode())
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
    except Exception as exc:  # the transport's own errors (httpx, requests) are no OSError
        raise _network_error(exc, f"create the Hub repo {repo_id!r}") from None
    try:
        return api.create_commit(repo_id, operations, commit_message=commit_message).commit_url
    except Exception as exc:  # as above
        raise _network_error(exc, f"push to the Hub repo {repo_id!r}") from None


#: The packages whose errors are the transport's (huggingface_hub has used requests, then httpx, then httpx2): any
#: class in an exception's ancestry from one of them makes it a network error
TRANSPORTS = re.compile(r"(requests|urllib3|httpx|httpcore|h11|h2|aiohttp)\d*")


def _network_error(exc: Exception, doing: str) -> Exception:
    """`exc` as the CLI reports it in one line: the Hub's answers and the transport's failures become an OSError."""
    modules = {cls.__module__.split(".")[0] for cls in type(exc).__mro__}
    if isinstance(exc, OSError) or any(TRANSPORTS.fullmatch(m) for m in modules):
        return OSError(f"Could not {doing}: {exc}")
    return exc


def _base_model_id(config: Any, base_model: str | None) -> str | None:
    """The base model's Hub id as the card and the pushed config name it: `base_model`, else the adapter's
    `base_model_name_or_path` where that is a Hub id; None for a local folder."""
    return base_model or hub_model_id(config.base_model_name_or_path)


def _shared_config(folder: Path, base: str | None) -> bytes:
    """The adapter's config as pushed: `base_model_name_or_path` the Hub id `base` (None: none), and no local path
    for its tokenizer."""
    config = read_json(folder / CONFIG_NAME)
    config["base_model_name_or_path"] = base
    if config.get("tokenizer_name_or_path") and hub_model_id(config["tokenizer_name_or_path"]) is None:
        config["tokenizer_name_or_path"] = None  # the base model's own tokenizer, wherever it is loaded from
    return json.dumps(config, indent=2).encode()


def _no_local_paths(text: str) -> str:
    """`text` with the folders of its absolute paths left out: `/home/me/shapes (all)` -> `shapes (all)`."""
    return re.sub(r"(?<![\w.~])(?:/[^/\s]+)*/(?=[^/\s])", "", text)
