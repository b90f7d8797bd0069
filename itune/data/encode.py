"""Encoding chats: render, cut to what a row can hold, tokenize, shift to next-token pairs.

A row holds ``seq_len`` next-token pairs, so the packer keeps ``seq_len + 1`` ids of a longer
example: its first ones (``truncate_response``, and ``drop``, which only needs to see that it is
too long) or its last ones (``truncate_prompt_left``). A record of any size is therefore cut,
before it is tokenized, to about the characters those ids come from (`tokenize_window`): a
token spells at most ``tokenizer.max_token_bytes`` bytes, hence characters, and most text far
fewer. The cut falls before a space that follows a word, where
SentencePiece and byte-level BPE both start a token (pieces never span a word's leading space,
and pre-tokenizers split there), so the kept ids and loss mask are those that tokenizing the
whole record and then truncating gives, at the cost of a ``seq_len`` record.

One exception, kept from the end of a record only: a SentencePiece unigram model sums piece
scores (in float32) from the start of its input, so where two segmentations of a word score
within rounding of each other, which one wins depends on where the input starts. The cut picks
by the nearer start, which rounds less: rarely, a word of the kept ids is split differently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from itune.data import chat, mixture, packing
from itune.data.sources import DataError
from itune.errors import ConfigError

# Ids kept beyond the row, so that the few tokens next to a cut that falls inside a word never
# reach the kept ids.
_SLACK_TOKENS = 16
# Bytes a token spells in most text (English prose: about 4); more widen the cut (x4 a time).
_TYPICAL_TOKEN_BYTES = 8
# How far back from the budget a cut looks for a space that starts a word.
_SPACE_SEARCH = 256
_WHITESPACE = " \t\n\r\f\v"


def cut_pieces(
    pieces: Sequence[chat.Piece], max_chars: int, keep_end: bool = False
) -> tuple[list[chat.Piece], bool]:
    """The rendered pieces within ``max_chars`` characters of the start (of the end with
    ``keep_end``), and whether anything was cut.

    Plain text is cut before a space that follows a word when there is one near the limit; a
    special token is kept or dropped whole.

    >>> pieces = [chat.Piece("Q: ", False, False), chat.Piece("one two three", True, False)]
    >>> [p.text for p in cut_pieces(pieces, 12)[0]]
    ['Q: ', 'one two']
    >>> [p.text for p in cut_pieces(pieces, 8, keep_end=True)[0]]
    [' three']
    """
    order = list(reversed(pieces)) if keep_end else list(pieces)
    kept, total = [], 0
    for piece in order:
        if total + len(piece.text) <= max_chars:
            kept.append(piece)
            total += len(piece.text)
            continue
        if not piece.special:
            text = _cut_text(piece.text, max_chars - total, keep_end)
            kept.append(dataclasses.replace(piece, text=text))
        return (kept[::-1] if keep_end else kept), True
    return list(pieces), False


def _cut_text(text: str, room: int, keep_end: bool) -> str:
    """At most ``room`` characters of the start (end) of ``text``, cut before a space that
    follows a word if one is within `_SPACE_SEARCH` of the limit."""
    if keep_end:
        start = len(text) - room
        for at in _word_spaces(text, start, min(len(text), start + _SPACE_SEARCH)):
            return text[at:]
        return text[start:]
    for at in reversed(list(_word_spaces(text, max(1, room - _SPACE_SEARCH), room + 1))):
        return text[:at]
    return text[:room]


def _word_spaces(text: str, begin: int, end: int) -> Iterator[int]:
    """Positions in ``[begin, end)`` of a space right after a character that is not whitespace."""
    at = text.find(" ", max(begin, 1), end)
    while at != -1:
        if text[at - 1] not in _WHITESPACE:
            yield at
        at = text.find(" ", at + 1, end)


def tokenize_window(
    pieces: Sequence[chat.Piece], spec: Any, truncation: str
) -> tuple[np.ndarray, np.ndarray]:
    """`chat.tokenize` of the part of ``pieces`` that a row of ``spec.seq_len`` keeps under
    ``truncation``; what the packer keeps of it is what it keeps of the whole chat's ids.

    The cut keeps `_SLACK_TOKENS` ids more than the row. It starts at `_TYPICAL_TOKEN_BYTES`
    characters a token and is widened while the text spells fewer tokens than that: tokens longer
    than typical, up to ``max_token_bytes``, or a normalizer that drops or merges characters.
    """
    if truncation not in packing.TRUNCATION:
        raise ConfigError(f"data.truncation={truncation!r}; expected one of {packing.TRUNCATION}")
    tokenizer, fmt = spec.tokenizer, spec.chat_format
    needed = spec.seq_len + 1 + _SLACK_TOKENS
    # Most text spells fewer bytes per token than the longest token: start from a typical size.
    token_bytes = getattr(tokenizer, "max_token_bytes", _TYPICAL_TOKEN_BYTES)
    max_chars = needed * min(token_bytes, _TYPICAL_TOKEN_BYTES) + _SPACE_SEARCH
    while True:
        window, cut = cut_pieces(pieces, max_chars, truncation == "truncate_prompt_left")
        ids, mask = chat.tokenize(window, tokenizer, fmt)
        if not cut or len(ids) >= needed:
            return ids, mask
        max_chars *= 4


def encode_example(
    example: dict, spec: Any, truncation: str | None = None
) -> dict[str, np.ndarray]:
    """One chat -> next-token inputs, targets and loss mask (see `packing.to_next_token`).

    With ``truncation`` (one of `packing.TRUNCATION`), a chat longer than a row is first cut to
    what a `packing.Packer` of ``spec.seq_len`` keeps of it (see `tokenize_window`), so that its
    cost is bounded by ``seq_len`` rather than by its size; without, it is tokenized whole. A
    chat that cannot be rendered raises `DataError` naming where it came from.
    """
    try:
        pieces = chat.render(
            example["messages"],
            spec.chat_format,
            train_on=spec.train_on,
            tools=example.get("tools"),
        )
    except ValueError as e:
        raise DataError(
            example.get("origin", example.get("source", "?")), str(e), reason="bad chat"
        ) from None
    if truncation is None:
        ids, mask = chat.tokenize(pieces, spec.tokenizer, spec.chat_format)
    else:
        ids, mask = tokenize_window(pieces, spec, truncation)
    example_tokens = packing.to_next_token(ids, mask)
    source = spec.source_index.get(example.get("source", mixture.BUILTIN), 0)
    example_tokens["source_ids"] = np.full(len(ids) - 1, source, np.int32)
    return example_tokens


def encode_examples(
    examples: Iterable[dict], spec: Any, stats: packing.PackingStats, truncation: str
) -> Iterator[dict[str, np.ndarray]]:
    """`encode_example` of each chat, cut for ``truncation``; with ``spec.on_bad_example ==
    "skip"``, a chat that cannot be rendered is counted in ``stats.dropped`` and skipped."""
    for example in examples:
        stats.sources[example.get("source", mixture.BUILTIN)] += 1
        try:
            yield encode_example(example, spec, truncation)
        except DataError as e:
            if spec.on_bad_example != "skip":
                raise
            stats.examples += 1
            stats.dropped[e.reason or "bad example"] += 1
