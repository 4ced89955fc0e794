"""Every code snippet of the README and the docs runs as written.

A page's snippets run in order, in a fresh process (the Python blocks share one namespace, as in a notebook), in a
folder that holds what the snippets name: `./eurosat` (`train/`, `val/`, `test/` of class folders), `cat.jpg`,
`image.jpg`, `img1.jpg`, `img2.jpg` and an adapter `./coop-eurosat` (unless the page trains it). Repo ids resolve
through a local server that speaks the Hub's API (`hub_server.py`): `openai/clip-vit-base-patch32` is a tiny CLIP
there, and pushes land there. Shell lines run with the installed `peft-prompt-clip` command, except installs
(`pip`), logging in (`hf`; `HF_TOKEN` stands in) and `accelerate launch` (several processes:
`test_distributed.py`); any other command fails the test.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from hub_server import client_env, serve
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
NOT_RUN = {"pip", "hf", "accelerate"}
TOKEN = "hf_snippets"
BASE_REPO = "openai/clip-vit-base-patch32"


def program(page: Path) -> str:
    """The page's snippets as one Python program; shell lines become calls of the installed command."""
    command = str(Path(sys.executable).parent / "peft-prompt-clip")
    parts = ["import subprocess"]
    for language, code in BLOCK.findall(page.read_text()):
        if language == "python":
            parts.append(code)
            continue
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if not words or words[0] in NOT_RUN:
                continue
            if words[0] != "peft-prompt-clip":
                raise ValueError(f"{page.name}: a shell line this test cannot run: {line}")
            parts.append(f"subprocess.run({[command, *words[1:]]!r}, check=True)")
    return "\n".join(parts)


RUNNABLE = [page for page in PAGES if BLOCK.search(page.read_text())]


@pytest.fixture(scope="module")
def workspace(clip_dir, tmp_path_factory):
    """The Hub server (with the base model), its client's environment, and the folder every page starts from."""
    server, state, endpoint = serve({TOKEN})
    files = {p.name: p.read_bytes() for p in clip_dir.iterdir() if p.is_file()}
    state.repos[BASE_REPO] = {"branches": {"main": "1" * 40}, "commits": {"1" * 40: files}}
    env = client_env(endpoint, tmp_path_factory.mktemp("hf-home"), token=TOKEN)
    folder = tmp_path_factory.mktemp("workspace")
    for split, per_class in (("train", 20), ("val", 4), ("test", 6)):  # CoOp's prepared datasets come split
        write_image_folder(folder / "eurosat" / split, per_class=per_class)
    rng = np.random.default_rng(1)
    for name in ("cat.jpg", "image.jpg", "img1.jpg", "img2.jpg"):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / name)
    make_adapter = (
        "from transformers import CLIPModel\nfrom peft import get_peft_model\n"
        "from peft_prompt_clip import PromptEmbeddingConfig\n"
        f"clip = CLIPModel.from_pretrained({BASE_REPO!r})\n"
        "config = PromptEmbeddingConfig(n_ctx=4, class_names=['cat', 'dog', 'red car'])\n"
        "get_peft_model(clip, config).save_pretrained('coop-eurosat')\n"
    )
    subprocess.run([sys.executable, "-c", make_adapter], cwd=folder, env=env, check=True, timeout=300)
    yield env, folder
    server.shutdown()


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_snippets_run(page, workspace, tmp_path):
    env, folder = workspace
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    if re.search(
        r"train .*--output \./coop-eurosat", page.read_text()
    ):  # trained by the page itself, into a new folder
        shutil.rmtree(tmp_path / "coop-eurosat")
    script = tmp_path / "snippets.py"
    script.write_text(program(page))
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{page.name}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_the_docs_have_snippets_to_run():
    assert {"README.md", "quickstart.md", "hub.md"} <= {p.name for p in RUNNABLE}


def test_an_unknown_shell_command_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\nwget https://example.com/model.bin\n```\n")
    with pytest.raises(ValueError, match="cannot run: wget"):
        program(page)
