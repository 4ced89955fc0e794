"""The generated reference pages match the code (regenerate with `python docs/generate.py`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
spec = importlib.util.spec_from_file_location("generate", DOCS / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


@pytest.mark.parametrize("page", list(generate.PAGES))
def test_reference_page_is_current(page):
    assert (DOCS / "reference" / page).read_text() == generate.PAGES[page](), f"run: python docs/generate.py ({page})"


PAGES = [DOCS.parent / "README.md", DOCS.parent / "benchmarks" / "README.md", *sorted(DOCS.rglob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_point_at_files(page):
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page}: links to missing files {missing}"
