"""Where the learned context goes in a tokenised prompt.

A text arrives tokenised as `[SOS] t_1 ... t_m [EOS] [pad ...]` (CLIP), or `t_1 ... t_m [EOS] [pad ...]` (SigLIP).
The adapter makes room for `n_ctx` context vectors by inserting placeholder tokens (followed by the adapter's fixed
tokens, if any: MaPLe's "of a"), so that every module downstream of the embeddings (the causal mask, the pooling at the
end-of-text token) sees a consistent sequence. The positions of the context are a function of the end-of-text index and
of whether the text ends with the suffix (CoOp's period), so they can be derived again from the expanded ids alone: the
placeholder ids are never searched for, and a text containing the placeholder's word is harmless.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .options import ClassTokenPosition


class Pooling(str, enum.Enum):
    """Where a text tower pools a prompt into its feature."""

    EOS = "eos"  # the first end-of-text id (CLIP, GroupViT)
    ARGMAX = "argmax"  # the highest id, the end-of-text token (OWL-ViT; CLIP configs with the legacy eos_token_id 2)
    LAST = "last"  # the last position, usually padding (SigLIP, SigLIP 2): a prompt keeps the model's full length


def end_of_text_index(input_ids: torch.Tensor, pooling: Pooling, eos_token_id: int) -> torch.Tensor:
    """Index of each row's end-of-text token, by the text model's rule: the highest id for `Pooling.ARGMAX`, else the
    first `eos_token_id`.

    Raises:
        `ValueError`: when a row has no end-of-text token.
    """
    if pooling == Pooling.ARGMAX:
        return input_ids.to(torch.int).argmax(dim=-1)
    is_eos = input_ids == eos_token_id
    if not bool(is_eos.any(dim=-1).all()):
        raise ValueError(
            f"Every text must end with the end-of-text token (id {eos_token_id}); tokenise with the model's own "
            "tokenizer or processor, which adds it."
        )
    return is_eos.to(torch.int).argmax(dim=-1)


def write_at(hidden: torch.Tensor, slots: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`hidden` `(batch, length, width)` with `tokens` (`(n, width)`, or one set per row `(batch, n, width)`) in
    place of the vectors at positions `slots` (`(batch, n)`, or `(1, n)` for every row); out of place."""
    batch, _, width = hidden.shape
    index = slots.expand(batch, -1)[..., None].expand(-1, -1, width)
    return hidden.scatter(1, index, tokens.to(hidden.dtype).expand(batch, -1, -1))


