"""itune-inspect: rows with segments and trained tokens marked, an HTML page, statistics."""

import os
import subprocess
import sys

import numpy as np

from configs import smoke
from itune.cli import inspect as inspect_cli
from itune.data import inspection, pipeline, synthetic_tasks
from itune.data import spec as data_spec
from tests.conftest import HANG_GUARD_S, REPO


def test_row_view_marks_segments_and_exactly_the_trained_tokens(tmp_path):
    config = smoke.get_config("runlocal")
    spec = data_spec.make_spec(config.data, str(tmp_path))
    row = next(pipeline.train_rows(config.data, spec))
    segments = inspection.row_tokens(spec.tokenizer, row)
    assert len(segments) == len(np.unique(row["segment_ids"][row["segment_ids"] > 0]))
    # Each segment's trained text is one example's answer followed by the end of turn.
    answers = {
        synthetic_tasks.make_example(
            config.data.seed, i, "train", system_prompt_rate=config.data.builtin.system_prompt_rate
        )["answer"]
        for i in range(300)
    }
    for segment in segments:
        trained = "".join(text for text, is_trained in segment if is_trained).strip()
        assert trained.endswith("<|im_end|>") and trained[: -len("<|im_end|>")] in answers
    # Tokens put back together give the rendered chat.
    assert "".join(text for text, _ in segments[0]).startswith("<s><|im_start|>")
    view = inspection.format_row(spec.tokenizer, row, color=False)
    assert view.count(" ║ ") >= len(segments) - 1 and "[<|im_end|>]" in view


def test_inspect_prints_rows_statistics_and_writes_html(tmp_path, capsys):
    config = smoke.get_config("runlocal")
    path = inspect_cli.inspect(config, str(tmp_path), num_rows=2, num_batches=2, color=False)
    out = capsys.readouterr().out
    assert out.count("--- row") == 2 and "statistics over 16 rows (2 batches)" in out
    for key in (
        "examples read",
        "examples dropped",
        "examples truncated",
        "trained tokens",
        "packing efficiency",
        "source builtin",
    ):
        assert key in out
    page = open(path, encoding="utf-8").read()
    assert page.startswith("<!doctype html>") and page.count('<div class="seg">') >= 2
    assert '<span class="t">' in page and "packing efficiency" in page


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_colour_only_for_a_terminal_and_never_with_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert inspection.use_color(_Stream(True)) and not inspection.use_color(_Stream(False))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not inspection.use_color(_Stream(True))
    monkeypatch.setenv("NO_COLOR", "")  # Set but empty counts as unset (no-color.org).
    assert inspection.use_color(_Stream(True))


def test_itune_inspect_writes_no_colour_codes_into_a_file(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    env.pop("NO_COLOR", None)  # Only because the output is a file.
    with open(tmp_path / "out.txt", "w", encoding="utf-8") as out:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "itune.cli.inspect",
                f"--config={REPO / 'configs/smoke.py'}:runlocal",
                f"--workdir={tmp_path / 'run'}",
                "--rows=2",
            ],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=HANG_GUARD_S,
            cwd=REPO,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "out.txt").read_text(encoding="utf-8")
    assert "--- row 1 ---" in text and "[<|im_end|>]" in text
    assert "\x1b" not in text
