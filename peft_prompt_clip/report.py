"""A self-contained HTML report of an evaluation: the zero-shot prompt against the learned one, overall and per class
(bar charts), a confusion matrix of each, and the run's training curve (from `training_log.json`). The charts are
inline SVG written here: no plotting library, no script, nothing fetched, so the file opens anywhere and can be
attached or published as it is."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .options import describe_templates
from .storage import write_json, write_text

#: The results file `eval` writes (beside its report) and `push` uploads
RESULTS_NAME = "eval_results.json"

#: The colours of the zero-shot and learned series (colour-blind safe: Okabe-Ito).
COLORS = {"zero-shot": "#999999", "learned prompt": "#0072B2"}
#: Confusion matrices are drawn up to this many classes; above, the most frequent confusions are listed.
MAX_MATRIX_CLASSES = 40


def save_results(path: Path, results: dict[str, Any], log: dict[str, Any] | None, title: str) -> Path:
    """Write `results` to `path` as JSON and their report beside it (`.html`; `.report.html` where `path` is one),
    with the training curve of `log` (None: none); returns the report's path. Each file is written atomically, and
    an older report is removed before the new results are written: a run killed midway never leaves new results
    beside an old report."""
    page = report_path(path)
    drawn = report_html(results, log, title)  # drawn first: a report that cannot be drawn writes nothing
    page.unlink(missing_ok=True)
    write_json(path, results)
    write_text(page, drawn)
    return page


def report_path(path: Path) -> Path:
    """Where the report of results written to `path` goes: beside it, as `.html` (`.report.html` where `path` is
    one)."""
    return path.with_suffix(".report.html" if path.suffix == ".html" else ".html")


def write_report(path: str | Path, results: dict[str, Any], log: dict[str, Any] | None, title: str) -> None:
    """Write [`report_html`] to `path` atomically."""
    write_text(path, report_html(results, log, title))


def report_html(results: dict[str, Any], log: dict[str, Any] | None, title: str) -> str:
    """The report of `results` (what `peft-prompt-clip eval` writes: each method's `top1`, `top5`, `per_class` and
    `confusion`, or per part under `details` for base-to-novel) and of the training `log` (None: no curve)."""
    parts = results["details"] if "details" in results else {"": results}
    templates = results.get("zero_shot_templates")
    prompt = f"; the zero-shot prompt {describe_templates(templates)}" if templates else ""
    sections = [f"<h1>{_e(title)}</h1>", f"<p>Evaluated on {_e(results.get('data', ''))}{_e(prompt)}.</p>"]
    for part, methods in parts.items():
        heading = f" ({part} classes)" if part else ""
        n = methods["learned prompt"]["n"]
        names = methods["learned prompt"].get("class_names") or list(methods["learned prompt"]["per_class"])
        metrics = ("top1", "top5") if len(names) > 5 else ("top1",)  # of 5 classes or fewer, top-5 is always 1
        overall = [(metric.replace("top", "top-"), [methods[m][metric] for m in COLORS]) for metric in metrics]
        sections.append(f"<h2>Accuracy{_e(heading)}, {n} images</h2>")
        sections.append(_bars(overall, f"{' and '.join(label for label, _ in overall)} accuracy{heading}"))
        scored = [name for name in names if name in methods["learned prompt"]["per_class"]]  # classes with images
        per_class = [(name, [methods[m]["per_class"][name] for m in COLORS]) for name in scored]
        per_class.sort(key=lambda row: row[1][1] - row[1][0])
        sections.append(f"<h2>Top-1 accuracy per class{_e(heading)}, by gain over zero-shot</h2>")
        sections.append(_bars(per_class, f"Top-1 accuracy per class{heading}"))
        matrices = "".join(_confusion(methods[m], names, m) for m in COLORS if "confusion" in methods[m])
        if matrices:  # results from before the counts were kept have none
            sections.append(f"<h2>Confusion matrices{_e(heading)}: rows true class, columns predicted</h2>")
            sections.append(f'<div class="row">{matrices}</div>')
    if log and log.get("history"):
        sections.append("<h2>Training</h2>")
        sections.append(_training_curve(log))
    legend = "".join(f'<span class="key" style="background:{c}"></span>{_e(m)} ' for m, c in COLORS.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
svg {{ display: block; margin: 0.5em 0 1.5em; }} svg text {{ font: 12px system-ui, sans-serif; fill: #222; }}
svg text.count {{ font-size: 10px; }}
.key {{ display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: middle; }}
.row {{ display: flex; flex-wrap: wrap; gap: 2em; }} table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ padding: 2px 8px; text-align: left; border-bottom: 1px solid #ddd; }}
</style></head><body>
<p>{legend}</p>
{chr(10).join(sections)}
</body></html>
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


#: The widest a character of the charts' 12px labels is drawn (px), and the longest labels in characters
CHAR_WIDTH, LONGEST_LABEL, LONGEST_MATRIX_LABEL = 7.5, 28, 16


def _label(text: str, longest: int) -> str:
    """`text` cut to `longest` characters (an ellipsis ending it where cut); the whole is in the element's title."""
    return text if len(text) <= longest else text[: longest - 1] + "\u2026"


