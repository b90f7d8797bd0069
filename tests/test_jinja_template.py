"""Real Jinja chat templates: rendered as transformers renders them, masks from the rendering,
reasoning and tool-call chats, tokenization equal to the tokenizer's own encode.

``pytest -s tests/test_jinja_template.py -k acceptance`` prints the table per template.
"""

import doctest
import json
import functools

import pytest
import tokenizers
from tokenizers import AddedToken

from itune.data import chat, jinja_template, sources
from itune.data.hf_tokenizer import HFTokenizer
from itune.data.jinja_template import ChatTemplate, TemplateError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city"}},
                "required": ["city"],
            },
        },
    }
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
USER, SYSTEM = {"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}


def _assistant(content, **extra):
    return {"role": "assistant", "content": content, **extra}


# name -> (messages, tools, template kwargs)
CHATS = {
    "single": ([{"role": "user", "content": "What is 2+2?"}, _assistant("4")], None, {}),
    "system": ([SYSTEM, {"role": "user", "content": "Hi there"}, _assistant("Hello!")], None, {}),
    "multi_turn": (
        [
            SYSTEM,
            USER,
            _assistant("Hello!"),
            {"role": "user", "content": "Bye"},
            _assistant("Bye."),
        ],
        None,
        {},
    ),
    "tool_calls": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            _assistant("", tool_calls=[CALL]),
            {"role": "tool", "content": "sunny, 21 C"},
            _assistant("It is sunny."),
        ],
        TOOLS,
        {},
    ),
    "tool_calls_system": (
        [
            SYSTEM,
            {"role": "user", "content": "Weather in Paris?"},
            _assistant("Let me check.", tool_calls=[CALL]),
            {"role": "tool", "content": "sunny"},
            _assistant("Sunny."),
        ],
        TOOLS,
        {},
    ),
    "reasoning": (
        [{"role": "user", "content": "2+3?"}, _assistant("5", reasoning_content="2 plus 3 is 5.")],
        None,
        {},
    ),
    "reasoning_multi_turn": (
        [
            {"role": "user", "content": "2+3?"},
            _assistant("5", reasoning_content="2 plus 3 is 5."),
            {"role": "user", "content": "Times 2?"},
            _assistant("10", reasoning_content="5 times 2 is 10."),
        ],
        None,
        {},
    ),
    "think_in_content": (
        [{"role": "user", "content": "2+3?"}, _assistant("<think>\nAdd them.\n</think>\n\n5")],
        None,
        {},
    ),
    "thinking_off": (
        [{"role": "user", "content": "2+3?"}, _assistant("5")],
        None,
        {"enable_thinking": False},
    ),
    "bad_roles": ([USER, USER, _assistant("Hello!")], None, {}),
}

