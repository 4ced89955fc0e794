"""The HTML report of `eval`: what it holds (parsed here), and that a real browser draws its charts (headless
Chromium through Selenium). Without Chromium on the machine the browser test is skipped, unless
PEFT_PROMPT_CLIP_REQUIRE_BROWSER=1 (CI sets it, and installs Chromium) makes that a failure."""

from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser

import pytest

from peft_prompt_clip.report import MAX_MATRIX_CLASSES, report_html, write_report

NAMES = ["cat", "dog", "<b>red</b> car"]


def scores(top1: float, per_class: list[float], confusion: list[list[int]]) -> dict:
    return {
        "top1": top1,
        "top5": 1.0,
        "n": 30,
        "per_class": dict(zip(NAMES, per_class, strict=True)),
        "confusion": confusion,
    }


RESULTS = {
    "split": "test",
    "data": "./images/test",
    "zero-shot": scores(0.4, [0.5, 0.2, 0.5], [[0, 0, 5], [0, 1, 5], [1, 1, 2], [1, 0, 8], [2, 2, 5], [2, 0, 5]]),
    "learned prompt": scores(0.8, [0.9, 0.7, 0.8], [[0, 0, 9], [0, 1, 1], [1, 1, 7], [1, 2, 3], [2, 2, 8], [2, 0, 2]]),
}
LOG = {
    "history": [
        {"epoch": e, "loss": 1 / e, "accuracy": 0.5 + e / 20, "lr": 0.002, **({"eval_accuracy": 0.6} if e % 2 else {})}
        for e in range(1, 7)
    ],
    "best": {"epoch": 3, "accuracy": 0.6, "loss": 0.9},
}


class Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def elements(page: str) -> list[tuple[str, dict]]:
    parser = Elements()
    parser.feed(page)
    return parser.tags


def test_the_report_holds_each_chart_with_the_numbers():
    page = report_html(RESULTS, LOG, "adapter <x>")
    tags = elements(page)
    charts = [a for t, a in tags if t == "svg"]
    assert len(charts) == 1 + 1 + 2 + 4  # overall, per class, two confusion matrices, four training curves
    assert len([a for t, a in tags if t == "rect"]) == 1 * 2 + 3 * 2 + 6 + 6  # top-1 (3 classes), per class, cells
    assert "cat, learned prompt: 0.900" in page and "true dog, predicted red" not in page  # names are escaped
    assert "true dog, predicted &lt;b&gt;red&lt;/b&gt; car: 3 images (30% of the class)" in page
    assert "<b>red</b>" not in page and "adapter &lt;x&gt;" in page and "<script" not in page
    assert "kept: epoch 3" in page
    no_log = elements(report_html(RESULTS, None, "t"))
    assert len([a for t, a in no_log if t == "svg"]) == 4


