"""itune-inspect: rows with segments and trained tokens marked, an HTML page, statistics."""

import numpy as np

from configs import smoke
from itune import inspect as inspect_cli
from itune.data import inspection, pipeline, synthetic_tasks


def test_row_view_marks_segments_and_exactly_the_trained_tokens(tmp_path):
    config = smoke.get_config("runlocal")
    spec = pipeline.make_spec(config.data, str(tmp_path))
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