@dataclass(frozen=True)
class PromptLayout:
    """How one adapter arranges its context around a text.

    Args:
        n_ctx (`int`): number of context vectors.
        position (`ClassTokenPosition`): where the text sits relative to the context.
        suffix_token_ids (`tuple[int, ...]`): ids that stay after the context when a text ends with them.
        eos_token_id (`int`): the end-of-text id of the text model.
        placeholder_id (`int`): id written into the context slots; never the end-of-text id, never a suffix id, and
            below the end-of-text id for models that pool at the highest id.
        max_positions (`int`): the text model's number of positions.
        pooling (`Pooling`): where the text model pools. With `Pooling.LAST` the sequence keeps its length (padding
            to the model's length is part of its input) and the context takes the place of trailing padding.
        prefix_length (`int`, defaults to 1): tokens before the text (CLIP's start-of-text; 0 for SigLIP).
        fixed_token_ids (`tuple[int, ...]`, defaults to `()`): ids inserted right after the context and kept as they
            are (MaPLe's "of a" after its learned "a photo"); only with the text at the end.
    """

    n_ctx: int
    position: ClassTokenPosition
    suffix_token_ids: tuple[int, ...]
    eos_token_id: int
    placeholder_id: int
    max_positions: int
    pooling: Pooling = Pooling.EOS
    prefix_length: int = 1
    fixed_token_ids: tuple[int, ...] = ()

    @property
    def inserted(self) -> int:
        """Tokens inserted into each prompt: the context and the fixed tokens after it."""
        return self.n_ctx + len(self.fixed_token_ids)

    def check_lengths(self, lengths: Sequence[int], texts: Sequence[str] | None = None, padded: int = 0) -> None:
        """The one check that prompts fit the model: each text of `lengths[i]` tokens (start and end tokens included)
        plus the inserted tokens must fit the model's positions, or, for `Pooling.LAST`, the `padded` length the texts
        keep.

        Raises:
            `ValueError`: naming the texts (when given) that are too long, and the fix.
        """
        keeps_length = self.pooling == Pooling.LAST and padded
        limit = padded if keeps_length else self.max_positions
        too_long = [i for i, n in enumerate(lengths) if n + self.inserted > limit]
        if not too_long:
            return
        longest = max(lengths[i] for i in too_long)
        what = (
            f"These prompts: {[texts[i] for i in too_long[:5]]}"
            if texts is not None
            else f"A text of {longest} tokens"
        )
        if keeps_length:
            raise ValueError(
                f"{what} leave no room for the {self.inserted} context tokens: this model pools at the last position, "
                f"so a prompt keeps its padded length ({padded}) and the context replaces padding. Tokenise with "
                "padding='max_length' (as the model expects), shorten the text or use a smaller n_ctx."
            )
        verb = "need" if texts is not None else "needs"
        raise ValueError(
            f"{what} plus {self.inserted} context tokens {verb} {longest + self.inserted} positions, but the model "
            f"has max_position_embeddings={self.max_positions}. Shorten the text or use a smaller n_ctx."
        )

    def end_of_text_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of each row's end-of-text token, found by the same rule as the text model."""
        return end_of_text_index(input_ids, self.pooling, self.eos_token_id)

    def _suffix_length(
        self, input_ids: torch.Tensor, eos_index: torch.Tensor, min_start: torch.Tensor
    ) -> torch.Tensor:
        """Per row, `len(suffix)` where the tokens just before end-of-text are the suffix (starting at or after
        `min_start`), else 0."""
        n = len(self.suffix_token_ids)
        if n == 0 or self.position == ClassTokenPosition.END:
            return torch.zeros_like(eos_index)
        offsets = torch.arange(-n, 0, device=input_ids.device)
        index = (eos_index[:, None] + offsets).clamp(min=0)
        suffix = torch.tensor(self.suffix_token_ids, device=input_ids.device, dtype=input_ids.dtype)
        matches = (input_ids.gather(1, index) == suffix).all(dim=-1) & (eos_index - n >= min_start)
        return matches.to(eos_index.dtype) * n

    def context_positions(self, eos_index: torch.Tensor, suffix_length: torch.Tensor) -> torch.Tensor:
        """Positions `(batch, n_ctx)` of the context in a prompt whose end-of-text token is at `eos_index`."""
        n = self.n_ctx
        steps = torch.arange(n, device=eos_index.device)
        if self.position == ClassTokenPosition.END:
            return (self.prefix_length + steps).expand(eos_index.shape[0], n)
        # the context after the text ends right before the suffix: [SOS ... text ctx suffix EOS]
        after_text = n - n // 2 if self.position == ClassTokenPosition.MIDDLE else n
        start = eos_index - suffix_length - after_text
        if self.position == ClassTokenPosition.FRONT:
            return start[:, None] + steps
        half = n // 2
        first = (self.prefix_length + steps[:half]).expand(eos_index.shape[0], half)
        second = start[:, None] + steps[:after_text]
        return torch.cat([first, second], dim=1)

    def expand(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Insert `n_ctx` placeholder tokens (and the fixed tokens after them) into each row and drop padding past the
        longest prompt.

        Returns the new `input_ids` and `attention_mask` (ones at the inserted slots).
        """
        batch, length = input_ids.shape
        eos = self.end_of_text_index(input_ids)
        longest = int(eos.max()) + 1
        self.check_lengths([longest], padded=length)
        inserted = self.inserted
        needed = longest + inserted
        new_eos = eos + inserted
        suffix = self._suffix_length(input_ids, eos, torch.full_like(eos, self.prefix_length))
        slots = self.context_positions(new_eos, suffix)
        tokens = [self.placeholder_id] * self.n_ctx
        if self.fixed_token_ids:  # right after the context, which then starts after the prefix (the text at the end)
            slots = self.prefix_length + torch.arange(inserted, device=input_ids.device).expand(batch, -1)
            tokens += self.fixed_token_ids
        is_inserted = torch.zeros(batch, length + inserted, dtype=torch.bool, device=input_ids.device)
        is_inserted.scatter_(1, slots, True)
        # every row has exactly `length` slots of its own, filled with its tokens in order
        ids = input_ids.new_empty((batch, length + inserted))
        ids.scatter_(1, slots, input_ids.new_tensor(tokens).expand(batch, -1))
        ids[~is_inserted] = input_ids.reshape(-1)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.new_ones((batch, length + inserted))
            mask[~is_inserted] = attention_mask.reshape(-1)
        keep = length if self.pooling == Pooling.LAST else needed  # SigLIP: same length, the last pads dropped
        return ids[:, :keep], None if mask is None else mask[:, :keep]

    def locate(self, expanded_ids: torch.Tensor) -> torch.Tensor:
        """Positions `(batch, n_ctx)` of the context in ids made by [`expand`]."""
        eos = self.end_of_text_index(expanded_ids)
        # the suffix can only start after the prefix and the context
        suffix = self._suffix_length(expanded_ids, eos, torch.full_like(eos, self.prefix_length + self.n_ctx))
        return self.context_positions(eos, suffix)