def test_many_classes_list_their_most_frequent_confusions():
    names = [f"class {i}" for i in range(MAX_MATRIX_CLASSES + 1)]
    confusion = [[i, (i + 1) % len(names), i + 1] for i in range(len(names))]
    method = {"top1": 0.0, "top5": 0.1, "n": 861, "per_class": dict.fromkeys(names, 0.0), "confusion": confusion}
    page = report_html({"zero-shot": method, "learned prompt": method}, None, "many")
    assert "most frequent confusions" in page and "<td>class 40</td><td>class 0</td><td>41</td>" in page
    assert len([a for t, a in elements(page) if t == "svg"]) == 2  # overall and per class: no matrices


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium driven by Selenium (skipped without one, unless PEFT_PROMPT_CLIP_REQUIRE_BROWSER=1)."""
    browser, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (browser and driver_path):
        if os.environ.get("PEFT_PROMPT_CLIP_REQUIRE_BROWSER") == "1":
            pytest.fail("Chromium and chromedriver are required here (apt-get install chromium chromium-driver).")
        pytest.skip("no Chromium on this machine (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def test_the_report_renders_in_chromium(chromium, tmp_path):
    from selenium.webdriver.common.by import By

    write_report(tmp_path / "report.html", RESULTS, LOG, "adapter")
    chromium.get((tmp_path / "report.html").as_uri())
    assert chromium.title == "adapter"
    charts = chromium.find_elements(By.CSS_SELECTOR, "svg")
    assert len(charts) == 8 and all(c.size["width"] > 100 and c.size["height"] > 50 for c in charts)
    bars = charts[1].find_elements(By.CSS_SELECTOR, "rect")  # per class: drawn in proportion to the accuracy
    widths = [bar.size["width"] for bar in bars]
    assert len(widths) == 6 and all(w > 0 for w in widths)
    assert widths[1] / widths[0] == pytest.approx(0.8 / 0.5, rel=0.05)  # "<b>red</b> car" first: least gain
    lines = chromium.find_elements(By.CSS_SELECTOR, "polyline")
    assert len(lines) == 4 and all(line.size["width"] > 100 for line in lines)


#: Every text of every chart, with its drawn box where it leaves its chart's box
CLIPPED = """
const clipped = [];
for (const svg of document.querySelectorAll("svg")) {
  const box = svg.getBoundingClientRect();
  for (const text of svg.querySelectorAll("text")) {
    const r = text.getBoundingClientRect();
    if (r.left < box.left - 0.5 || r.right > box.right + 0.5 || r.top < box.top - 0.5 || r.bottom > box.bottom + 0.5)
      clipped.push(text.textContent + " " + JSON.stringify([r.left - box.left, box.right - r.right, r.top - box.top,
                                                              box.bottom - r.bottom]));
  }
}
return [clipped, document.querySelectorAll("svg text").length];
"""


@pytest.mark.parametrize("classes", [5, 10, 40, 100])
def test_no_text_of_the_report_is_clipped(chromium, tmp_path, classes):
    """Long class names (cut to the chart's label length), the kept epoch at the last epoch, the y axis' values and
    the counts in the matrices' cells: every text lies inside its chart, measured in the browser."""
    names = [f"{'yellow stripe wide ' * (i % 3)}class W{i}" for i in range(classes)]
    confusion = [[i, (i + j) % classes, 5 - j] for i in range(classes) for j in range(3)]
    method = {"top1": 0.5, "top5": 0.9, "n": 12 * classes, "per_class": dict.fromkeys(names, 0.5),
              "class_names": names, "confusion": confusion}  # fmt: skip
    log = {"history": [{"epoch": e, "loss": 1.6094, "accuracy": 0.2, "lr": 0.002, "eval_accuracy": 0.3}
                       for e in range(1, 201)], "best": {"epoch": 200, "accuracy": 0.3, "loss": 1.6}}  # fmt: skip
    write_report(tmp_path / "report.html", {"zero-shot": method, "learned prompt": method}, log, "adapter")
    chromium.get((tmp_path / "report.html").as_uri())
    clipped, texts = chromium.execute_script(CLIPPED)
    assert texts > classes and clipped == [], clipped[:5]
    page = (tmp_path / "report.html").read_text()
    assert "kept: epoch 200" in page and ">1.61</text>" in page  # the y axis says where the flat loss lies
    assert ('class="count"' in page) == (480 // classes >= 20)  # counts where the cells hold them
    assert (">top-5<title>" in page) == (classes > 5)  # of 5 classes, top-5 is always 1: not drawn


def test_older_results_empty_classes_and_one_epoch():
    """Results without confusion counts (older JSON) draw no matrices; a class without test images gets no bars but
    keeps the matrices' indices; a one-epoch log draws points."""
    older = {m: {k: v for k, v in RESULTS[m].items() if k != "confusion"} for m in ("zero-shot", "learned prompt")}
    page = report_html(older, {"history": LOG["history"][:1]}, "old")
    assert "Confusion matrices" not in page and page.count("<circle") == 4  # each curve: one point
    sparse = {m: {**RESULTS[m], "class_names": ["bird", *NAMES]} for m in ("zero-shot", "learned prompt")}
    for method in sparse.values():  # "bird" (index 0) has no test images; the others shift by one
        method["confusion"] = [[t + 1, p + 1, c] for t, p, c in method["confusion"]]
    page = report_html(sparse, None, "sparse")
    assert "true dog, predicted &lt;b&gt;red&lt;/b&gt; car: 3 images" in page and "bird, learned" not in page
