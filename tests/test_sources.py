"""Instruction data sources: converters, file reading, bad input, and every shared data file."""

import doctest
import json
import pickle
import re

import ml_collections
import pytest

from itune.data import sources
from itune.data.sources import DataError, SourceSpec, SourceStats, convert_record, read_source


def _msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def _write(path, lines):
    """Writes JSONL lines: records JSON-dumped, bytes written as they are."""
    data = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    path.write_bytes(data)
    return str(path)


def test_docstring_examples():
    assert doctest.testmod(sources).failed == 0
    assert doctest.testmod(sources.formats).failed == 0


# Converters on hand-written records.


def test_alpaca_with_input_system_and_history():
    record = {
        "instruction": "Translate.",
        "input": "chat",
        "output": "cat",
        "system": "You translate French.",
        "history": [["Hello", "Bonjour"]],
    }
    assert convert_record(record, "alpaca", origin="f.json:3", source="demo") == {
        "messages": _msgs(
            ("system", "You translate French."),
            ("user", "Hello"),
            ("assistant", "Bonjour"),
            ("user", "Translate.\n\nchat"),
            ("assistant", "cat"),
        ),
        "source": "demo",
        "tools": None,
        "origin": "f.json:3",
    }


def test_alpaca_without_input_and_empty_system():
    for record in (
        {"instruction": "Say hi.", "output": "Hi!"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "", "history": []},
        {"instruction": "Say hi.", "input": "  ", "output": "Hi!", "system": None},
    ):
        messages = convert_record(record, "alpaca")["messages"]
        assert messages == _msgs(("user", "Say hi."), ("assistant", "Hi!"))


def test_messages_multi_turn_with_tools():
    record = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}],
            },
            {"role": "tool", "content": "-3C"},
            {"role": "assistant", "content": "Cold: -3C."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        "tools": [{"type": "function", "function": {"name": "weather"}}],
    }
    example = convert_record(record, "messages")
    call = {"function": {"name": "weather", "arguments": {"city": "Oslo"}}, "type": "function"}
    assert example["messages"] == [
        *_msgs(("system", "Be terse."), ("user", "Weather in Oslo?")),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        *_msgs(
            ("tool", "-3C"),
            ("assistant", "Cold: -3C."),
            ("user", "Thanks"),
            ("assistant", "You're welcome."),
        ),
    ]
    assert json.loads(example["tools"]) == record["tools"]


def test_tool_calls_and_results_keep_their_fields():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    record = {
        "messages": [
            {"role": "user", "content": "Go."},
            {"role": "assistant", "content": "Calling.", "tool_calls": [call, call]},
            {"role": "tool", "content": "ok", "tool_call_id": "c1", "name": "f"},
            {"role": "assistant", "content": "Done."},
        ]
    }
    messages = convert_record(record, "messages")["messages"]
    assert messages[1] == {"role": "assistant", "content": "Calling.", "tool_calls": [call, call]}
    assert messages[2] == {"role": "tool", "content": "ok", "tool_call_id": "c1", "name": "f"}


BAD_TOOL_RECORDS = [
    (
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]},
        r"f.jsonl:7: field 'messages.1.tool_calls.0.function.arguments': expected a JSON object",
    ),
    (
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]},
        r"f.jsonl:7: field 'messages.1.tool_calls.0.function.arguments': arguments are not JSON",
    ),
    (
        {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]},
        r"f.jsonl:7: field 'messages.1.tool_calls.0.function.name': expected the function's name",
    ),
    (
        {"role": "assistant", "tool_calls": "f()"},
        r"f.jsonl:7: field 'messages.1.tool_calls': expected a list of calls, got str",
    ),
    ({"role": "tool"}, r"f.jsonl:7: field 'messages.1.content': missing"),
    ({"role": "tool", "content": None}, r"f.jsonl:7: field 'messages.1.content': missing"),
    (
        {"role": "tool", "content": "ok", "tool_call_id": 5},
        r"f.jsonl:7: field 'messages.1.tool_call_id': expected a string, got int",
    ),
]


