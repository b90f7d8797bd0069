"""What a batch trains on, made visible: text views of packed rows and a self-contained HTML page.

Segment boundaries are marked, trained tokens (loss mask 1) highlighted, padding summarised.
"""

from __future__ import annotations

import html
import os
from typing import Sequence, TextIO

import numpy as np

from itune.data.packing import PackingStats
from itune.data.tokenizer import Tokenizer

_TRAINED = "\x1b[1;32m"  # Bold green in a terminal.
_RESET = "\x1b[0m"


def use_color(stream: TextIO) -> bool:
    """Whether text for ``stream`` may carry colour codes: only for a terminal, and never when
    the ``NO_COLOR`` environment variable is set and not empty (https://no-color.org), so that a
    file or a pipe gets plain text."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _segments(row: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray]]:
    ids = row["segment_ids"]
    return [(int(s), np.flatnonzero(ids == s)) for s in np.unique(ids) if s > 0]


def row_tokens(tokenizer: Tokenizer, row: dict[str, np.ndarray]) -> list[list[tuple[str, bool]]]:
    """Per segment, its tokens as ``(text, trained)``; a token is trained when it is a target with
    loss mask 1 (the first token of a segment is only ever an input)."""
    segments = []
    for _, where in _segments(row):
        tokens = [(tokenizer.token_text(row["inputs"][where[0]]), False)]
        for i in where:
            tokens.append((tokenizer.token_text(row["targets"][i]), bool(row["loss_mask"][i])))
        segments.append(tokens)
    return segments


def _visible(text: str) -> str:
    return text.replace("\n", "\\n")


def format_row(tokenizer: Tokenizer, row: dict[str, np.ndarray], color: bool = False) -> str:
    """One row as text: segments separated by ``║``, trained tokens in ``[...]`` or, with
    ``color`` (for a terminal: `use_color`), in green."""
    parts = []
    for tokens in row_tokens(tokenizer, row):
        text = []
        for piece, trained in tokens:
            piece = _visible(piece)
            if trained:
                piece = f"{_TRAINED}{piece}{_RESET}" if color else f"[{piece}]"
            text.append(piece)
        parts.append("".join(text))
    padding = int((row["segment_ids"] == 0).sum())
    return " ║ ".join(parts) + (f" ║ <{padding} padding>" if padding else "")


def statistics(stats: PackingStats, seq_len: int, per_source: dict[str, int] | None = None) -> str:
    """The pipeline statistics as aligned lines."""
    dropped = sum(stats.dropped.values())
    lines = [
        ("examples read", f"{stats.examples}"),
        ("examples packed", f"{stats.packed}"),
        (
            "examples dropped",
            f"{dropped}"
            + (
                " (" + ", ".join(f"{n} {why}" for why, n in sorted(stats.dropped.items())) + ")"
                if dropped
                else ""
            ),
        ),
        ("examples truncated", f"{stats.truncated}"),
        ("longest example", f"{stats.longest} tokens (rows of {seq_len})"),
        ("rows", f"{stats.rows}"),
        ("tokens", f"{stats.tokens}"),
        (
            "trained tokens",
            f"{stats.trained_tokens} ({stats.trained_tokens / max(1, stats.tokens):.1%})",
        ),
        ("packing efficiency", f"{stats.efficiency(seq_len):.1%} non-padding"),
    ]
    total = sum((per_source or {}).values())
    for name, n in sorted((per_source or {}).items()):
        lines.append((f"source {name}", f"{n} examples ({n / max(1, total):.1%})"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def html_page(
    tokenizer: Tokenizer, rows: Sequence[dict[str, np.ndarray]], stats_text: str, title: str
) -> str:
    """A self-contained HTML page: one block per row, segments boxed, trained tokens highlighted."""
    blocks = []
    for r, row in enumerate(rows):
        segs = []
        for tokens in row_tokens(tokenizer, row):
            spans = "".join(
                f'<span class="{"t" if trained else "p"}">{html.escape(_visible(piece))}</span>'
                for piece, trained in tokens
            )
            segs.append(f'<div class="seg">{spans}</div>')
        padding = int((row["segment_ids"] == 0).sum())
        pad = f'<div class="pad">{padding} padding</div>' if padding else ""
        blocks.append(f'<h3>row {r}</h3><div class="row">{"".join(segs)}{pad}</div>')
    style = (
        "body{font-family:sans-serif;margin:2em}"
        ".row{display:flex;flex-wrap:wrap;gap:6px;font-family:monospace}"
        ".seg{border:1px solid #888;padding:4px;border-radius:4px;white-space:pre-wrap}"
        ".t{background:#b6f2b6}.p{color:#555}.pad{color:#999;padding:4px}"
        "pre{background:#f4f4f4;padding:1em}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>Each box is one packed example (segment); "
        "<span class='t'>highlighted</span> tokens are trained on.</p>"
        f"<pre>{html.escape(stats_text)}</pre>{''.join(blocks)}</body></html>"
    )


def chat_view(
    tokenizer: Tokenizer,
    fmt,
    messages: Sequence[dict],
    tools=None,
    train_on: str = "all_assistant",
    color: bool = False,
) -> str:
    """One chat as its chat format renders it for training: the text with the trained spans in
    ``[...]`` (or green), then its tokens the same way, and the counts.

    >>> from itune.data import chat
    >>> class Chars:  # A tokenizer that spells each character as a token.
    ...     def encode_with_offsets(self, text):
    ...         return list(map(ord, text)), [(i, i + 1) for i in range(len(text))]
    ...     def token_text(self, token_id):
    ...         return chr(token_id)
    ...     bos_id, add_bos_token = -1, False
    >>> fmt = chat.get_format("{% for m in messages %}{{ m.role[0] }}: {{ m.content }}\\n"
    ...                       "{% endfor %}{% if add_generation_prompt %}a: {% endif %}")
    >>> print(chat_view(Chars(), fmt, [{"role": "user", "content": "hi"},
    ...                                {"role": "assistant", "content": "yo"}]))
    u: hi\\na: [yo]\\n
    tokens: u: hi\\na: [y][o]\\n
    12 tokens, 2 trained
    """
    from itune.data import chat  # noqa: PLC0415

    pieces = chat.render(messages, fmt, train_on=train_on, tools=tools)
    text = []
    for piece in pieces:
        shown = _visible(piece.text)
        if piece.trained:
            shown = f"{_TRAINED}{shown}{_RESET}" if color else f"[{shown}]"
        text.append(shown)
    ids, mask = chat.tokenize(pieces, tokenizer, fmt)
    tokens = []
    for token_id, trained in zip(ids, mask):
        shown = _visible(tokenizer.token_text(int(token_id)))
        if trained:
            shown = f"{_TRAINED}{shown}{_RESET}" if color else f"[{shown}]"
        tokens.append(shown)
    return (
        "".join(text)
        + "\ntokens: "
        + "".join(tokens)
        + f"\n{len(ids)} tokens, {int(np.sum(mask))} trained"
    )