# The control tokens of each template's model, and its named tokens.
TEMPLATES = {
    "llama3_1": (
        [
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
    "qwen": (
        [
            "<|im_start|>",
            "<|im_end|>",
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<tool_response>",
            "</tool_response>",
        ],
        {"eos_token": "<|im_end|>"},
    ),
    "gemma": (
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>"},
    ),
    "phi3_5": (
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        {"eos_token": "<|endoftext|>"},
    ),
    "deepseek_r1_distill": (
        [
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "<think>",
            "</think>",
        ],
        {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    ),
    "gptoss": (
        ["<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>", "<|call|>"],
        {"eos_token": "<|return|>"},
    ),
}
FAMILY = {
    "llama3_2": "llama3_1",
    "qwen2_5": "qwen",
    "qwen3": "qwen",
    "qwen3_5_think": "qwen",
    "qwen3_instruct_2507": "qwen",
    "gemma3": "gemma",
}

# The trained text of each template's tool-call chat (all turns) and reasoning chat.
GOLDEN = {
    "deepseek_r1_distill": (
        ["<｜end▁of▁sentence｜>", "It is sunny.<｜end▁of▁sentence｜>"],
        TemplateError(
            "the chat renders '5<｜end▁of▁sentence｜>' where the last turn's "
            "generation prompt has '<think>\\n'"
        ),
    ),
    "gemma": (TemplateError("Conversation roles must alternate"), ["5<end_of_turn>"]),
    "gemma3": (TemplateError("Conversation roles must alternate"), ["5<end_of_turn>"]),
    "gptoss": (
        [
            ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
            "<|channel|>final<|message|>It is sunny.<|return|>",
        ],
        [
            "<|channel|>analysis<|message|>2 plus 3 is 5.<|end|><|start|>assistant<|channel|>final"
            "<|message|>5<|return|>"
        ],
    ),
    "llama3_1": (
        [
            '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
            "It is sunny.<|eot_id|>",
        ],
        ["5<|eot_id|>"],
    ),
    "llama3_2": (
        [
            '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
            "It is sunny.<|eot_id|>",
        ],
        ["5<|eot_id|>"],
    ),
    "phi3_5": (["<|end|>", "It is sunny.<|end|>\n<|endoftext|>"], ["5<|end|>\n<|endoftext|>"]),
    "qwen2_5": (
        [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            "<|im_end|>",
            "It is sunny.<|im_end|>",
        ],
        ["5<|im_end|>"],
    ),
    "qwen3": (
        [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            "<|im_end|>",
            "<think>\n\n</think>\n\nIt is sunny.<|im_end|>",
        ],
        ["<think>\n2 plus 3 is 5.\n</think>\n\n5<|im_end|>"],
    ),
    "qwen3_5_think": (
        [
            "\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
            "</parameter>\n</function>\n</tool_call><|im_end|>",
            "\n</think>\n\nIt is sunny.<|im_end|>",
        ],
        ["2 plus 3 is 5.\n</think>\n\n5<|im_end|>"],
    ),
    "qwen3_instruct_2507": (
        [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            "<|im_end|>",
            "It is sunny.<|im_end|>",
        ],
        ["5<|im_end|>"],
    ),
}


def _names(shared_dir):
    return sorted(p.stem for p in (shared_dir / "chat_templates").glob("*.jinja"))


@pytest.fixture(scope="module")
def base_tokenizer(shared_dir):
    return HFTokenizer.from_directory(str(shared_dir / "tokenizers" / "smollm2_bpe"))


@functools.lru_cache(maxsize=None)
def _setup(shared_dir, base, name):
    """(itune template, itune tokenizer, transformers tokenizer) for a shared template: SmolLM2's
    vocabulary with the template model's control tokens added."""
    from transformers import PreTrainedTokenizerFast

    controls, named = TEMPLATES[FAMILY.get(name, name)]
    backend = tokenizers.Tokenizer.from_str(base.backend.to_str())
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in controls])
    ours = HFTokenizer(backend, bos=named.get("bos_token"), eos=named.get("eos_token"))
    theirs = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
    source = (shared_dir / "chat_templates" / f"{name}.jinja").read_text()
    theirs.chat_template = source
    template = ChatTemplate(source, name=f"{name}.jinja", special_tokens=named)
    return template, ours, theirs


def _render_both(template, theirs, messages, tools, kwargs, prompt):
    """(transformers' text or its error message, itune's text or error message)."""
    try:
        expected = theirs.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=prompt, **kwargs
        )
    except Exception as e:  # noqa: BLE001 - any error of the template's
        expected = TemplateError(str(e))
    try:
        got = template.replace(kwargs=kwargs).render_text(messages, tools, prompt)
    except TemplateError as e:
        got = e
    return expected, got


def _check_mask(text, spans, ids, offsets, mask):
    """A token is trained exactly when it overlaps a trained character."""
    data = text.encode()
    byte_spans = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]
    for (b, e), m in zip(offsets, mask):
        assert m == int(any(b < y and e > x for x, y in byte_spans)), (data[b:e], m)