@pytest.mark.parametrize("turn, message", BAD_TOOL_RECORDS)
def test_bad_tool_call_records_name_file_line_and_field(turn, message):
    record = {"messages": [{"role": "user", "content": "Go."}, turn, _msgs(("assistant", "A"))[0]]}
    with pytest.raises(DataError, match=message) as error:
        convert_record(record, "messages", origin="f.jsonl:7")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "value, message",
    [
        ("weather()", r"'conversations.1.value': a function_call that is not JSON"),
        ('"weather"', r"'conversations.1.value': expected a \{name, arguments\} object"),
        ('{"name": "f", "arguments": [1]}', r"'conversations.1.value.0.function.arguments'"),
    ],
)
def test_bad_sharegpt_function_calls(value, message):
    turns = [{"from": "human", "value": "Q"}, {"from": "function_call", "value": value}]
    record = {"conversations": turns + [{"from": "gpt", "value": "A"}]}
    with pytest.raises(DataError, match=r"g.json:2: field " + message):
        convert_record(record, "sharegpt", origin="g.json:2")


def test_sharegpt_roles_system_and_tools():
    record = {
        "system": "Use tools.",
        "tools": '[{"name": "add"}]',
        "conversations": [
            {"from": "human", "value": "1+2?"},
            {"from": "function_call", "value": '{"name": "add"}'},
            {"from": "observation", "value": "3"},
            {"from": "gpt", "value": "3."},
            {"from": "user", "value": "And 2+2?"},
            {"from": "assistant", "value": "4."},
        ],
    }
    call = {"type": "function", "function": {"name": "add", "arguments": {}}}
    assert convert_record(record, "sharegpt", origin="g.json:2") == {
        "messages": [
            *_msgs(("system", "Use tools."), ("user", "1+2?")),
            {"role": "assistant", "content": "", "tool_calls": [call]},
            *_msgs(("tool", "3"), ("assistant", "3."), ("user", "And 2+2?"), ("assistant", "4.")),
        ],
        "source": "",
        "tools": '[{"type": "function", "function": {"name": "add"}}]',
        "origin": "g.json:2",
    }


def test_sharegpt_drops_turns_after_the_last_answer_and_keeps_a_system_turn():
    record = {
        "tools": "",
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
            {"from": "human", "value": "unanswered"},
        ],
    }
    example = convert_record(record, "sharegpt")
    assert example["messages"] == _msgs(("system", "S"), ("user", "Q"), ("assistant", "A"))
    assert example["tools"] is None


def test_prompt_completion():
    record = {"prompt": "Capital of France?", "completion": " Paris.", "system": "Answer."}
    assert convert_record(record, "prompt_completion")["messages"] == _msgs(
        ("system", "Answer."), ("user", "Capital of France?"), ("assistant", " Paris.")
    )


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"messages": [{"role": "user", "content": "a"}]}, "messages"),
        ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ],
)
def test_auto_detects_the_format(record, fmt):
    assert sources.detect_format(record) == fmt


def test_auto_finds_nothing_it_knows():
    with pytest.raises(DataError, match=r"x:1: cannot tell the format from keys \['q'\]"):
        convert_record({"q": "a"}, "auto", origin="x:1")


def test_field_map_renames_dotted_paths_turn_keys_and_role_map():
    gsm8k = {"question": "1+1?", "answer": "2\n#### 2"}
    field_map = {"instruction": "question", "output": "answer"}
    assert convert_record(gsm8k, "auto", field_map)["messages"] == _msgs(
        ("user", "1+1?"), ("assistant", "2\n#### 2")
    )
    seed = {"instruction": "Reverse.", "instances": [{"input": "ab", "output": "ba"}]}
    field_map = {"input": "instances.0.input", "output": "instances.0.output"}
    assert convert_record(seed, "alpaca", field_map)["messages"] == _msgs(
        ("user", "Reverse.\n\nab"), ("assistant", "ba")
    )
    with pytest.raises(DataError, match=r"^s:4: field 'instances.0.output': missing"):
        convert_record({"instruction": "a", "instances": []}, "alpaca", field_map, "s:4")
    chat = {"conversations": [{"role": "me", "content": "hi"}, {"role": "bot", "content": "yo"}]}
    example = convert_record(
        chat,
        "sharegpt",
        {"from": "role", "value": "content"},
        role_map={"me": "user", "bot": "assistant"},
    )
    assert example["messages"] == _msgs(("user", "hi"), ("assistant", "yo"))


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match=r"unknown data format 'csv'; known formats: \['auto'"):
        convert_record({}, "csv")
    with pytest.raises(ValueError, match=r"known formats: .*'sharegpt'"):
        SourceSpec("x", "x.json", format="chatml")
    with pytest.raises(ValueError, match=r"field_map keys \['instrution'\] are not fields"):
        SourceSpec("x", "x.json", format="alpaca", field_map={"instrution": "q"})
    with pytest.raises(ValueError, match="role_map"):
        SourceSpec("x", "x.json", role_map={"bot": "robot"})
    with pytest.raises(ValueError, match="weight must be positive"):
        SourceSpec("x", "x.json", weight=0)


