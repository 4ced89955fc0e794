"""Property tests of the prompt layout: for any batch of texts, the slots found again in the expanded ids are the
slots the context was inserted into, and taking them out gives back the text."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_prompt_clip import ClassTokenPosition
from peft_prompt_clip.layout import PromptLayout

SOS, EOS, PAD, DOT, P = 90, 99, 0, 7, 50
WORDS = st.sampled_from([11, 12, 13, DOT, P, SOS])  # texts may contain the period, the placeholder id, even SOS


@st.composite
def batches(draw):
    texts = draw(st.lists(st.lists(WORDS, max_size=6), min_size=1, max_size=4))
    length = max(len(t) for t in texts) + 2 + draw(st.integers(0, 3))
    rows = [[SOS, *t, EOS] + [PAD] * (length - len(t) - 2) for t in texts]
    return torch.tensor(rows), texts


@settings(max_examples=200, deadline=None)
@given(
    batch=batches(),
    n_ctx=st.integers(1, 5),
    position=st.sampled_from(list(ClassTokenPosition)),
    suffix=st.sampled_from([(), (DOT,), (DOT, 13)]),
    fixed=st.sampled_from([(), (12,), (DOT, 11, P)]),
)
def test_locate_finds_what_expand_inserted(batch, n_ctx, position, suffix, fixed):
    ids, texts = batch
    fixed = fixed if position == ClassTokenPosition.END else ()  # fixed words only before a text at the end
    layout = PromptLayout(n_ctx, position, suffix, EOS, placeholder_id=P, max_positions=64, fixed_token_ids=fixed)
    expanded, mask = layout.expand(ids, torch.ones_like(ids))
    slots = layout.locate(expanded)
    is_ctx = torch.zeros_like(expanded, dtype=torch.bool).scatter_(1, slots, True)
    assert int(is_ctx.sum()) == n_ctx * len(texts)  # n_ctx distinct slots per row
    for row, text in enumerate(texts):
        kept = expanded[row][~is_ctx[row]].tolist()
        assert kept[: len(text) + len(fixed) + 2] == [SOS, *fixed, *text, EOS]  # in order, around the context
        assert expanded[row].tolist().index(EOS) == len(text) + 1 + n_ctx + len(fixed)
        first = int(slots[row].min())
        if position == ClassTokenPosition.END:
            assert slots[row].tolist() == list(range(1, 1 + n_ctx))
        elif position == ClassTokenPosition.FRONT:
            has_suffix = len(suffix) > 0 and tuple(text[-len(suffix) :]) == suffix and len(text) >= len(suffix)
            assert first == 1 + len(text) - (len(suffix) if has_suffix else 0)
    assert (mask == 1).all()
