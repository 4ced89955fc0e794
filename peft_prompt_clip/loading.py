"""The package's own entry points: attach a new prompt adapter, or load a saved one with clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .config import PEFT_TYPE, PromptEmbeddingConfig
from .errors import InvalidAdapterError
from .model import find_text_embeddings
from .storage import file_sha256, locked
from .variants import check_adapter_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def get_prompt_model(model: nn.Module, config: PromptEmbeddingConfig, adapter_name: str = "default") -> PeftModel:
    """
    Attach a new prompt adapter to a CLIP-family model; the same as `peft.get_peft_model`.

    Args:
        model (`nn.Module`): a `CLIPModel`, `CLIPTextModel` or `CLIPTextModelWithProjection`.
        config ([`PromptEmbeddingConfig`]): what to learn.
        adapter_name (`str`, *optional*, defaults to `"default"`): the adapter's name.

    Returns:
        `PeftModel`: the model, whose only trainable parameters are the context vectors.
    """
    if not isinstance(config, PromptEmbeddingConfig):
        raise TypeError(f"config must be a PromptEmbeddingConfig, got {type(config).__name__}.")
    return get_peft_model(model, config, adapter_name=adapter_name)


#: Models shipped in the package, by the name that loads them without a download (`--model fashion-clip`)
EMBEDDED_MODELS = {"fashion-clip": Path(__file__).parent / "assets" / "fashion-clip"}


def load_base_model(model_name: str) -> tuple[nn.Module, Any]:
    """
    A CLIP-family model of a supported family (CLIP, SigLIP, SigLIP 2, GroupViT, OWL-ViT), in eval mode, and its
    processor: from a local folder (recorded by its absolute path, which an adapter saves as its base model), an
    embedded model by its name ([`EMBEDDED_MODELS`]: `"fashion-clip"`, unless a folder of that name is here) or a Hub
    id. Anything else (a missing folder, a model without an image tower or of another family) is an error naming it.
    """
    from transformers import AutoModel, AutoProcessor

    path = Path(model_name).expanduser()
    if not path.is_dir() and model_name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[model_name]
    if path.is_dir():
        model_name = str(path.resolve())
    elif model_name.startswith((".", "/", "~")) or model_name.count("/") > 1 or "\\" in model_name:
        raise FileNotFoundError(f"No model folder at {model_name} (a Hub id is 'owner/name').")
    model = AutoModel.from_pretrained(model_name).eval()
    find_text_embeddings(model)  # says which families are supported when this is none of them
    if not hasattr(model, "get_image_features"):
        raise ValueError(
            f"{model_name} is a {type(model).__name__}, which has no image tower; give an image-text model."
        )
    return model, AutoProcessor.from_pretrained(model_name)


def load_prompt_model(
    model: nn.Module,
    adapter: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> PeftModel:
    """
    Load a saved prompt adapter (a folder or a Hub repo id) into `model`.

    Checks the files before PEFT reads them, so that a wrong, corrupt or foreign adapter fails with a message that
    names the file and the fix. Only JSON and safetensors are read.

    Args:
        model (`nn.Module`): the base model, or a `PeftModel` to add the adapter to (then `adapter_name` must be new).
        adapter (`str`): a folder with `adapter_config.json` and `adapter_model.safetensors`, or a Hub repo id.
        adapter_name (`str`, *optional*, defaults to `"default"`): the name to give the adapter.
        is_trainable (`bool`, *optional*, defaults to `False`): keep the context trainable, to go on training.
        revision (`str`, *optional*): branch, tag or commit of a Hub repo.
        token (`str`, *optional*): Hub token, for private repos.

    Returns:
        `PeftModel`: the model with the adapter active.
    """
    folder = resolve_adapter(adapter, revision=revision, token=token)
    with locked(Path(folder), shared=True):  # a save into this folder by another process finishes first
        config = read_adapter_config(folder)
        check_adapter_weights(folder, config)
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(folder, adapter_name=adapter_name, is_trainable=is_trainable)
                model.set_adapter(adapter_name)
                return model
            return PeftModel.from_pretrained(
                model, folder, adapter_name=adapter_name, is_trainable=is_trainable, config=config
            )
        except InvalidAdapterError:
            raise
        except ValueError as exc:  # the adapter does not fit this model (positions, family, ...)
            raise InvalidAdapterError(f"{adapter}: {exc}") from None


def read_adapter_config(folder: str | os.PathLike) -> PromptEmbeddingConfig:
    """The validated config of the adapter in `folder`; unknown keys are ignored with a warning (as PEFT does)."""
    config_path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidAdapterError(
            f"{config_path} is not valid JSON ({exc}); save or download the adapter again."
        ) from None
    if not isinstance(raw, dict) or raw.get("peft_type") != PEFT_TYPE:
        found = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise InvalidAdapterError(
            f"{config_path} describes a {found!r} adapter, not a prompt adapter ({PEFT_TYPE.value!r}); "
            "load other PEFT adapters with peft.PeftModel.from_pretrained."
        )
    try:
        return PromptEmbeddingConfig.from_peft_type(**raw)
    except (TypeError, ValueError) as exc:
        raise InvalidAdapterError(f"{config_path}: {exc}") from None


def check_adapter_weights(folder: str | os.PathLike, config: PromptEmbeddingConfig) -> None:
    """Check that the adapter's safetensors file is whole and holds the one context tensor its config describes."""
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapterError(
            f"{weights_path} is corrupt or truncated ({exc}); save or download the adapter again."
        ) from None
    check_adapter_tensors(tensors, config, weights_path)
    if config.weights_sha256 is not None and file_sha256(Path(weights_path)) != config.weights_sha256:
        raise InvalidAdapterError(
            f"{weights_path} is not the weights file that {CONFIG_NAME} was saved with (its SHA-256 differs): the two "
            "files come from different saves, as after an interrupted save. Save or download the adapter again."
        )


