"""JSONL files: one JSON record per line, indexed by line offset; blank lines are records that yield
nothing.

A record's index is its 0-based line, so the number of records is the number of lines, counted
without parsing them; ``origin`` is ``path:line``, 1-based. A range of records is found by the byte
offsets of its lines (`line_offsets`, a scan for newlines that decodes nothing): a reader of one
block of the file seeks to it and decodes only its lines, and its `Lines` table reads any one line
again on demand, so that the records need not be held.
"""

from __future__ import annotations

import codecs
import json
import os
import threading
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from itune.data.sources.formats import DataError
from itune.data.sources.records import Raw

_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"
_SCAN_BYTES = 1 << 22


def count(spec: Any) -> int:
    """The number of lines of the file ``spec.path`` (a last line without a newline counts)."""
    lines, last = 0, b"\n"
    with tf.io.gfile.GFile(spec.path, "rb") as f:
        while chunk := f.read(_SCAN_BYTES):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return lines + (last != b"\n")


def line_offsets(path: str, first: int = 0, stop: int | None = None) -> np.ndarray:
    """The byte offsets where lines ``first .. stop - 1`` start, then where the last one ends.

    Only newlines are looked for, and only up to line ``stop``; the result costs 8 bytes a line
    of the range, whatever the lines hold.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
    ...     _ = f.write(b'{"a": 1}\\n\\n{"b": 22}')
    >>> line_offsets(f.name).tolist(), line_offsets(f.name, 1, 2).tolist()
    ([0, 9, 10, 19], [9, 10])
    """
    want = None if stop is None else stop + 1  # Line starts [first, want): the last is the end.
    found, seen, size = [np.zeros(0, np.int64)], 0, 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while (want is None or seen < want) and (chunk := f.read(_SCAN_BYTES)):
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n"))
            starts = newlines.astype(np.int64) + (size + 1)
            if size == 0:
                starts = np.concatenate([np.zeros(1, np.int64), starts])
            size += len(chunk)
            lo = min(max(first - seen, 0), len(starts))
            hi = len(starts) if want is None else min(max(want - seen, 0), len(starts))
            found.append(starts[lo:hi])
            seen += len(starts)
    offsets = np.concatenate(found)
    if want is None or seen < want:  # The range runs to the end of the file.
        if len(offsets) and offsets[-1] == size:  # After a last newline no line starts.
            offsets = offsets[:-1]
        offsets = np.append(offsets, np.int64(size))
    return offsets


class Lines:
    """Lines ``first .. stop - 1`` of a JSONL file as `Raw` records: in order (`records`) or one
    at a time by index (`raw`), through their byte offsets."""

    def __init__(self, path: str, first: int = 0, stop: int | None = None):
        self.path, self.first = path, first
        self.offsets = line_offsets(path, first, stop)
        self._file, self._lock = None, threading.Lock()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def records(self) -> Iterator[Raw]:
        """A `Raw` record per non-blank line of the range, read in order.

        Lines are read one at a time, and each is dropped once its record is parsed.
        """
        with tf.io.gfile.GFile(self.path, "rb") as f:
            f.seek(int(self.offsets[0]))
            for index in range(self.first, self.first + len(self)):
                raw = _line_record(f.readline(), index, self.path)
                if raw is not None:
                    yield raw

    def raw(self, index: int) -> Raw | None:
        """Line ``index`` of the file (which must be in the range) as a `Raw` record; None when
        it is blank. Safe to call from several threads."""
        start, end = self.offsets[index - self.first : index - self.first + 2].tolist()
        if "://" not in self.path:
            if self._file is None:
                with self._lock:
                    self._file = self._file or open(self.path, "rb")  # noqa: SIM115
            line = os.pread(self._file.fileno(), end - start, start)
        else:
            with self._lock:
                self._file = self._file or tf.io.gfile.GFile(self.path, "rb")
                self._file.seek(start)
                line = self._file.read(end - start)
        return _line_record(line, index, self.path)


def records(spec: Any, first: int, stop: int | None) -> Iterator[Raw]:
    """A `Raw` record per non-blank line ``first <= index < stop`` of the file ``spec.path``."""
    return Lines(spec.path, first, stop).records()


def table(spec: Any, first: int, stop: int | None) -> Lines:
    """Lines ``first .. stop - 1`` of ``spec.path``, to be read again one at a time."""
    return Lines(spec.path, first, stop)


def _line_record(raw: bytes, index: int, path: str) -> Raw | None:
    """The `Raw` record of line ``index`` (its bytes ``raw``); None for a blank line."""
    if index == 0:
        raw = raw.removeprefix(codecs.BOM_UTF8)
    if not raw or raw.isspace():
        return None
    origin = f"{path}:{index + 1}"
    end = len(raw)
    while raw[end - 1] in _ASCII_WHITESPACE:  # What bytes.rstrip() strips, uncopied.
        end -= 1
    try:
        text = str(memoryview(raw)[:end], "utf-8")
    except UnicodeDecodeError as e:
        problem = f"invalid UTF-8 byte {raw[e.start : e.start + 1]!r} at column {e.start + 1}"
        return Raw(index, origin, origin, DataError(origin, problem, reason="invalid UTF-8"))
    return Raw(index, origin, origin, _json_record(text, origin))


def _json_record(text: str, origin: str) -> Any:
    """The record of one JSONL line, or the `DataError` saying why it has none."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problem = f"malformed JSON: {e.msg} (column {e.colno})"
        return DataError(origin, problem, reason="malformed JSON")
