"""Instruction data from local or gs:// JSON / JSONL files, read into one normal form.

One example in normal form::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
     "source": str, "tools": str | None, "origin": "path:line"}

A file is either a JSON list of records (loaded whole) or JSONL, one record per line (streamed;
blank lines ignored); which one is read off its first non-blank byte, not its name. ``origin`` is
the 1-based line where the record starts, for JSON lists too, so an editor can jump to it; errors
in a JSON list also give the 1-based record number.

Record formats (``FORMATS``): ``alpaca``, ``messages`` (OpenAI chat), ``sharegpt``,
``prompt_completion``, and ``auto``, which picks one from the keys of the first record. A field
map renames a format's fields, ``{"instruction": "question", "output": "answer"}``, and its values
may be dotted paths into nested records, ``{"output": "instances.0.output"}``. A role map adds
role names to ``DEFAULT_ROLES``.

A bad record raises `DataError` (``file:line: field 'output': expected a string, got int``), or
with ``on_bad_example="skip"`` is skipped and counted in `SourceStats.skipped` by reason.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import functools
import json
import logging
import math
import re
from typing import Any, Iterator, Mapping

import tensorflow as tf

from itune.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion")
# The fields of each format, by their canonical names: the keys a field map may use.
FIELDS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "messages": ("messages", "role", "content", "system", "tools"),
    "sharegpt": ("conversations", "from", "value", "system", "tools"),
    "prompt_completion": ("prompt", "completion", "system"),
}
# Role names as they appear in the data -> roles of the normal form; shared by messages and
# sharegpt, so that either spelling works in either.
DEFAULT_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
}
ON_BAD_EXAMPLE = ("error", "skip")
_MISSING = object()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # Bytes kept by the surrogateescape error handler.
_LOGGED_SKIPS = 5  # Skipped examples logged per source; the rest are only counted.


class DataError(UserError, ValueError):
    """A bad record: ``location: field 'f': problem``; ``reason`` is its short, countable kind."""

    def __init__(self, location: str, problem: str, field: str | None = None, reason: str = ""):
        self.location, self.problem, self.field, self.reason = location, problem, field, reason
        where = f"{location}: field {field!r}" if field else location
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # Pickles (e.g. across worker processes) with all its parts.
        return DataError, (self.location, self.problem, self.field, self.reason)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of ``config.data.sources``: where a data set is and how to read its records."""

    name: str
    path: str  # A .json / .jsonl file, local or gs://.
    format: str = "auto"  # One of FORMATS.
    field_map: Mapping[str, str] = dataclasses.field(default_factory=dict)  # Canonical -> path.
    role_map: Mapping[str, str] = dataclasses.field(default_factory=dict)  # Data role -> ROLES.
    weight: float = 1.0  # Relative share of this source in a mixture.

    def __post_init__(self):
        if not self.name or not self.path:
            raise ValueError(f"source {self.name!r}: name and path must be non-empty")
        _check_format(self.format)
        _check_maps(self.format, self.field_map, self.role_map)
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight)):
            raise ValueError(f"source {self.name!r}: weight must be a number, got {self.weight!r}")
        if self.weight <= 0:
            raise ValueError(f"source {self.name!r}: weight must be positive, got {self.weight}")

    @classmethod
    def from_config(cls, cfg: Any, name: str | None = None) -> SourceSpec:
        """From an ``ml_collections.ConfigDict`` or a dict; ``name`` fills in a missing name."""
        return spec_from_values(cls, cfg, name)


def spec_from_values(cls, cfg: Any, name: str | None = None):
    """A source spec dataclass ``cls`` from a config entry, rejecting keys it does not have."""
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if name is not None:
        values.setdefault("name", name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"source {values.get('name')!r}: unknown keys {unknown}; known: {known}")
    for key in ("field_map", "role_map"):
        values[key] = dict(values.get(key) or {})
    return cls(**values)


def specs_from_config(sources: Any) -> list[SourceSpec]:
    """``config.data.sources`` as specs: a mapping of name -> entry, or a list of entries."""
    if hasattr(sources, "items"):
        return [SourceSpec.from_config(cfg, name=name) for name, cfg in sources.items()]
    return [SourceSpec.from_config(cfg) for cfg in sources]


@dataclasses.dataclass
class SourceStats:
    """What reading one source did: records read, skipped (by reason) and yielded."""

    name: str = ""
    read: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    yielded: int = 0

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return f"{self.name}: {self.read} read, {self.yielded} yielded, skipped: {skipped}"


def read_source(
    spec: SourceSpec, on_bad_example: str = "error", stats: SourceStats | None = None
) -> Iterator[dict]:
    """The examples of one source in normal form, in file order.

    ``on_bad_example="skip"`` skips bad records and counts them in ``stats.skipped``. Problems
    with the file as a whole raise in either mode: a JSON list that does not parse (there is no
    next record to go on from), or ``auto`` finding no known format in the first record.
    """
    return (example for _, example in read_records(spec, on_bad_example, stats))


def read_records(
    spec: SourceSpec,
    on_bad_example: str = "error",
    stats: SourceStats | None = None,
    first: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[int, dict]]:
    """``(record index, example)`` for the records ``first <= index < stop`` of a source.

    A record's index is its 0-based line in a JSONL file (a blank line is a record that yields
    nothing) and its 0-based position in a JSON list, so `count_records` tells the range of
    indices without parsing a JSONL file. Records outside the range are not parsed (a JSON list
    is still decoded whole) and not counted in ``stats``.
    """
    if on_bad_example not in ON_BAD_EXAMPLE:
        raise ValueError(f"on_bad_example={on_bad_example!r}; expected one of {ON_BAD_EXAMPLE}")
    _check_exists(spec)
    stats = stats if stats is not None else SourceStats()
    stats.name = stats.name or spec.name
    stop = count_records(spec) if stop is None else stop
    return _read(spec, on_bad_example == "skip", stats, first, stop)


def count_records(spec: SourceSpec) -> int:
    """The number of record indices of a source (see `read_records`): for JSONL, its lines."""
    _check_exists(spec)
    if _is_json_list(spec.path):
        return sum(1 for _ in _json_list(spec.path, 0, math.inf))
    lines, last = 0, b"\n"
    with tf.io.gfile.GFile(spec.path, "rb") as f:
        while chunk := f.read(1 << 22):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return lines + (last != b"\n")


def _check_exists(spec: SourceSpec) -> None:
    if not tf.io.gfile.exists(spec.path):
        raise FileNotFoundError(f"source {spec.name!r}: no such file: {spec.path}")


def _read(
    spec: SourceSpec, skip: bool, stats: SourceStats, first: int, stop: int
) -> Iterator[tuple[int, dict]]:
    reader = _json_list if _is_json_list(spec.path) else _jsonl
    fmt = None if spec.format == "auto" else spec.format
    convert = functools.partial(
        _convert, field_map=spec.field_map, role_map=spec.role_map, source=spec.name
    )
    for index, origin, location, record in reader(spec.path, first, stop):
        stats.read += 1
        try:
            if isinstance(record, DataError):
                raise record
            if fmt is None and isinstance(record, dict):
                fmt = detect_format(record, spec.field_map, location)
            example = convert(record, fmt or spec.format, origin=origin, location=location)
        except DataError as e:
            if not skip or e.reason == "unknown format":
                raise
            stats.skipped[e.reason] += 1
            if sum(stats.skipped.values()) <= _LOGGED_SKIPS:
                logging.warning("source %s: skipped %s", spec.name, e)
            continue
        stats.yielded += 1
        yield index, example


def _is_json_list(path: str) -> bool:
    """Whether the first non-blank byte opens a list; JSONL records open with ``{``."""
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(4096):
            chunk = chunk.removeprefix(codecs.BOM_UTF8).lstrip()
            if chunk:
                return chunk.startswith(b"[")
    return False


def _jsonl(path: str, first: int, stop: int) -> Iterator[tuple[int, str, str, Any]]:
    """``(index, origin, location, record or DataError)`` per non-blank line of the range.

    A huge line is held at most twice at once: as bytes while it is decoded, then as text while
    its record is parsed (so lines are read one by one, and each is dropped once used).
    """
    with tf.io.gfile.GFile(path, "rb") as f:
        index = -1
        while raw := f.readline():
            index += 1
            if index >= stop:
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
                yield index, origin, origin, DataError(origin, problem, reason="invalid UTF-8")
                continue
            raw = None
            record, text = _json_record(text, origin), None
            yield index, origin, origin, record


def _json_record(text: str, origin: str) -> Any:
    """The record of one JSONL line, or the `DataError` saying why it has none."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problem = f"malformed JSON: {e.msg} (column {e.colno})"
        return DataError(origin, problem, reason="malformed JSON")


def _json_list(path: str, first: int, stop: int) -> Iterator[tuple[int, str, str, Any]]:
    """``(index, origin, location, record or DataError)`` per element of a top-level JSON list
    in the range; the whole list is decoded (and checked) whatever the range.

    Decodes element by element to learn the line each starts on. Undecodable bytes are kept as
    surrogates, so that only the records holding them are bad.
    """
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
            yield index - 1, origin, location, record
        i = _WHITESPACE.match(text, end).end()
        if text.startswith(",", i):
            i = _WHITESPACE.match(text, i + 1).end()
        elif not text.startswith("]", i):
            where = f"{path}:{text.count(chr(10), 0, i) + 1}"
            raise DataError(where, "malformed JSON: expected ',' or ']'", None, "malformed JSON")


def detect_format(
    record: dict, field_map: Mapping[str, str] | None = None, location: str = ""
) -> str:
    """The format whose telling field the record has (after the field map).

    >>> detect_format({"question": "2+2?", "answer": "4"}, {"instruction": "question"})
    'alpaca'
    """
    for fmt, key in (
        ("messages", "messages"),
        ("sharegpt", "conversations"),
        ("alpaca", "instruction"),
        ("prompt_completion", "prompt"),
    ):
        if _lookup(record, (field_map or {}).get(key, key)) is not _MISSING:
            return fmt
    problem = f"cannot tell the format from keys {sorted(record)[:10]}; set format to one of"
    raise DataError(location, f"{problem} {FORMATS[1:]} (and a field_map)", None, "unknown format")


def convert_record(
    record: Any,
    fmt: str,
    field_map: Mapping[str, str] | None = None,
    origin: str = "",
    *,
    role_map: Mapping[str, str] | None = None,
    source: str = "",
) -> dict:
    """One record in normal form; raises `DataError` naming ``origin`` and the bad field.

    >>> record = {"question": "Say hi.", "answer": "Hi!"}
    >>> fields = {"instruction": "question", "output": "answer"}
    >>> convert_record(record, "alpaca", fields, "x.jsonl:3")  # doctest: +NORMALIZE_WHITESPACE
    {'messages': [{'role': 'user', 'content': 'Say hi.'}, {'role': 'assistant', 'content': 'Hi!'}],
     'source': '', 'tools': None, 'origin': 'x.jsonl:3'}
    >>> convert_record({"question": "Say hi.", "answer": 7}, "alpaca", fields, "x.jsonl:4")
    Traceback (most recent call last):
    itune.data.sources.DataError: x.jsonl:4: field 'answer': expected a string, got int
    """
    field_map, role_map = field_map or {}, role_map or {}
    _check_format(fmt)
    _check_maps(fmt, field_map, role_map)
    return _convert(record, fmt, field_map, role_map, source, origin, origin)


def _convert(record, fmt, field_map, role_map, source, origin, location) -> dict:
    """`convert_record` without the checks of its arguments; errors name ``location``."""
    if not isinstance(record, dict):
        raise DataError(
            location, f"expected a JSON object, got {_type(record)}", None, "not an object"
        )
    if fmt == "auto":
        fmt = detect_format(record, field_map, location)
    fields = _Fields(record, field_map, location)
    if fmt == "alpaca":
        messages, tools = _alpaca(fields), None
    elif fmt == "prompt_completion":
        messages, tools = _prompt_completion(fields), None
    else:
        roles = {**DEFAULT_ROLES, **role_map}
        messages, tools = _conversation(fields, FIELDS[fmt][:3], roles)
    return {"messages": messages, "source": source, "tools": tools, "origin": origin}


class _Fields:
    """A record seen through a field map; its getters raise `DataError` naming the field."""

    def __init__(self, record: dict, field_map: Mapping[str, str], location: str):
        self.record, self.field_map, self.location = record, field_map, location

    def path(self, name: str) -> str:
        return self.field_map.get(name, name)

    def error(self, field: str | None, problem: str, reason: str) -> DataError:
        return DataError(self.location, problem, field, reason)

    def get(self, name: str, required: bool = True) -> Any:
        """The raw value; ``None`` when optional and missing or null."""
        value = _lookup(self.record, self.path(name))
        if value is _MISSING and required:
            keys = ", ".join(sorted(self.record)[:10])
            raise self.error(self.path(name), f"missing (record keys: {keys})", "missing field")
        return None if value is _MISSING else value

    def string(self, name: str, required: bool = True) -> str | None:
        value = self.get(name, required)
        return None if value is None and not required else self.check_string(value, self.path(name))

    def check_string(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {_type(value)}", "wrong type")
        return value

    def turn(self, role: str, content: str, field: str) -> dict:
        # An empty answer would train the model to end its turn at once.
        if role == "assistant" and not content.strip():
            raise self.error(field, "empty assistant turn", "empty assistant turn")
        return {"role": role, "content": content}


def _alpaca(fields: _Fields) -> list[dict]:
    """``instruction``, ``input``, ``output`` (+ ``system``, ``history``) -> messages.

    The user turn is the instruction, then a blank line and the input when there is one; each
    ``history`` pair ``[user, assistant]`` comes before it, after the system turn.

    >>> record = {"instruction": "Add.", "input": "2 3", "output": "5",
    ...           "system": "Be brief.", "history": [["Hi", "Hello"]]}
    >>> convert_record(record, "alpaca")["messages"]  # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
     {'role': 'assistant', 'content': 'Hello'}, {'role': 'user', 'content': 'Add.\\n\\n2 3'},
     {'role': 'assistant', 'content': '5'}]
    """
    messages = _system(fields)
    history, path = fields.get("history", required=False) or [], fields.path("history")
    if not isinstance(history, list):
        raise fields.error(path, f"expected a list of pairs, got {_type(history)}", "wrong type")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            problem = f"expected a [user, assistant] pair, got {_type(pair)}"
            raise fields.error(f"{path}.{i}", problem, "wrong type")
        user, answer = (fields.check_string(pair[j], f"{path}.{i}.{j}") for j in (0, 1))
        messages += [{"role": "user", "content": user}]
        messages += [fields.turn("assistant", answer, f"{path}.{i}.1")]
    instruction = fields.string("instruction")
    extra = fields.string("input", required=False) or ""
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages.append({"role": "user", "content": user})
    messages.append(fields.turn("assistant", fields.string("output"), fields.path("output")))
    return messages


def _prompt_completion(fields: _Fields) -> list[dict]:
    """``prompt``, ``completion`` (+ ``system``) -> a user turn and an assistant turn.

    >>> convert_record({"prompt": "2+2?", "completion": "4"}, "prompt_completion")["messages"]
    [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]
    """
    messages = _system(fields)
    messages.append({"role": "user", "content": fields.string("prompt")})
    answer = fields.string("completion")
    return messages + [fields.turn("assistant", answer, fields.path("completion"))]


def _conversation(
    fields: _Fields, keys: tuple[str, str, str], roles: Mapping[str, str]
) -> tuple[list[dict], str | None]:
    """A list of turns (+ ``system``, ``tools``) -> messages and tools; for messages and sharegpt.

    ``keys`` names the list and each turn's role and content: ``("messages", "role", "content")``
    or ``("conversations", "from", "value")``. Turns after the last assistant turn are dropped,
    since nothing after it is trained. ``tools`` is kept as a string (a list is dumped to JSON);
    an OpenAI assistant turn with ``tool_calls`` and no content gets the calls as JSON content.

    >>> record = {"system": "Use tools.", "tools": "[]", "conversations": [
    ...     {"from": "human", "value": "Weather?"},
    ...     {"from": "function_call", "value": '{"name": "weather"}'},
    ...     {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    >>> example = convert_record(record, "sharegpt")
    >>> example["tools"], example["messages"]  # doctest: +NORMALIZE_WHITESPACE
    ('[]', [{'role': 'system', 'content': 'Use tools.'}, {'role': 'user', 'content': 'Weather?'},
            {'role': 'assistant', 'content': '{"name": "weather"}'},
            {'role': 'tool', 'content': 'sunny'}, {'role': 'assistant', 'content': 'Sunny.'}])
    """
    list_key, role_key, content_key = (fields.path(k) for k in keys)
    turns = fields.get(keys[0])
    if not isinstance(turns, list):
        raise fields.error(list_key, f"expected a list of turns, got {_type(turns)}", "wrong type")
    messages = _system(fields)
    for i, turn in enumerate(turns):
        field = f"{list_key}.{i}"
        if not isinstance(turn, dict):
            raise fields.error(field, f"expected an object, got {_type(turn)}", "wrong type")
        name = _lookup(turn, role_key)
        if name is _MISSING:
            raise fields.error(f"{field}.{role_key}", "missing", "missing field")
        if not isinstance(name, str) or name not in roles:
            problem = f"unknown role {name!r}; known: {sorted(roles)} (add to role_map)"
            raise fields.error(f"{field}.{role_key}", problem, "unknown role")
        content = _lookup(turn, content_key)
        if (
            roles[name] == "assistant"
            and content in (_MISSING, None, "")
            and turn.get("tool_calls")
        ):
            content = _tool_calls(turn["tool_calls"])
        if content is _MISSING:
            raise fields.error(f"{field}.{content_key}", "missing", "missing field")
        content = fields.check_string(content, f"{field}.{content_key}")
        messages.append(fields.turn(roles[name], content, f"{field}.{content_key}"))
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not messages:
        raise fields.error(list_key, "no assistant turn", "no assistant turn")
    return messages, _tools(fields)


def _system(fields: _Fields) -> list[dict]:
    # An empty system prompt is the same as none.
    system = fields.string("system", required=False)
    return [{"role": "system", "content": system}] if system else []


def _tools(fields: _Fields) -> str | None:
    tools = fields.get("tools", required=False)
    if isinstance(tools, (list, dict)):
        return json.dumps(tools, ensure_ascii=False)
    if tools is not None and not isinstance(tools, str):
        problem = f"expected a string or a list, got {_type(tools)}"
        raise fields.error(fields.path("tools"), problem, "wrong type")
    return tools or None


def _tool_calls(calls: Any) -> Any:
    """OpenAI ``tool_calls`` as sharegpt's ``function_call`` text: ``{"name", "arguments"}``."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        return calls  # Left for the string check to report.
    out = []
    for call in calls:
        function = call.get("function", call)
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        out.append({"name": function.get("name"), "arguments": arguments})
    return json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)


def _lookup(record: Any, path: str) -> Any:
    """``record[path]``, else the dotted path ``"instances.0.output"``; `_MISSING` if absent."""
    if isinstance(record, dict) and path in record:
        return record[path]
    value = record
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; known formats: {list(FORMATS)}")


def _check_maps(fmt: str, field_map: Mapping[str, str], role_map: Mapping[str, str]) -> None:
    known = FIELDS.get(fmt) or sorted({f for names in FIELDS.values() for f in names})
    unknown = sorted(set(field_map) - set(known))
    if unknown:
        raise ValueError(f"field_map keys {unknown} are not fields of {fmt!r}; known: {known}")
    bad = {k: v for k, v in role_map.items() if v not in ROLES}
    if bad:
        raise ValueError(f"role_map {bad}: roles must be one of {ROLES}")
