"""Class prompts that begin with the same tokens, encoded with that beginning computed once.

With a shared context at the end position every class prompt starts `[SOS] ctx_1 ... ctx_n`; with a template, `[SOS]
a photo of a`. A causal text tower (CLIP, GroupViT, OWL-ViT) computes the hidden states of those shared positions
identically for every prompt, in every layer. [`CausalTextTower`] runs them once (per image for CoCoOp, whose context
is shared by the classes of one image), keeps each layer's keys and values, and runs only each prompt's own tokens,
attending to the prefix's keys and values and to their own causal past: the same features, and through autograd the
same gradient, as the whole prompts through the model's forward, with the model's own weights. SigLIP's text tower
attends both ways (every position sees the class name), so nothing is shared there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: The parts of an encoder layer the shared-prefix path runs (CLIP's pre-norm layer; GroupViT and OWL-ViT copy it).
LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")

#: Deep prompts: `write(i, hidden)` gives the hidden states that enter layer `i`, with that layer's learned tokens in
#: place where it has them
DeepWrite = Callable[[int, torch.Tensor], torch.Tensor]
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale")


def common_prefix_length(ids: torch.Tensor) -> int:
    """How many leading positions all rows of `ids` `(rows, length)` share."""
    differs = (ids != ids[:1]).any(dim=0)
    return int(differs.to(torch.int).argmax()) if bool(differs.any()) else ids.shape[1]


@dataclass(frozen=True)
class CausalTextTower:
    """The layers, final norm and projection of a causal text tower, run with a prefix shared by groups of prompts.

    Args:
        layers (`Sequence[nn.Module]`): the text encoder's layers.
        final_layer_norm (`nn.Module`): the norm after them.
        projection (`nn.Module`): the model's `text_projection`.
    """

    layers: Sequence[nn.Module]
    final_layer_norm: nn.Module
    projection: nn.Module

    @classmethod
    def of(cls, model: nn.Module, text_model: nn.Module) -> CausalTextTower | None:
        """The tower of `model` whose text model is `text_model`, or None when its layers are not of the known
        pre-norm kind (then prompts go through the model's own forward)."""
        layers = getattr(getattr(text_model, "encoder", None), "layers", None)
        final = getattr(text_model, "final_layer_norm", None)
        projection = getattr(model, "text_projection", None)
        if layers is None or final is None or projection is None:
            return None
        known = all(
            all(hasattr(layer, p) for p in LAYER_PARTS) and all(hasattr(layer.self_attn, p) for p in ATTENTION_PARTS)
            for layer in layers
        )
        return cls(list(layers), final, projection) if known else None

    def prefix_states(
        self, prefix: torch.Tensor, deep: DeepWrite | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values `(groups, heads, P, head_dim)` of the prefixes `(groups, P, width)`
        (embeddings with their positions), which attend causally among themselves; `deep` writes deep prompts."""
        states = []
        x = prefix
        for i, layer in enumerate(self.layers):
            x = x if deep is None else deep(i, x)
            attention = layer.self_attn
            h = layer.layer_norm1(x)
            k, v = _heads(attention, attention.k_proj(h)), _heads(attention, attention.v_proj(h))
            states.append((k, v))
            if i + 1 == len(self.layers):
                break  # the last layer's output at the prefix is never used
            q = _heads(attention, attention.q_proj(h))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attention.scale)
            x = x + attention.out_proj(_merge(out))
            x = x + layer.mlp(layer.layer_norm2(x))
        return states

    def features(
        self,
        suffix: torch.Tensor,
        states: list[tuple[torch.Tensor, torch.Tensor]],
        pool_index: torch.Tensor,
        deep: DeepWrite | None = None,
    ) -> torch.Tensor:
        """Projected features `(rows, dim)` of prompts whose own positions are `suffix` `(rows, S, width)`
        (embeddings with their positions), rows `r * rows // groups ...` following the prefix of group `r`; pooled at
        `pool_index` (positions within the suffix); `deep` writes deep prompts at the suffix's positions."""
        rows, length = suffix.shape[:2]
        groups, prefix = states[0][0].shape[0], states[0][0].shape[2]
        # suffix position i sees the whole prefix and its own positions up to i
        mask = torch.ones(length, prefix + length, dtype=torch.bool, device=suffix.device).tril(prefix)
        x = suffix
        for i, (layer, (prefix_k, prefix_v)) in enumerate(zip(self.layers, states, strict=True)):
            x = x if deep is None else deep(i, x)
            attention = layer.self_attn
            h = layer.layer_norm1(x)
            q = _heads(attention, attention.q_proj(h))
            k = torch.cat([_per_row(prefix_k, rows, groups), _heads(attention, attention.k_proj(h))], dim=2)
            v = torch.cat([_per_row(prefix_v, rows, groups), _heads(attention, attention.v_proj(h))], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attention.scale)
            x = x + attention.out_proj(_merge(out))
            x = x + layer.mlp(layer.layer_norm2(x))
        pooled = x[torch.arange(rows, device=x.device), pool_index]
        return self.projection(self.final_layer_norm(pooled))


def _heads(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.view(*x.shape[:2], attention.num_heads, attention.head_dim).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)


def _per_row(states: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """A group's prefix keys or values for each of its rows (groups are contiguous, of equal size)."""
    if groups == 1:
        return states.expand(rows, -1, -1, -1)
    return states.repeat_interleave(rows // groups, dim=0)
