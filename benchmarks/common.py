"""What the benchmarks share: full-size CLIP configs (random weights have the real model's compute and size) and
timing by medians after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from transformers import CLIPConfig

# text and vision towers of openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14
SIZES = {
    "ViT-B/32": (
        dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
        dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, patch_size=32),
        512,
    ),
    "ViT-L/14": (
        dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
        dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14),
        768,
    ),
}


def clip_config(size: str, **text_overrides) -> CLIPConfig:
    """The CLIP config of `size` ("ViT-B/32" or "ViT-L/14"), with text config fields overridden."""
    text, vision, projection_dim = SIZES[size]
    return CLIPConfig(text_config={**text, **text_overrides}, vision_config=vision, projection_dim=projection_dim)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn`, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
