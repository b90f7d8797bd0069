"""Record formats: ``alpaca``, ``messages`` (OpenAI chat), ``sharegpt`` and ``prompt_completion``
records into the normal form, whatever storage they were read from.

One example in normal form::

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
     "source": str, "tools": str | None, "origin": "path:line"}

Tool-call chats keep the OpenAI form that chat templates read: an assistant turn may hold
``tool_calls``, ``[{"type": "function", "function": {"name": str, "arguments": dict}}]`` (with an
``id`` when the record has one; ``arguments`` given as JSON text are parsed into their object, as
templates expect), and a tool turn its ``tool_call_id`` and ``name``. ShareGPT's
``function_call`` turn (``{"name", "arguments"}`` JSON, or a list of them) becomes such an
assistant turn and its ``observation`` turn a tool turn
(`itune.data.jinja_template.openai_messages`); its ``tools``, bare function schemas, are put in
the OpenAI form too (`_openai_tools`).

``auto`` picks a format from the keys of a source's first record. A field map renames a format's
fields, ``{"instruction": "question", "output": "answer"}``, and its values may be dotted paths
into nested records, ``{"output": "instances.0.output"}``. A role map adds role names to
``DEFAULT_ROLES``. A bad record raises `DataError`
(``file:line: field 'output': expected a string, got int``).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from itune.data.jinja_template import TemplateError, openai_messages
from itune.errors import ConfigError, UserError

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
_MISSING = object()


class DataError(UserError, ValueError):
    """A bad record: ``location: field 'f': problem``; ``reason`` is its short, countable kind."""

    def __init__(self, location: str, problem: str, field: str | None = None, reason: str = ""):
        self.location, self.problem, self.field, self.reason = location, problem, field, reason
        where = f"{location}: field {field!r}" if field else location
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # Pickles (e.g. across worker processes) with all its parts.
        return DataError, (self.location, self.problem, self.field, self.reason)


DataError.__module__ = "itune.data.sources"  # Where it is public (and pickled from).


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
    check_format(fmt)
    check_maps(fmt, field_map, role_map)
    return convert(record, fmt, field_map, role_map, source, origin, origin)


def convert(record, fmt, field_map, role_map, source, origin, location) -> dict:
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
        if fmt == "sharegpt":
            tools = _openai_tools(tools)
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
    tool calls and results as the module docstring says.

    >>> record = {"system": "Use tools.", "tools": "[]", "conversations": [
    ...     {"from": "human", "value": "Weather?"},
    ...     {"from": "function_call", "value": '{"name": "weather", "arguments": {}}'},
    ...     {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]}
    >>> example = convert_record(record, "sharegpt")
    >>> example["tools"], example["messages"]  # doctest: +NORMALIZE_WHITESPACE
    ('[]', [{'role': 'system', 'content': 'Use tools.'}, {'role': 'user', 'content': 'Weather?'},
            {'role': 'assistant', 'content': '', 'tool_calls': [{'type': 'function',
             'function': {'name': 'weather', 'arguments': {}}}]},
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
        content_field = f"{field}.{content_key}"
        if name == "function_call":
            if content is _MISSING:
                raise fields.error(content_field, "missing", "missing field")
            text = fields.check_string(content, content_field)
            messages.append(_function_call(fields, text, content_field))
        elif roles[name] == "assistant" and turn.get("tool_calls") is not None:
            calls = _checked_calls(fields, turn["tool_calls"], f"{field}.tool_calls")
            if content in (_MISSING, None):
                content = ""
            content = fields.check_string(content, content_field)
            messages.append({"role": "assistant", "content": content, "tool_calls": calls})
        else:
            if content is _MISSING or (content is None and roles[name] == "tool"):
                raise fields.error(content_field, "missing", "missing field")
            content = fields.check_string(content, content_field)
            message = fields.turn(roles[name], content, content_field)
            if roles[name] == "tool":
                message.update(_tool_result_fields(fields, turn, field))
            messages.append(message)
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


def _openai_tools(tools: str | None) -> str | None:
    """ShareGPT's ``tools``, bare function schemas ``{"name", "parameters"...}``, in the OpenAI
    form that templates read, ``{"type": "function", "function": schema}``.

    >>> _openai_tools('[{"name": "add"}]')
    '[{"type": "function", "function": {"name": "add"}}]'
    """
    try:
        parsed = json.loads(tools) if tools else None
    except json.JSONDecodeError:
        return tools  # Left for the template to report, naming the record.
    parsed = [parsed] if isinstance(parsed, dict) else parsed
    if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
        return tools
    if not any("name" in t and "function" not in t for t in parsed):
        return tools
    wrapped = [
        {"type": "function", "function": t} if "name" in t and "function" not in t else t
        for t in parsed
    ]
    return json.dumps(wrapped, ensure_ascii=False)


def _function_call(fields: _Fields, text: str, field: str) -> dict:
    """A ShareGPT ``function_call`` turn as an OpenAI assistant turn with ``tool_calls``."""
    try:
        message = openai_messages([{"role": "function_call", "content": text}])[0]
    except TemplateError as e:
        problem = str(e).partition(": ")[2] or str(e)
        raise fields.error(field, problem, "bad tool call") from None
    except AttributeError:  # A list holding something other than objects.
        raise fields.error(
            field, "expected a {name, arguments} object or a list of them", "bad tool call"
        ) from None
    message["tool_calls"] = _checked_calls(fields, message["tool_calls"], field)
    return message


def _checked_calls(fields: _Fields, calls: Any, field: str) -> list[dict]:
    """OpenAI ``tool_calls`` checked: each a function with a string name and an object of
    arguments (JSON text of one is parsed); a bare ``{name, arguments}`` is put in the form."""
    if not isinstance(calls, list) or not calls:
        raise fields.error(field, f"expected a list of calls, got {_type(calls)}", "bad tool call")
    checked = []
    for j, call in enumerate(calls):
        where = f"{field}.{j}"
        if not isinstance(call, dict):
            raise fields.error(where, f"expected an object, got {_type(call)}", "bad tool call")
        function = call.get("function", call)
        if not isinstance(function, dict):
            problem = f"expected an object, got {_type(function)}"
            raise fields.error(f"{where}.function", problem, "bad tool call")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            problem = f"expected the function's name, got {_type(name)}"
            raise fields.error(f"{where}.function.name", problem, "bad tool call")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                problem = f"arguments are not JSON ({e})"
                raise fields.error(
                    f"{where}.function.arguments", problem, "bad tool call"
                ) from None
        if not isinstance(arguments, dict):
            problem = f"expected a JSON object (or its text), got {_type(arguments)}"
            raise fields.error(f"{where}.function.arguments", problem, "bad tool call")
        if call.get("id") is not None:
            fields.check_string(call["id"], f"{where}.id")
        # The record's own keys, in its order: some templates dump a call whole.
        out = dict(call) if "function" in call else {"type": "function", "function": call}
        out.setdefault("type", "function")
        out["function"] = {**function, "arguments": arguments}
        checked.append(out)
    return checked


def _tool_result_fields(fields: _Fields, turn: dict, field: str) -> dict:
    """A tool turn's ``tool_call_id`` and ``name``, when it has them."""
    out = {}
    for key in ("tool_call_id", "name"):
        if turn.get(key) is not None:
            out[key] = fields.check_string(turn[key], f"{field}.{key}")
    return out


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


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; known formats: {list(FORMATS)}")


def check_maps(fmt: str, field_map: Mapping[str, str], role_map: Mapping[str, str]) -> None:
    known = FIELDS.get(fmt) or sorted({f for names in FIELDS.values() for f in names})
    unknown = sorted(set(field_map) - set(known))
    if unknown:
        raise ConfigError(f"field_map keys {unknown} are not fields of {fmt!r}; known: {known}")
    bad = {k: v for k, v in role_map.items() if v not in ROLES}
    if bad:
        raise ConfigError(f"role_map {bad}: roles must be one of {ROLES}")