def _acceptance_row(shared_dir, base, name):
    template, ours, theirs = _setup(shared_dir, base, name)
    row = dict(chats=0, equal=0, errors_equal=0, masks=0, refused=0, tokens_equal=0)
    for key, (messages, tools, kwargs) in CHATS.items():
        for prompt in (False, True):
            turns = messages[:-1] if prompt else messages
            expected, got = _render_both(template, theirs, turns, tools, kwargs, prompt)
            row["chats"] += 1
            if isinstance(expected, TemplateError):
                assert isinstance(got, TemplateError), (name, key, prompt, got)
                assert str(expected) in str(got), (name, key, prompt)
                row["errors_equal"] += 1
                continue
            assert got == expected, (name, key, prompt)
            row["equal"] += 1
            if prompt:
                continue
            t = template.replace(kwargs=kwargs)
            try:
                pieces = chat.render(messages, t, tools=tools)
            except TemplateError:
                row["refused"] += 1  # The training render is not the inference render.
                continue
            text = chat.to_text(pieces)
            assert text == expected
            _, spans = t.trained_spans(messages, tools)
            ids, mask = chat.tokenize(pieces, ours, t)
            hf_ids = theirs.apply_chat_template(
                messages, tools=tools, tokenize=True, return_dict=False, **kwargs
            )
            assert list(ids) == ours.encode(text) == list(hf_ids), (name, key)
            _, offsets = ours.encode_with_offsets(text)
            _check_mask(text, spans, ids, offsets, mask)
            assert mask.sum() > 0
            row["masks"] += 1
            row["tokens_equal"] += 1
    return row


def test_docstring_examples():
    assert doctest.testmod(jinja_template).failed == 0


def test_acceptance_table(shared_dir, base_tokenizer):
    rows = {name: _acceptance_row(shared_dir, base_tokenizer, name) for name in _names(shared_dir)}
    assert len(rows) == 11
    print(
        "\n| template | chats rendered | renders equal to transformers | template errors equal "
        "| masks checked | refused (last turn differs from its prompt) | tokenization equal "
        "to encode |\n|---|---|---|---|---|---|---|"
    )
    for name, r in rows.items():
        print(
            f"| {name} | {r['chats']} | {r['equal']} | {r['errors_equal']} | {r['masks']} "
            f"| {r['refused']} | {r['tokens_equal']} |"
        )
        assert r["equal"] + r["errors_equal"] == r["chats"]
        assert r["masks"] == r["tokens_equal"] and r["masks"] + r["refused"] > 0


@pytest.mark.parametrize("key", ["tool_calls", "reasoning"])
def test_golden_trained_text(shared_dir, base_tokenizer, key):
    for name in _names(shared_dir):
        template, _, _ = _setup(shared_dir, base_tokenizer, name)
        messages, tools, _ = CHATS[key]
        expected = GOLDEN[name][0 if key == "tool_calls" else 1]
        if isinstance(expected, TemplateError):
            with pytest.raises(
                TemplateError,
                match=str(expected).replace("\\", "\\\\").replace("(", r"\(").replace("|", r"\|"),
            ):
                template.trained_spans(messages, tools)
            continue
        text, spans = template.trained_spans(messages, tools)
        assert [text[a:b] for a, b in spans] == expected, name


def test_reasoning_is_trained_only_when_asked(shared_dir, base_tokenizer):
    template, _, _ = _setup(shared_dir, base_tokenizer, "qwen3")
    messages = CHATS["reasoning_multi_turn"][0]
    text, spans = template.replace(train_on_reasoning=False).trained_spans(messages)
    # The earlier turn's reasoning is stripped by the template itself; the last one's is kept in
    # the text but not trained, its tags and answer are.
    assert "5 times 2 is 10." in text and "2 plus 3 is 5." not in text
    assert [text[a:b] for a, b in spans] == [
        "5<|im_end|>",
        "<think>\n",
        "\n</think>\n\n10<|im_end|>",
    ]
    for name in ("gptoss", "qwen3_5_think"):
        template, _, _ = _setup(shared_dir, base_tokenizer, name)
        text, spans = template.replace(train_on_reasoning=False).trained_spans(
            CHATS["think_in_content" if name == "qwen3_5_think" else "reasoning"][0]
        )
        trained = "".join(text[a:b] for a, b in spans)
        assert "Add them." not in trained and "2 plus 3" not in trained and trained, name


def test_the_last_turn_is_trained_as_it_is_prompted(shared_dir, base_tokenizer):
    for name in _names(shared_dir):
        template, _, _ = _setup(shared_dir, base_tokenizer, name)
        messages, tools, _ = CHATS["multi_turn" if "gemma" not in name else "single"]
        try:
            text, spans = template.trained_spans(messages, tools)
        except TemplateError as e:
            assert name in ("deepseek_r1_distill", "gemma"), e
            continue
        prompt = template.render_text(messages[:-1], tools, add_generation_prompt=True)
        assert text.startswith(prompt) and spans[-1][0] == len(prompt), name