def test_spec_from_config_dict_and_config_dict():
    cfg = ml_collections.ConfigDict(
        {"path": "g.jsonl", "format": "alpaca", "field_map": {"instruction": "question"}}
    )
    spec = SourceSpec.from_config(cfg, name="gsm8k")
    assert spec == SourceSpec("gsm8k", "g.jsonl", "alpaca", {"instruction": "question"})
    assert SourceSpec.from_config({"name": "a", "path": "a.json", "weight": 2}).weight == 2
    with pytest.raises(ValueError, match=r"unknown keys \['fromat'\]"):
        SourceSpec.from_config({"name": "a", "path": "a.json", "fromat": "alpaca"})
    specs = sources.specs_from_config(ml_collections.ConfigDict({"a": {"path": "a.json"}}))
    assert [s.name for s in specs] == ["a"]


def test_data_error_pickles_with_its_parts():
    error = pickle.loads(pickle.dumps(DataError("x:1", "bad", "output", "wrong type")))
    assert (str(error), error.field, error.reason) == (
        "x:1: field 'output': bad",
        "output",
        "wrong type",
    )


# Files.


def test_jsonl_and_json_files_with_origins(tmp_path):
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps(r) for r in records[:2]) + "\n\n  \n" + json.dumps(records[2])
    )
    stats = SourceStats()
    examples = list(read_source(SourceSpec("d", str(jsonl)), stats=stats))
    assert [e["origin"] for e in examples] == [f"{jsonl}:1", f"{jsonl}:2", f"{jsonl}:5"]
    assert [e["messages"][-1]["content"] for e in examples] == ["a0", "a1", "a2"]
    assert {e["source"] for e in examples} == {"d"}
    assert (stats.read, stats.yielded, stats.skipped) == (3, 3, {})
    # A pretty-printed JSON list, with a BOM: origins are the lines where records start.
    listing = tmp_path / "d.json"
    listing.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=2).encode())
    examples = list(read_source(SourceSpec("d", str(listing))))
    assert [e["origin"] for e in examples] == [f"{listing}:{n}" for n in (2, 6, 10)]
    # JSONL named .json and an empty list both read by content.
    (tmp_path / "l.json").write_text(json.dumps(records[0]))
    assert len(list(read_source(SourceSpec("l", str(tmp_path / "l.json"))))) == 1
    (tmp_path / "e.json").write_text(" [ ] ")
    assert list(read_source(SourceSpec("e", str(tmp_path / "e.json")))) == []


def test_a_jsonl_record_range_parses_only_its_lines(tmp_path):
    records = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(6)]
    # Line indices: 3 is blank, 5 is broken; no newline at the end.
    lines = records[:3] + [""] + records[3:4] + ["{broken"] + records[4:]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))
    spec = SourceSpec("d", str(path))
    assert sources.count_records(spec) == 8

    def read(first, stop, mode="error"):
        stats = SourceStats()
        got = sources.read_records(spec, mode, stats, first, stop)
        return {i: e["messages"][-1]["content"] for i, e in got}, stats.read

    assert read(0, 5) == ({0: "a0", 1: "a1", 2: "a2", 4: "a3"}, 4)
    assert read(6, 8) == ({6: "a4", 7: "a5"}, 2)  # The broken line is outside: never parsed.
    with pytest.raises(DataError, match=f"{path}:6: malformed JSON"):
        read(5, 6)
    assert read(0, 8, "skip")[0] == read(0, 5)[0] | read(6, 8)[0]