def _bars(rows: list[tuple[str, list[float]]], title: str) -> str:
    """Horizontal grouped bars, one group per row (a value in [0, 1] per series of `COLORS`), as wide as their
    longest label needs."""
    longest = max((len(_label(label, LONGEST_LABEL)) for label, _ in rows), default=1)
    label_width, width, bar, gap = round(longest * CHAR_WIDTH) + 12, 420, 10, 8
    height = len(rows) * (bar * len(COLORS) + gap) + 34
    parts = [f'<svg class="chart" width="{label_width + width + 60}" height="{height}" role="img">']
    parts.append(f"<title>{_e(title)}</title>")
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        x = label_width + tick * width
        parts.append(f'<line x1="{x}" y1="0" x2="{x}" y2="{height - 20}" stroke="#eee"/>')
        parts.append(f'<text x="{x}" y="{height - 5}" text-anchor="middle">{tick:g}</text>')
    y = 4  # the first value's text rises above its bar
    for label, values in rows:
        parts.append(f'<text x="{label_width - 6}" y="{y + bar * len(COLORS) / 2 + 4}" text-anchor="end">')
        parts.append(f"{_e(_label(label, LONGEST_LABEL))}<title>{_e(label)}</title></text>")
        for (method, color), value in zip(COLORS.items(), values, strict=True):
            parts.append(
                f'<rect x="{label_width}" y="{y}" width="{max(value * width, 1):.1f}" height="{bar - 1}" '
                f'fill="{color}"><title>{_e(label)}, {_e(method)}: {value:.3f}</title></rect>'
            )
            parts.append(f'<text x="{label_width + value * width + 4:.1f}" y="{y + bar - 2}">{value:.3f}</text>')
            y += bar
        y += gap
    return "".join(parts) + "</svg>"


