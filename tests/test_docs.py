"""The generated reference pages match the code (regenerate with `python docs/generate.py`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
spec = importlib.util.spec_from_file_location("generate", DOCS / "generate.py")
generate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate)


@pytest.mark.parametrize("page", list(generate.PAGES))
def test_reference_page_is_current(page):
    assert (DOCS / "reference" / page).read_text() == generate.PAGES[page](), f"run: python docs/generate.py ({page})"
