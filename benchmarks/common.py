"""What the benchmarks share: full-size CLIP configs (random weights have the real model's compute and size), the
device (CUDA when present, else CPU), timing by medians after a warm-up, and peak memory."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import CLIPConfig

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

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


def synchronize() -> None:
    """Wait for the device's queued work, so that a clock reading covers it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn`, after one warm-up call."""
    return interleaved_medians({"fn": fn}, repeats)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each of `fns`, timed in turn within each of `repeats` rounds after one warm-up round, so
    that drifts of the machine's speed touch all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def memory_gib() -> float:
    """Memory in use now: allocated on the GPU, or this process's resident memory on CPU."""
    if DEVICE.type == "cuda":
        return torch.cuda.memory_allocated() / 2**30
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**30


def peak_memory_gib() -> float:
    """Peak memory so far: allocated on the GPU, or this process's peak resident memory on CPU."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_name() -> str:
    """The device the numbers come from, for the results files."""
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads"
