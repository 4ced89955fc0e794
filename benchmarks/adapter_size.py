"""Adapter size: bytes of adapter_model.safetensors against the raw context bytes and the full model's size.

Full-size CLIP configs with random weights (sizes do not depend on the values). Prints a table and writes
benchmarks/results/adapter_size.json.

Run: python benchmarks/adapter_size.py
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from common import SIZES, clip_config
from peft import get_peft_model
from transformers import CLIPModel, CLIPTextModel

from peft_prompt_clip import PromptEmbeddingConfig

ADAPTERS = {
    "CoOp n_ctx=4": dict(n_ctx=4),
    "CoOp n_ctx=16": dict(n_ctx=16),
    "CoOp CSC n_ctx=16, 100 classes": dict(n_ctx=16, class_specific=True, num_classes=100),
}


def main() -> list[dict]:
    rows = []
    for model_name in SIZES:
        config = clip_config(model_name)
        with torch.device("meta"):
            full_bytes = sum(p.numel() * 4 for p in CLIPModel(config).parameters())  # fp32 checkpoint
        text_model = CLIPTextModel(config.text_config)
        for adapter_name, kwargs in ADAPTERS.items():
            model = get_peft_model(text_model, PromptEmbeddingConfig(**kwargs))
            raw = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                size = os.path.getsize(Path(folder) / "adapter_model.safetensors")
            text_model = model.unload()
            rows.append(
                {
                    "model": model_name,
                    "adapter": adapter_name,
                    "file_bytes": size,
                    "raw_context_bytes": raw,
                    "header_bytes": size - raw,
                    "file_over_raw": size / raw,
                    "full_model_bytes": full_bytes,
                    "file_over_full_model": size / full_bytes,
                }
            )
    print(f"{'model':9} {'adapter':32} {'file':>10} {'raw ctx':>10} {'header':>7} {'file/raw':>9} {'file/full':>11}")
    for r in rows:
        print(
            f"{r['model']:9} {r['adapter']:32} {r['file_bytes']:>10,} {r['raw_context_bytes']:>10,} "
            f"{r['header_bytes']:>7} {r['file_over_raw']:>9.4f} {r['file_over_full_model']:>11.2e}"
        )
    out = Path(__file__).parent / "results" / "adapter_size.json"
    out.write_text(json.dumps({"machine": platform.platform(), "torch": torch.__version__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
