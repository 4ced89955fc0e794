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

WORDS = tuple(
    (
        "a photo of the cat dog bird car x ray x-ray airplane ship truck frog horse deer "
        "small large red blue picture . , ! x"
    ).split()
)


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
def vocab_and_merges(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """Byte-level vocabulary plus the merges that make each of `words` one token, then the special tokens."""
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
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


def save_tokenizer(folder: Path, words: tuple[str, ...] = WORDS, max_length: int = 24) -> CLIPTokenizer:
    """Write a CLIP BPE tokenizer for `words` (any other text falls back to bytes) to `folder`."""
    vocab, merges = vocab_and_merges(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # from_pretrained reads vocab.json + merges.txt under transformers 4 and 5 alike
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)
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
    save_processor(folder, save_tokenizer(folder), image_size=30)
    return folder


def save_processor(folder: Path, tokenizer: CLIPTokenizer, image_size: int, **image_kwargs) -> CLIPProcessor:
    """Save a CLIP processor (PIL image backend, so no torchvision) for `image_size` pixels with `tokenizer`."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **image_kwargs
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return processor


def save_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """Save a random tiny `SiglipModel` with the tiny CLIP BPE tokenizer (its padding token is its end-of-text token,
    as in SigLIP) and a SigLIP image processor in `folder`: `AutoModel` / `AutoProcessor` load it as a SigLIP."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    eos = len(vocab_and_merges()[0]) - 1
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {**tower, "vocab_size": eos + 1, "max_position_embeddings": 24, "pad_token_id": eos, "eos_token_id": eos}
    text["bos_token_id"] = None
    model = SiglipModel(SiglipConfig(text_config=text, vision_config={**tower, "image_size": 30, "patch_size": 6}))
    model.eval().save_pretrained(folder)
    save_tokenizer(folder)
    SiglipImageProcessor(size={"height": 30, "width": 30}).save_pretrained(folder)
    return folder
