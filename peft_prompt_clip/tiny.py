"""Tiny CLIP-architecture models and a real (tiny) CLIP BPE tokenizer, built from configs with random weights.

They run the library's real code paths offline (`from_pretrained` on a folder, tokenisation, padding) in seconds:
the tests, the quickstart and the examples use them. They have no pretrained knowledge.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

try:  # transformers 5: the PIL backend (the default one needs torchvision)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor

WORDS = (
    "a photo of the cat dog bird car x ray x-ray airplane ship truck frog horse deer "
    "small large red blue picture . , ! x"
).split()


def _byte_chars() -> list[str]:
    # GPT-2/CLIP byte-to-unicode table: every byte gets a printable character
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache
def vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Byte-level vocabulary plus the merges that make each of `WORDS` one token, then the special tokens."""
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            joined = parts[0] + parts[1]
            if merge not in merges:
                merges.append(merge)
                tokens.append(joined)
            parts = [joined] + parts[2:]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write a CLIP BPE tokenizer for the words in `WORDS` (any other text falls back to bytes) to `folder`."""
    vocab, merges = vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # from_pretrained reads vocab.json + merges.txt under transformers 4 and 5 alike
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=24)
    tok.save_pretrained(folder)
    return tok


def clip_config(hidden: int = 32, max_positions: int = 24, legacy_eos: bool = False) -> CLIPConfig:
    """A two-layer CLIP config of text width `hidden` that matches the tiny tokenizer's ids."""
    vocab, _ = vocab_and_merges()
    text = {
        "hidden_size": hidden,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": len(vocab),
        "max_position_embeddings": max_positions,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": 2 if legacy_eos else vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
        "projection_dim": 16,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 30,
        "patch_size": 6,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def save_tiny_clip(folder: Path, seed: int = 0, **config_kwargs) -> Path:
    """Save a random tiny `CLIPModel` with its tokenizer and processor in `folder`, as `from_pretrained` expects."""
    torch.manual_seed(seed)
    model = CLIPModel(clip_config(**config_kwargs)).eval()
    model.save_pretrained(folder)
    tokenizer = save_tokenizer(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder
