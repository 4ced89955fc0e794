"""Nothing a user gives the command line destroys data: outputs are checked before any work (never a special file,
never inside an input), and a training run holds its output folder (a second run into it is refused at once, and a
finished run is replaced only when asked); and the JSON read beside an adapter (its training log) never hangs or
crashes a command. FIFOs are made in temporary folders, never at system paths."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from conftest import write_image_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run

from peft_prompt_clip.storage import atomic_path, run_lock


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=6)


@pytest.fixture(scope="module")
def adapter(clip_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    run(
        "train",
        "--model",
        clip_dir,
        "--data",
        images,
        "--output",
        out,
        "--shots",
        "2",
        "--epochs",
        "1",
        "--n-ctx",
        "2",
    )
    return out


def one_line_error(result, message):
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_eval_never_writes_over_a_special_file_a_folder_or_the_adapter(adapter, images, tmp_path):
    fifo = tmp_path / "results.json"
    os.mkfifo(fifo)
    one_line_error(run("eval", "--adapter", adapter, "--data", images, "--output", fifo, check=False), "is a FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    os.mkfifo(tmp_path / "page.html")  # the report beside the results
    result = run("eval", "--adapter", adapter, "--data", images, "--output", tmp_path / "page.json", check=False)
    one_line_error(result, f"--output {tmp_path / 'page.html'} is a FIFO, not a regular file")
    assert not (tmp_path / "page.json").exists() and stat.S_ISFIFO(os.lstat(tmp_path / "page.html").st_mode)
    one_line_error(
        run("eval", "--adapter", adapter, "--data", images, "--output", adapter, check=False), "is a folder"
    )
    weights = adapter / "adapter_model.safetensors"
    before = weights.read_bytes()
    for output, flag in [(weights, "--adapter"), (images / "cat" / "results.json", "--data")]:
        result = run("eval", "--adapter", adapter, "--data", images, "--output", output, check=False)
        one_line_error(result, f"--output {output} would write into {flag}")
    assert weights.read_bytes() == before and not (images / "cat" / "results.json").exists()
    run("eval", "--adapter", adapter, "--data", images)  # the default, beside the adapter's files, is its own
    assert (adapter / "eval_results.json").is_file() and (adapter / "eval_results.html").is_file()


def test_training_never_writes_into_its_data_or_over_a_run(clip_dir, images, tmp_path):
    common = ("--model", clip_dir, "--data", images, "--shots", "2", "--epochs", "1", "--n-ctx", "2")
    inside = images / "runs"
    one_line_error(run("train", *common, "--output", inside, check=False), f"would write into --data {images}")
    assert not inside.exists()
    out = tmp_path / "run"
    run("train", *common, "--output", out)
    weights = (out / "adapter_model.safetensors").read_bytes()
    again = run("train", *common, "--seed", "2", "--output", out, check=False)
    one_line_error(again, f"--output {out} holds a run (adapter_model.safetensors); pass --resume")
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    run("train", *common, "--seed", "2", "--output", out, "--overwrite")
    assert (out / "adapter_model.safetensors").read_bytes() != weights
    both = run("train", *common, "--output", out, "--resume", "--overwrite", check=False)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_a_link_as_output_is_checked_where_it_is_not_where_it_points(adapter, images, tmp_path):
    """A link is replaced, not written through: one inside --data is refused, one pointing into --data is not (the
    data keeps its file)."""
    (images / "cat" / "r.json").symlink_to(tmp_path / "elsewhere.json")
    result = run("eval", "--adapter", adapter, "--data", images, "--output", images / "cat" / "r.json", check=False)
    one_line_error(result, "would write into --data")
    (images / "cat" / "r.json").unlink()
    kept = images / "kept.json"
    kept.write_text("mine")
    (tmp_path / "out.json").symlink_to(kept)
    run("eval", "--adapter", adapter, "--data", images, "--output", tmp_path / "out.json")
    assert kept.read_text() == "mine" and not (tmp_path / "out.json").is_symlink()
    kept.unlink()


def test_a_second_run_into_a_folder_in_use_is_refused_at_once(clip_dir, images, tmp_path):
    out = tmp_path / "busy"
    common = ("--model", clip_dir, "--data", images, "--shots", "2", "--epochs", "1", "--n-ctx", "2")
    with run_lock(out):  # as a run in another process holds it
        result = run("train", *common, "--output", out, check=False)
        one_line_error(result, f"{out} is the output of another training run in progress")
        teacher = ("--teacher", clip_dir, "--classes", "cat,dog,red car", "--epochs", "1", "--n-ctx", "2")
        result = run("distill", *teacher, "--model", clip_dir, "--data", images, "--output", out, check=False)
        one_line_error(result, f"{out} is the output of another training run in progress")
        assert sorted(p.name for p in out.iterdir()) == [".peft-prompt-clip.run.lock"]  # refused before any work
        with run_lock(out):  # re-entrant in its own process: a command holds it, its trainer takes it again
            pass
    run("train", *common, "--output", out)  # released: the next run goes ahead
    assert (out / "adapter_model.safetensors").is_file()


def test_an_atomic_write_refuses_a_special_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="is a FIFO, not a regular file: refusing to replace it"):
        with atomic_path(fifo) as tmp:
            tmp.write_text("x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    link = tmp_path / "link"
    link.symlink_to(fifo)  # a link is replaced, never written through
    with atomic_path(link) as tmp:
        tmp.write_text("x")
    assert link.read_text() == "x" and not link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_json_beside_an_adapter_is_read_only_from_a_bounded_regular_file(tmp_path):
    from peft_prompt_clip.storage import MAX_JSON_BYTES, read_json

    (tmp_path / "good.json").write_text('{"history": []}')
    assert read_json(tmp_path / "good.json") == {"history": []}
    os.mkfifo(tmp_path / "fifo.json")  # no writer: opening it to read would block
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: no disk used
        f.truncate(MAX_JSON_BYTES + 1)
    (tmp_path / "link.json").symlink_to(huge)
    (tmp_path / "deep.json").write_text("[" * 100_000)
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    for name in ("fifo.json", "huge.json", "link.json", "deep.json", "latin1.json", "missing.json"):
        assert read_json(tmp_path / name) is None, name


@pytest.mark.parametrize(
    "change, valid",
    [
        ({}, True),
        ({"epoch": 0}, False),  # the report divides by the last epoch
        ({"accuracy": "0.5"}, False),
        ({"loss": float("nan")}, False),
        ({"epoch": True}, False),
        ({"eval_accuracy": [1]}, False),
        ({"lr": None}, False),
        ({"notes": "anything"}, True),  # a field nothing reads
    ],
)
def test_the_training_log_has_a_schema(change, valid):
    from peft_prompt_clip.report import report_html
    from peft_prompt_clip.training.record import valid_log

    entry = {"epoch": 1, "loss": 0.5, "accuracy": 0.5, "lr": 0.002, "skipped_steps": 0, "seconds": 0.1}
    log = {"history": [{**entry, **change}], "best": {"epoch": 1, "accuracy": 0.5, "loss": 0.7}}
    assert valid_log(log) is valid
    if valid:  # what passes the schema, the report draws
        top = {"top1": 0.5, "top5": 1.0, "per_class": {"cat": 0.5}, "n": 2}
        assert "<svg" in report_html({"zero-shot": top, "learned prompt": top}, log, "title")
        assert not valid_log({**log, "best": {"epoch": "first"}}) and valid_log({**log, "last": {"epoch": "average"}})


def test_eval_reads_a_fifo_or_a_broken_log_without_hanging_or_crashing(adapter, images, tmp_path):
    import shutil

    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    log = copy / "training_log.json"
    log.unlink()
    os.mkfifo(log)
    result = run("eval", "--adapter", copy, "--data", images, "--output", tmp_path / "r.json")  # timeout: 300 s
    assert "learned prompt" in result.stdout and (tmp_path / "r.html").is_file()
    log.unlink()
    log.write_text('{"history": [{"epoch": 0, "loss": 1, "accuracy": 0, "lr": 1}]}')
    run("eval", "--adapter", copy, "--data", images, "--output", tmp_path / "s.json")
    assert (tmp_path / "s.html").is_file()


# Fuzz: random training logs; and every kind of output for `eval`: links, FIFOs, folders, its own inputs.
NUMBERS = st.integers(-(2**70), 2**70) | st.floats() | st.sampled_from([0, 1, 0.5, 1e308, -1e-308])
VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
EPOCH = {"epoch": 1, "loss": 0.5, "accuracy": 0.5, "lr": 0.002, "eval_accuracy": 0.5, "skipped_steps": 0}
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(
    history=st.lists(st.dictionaries(st.sampled_from([*EPOCH, "x"]), VALUES, max_size=3), max_size=4),
    evaluations=st.dictionaries(
        st.sampled_from(["zero_shot", "initial", "best", "last"]),
        st.dictionaries(st.sampled_from(["epoch", "accuracy", "loss", "x"]), VALUES, max_size=3) | VALUES,
        max_size=4,
    ),
    top=st.dictionaries(st.text(max_size=5), VALUES, max_size=2),
)
def test_fuzz_the_report_draws_every_log_that_passes_the_schema(history, evaluations, top):
    from peft_prompt_clip.report import report_html
    from peft_prompt_clip.training.record import valid_log

    epochs = [{**EPOCH, "epoch": i + 1, **change} for i, change in enumerate(history)]
    log = {**top, "history": epochs, **evaluations}
    if not valid_log(json.loads(json.dumps(log))):  # what the file holds: JSON, so tuples are lists, keys strings
        return
    top1 = {"top1": 0.5, "top5": 1.0, "per_class": {"cat": 0.5, "dog": 0.5}, "n": 2}
    page = report_html({"zero-shot": top1, "learned prompt": top1}, log, "title")
    assert "<svg" in page and not re.search(r'="[^"]*\b(nan|inf)', page, re.IGNORECASE)


KINDS = ["new.json", "file.json", "dir", "fifo", "link-file", "link-dir", "link-fifo", "link-data", "dangling",
         "data", "adapter", "link-weights"]  # fmt: skip
TAILS = ["", "/x.json", "/new/x.json", "/adapter_model.safetensors", "/eval_results.json", "/cat/0.png", ".html"]


def sandbox(root: Path, adapter: Path, images: Path) -> Path:
    """A folder of every kind of path an output may name: a regular file, a folder, a FIFO, links to each and to the
    inputs, a dangling link, and the command's inputs (the data and the adapter)."""
    shutil.copytree(images, root / "data")
    shutil.copytree(adapter, root / "adapter", ignore=shutil.ignore_patterns("*.lock", "checkpoint*"))
    (root / "file.json").write_text("{}")
    (root / "dir").mkdir()
    os.mkfifo(root / "fifo")
    for name, target in [("link-file", "file.json"), ("link-dir", "dir"), ("link-fifo", "fifo"), ("link-data", "data"),
                         ("dangling", "missing"), ("link-weights", "adapter/adapter_model.safetensors")]:  # fmt: skip
        (root / name).symlink_to(root / target)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`: its kind, and a regular file's content (the adapter's lock file aside: loading takes
    it)."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if not p.name.endswith(".lock")):
        mode = os.lstat(path).st_mode
        content = path.read_bytes() if stat.S_ISREG(mode) else os.readlink(path) if stat.S_ISLNK(mode) else None
        found[str(path.relative_to(root))] = (stat.S_IFMT(mode), content)
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_every_output_eval_may_be_given_is_written_or_refused_alone(adapter, images, tmp_path, kind):
    """Whatever `--output` names (each kind of path, and paths inside it), `eval` writes its results and report there
    or refuses in one line naming it, and nothing else under the sandbox changes: no input, no FIFO, no folder, no
    link."""
    from peft_prompt_clip.cli import main
    from peft_prompt_clip.report import report_path

    root = sandbox(tmp_path, adapter, images)
    for output in (root / f"{kind}{tail}" for tail in TAILS):
        before = snapshot(root)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["eval", "--adapter", str(root / "adapter"), "--data", str(root / "data"),
                         "--output", str(output)])  # fmt: skip
        lines = [line for line in err.getvalue().splitlines() if line.startswith("peft-prompt-clip")]
        assert code in (0, 2) and "Traceback" not in err.getvalue(), output
        made = [output, report_path(output), *output.parents]  # the output, its report, the folders made for them
        mine = {str(p.relative_to(root)) for p in made if p.is_relative_to(root) and p != root} if code == 0 else set()
        after = snapshot(root)
        assert {k: v for k, v in after.items() if k not in mine} == {k: v for k, v in before.items() if k not in mine}
        if code == 2:
            assert lines[-1].startswith("peft-prompt-clip eval: error:") and str(output) in lines[-1], lines
        else:
            assert stat.S_ISREG(os.lstat(output).st_mode) and json.loads(output.read_text())["learned prompt"]
            assert stat.S_ISREG(os.lstat(report_path(output)).st_mode)
