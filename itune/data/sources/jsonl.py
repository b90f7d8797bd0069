"""JSONL files: one JSON record per line, streamed; blank lines are records that yield nothing.

A record's index is its 0-based line, so the number of records is the number of lines, counted
without parsing them; ``origin`` is ``path:line``, 1-based.
"""

from __future__ import annotations

import codecs
import json
from typing import Any, Iterator

import tensorflow as tf

from itune.data.sources.formats import DataError
from itune.data.sources.records import Raw

_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"


def count(spec: Any) -> int:
    """The number of lines of the file ``spec.path`` (a last line without a newline counts)."""
    lines, last = 0, b"\n"
    with tf.io.gfile.GFile(spec.path, "rb") as f:
        while chunk := f.read(1 << 22):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return lines + (last != b"\n")


def records(spec: Any, first: int, stop: int | None) -> Iterator[Raw]:
    """A `Raw` record per non-blank line ``first <= index < stop`` of the file ``spec.path``.

    A huge line is held at most twice at once: as bytes while it is decoded, then as text while
    its record is parsed (so lines are read one by one, and each is dropped once used).
    """
    path = spec.path
    with tf.io.gfile.GFile(path, "rb") as f:
        index = -1
        while raw := f.readline():
            index += 1
            if stop is not None and index >= stop:
                return
            if index < first:
                continue
            if index == 0:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw or raw.isspace():
                continue
            origin = f"{path}:{index + 1}"
            end = len(raw)
            while raw[end - 1] in _ASCII_WHITESPACE:  # What bytes.rstrip() strips, uncopied.
                end -= 1
            try:
                text = str(memoryview(raw)[:end], "utf-8")
            except UnicodeDecodeError as e:
                problem = f"invalid UTF-8 byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}"
                yield Raw(index, origin, origin, DataError(origin, problem, reason="invalid UTF-8"))
                continue
            raw = None
            record, text = _json_record(text, origin), None
            yield Raw(index, origin, origin, record)


def _json_record(text: str, origin: str) -> Any:
    """The record of one JSONL line, or the `DataError` saying why it has none."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problem = f"malformed JSON: {e.msg} (column {e.colno})"
        return DataError(origin, problem, reason="malformed JSON")
