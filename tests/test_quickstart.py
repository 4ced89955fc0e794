"""The README's first command: a prompt is learned end to end, saved in a few KB and reloaded exactly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_learns_the_teachers_prompt(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "100", "--output", str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    zero_shot = float(re.search(r"zero-shot prompt\s+([\d.]+)", result.stdout).group(1))
    learned = float(re.search(r"learned prompt\s+([\d.]+)", result.stdout).group(1))
    assert learned > zero_shot + 0.15, result.stdout
    assert "reloaded outputs identical: True" in result.stdout
    raw = 8 * 4 * 32 * 4  # 8 classes x 4 context vectors x width 32, float32
    assert raw <= (tmp_path / "a" / "adapter_model.safetensors").stat().st_size <= raw + 2048
