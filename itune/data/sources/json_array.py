"""JSON files holding one list of records, loaded whole; told from JSONL by their first byte.

A record's index is its 0-based position in the list; its ``origin`` is ``path:line``, the
1-based line where it starts (so an editor can jump to it), and errors also give its 1-based
record number.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from typing import Any, Iterator

import tensorflow as tf

from itune.data.sources.formats import DataError
from itune.data.sources.records import Raw

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # Bytes kept by the surrogateescape error handler.


def holds_array(path: str) -> bool:
    """Whether the first non-blank byte opens a list; JSONL records open with ``{``."""
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(4096):
            chunk = chunk.removeprefix(codecs.BOM_UTF8).lstrip()
            if chunk:
                return chunk.startswith(b"[")
    return False


def count(spec: Any) -> int:
    """The number of records of the list in ``spec.path`` (it is decoded to count them)."""
    return sum(1 for _ in records(spec, 0, None))


def records(spec: Any, first: int, stop: int | None) -> Iterator[Raw]:
    """A `Raw` record per element ``first <= index < stop`` of the top-level JSON list in the
    file ``spec.path``; the whole list is decoded (and checked) whatever the range.

    Decodes element by element to learn the line each starts on. Undecodable bytes are kept as
    surrogates, so that only the records holding them are bad.
    """
    path, stop = spec.path, math.inf if stop is None else stop
    with tf.io.gfile.GFile(path, "rb") as f:
        # One expression, so that the file's bytes are dropped once decoded.
        text = f.read().removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")
    undecodable = _UNDECODABLE.search(text) is not None
    decoder = json.JSONDecoder()
    i = _WHITESPACE.match(text, _WHITESPACE.match(text).end() + 1).end()  # Just past the "[".
    line, counted, index = 1, 0, 0
    while not text.startswith("]", i):
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            where = f"{path}:{e.lineno}"
            raise DataError(
                where, f"malformed JSON: {e.msg} (column {e.colno})", None, "malformed JSON"
            ) from None
        line += text.count("\n", counted, i)
        counted, index = i, index + 1
        if first < index <= stop:
            origin = f"{path}:{line}"
            location = f"{origin} (record {index})"
            if undecodable and (bad := _UNDECODABLE.search(text, i, end)):
                byte = bad.group().encode("utf-8", errors="surrogateescape")
                record = DataError(location, f"invalid UTF-8 byte {byte!r}", reason="invalid UTF-8")
            yield Raw(index - 1, origin, location, record)
        i = _WHITESPACE.match(text, end).end()
        if text.startswith(",", i):
            i = _WHITESPACE.match(text, i + 1).end()
        elif not text.startswith("]", i):
            where = f"{path}:{text.count(chr(10), 0, i) + 1}"
            raise DataError(where, "malformed JSON: expected ',' or ']'", None, "malformed JSON")