def _confusion(scores: dict[str, Any], names: list[str], method: str) -> str:
    """A heatmap of `scores["confusion"]` (`[true, predicted, count]` triples), or its most frequent confusions."""
    counts = {(t, p): c for t, p, c in scores["confusion"]}
    if len(names) > MAX_MATRIX_CLASSES:
        worst = sorted(((c, t, p) for (t, p), c in counts.items() if t != p), reverse=True)[:20]
        rows = "".join(f"<tr><td>{_e(names[t])}</td><td>{_e(names[p])}</td><td>{c}</td></tr>" for c, t, p in worst)
        return (
            f"<div><h3>{_e(method)}: most frequent confusions</h3>"
            f"<table><tr><th>true</th><th>predicted</th><th>images</th></tr>{rows}</table></div>"
        )
    cell = max(8, min(28, 480 // len(names)))
    labels = [_label(name, LONGEST_MATRIX_LABEL) for name in names]
    text = max(len(label) for label in labels) * CHAR_WIDTH  # the longest label, drawn
    left, top = round(text) + 10, round(text * 0.87) + 14  # column labels rise at 60 degrees: sin 60 = 0.87
    width, height = left + cell * len(names) + round(text / 2) + 10, top + cell * len(names) + 4
    totals = [sum(c for (t, _), c in counts.items() if t == row) or 1 for row in range(len(names))]
    parts = [f'<div><h3>{_e(method)}</h3><svg class="chart" width="{width}" height="{height}" role="img">']
    parts.append(f"<title>Confusion matrix, {_e(method)}</title>")
    for i, (name, label) in enumerate(zip(names, labels, strict=True)):
        parts.append(f'<text x="{left - 4}" y="{top + i * cell + cell / 2 + 4}" text-anchor="end">')
        parts.append(f"{_e(label)}<title>{_e(name)}</title></text>")
        x, y = left + i * cell + cell / 2, top - 4
        parts.append(f'<text transform="translate({x},{y}) rotate(-60)">{_e(label)}<title>{_e(name)}</title></text>')
    for (true, predicted), count in counts.items():
        share = count / totals[true]
        x, y = left + predicted * cell, top + true * cell
        parts.append(
            f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{COLORS[method]}" '
            f'fill-opacity="{0.1 + 0.9 * share:.3f}"><title>true {_e(names[true])}, predicted {_e(names[predicted])}: '
            f"{count} images ({share:.0%} of the class)</title></rect>"
        )
        if cell >= 20 and count < 1000:  # the count, where it fits; dark cells get light text
            ink = "#fff" if share > 0.5 else "#222"
            parts.append(
                f'<text x="{x + (cell - 1) / 2}" y="{y + cell / 2 + 3}" text-anchor="middle" class="count" '
                f'style="fill:{ink}">{count}</text>'
            )
    return "".join(parts) + "</svg></div>"


def _training_curve(log: dict[str, Any]) -> str:
    """Loss, training accuracy, held-out accuracy and learning rate per epoch; the kept epoch marked."""
    history = log["history"]
    epochs = [entry["epoch"] for entry in history]
    series = {
        "training loss": [entry["loss"] for entry in history],
        "training accuracy": [entry["accuracy"] for entry in history],
        "held-out accuracy": [entry.get("eval_accuracy") for entry in history],
        "learning rate": [entry["lr"] for entry in history],
    }
    colors = {"training loss": "#D55E00", "training accuracy": "#0072B2", "held-out accuracy": "#009E73"}
    colors["learning rate"] = "#CC79A7"
    best = (log.get("best") or {}).get("epoch")
    charts = []
    width, height, margin, last = 480, 160, 50, max(epochs)
    for name, values in series.items():
        points = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
        if not points:
            continue
        top = max(v for _, v in points) or 1.0
        xs = [margin + e / last * (width - margin - 10) for e, _ in points]
        ys = [height - 25 - v / top * (height - 40) for _, v in points]
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
        chart = [
            f'<svg class="chart" width="{width}" height="{height}" role="img"><title>{_e(name)} per epoch</title>'
        ]
        chart.append(f'<text x="{margin}" y="12">{_e(name)}</text>')
        chart.append(f'<line x1="{margin}" y1="{height - 25}" x2="{width - 10}" y2="{height - 25}" stroke="#999"/>')
        for share in (0, 0.5, 1):  # the y axis' values: 0, half the top and the top
            y = height - 25 - share * (height - 40)
            chart.append(f'<line x1="{margin - 3}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#eee"/>')
            chart.append(f'<text x="{margin - 5}" y="{y + 4:.1f}" text-anchor="end">{share * top:.3g}</text>')
        chart.append(f'<text x="{width - 10}" y="{height - 8}" text-anchor="end">epoch {last}</text>')
        chart.append(f'<polyline points="{line}" fill="none" stroke="{colors[name]}" stroke-width="2"/>')
        if len(points) == 1:  # one epoch: a line of one point draws nothing
            chart.append(f'<circle cx="{xs[0]:.1f}" cy="{ys[0]:.1f}" r="3" fill="{colors[name]}"/>')
        if isinstance(best, int) and name == "held-out accuracy":
            x = margin + best / last * (width - margin - 10)
            chart.append(
                f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{height - 25}" stroke="#222" stroke-dasharray="4 3"/>'
            )
            anchor, shift = ("end", -4) if x > width / 2 else ("start", 4)  # inside the chart at either end
            chart.append(f'<text x="{x + shift:.1f}" y="30" text-anchor="{anchor}">kept: epoch {best}</text>')
        charts.append("".join(chart) + "</svg>")
    return '<div class="row">' + "".join(charts) + "</div>"
