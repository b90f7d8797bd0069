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
        "longest example",
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


def test_inspect_shows_a_models_template_with_its_trained_spans(shared_dir, tmp_path, capsys):
    """A tokenizer folder with Qwen3's template: a reasoning chat, its earlier turn stripped of
    its reasoning by the template, the last one trained with it (or without, on request)."""
    import json

    import tokenizers
    from tokenizers import AddedToken

    from itune.data.hf_tokenizer import HFTokenizer

    base = HFTokenizer.from_directory(str(shared_dir / "tokenizers" / "smollm2_bpe"))
    backend = tokenizers.Tokenizer.from_str(base.backend.to_str())
    controls = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in controls])
    folder = tmp_path / "qwen3"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    template = (shared_dir / "chat_templates" / "qwen3.jinja").read_text()
    config = {"eos_token": "<|im_end|>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    chats = tmp_path / "chats.jsonl"
    messages = [
        {"role": "user", "content": "What is 17 * 3?"},
        {"role": "assistant", "reasoning_content": "17 * 3 = 51.", "content": "51"},
        {"role": "user", "content": "And half of that?"},
        {"role": "assistant", "reasoning_content": "51 / 2 = 25.5.", "content": "25.5"},
    ]
    chats.write_text(json.dumps({"messages": messages}) + "\n")
    inspect_cli.inspect_chats(str(folder), str(chats), None, "all_assistant", True, {}, False)
    out = capsys.readouterr().out
    assert "qwen3 chat template" in out
    assert "assistant\\n[51<|im_end|>]\\n" in out and "17 * 3 = 51." not in out
    assert "assistant\\n[<think>\\n51 / 2 = 25.5.\\n</think>\\n\\n25.5<|im_end|>]\\n" in out
    assert "[<think>][\\n][5][1]" in out  # Its tokens: <think> is one.
    inspect_cli.inspect_chats(str(folder), str(chats), None, "all_assistant", False, {}, False)
    assert "[<think>\\n]51 / 2 = 25.5.[\\n</think>\\n\\n25.5<|im_end|>]" in capsys.readouterr().out