def test_train_on_last_and_all(shared_dir, base_tokenizer):
    template, _, _ = _setup(shared_dir, base_tokenizer, "llama3_1")
    messages = CHATS["multi_turn"][0]
    text, spans = template.trained_spans(messages, train_on="last_assistant")
    assert [text[a:b] for a, b in spans] == ["Bye.<|eot_id|>"]
    text, spans = template.trained_spans(messages, train_on="all")
    assert spans == [(len("<|begin_of_text|>"), len(text))]


def test_generation_blocks_give_the_trained_text():
    template = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}"
        "{{ m.content }}<end>{% endgeneration %}\n{% else %}U: {{ m.content }}\n{% endif %}"
        "{% endfor %}",
        name="marked",
    )
    text, spans = template.trained_spans(
        [
            {"role": "user", "content": "x"},
            _assistant("y"),
            {"role": "user", "content": "z"},
            _assistant("w"),
        ]
    )
    assert [text[a:b] for a, b in spans] == ["y<end>", "w<end>"]


def test_unlocatable_turns_and_template_errors_are_named():
    hidden = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}",
        name="drops_answers.jinja",
    )
    with pytest.raises(TemplateError, match=r"drops_answers.jinja: assistant message 1"):
        hidden.trained_spans([USER, _assistant("Hello"), USER, _assistant("Again")])
    with pytest.raises(TemplateError, match="custom.jinja: no assistant here"):
        ChatTemplate("{{ raise_exception('no assistant here') }}", name="custom.jinja").render_text(
            [USER]
        )
    with pytest.raises(TemplateError, match="bad.jinja: line 1"):
        ChatTemplate("{% for m in messages %}", name="bad.jinja")
    with pytest.raises(TemplateError, match="message 0: the chat ends with a user turn"):
        hidden.trained_spans([USER])


def test_sharegpt_tool_turns_become_openai_tool_calls(shared_dir, base_tokenizer):
    template, _, theirs = _setup(shared_dir, base_tokenizer, "qwen2_5")
    sharegpt = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "function_call",
            "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        },
        {"role": "observation", "content": "sunny, 21 C"},
        _assistant("It is sunny."),
    ]
    messages = jinja_template.openai_messages(sharegpt)
    assert messages == CHATS["tool_calls"][0]
    assert template.render_text(messages, TOOLS) == theirs.apply_chat_template(
        CHATS["tool_calls"][0], tools=TOOLS, tokenize=False
    )


def test_end_of_turn_and_stop_ids(shared_dir, base_tokenizer):
    ends = {}
    for name in _names(shared_dir):
        template, ours, _ = _setup(shared_dir, base_tokenizer, name)
        ends[name] = template.end_of_turn
        assert template.stop_ids(ours)
    assert ends["qwen3"] == "<|im_end|>" and ends["llama3_1"] == "<|eot_id|>"
    assert ends["gemma3"] == "<end_of_turn>" and ends["gptoss"] == "<|return|>"
    assert ends["phi3_5"] == "<|end|>"


def test_builtin_formats_match_the_templates_they_derive_from(shared_dir, base_tokenizer):
    """chatml is Qwen2.5's template given a system turn and SmolLM2's (tests/test_gguf.py), gemma
    is Gemma's and Gemma 3's, llama3's turns are Llama 3.1's after its system block: the same
    text, and the same trained text."""
    plain = [m for m in CHATS["multi_turn"][0] if m["role"] != "system"]
    cases = [
        ("chatml", "qwen2_5", CHATS["multi_turn"][0], 0),
        ("chatml", "qwen2_5", CHATS["system"][0], 0),
        ("gemma", "gemma", plain, 0),
        ("gemma", "gemma3", CHATS["multi_turn"][0], 0),
        ("gemma", "gemma3", [{"role": "user", "content": " padded "}, _assistant(" 4 ")], 0),
    ]
    # Llama 3.1 always writes its own system block (knowledge and today's dates) first.
    system_block = "Today Date: 26 Jul 2024\n\n<|eot_id|>"
    cases.append(("llama3", "llama3_1", plain, system_block))
    for builtin, name, messages, cut in cases:
        fmt = chat.get_format(builtin)
        template, _, _ = _setup(shared_dir, base_tokenizer, name)
        ours = chat.render(messages, fmt)
        text, spans = template.trained_spans(messages)
        theirs_text = text
        if cut:
            head = text.index(cut) + len(cut)
            theirs_text = "<|begin_of_text|>" + text[head:]
            spans = [
                (a - head + len("<|begin_of_text|>"), b - head + len("<|begin_of_text|>"))
                for a, b in spans
            ]
        assert chat.to_text(ours) == theirs_text, (builtin, name)
        joined = []  # Adjacent trained pieces (answer, end of turn) make one span.
        for piece in ours:
            if piece.trained and joined and joined[-1][1]:
                joined[-1][0] += piece.text
            else:
                joined.append([piece.text, piece.trained])
        trained = [t for t, is_trained in joined if is_trained]
        assert trained == [theirs_text[a:b] for a, b in spans], (builtin, name)
        prompt = chat.to_text(chat.render(messages[:-1], fmt, add_generation_prompt=True))
        theirs_prompt = template.render_text(messages[:-1], add_generation_prompt=True)
        if cut:
            theirs_prompt = "<|begin_of_text|>" + theirs_prompt.split(cut, 1)[1]
        assert prompt == theirs_prompt, (builtin, name)