def test_a_json_list_record_range(tmp_path):
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(7)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, indent=1))
    spec = SourceSpec("d", str(path))
    assert sources.count_records(spec) == 7
    got = list(sources.read_records(spec, first=3, stop=5))
    assert [(i, e["messages"][-1]["content"]) for i, e in got] == [(3, "a3"), (4, "a4")]
    assert got[0][1]["origin"] == f"{path}:{2 + 4 * 3}"


def test_missing_file_and_unknown_mode(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no such file: {tmp_path}/nope.jsonl"):
        read_source(SourceSpec("n", str(tmp_path / "nope.jsonl")))
    path = _write(tmp_path / "ok.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match=r"on_bad_example='ignore'; expected one of"):
        read_source(SourceSpec("ok", path), on_bad_example="ignore")


GOOD_ALPACA = {"instruction": "Add 1 and 1.", "input": "", "output": "2"}
GOOD_SHAREGPT = {
    "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
}
GOOD_MESSAGES = {
    "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
}
# name: (format, good record, bad line, reason, message after "file:2: ").
# fmt: off
BAD = {
    "malformed_json": (
        "alpaca", GOOD_ALPACA, b'{"instruction": "a", "output": "b"', "malformed JSON",
        "malformed JSON: Expecting ',' delimiter (column 35)",
    ),
    "missing_field": (
        "alpaca", GOOD_ALPACA, {"instruction": "a", "input": ""}, "missing field",
        "field 'output': missing (record keys: input, instruction)",
    ),
    "output_is_a_number": (
        "alpaca", GOOD_ALPACA, {"instruction": "a", "output": 3}, "wrong type",
        "field 'output': expected a string, got int",
    ),
    "output_is_a_list": (
        "alpaca", GOOD_ALPACA, {"instruction": "a", "output": ["b", "c"]}, "wrong type",
        "field 'output': expected a string, got list",
    ),
    "empty_output": (
        "alpaca", GOOD_ALPACA, {"instruction": "a", "output": ""}, "empty assistant turn",
        "field 'output': empty assistant turn",
    ),
    "whitespace_gpt_value": (
        "sharegpt", GOOD_SHAREGPT,
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": " \n"}]},
        "empty assistant turn", "field 'conversations.1.value': empty assistant turn",
    ),
    "invalid_utf8": (
        "alpaca", GOOD_ALPACA, b'{"instruction": "caf\xe9", "output": "b"}', "invalid UTF-8",
        "invalid UTF-8 byte b'\\xe9' at column 21",
    ),
    "unknown_from": (
        "sharegpt", GOOD_SHAREGPT,
        {"conversations": [{"from": "bot", "value": "a"}]}, "unknown role",
        "field 'conversations.0.from': unknown role 'bot'; known: ",
    ),
    "unknown_role": (
        "messages", GOOD_MESSAGES,
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
        "unknown role", "field 'messages.1.role': unknown role 'robot'",
    ),
    "no_assistant_turn": (
        "sharegpt", GOOD_SHAREGPT,
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"}]},
        "no assistant turn", "field 'conversations': no assistant turn",
    ),
    "not_an_object": (
        "auto", GOOD_ALPACA, ["instruction", "output"], "not an object",
        "expected a JSON object, got list",
    ),
}
# fmt: on


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_bad_jsonl_line(tmp_path, case, mode):
    fmt, good, bad, reason, message = BAD[case]
    path = _write(tmp_path / "x.jsonl", [good, bad, good])
    spec = SourceSpec("x", path, format=fmt)
    stats = SourceStats()
    if mode == "error":
        with pytest.raises(DataError, match=f"^{re.escape(f'{path}:2: {message}')}") as info:
            list(read_source(spec, stats=stats))
        assert info.value.reason == reason and stats.yielded == 1
    else:
        examples = list(read_source(spec, "skip", stats))
        assert [e["origin"] for e in examples] == [f"{path}:1", f"{path}:3"]
        assert (stats.read, stats.yielded, stats.skipped) == (3, 2, {reason: 1})
        assert f"skipped: 1 {reason}" in stats.summary()


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_bad_records_in_a_json_list_name_line_and_record(tmp_path, mode):
    bad = {"instruction": "a", "output": 5}
    text = json.dumps([GOOD_ALPACA, bad, GOOD_ALPACA], indent=1).encode()
    text = text.replace(b'"Add 1 and 1."', b'"caf\xe9"', 1)  # Invalid UTF-8 in record 1.
    path = tmp_path / "x.json"
    path.write_bytes(text)
    stats = SourceStats()
    if mode == "error":
        with pytest.raises(DataError, match=rf"^{path}:2 \(record 1\): invalid UTF-8 byte"):
            list(read_source(SourceSpec("x", str(path)), stats=stats))
        path.write_bytes(text.replace(b"caf\xe9", b"cafe"))
        message = rf"^{path}:7 \(record 2\): field 'output': expected a string, got int$"
        with pytest.raises(DataError, match=message):
            list(read_source(SourceSpec("x", str(path))))
    else:
        examples = list(read_source(SourceSpec("x", str(path)), "skip", stats))
        assert [e["origin"] for e in examples] == [f"{path}:11"]
        assert stats.skipped == {"invalid UTF-8": 1, "wrong type": 1}


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_malformed_json_list_fails_in_both_modes(tmp_path, mode):
    path = tmp_path / "x.json"
    path.write_text(
        '[\n {"prompt": "a", "completion": "b"},\n {"prompt": "a" "completion": "b"}\n]'
    )
    with pytest.raises(DataError, match=rf"^{path}:3: malformed JSON: Expecting ',' delimiter"):
        list(read_source(SourceSpec("x", str(path)), mode))


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_file_of_unknown_records_fails_in_both_modes(tmp_path, mode):
    path = _write(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r":1: cannot tell the format from keys \['answer'"):
        list(read_source(SourceSpec("x", path), mode))


# Every data file under ../shared/data.

# file: (spec arguments, rows, the raw record's last answer, whether it has tools).
SHARED = {
    "gsm8k/train.jsonl": (
        dict(format="alpaca", field_map={"instruction": "question", "output": "answer"}),
        7473,
        lambda r: r["answer"],
        False,
    ),
    "self_instruct/seed_tasks.jsonl": (
        dict(
            format="alpaca",
            field_map={"input": "instances.0.input", "output": "instances.0.output"},
        ),
        175,
        lambda r: r["instances"][0]["output"],
        False,
    ),
    "fastchat/dummy_conversation.json": (
        dict(format="sharegpt"),
        500,
        lambda r: r["conversations"][-1]["value"],
        False,
    ),
    "llamafactory/alpaca_en_demo.json": (dict(), 999, lambda r: r["output"], False),
    "llamafactory/identity.json": (dict(format="alpaca"), 91, lambda r: r["output"], False),
    "llamafactory/glaive_toolcall_en_demo.json": (
        dict(),
        300,
        lambda r: r["conversations"][-1]["value"],
        True,
    ),
}


def test_every_shared_data_file_is_covered(shared_dir):
    data = shared_dir / "data"
    found = {str(p.relative_to(data)) for p in data.rglob("*") if p.suffix in (".json", ".jsonl")}
    assert found == set(SHARED)


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_file_reads_completely(shared_dir, name):
    kwargs, rows, last_answer, has_tools = SHARED[name]
    path = shared_dir / "data" / name
    stats = SourceStats()
    examples = list(read_source(SourceSpec(name, str(path), **kwargs), stats=stats))
    assert len(examples) == rows and stats.read == stats.yielded == rows and not stats.skipped
    for example in examples:
        messages = example["messages"]
        assert all(m["role"] in sources.ROLES and isinstance(m["content"], str) for m in messages)
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"].strip()
        assert any(m["role"] == "user" for m in messages)
        assert example["source"] == name and (example["tools"] is not None) == has_tools
    # Each origin is the line where its record starts: decode from there and compare.
    text = path.read_text(encoding="utf-8")
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    decoder, blank = json.JSONDecoder(), re.compile(r"\s*")
    lines = [int(e["origin"].rpartition(":")[2]) for e in examples]
    assert lines == sorted(set(lines))
    checked = list(zip(examples, lines))[:: max(1, rows // 50)] + [(examples[-1], lines[-1])]
    for example, line in checked:
        assert example["origin"] == f"{path}:{line}"
        record, _ = decoder.raw_decode(text, blank.match(text, starts[line - 1]).end())
        assert example["messages"][-1]["content"] == last_answer(record)
