"""Rebuild docs/images/report.png, the screenshot of `eval`'s HTML report in docs/training.md: class-specific CoOp
learned from 16 faded shots per class with the embedded model (4 more per class held out to choose the epoch),
evaluated on the faded test images, rendered by headless Chromium.

Run: python docs/report_screenshot.py   (about a minute; needs chromium)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from transformers import AutoProcessor, CLIPModel

from peft_prompt_clip import PromptClassifier, PromptEmbeddingConfig, evaluate, few_shot, get_prompt_model, hold_out
from peft_prompt_clip.demo import CLASSES, MODEL_DIR, demo_data, fade
from peft_prompt_clip.options import CLIP_TEMPLATE
from peft_prompt_clip.report import write_report
from peft_prompt_clip.training import LOG_NAME, PromptTrainer, TrainingArguments

OUT = Path(__file__).parent / "images" / "report.png"

if __name__ == "__main__":
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    pool, test = demo_data(fade)
    train, rest = hold_out(pool, 16)
    folder = Path(tempfile.mkdtemp())
    config = PromptEmbeddingConfig(ctx_init="a photo of a", class_specific=True, class_names=list(CLASSES))
    model = get_prompt_model(CLIPModel.from_pretrained(MODEL_DIR).eval(), config)
    args = TrainingArguments(output_dir=str(folder), epochs=50, optimizer="adamw", lr=3e-3, eval_every=2)
    PromptTrainer(model, processor, train, args, eval_data=few_shot(rest, 4)).train()
    results = {
        "split": "test",
        "data": "the faded Fashion-MNIST test images",
        "zero_shot_templates": list(CLIP_TEMPLATE),
        "zero-shot": evaluate(PromptClassifier(model, processor, CLASSES, CLIP_TEMPLATE, use_adapter=False), test),
        "learned prompt": evaluate(PromptClassifier(model, processor, CLASSES), test),
    }
    log = json.loads((folder / LOG_NAME).read_text())
    write_report(
        folder / "eval_results.html", results, log, "CoOp CSC, 16 faded shots: learned prompt against zero-shot"
    )
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--hide-scrollbars", f"--screenshot={OUT}",
         "--window-size=1150,1720", (folder / "eval_results.html").as_uri()],
        check=True,
    )  # fmt: skip
    print(f"wrote {OUT}")