def test_a_run_encodes_records_with_the_named_template(shared_dir, base_tokenizer):
    """data.chat_format naming a .jinja file: a record's tools and tool calls reach the template,
    the ids are transformers', the config's kwargs and reasoning switch apply."""
    import ml_collections
    import numpy as np

    from itune.data import encode
    from itune.data import spec as data_spec

    _, ours, theirs = _setup(shared_dir, base_tokenizer, "qwen3")
    data = ml_collections.ConfigDict(
        dict(
            chat_format=str(shared_dir / "chat_templates" / "qwen3.jinja"),
            chat_template_kwargs={"enable_thinking": False},
            train_on_reasoning=False,
        )
    )
    fmt = chat.resolve_format(data, tokenizer=ours)
    assert fmt.kwargs == {"enable_thinking": False} and not fmt.train_on_reasoning
    assert fmt.special_tokens["eos_token"] == "<|im_end|>"
    assert chat.format_choice({"chat_format": "auto"}, fmt) is fmt
    messages, tools, _ = CHATS["tool_calls"]
    spec = data_spec.DataSpec(ours, fmt, 512, 1, [])
    example = {"messages": messages, "tools": json.dumps(TOOLS), "source": "chats"}
    tokens = encode.encode_example(example, spec)
    expected = theirs.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=False)
    ids = np.concatenate([tokens["inputs"][:1], tokens["targets"]])
    assert ids.tolist() == list(expected)
    trained = ours.decode(tokens["targets"][tokens["loss_mask"] == 1])
    assert trained.startswith('<tool_call>\n{"name": "get_weather"') and "It is sunny." in trained
    assert spec.stop_id == ours.encode("<|im_end|>")[0]


def _tool_chat_records():
    """One tool-call chat in the forms a data file holds it: OpenAI messages with ids (and its
    arguments as JSON text) and ShareGPT turns, each with a record-level ``tools``."""
    call = {"id": "call_1", **CALL}
    openai = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    as_text = json.loads(json.dumps(openai))
    as_text[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    sharegpt = [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps(CALL["function"])},
        {"from": "observation", "value": "sunny, 21 C"},
        {"from": "gpt", "value": "It is sunny."},
    ]
    return [
        {"messages": openai, "tools": TOOLS},
        {"messages": as_text, "tools": TOOLS},
        # ShareGPT's tools are bare function schemas.
        {"conversations": sharegpt, "tools": json.dumps([t["function"] for t in TOOLS])},
    ]


