"""Write the reference pages that must not drift from the code: the config reference (from the dataclass fields'
help metadata) and the CLI reference (from each command's --help). `tests/test_docs.py` fails when they are stale.

Run: python docs/generate.py
"""

from __future__ import annotations

import dataclasses
import io
import os
from contextlib import redirect_stdout
from pathlib import Path

from peft import PeftConfig

from peft_prompt_clip import PromptEmbeddingConfig
from peft_prompt_clip.cli import build_parser

HERE = Path(__file__).parent / "reference"


def config_reference() -> str:
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    lines = [
        "# `PromptEmbeddingConfig` reference",
        "",
        "Generated from the dataclass by `python docs/generate.py`; PEFT's own fields (`base_model_name_or_path`,",
        "`inference_mode`, ...) are left out.",
        "",
        "| field | default | meaning |",
        "| --- | --- | --- |",
    ]
    for field in dataclasses.fields(PromptEmbeddingConfig):
        if field.name in inherited:
            continue
        default = field.default.value if hasattr(field.default, "value") else field.default
        lines.append(f"| `{field.name}` | `{default!r}` | {field.metadata['help']} |")
    return "\n".join(lines) + "\n"


def cli_reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix the width so the page is reproducible
    parser = build_parser()
    sections = ["# `peft-prompt-clip` reference", "", "Generated from `--help` by `python docs/generate.py`.", ""]
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in [("peft-prompt-clip", parser), *commands.items()]:
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            sub.print_help()
        sections += [f"## `{name if name == 'peft-prompt-clip' else 'peft-prompt-clip ' + name}`", "", "```text"]
        sections += [buffer.getvalue().rstrip(), "```", ""]
    return "\n".join(sections)


PAGES = {"config.md": config_reference, "cli.md": cli_reference}

if __name__ == "__main__":
    for name, render in PAGES.items():
        (HERE / name).write_text(render())
        print(f"wrote {HERE / name}")
