"""What a learned context says: for each context vector, the nearest tokens of the vocabulary (CoOp's
interpret_prompt, with Euclidean distance, and by cosine similarity), for shared and class-specific context."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .config import printable
from .layer import find_prompt_layer


def nearest_words(
    model: torch.nn.Module, tokenizer: Any, k: int = 5, metric: str = "euclidean", adapter_name: str | None = None
) -> dict[str, list[list[tuple[str, float]]]]:
    """
    The `k` vocabulary tokens nearest to each context vector.

    Args:
        model: a model with a prompt adapter.
        tokenizer: its tokenizer, to decode token ids.
        k (`int`, *optional*, defaults to 5): tokens per context vector.
        metric (`str`, *optional*, defaults to `"euclidean"`): `"euclidean"` (distance, smaller is nearer; CoOp's
            choice) or `"cosine"` (similarity, larger is nearer).
        adapter_name (`str`, *optional*): which adapter; by default the active one.

    Returns:
        `dict`: `{"shared": [...]}` for a shared context, or one entry per class name (`class i` without names) for
        class-specific context; each a list over context positions of `[(token, score), ...]`, nearest first.
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}.")
    layer = find_prompt_layer(model)
    if layer is None:
        raise ValueError("The model has no prompt adapter to interpret.")
    name = adapter_name or layer.active_adapters[0]
    context = layer.prompt_embedding_ctx[name].detach().float()
    table = layer.token_embedding.weight.detach().float()
    if not 1 <= k <= table.shape[0]:
        raise ValueError(f"k must be between 1 and the vocabulary size {table.shape[0]}, got {k}.")
    rows = context.reshape(-1, context.shape[-1])
    if metric == "euclidean":
        scores, ids = torch.cdist(rows, table).topk(k, dim=-1, largest=False)
    else:
        scores, ids = (F.normalize(rows, dim=-1) @ F.normalize(table, dim=-1).T).topk(k, dim=-1)
    words = [
        [(_decode(tokenizer, i), s) for i, s in zip(row_ids.tolist(), row_scores.tolist(), strict=True)]
        for row_ids, row_scores in zip(ids, scores, strict=True)
    ]
    n_ctx = context.shape[-2]
    if context.dim() == 2:
        return {"shared": words}
    config = getattr(model, "peft_config", {}).get(name)
    names = (config.class_names if config is not None else None) or [f"class {i}" for i in range(context.shape[0])]
    return {names[c]: words[c * n_ctx : (c + 1) * n_ctx] for c in range(context.shape[0])}


def _decode(tokenizer: Any, token_id: int) -> str:
    token = tokenizer.convert_ids_to_tokens(token_id)
    return token.replace("</w>", "") if isinstance(token, str) else str(token_id)


def format_nearest_words(result: dict[str, list[list[tuple[str, float]]]], metric: str = "euclidean") -> str:
    """A readable table under a line that says what it shows: one line per context vector, its nearest tokens with
    their `metric` scores."""
    score = "Euclidean distance, smaller is nearer" if metric == "euclidean" else "cosine similarity, larger is nearer"
    lines = [f"the vocabulary tokens nearest to each learned context vector (in brackets: {score})"]
    for owner, positions in result.items():
        lines.append(f"{printable(owner)}:")
        for i, words in enumerate(positions):
            lines.append(f"  ctx {i + 1:2d}: " + ", ".join(f"{w} ({s:.3f})" for w, s in words))
    return "\n".join(lines)