@pytest.mark.parametrize("name", ["llama3_1", "qwen3"])
def test_a_tool_call_data_file_encodes_as_transformers_renders_it(
    shared_dir, base_tokenizer, tmp_path, name
):
    """Records of a JSONL file, read and encoded as a run does, give transformers' ids for the
    same messages and tools; the trained tokens are the assistant turns, tool calls included."""
    import numpy as np

    from itune.data import encode, sources
    from itune.data import spec as data_spec

    template, ours, theirs = _setup(shared_dir, base_tokenizer, name)
    records = _tool_chat_records()
    examples, origins = [], []
    # A source holds one format: the OpenAI records in one file, the ShareGPT one in another.
    for file, held in (("openai.jsonl", records[:2]), ("sharegpt.jsonl", records[2:])):
        path = tmp_path / file
        path.write_text("".join(json.dumps(r) + "\n" for r in held))
        examples += sources.read_source(sources.SourceSpec(file, str(path)))
        origins += [f"{path}:{line}" for line in range(1, len(held) + 1)]
    spec = data_spec.DataSpec(ours, template, 512, 1, [])
    # The messages as the file holds them (content null left out, as transformers drops it).
    messages = [{k: v for k, v in m.items() if v is not None} for m in records[0]["messages"]]
    text = theirs.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    expected = theirs.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=False)
    encoding = ours.backend.encode(text, add_special_tokens=False)
    assert encoding.ids == list(expected)
    spans, at = [], 0
    for trained in GOLDEN[name][0]:
        start = text.index(trained, at)
        spans.append((start, start + len(trained)))
        at = start + len(trained)
    mask = [int(any(b < y and e > x for x, y in spans)) for b, e in encoding.offsets]
    assert [e["origin"] for e in examples] == origins
    for example, origin in zip(examples, origins):
        tokens = encode.encode_example(example, spec)
        ids = np.concatenate([tokens["inputs"][:1], tokens["targets"]])
        assert ids.tolist() == list(expected), origin
        assert tokens["loss_mask"].tolist() == mask[1:], origin


def test_builtin_formats_write_tool_calls_as_text():
    example = sources.convert_record(_tool_chat_records()[0], "messages")
    text = chat.to_text(chat.render(example["messages"], chat.CHATML))
    assert '<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text


def test_auto_takes_the_template_that_the_tokenizer_path_ships(shared_dir, tmp_path):
    """data.chat_format='auto' with data.tokenizer.path a tokenizer folder (tokenizer_config.json
    or chat_template.jinja) or a GGUF file: that template, unless init_from brings one."""
    import shutil

    from configs import smoke  # noqa: PLC0415  (configs/ is importable from the repo root)

    from itune.convert import run_model
    from itune.data import spec as data_spec

    bpe = shared_dir / "tokenizers" / "smollm2_bpe"
    qwen = (shared_dir / "chat_templates" / "qwen2_5.jinja").read_text()
    llama = (shared_dir / "chat_templates" / "llama3_1.jinja").read_text()
    folders = {}
    for name, files in {
        "config": {"tokenizer_config.json": json.dumps({"chat_template": qwen})},
        "jinja": {"chat_template.jinja": llama, "tokenizer_config.json": "{}"},
        "none": {},
    }.items():
        folders[name] = tmp_path / name
        shutil.copytree(bpe, folders[name])
        for file, text in files.items():
            (folders[name] / file).write_text(text)

    from itune.convert import tokenizer_files

    def spec_of(folder, chat_format="auto", model_format=None):
        config = smoke.get_config("runlocal")
        with config.unlocked():
            config.data.tokenizer.path = str(folder)
            config.data.chat_format = chat_format
        # As a run resolves it (`run_model`): init_from's template, else the tokenizer path's.
        model_format = model_format or tokenizer_files.tokenizer_template(config.data)
        return data_spec.make_spec(config.data, str(tmp_path / "run"), None, model_format), config

    spec, config = spec_of(folders["config"])
    assert isinstance(spec.chat_format, ChatTemplate) and spec.chat_format.source == qwen
    assert spec.chat_format.special_tokens["eos_token"] == "<|im_end|>"
    assert run_model.resolve(config).chat_format.source == qwen
    assert spec_of(folders["jinja"])[0].chat_format.source == llama
    assert spec_of(folders["none"])[0].chat_format is chat.CHATML
    assert spec_of(folders["config"], "gemma")[0].chat_format is chat.GEMMA
    own = ChatTemplate(llama, name="init_from's")
    assert spec_of(folders["config"], model_format=own)[0].chat_format.name == "init_from's"

    gguf = shared_dir / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = spec_of(gguf)[0]
    template = spec.chat_format
    assert (
        spec.tokenizer.vocab_size == 49152 and template.special_tokens["eos_token"] == "<|im_end|>"
    )
    assert "You are a helpful AI assistant named SmolLM" in template.source
    chat_ = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert template.render_text(chat_).startswith("<|im_start|>system\nYou are a helpful")