def resolve_adapter(adapter: str, revision: str | None = None, token: str | None = None) -> str:
    """
    Local folder holding the adapter's files: `adapter` itself, or the Hub cache folder they are downloaded to.

    Honours `HF_HUB_OFFLINE`, `HF_HOME` and the saved token as `huggingface_hub` does.
    """
    if os.path.isdir(adapter):
        missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(adapter, name))]
        if missing:
            raise FileNotFoundError(f"{adapter} is not a saved prompt adapter: it has no {' or '.join(missing)}.")
        return adapter
    if os.path.exists(adapter) or adapter.startswith((".", "/", "~")) or adapter.count("/") > 1:
        raise FileNotFoundError(
            f"No adapter folder at {adapter!r}; give a folder made by save_pretrained or a repo id."
        )
    paths = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths.append(hf_hub_download(adapter, name, revision=revision, token=token))
        except LocalEntryNotFoundError:  # before EntryNotFoundError, its parent class
            _refuse_mistyped_folder(adapter)
            raise FileNotFoundError(
                f"Cannot reach the Hub for {adapter!r} (offline: HF_HUB_OFFLINE is set or there is no network), and "
                f"its {name} is not in the local cache. Connect once to download it, or give a local folder."
            ) from None
        except RepositoryNotFoundError:
            _refuse_mistyped_folder(adapter)
            raise FileNotFoundError(
                f"No Hub repo {adapter!r} (or it is private: pass token= or log in with `hf auth login`)."
            ) from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"The Hub repo {adapter!r} has no revision {revision!r}.") from None
        except EntryNotFoundError:
            raise FileNotFoundError(
                f"The Hub repo {adapter!r} has no {name}: it holds no saved prompt adapter."
            ) from None
        except HfHubHTTPError as exc:
            raise OSError(f"Could not download {name} from the Hub repo {adapter!r}: {exc}") from None
    return os.path.dirname(paths[0])


def _refuse_mistyped_folder(adapter: str) -> None:
    """`out/nothing` beside a local folder `out`, when no Hub repo of that name can be had: a mistyped local path."""
    local = os.path.dirname(adapter)
    if local and os.path.isdir(local):
        raise FileNotFoundError(
            f"No adapter folder at {adapter!r} (the folder {local!r} has no {os.path.basename(adapter)!r}), and no "
            "Hub repo of that name could be had."
        )
