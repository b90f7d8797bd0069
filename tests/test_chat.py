"""Chat rendering and the loss mask."""

import dataclasses

import ml_collections
import pytest

from itune.data import chat, synthetic_tasks
from itune.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Reverse the list: 1 2 3"},
    {"role": "assistant", "content": "3 2 1"},
    {"role": "user", "content": "Uppercase this: cat"},
    {"role": "assistant", "content": "CAT"},
]
ANSWERS = ["3 2 1", "CAT"]

TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": 'weather(city="Paris")'},
    {"role": "tool", "content": "18C, sunny"},
    {"role": "assistant", "content": "It is 18C and sunny."},
]

# Each format's rendering of CHAT, cut where the mask changes: (text, trained).
GOLDEN = {
    "chatml": [
        (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nReverse the list: 1 2 3<|im_end|>\n"
            "<|im_start|>assistant\n",
            0,
        ),
        ("3 2 1<|im_end|>", 1),
        ("\n<|im_start|>user\nUppercase this: cat<|im_end|>\n<|im_start|>assistant\n", 0),
        ("CAT<|im_end|>", 1),
        ("\n", 0),
    ],
    "llama3": [
        (
            "<|begin_of_text|>"
            "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nReverse the list: 1 2 3<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            0,
        ),
        ("3 2 1<|eot_id|>", 1),
        (
            "<|start_header_id|>user<|end_header_id|>\n\nUppercase this: cat<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            0,
        ),
        ("CAT<|eot_id|>", 1),
    ],
    "gemma": [
        (
            "<bos><start_of_turn>user\nYou are a helpful assistant.\n\n"
            "Reverse the list: 1 2 3<end_of_turn>\n"
            "<start_of_turn>model\n",
            0,
        ),
        ("3 2 1<end_of_turn>", 1),
        ("\n<start_of_turn>user\nUppercase this: cat<end_of_turn>\n<start_of_turn>model\n", 0),
        ("CAT<end_of_turn>", 1),
        ("\n", 0),
    ],
    "mistral": [
        ("<s>[INST] You are a helpful assistant.\n\nReverse the list: 1 2 3 [/INST]", 0),
        ("3 2 1</s>", 1),
        ("[INST] Uppercase this: cat [/INST]", 0),
        ("CAT</s>", 1),
    ],
    "alpaca": [
        (
            "You are a helpful assistant.\n\n"
            "### Instruction:\nReverse the list: 1 2 3\n\n"
            "### Response:\n",
            0,
        ),
        ("3 2 1</s>", 1),
        ("\n\n### Instruction:\nUppercase this: cat\n\n### Response:\n", 0),
        ("CAT</s>", 1),
    ],
}

TOOL_GOLDEN = {
    "chatml": [
        ("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", 0),
        ('weather(city="Paris")<|im_end|>', 1),
        ("\n<|im_start|>tool\n18C, sunny<|im_end|>\n<|im_start|>assistant\n", 0),
        ("It is 18C and sunny.<|im_end|>", 1),
        ("\n", 0),
    ],
    "llama3": [
        (
            "<|begin_of_text|>"
            "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            0,
        ),
        ('weather(city="Paris")<|eot_id|>', 1),
        (
            "<|start_header_id|>ipython<|end_header_id|>\n\n18C, sunny<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            0,
        ),
        ("It is 18C and sunny.<|eot_id|>", 1),
    ],
    "gemma": [
        ("<bos><start_of_turn>user\nWeather in Paris?<end_of_turn>\n<start_of_turn>model\n", 0),
        ('weather(city="Paris")<end_of_turn>', 1),
        ("\n<start_of_turn>tool\n18C, sunny<end_of_turn>\n<start_of_turn>model\n", 0),
        ("It is 18C and sunny.<end_of_turn>", 1),
        ("\n", 0),
    ],
    "mistral": [
        ("<s>[INST] Weather in Paris? [/INST]", 0),
        ('weather(city="Paris")</s>', 1),
        ("[INST] Tool:\n18C, sunny [/INST]", 0),
        ("It is 18C and sunny.</s>", 1),
    ],
    "alpaca": [
        ("### Instruction:\nWeather in Paris?\n\n### Response:\n", 0),
        ('weather(city="Paris")</s>', 1),
        ("\n\n### Tool:\n18C, sunny\n\n### Response:\n", 0),
        ("It is 18C and sunny.</s>", 1),
    ],
}


def _text_and_mask(segments):
    return "".join(s for s, _ in segments), "".join(str(t) * len(s) for s, t in segments)


def test_every_format_has_a_golden_rendering():
    assert sorted(GOLDEN) == sorted(TOOL_GOLDEN) == sorted(chat.FORMATS)


def test_chatml_rendering_is_exact():
    text = chat.to_text(chat.render(CHAT[1:3], chat.CHATML))
    assert text == (
        "<|im_start|>user\nReverse the list: 1 2 3<|im_end|>\n"
        "<|im_start|>assistant\n3 2 1<|im_end|>\n"
    )
    prompt = chat.to_text(chat.render(CHAT[1:2], chat.CHATML, add_generation_prompt=True))
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_rendering_and_mask(name):
    pieces = chat.render(CHAT, chat.get_format(name))
    text, mask = _text_and_mask(GOLDEN[name])
    assert chat.to_text(pieces) == text
    assert chat.char_mask(pieces) == mask


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_generation_prompt_ends_where_the_last_answer_starts(name):
    prompt = chat.render(CHAT[:-1], chat.get_format(name), add_generation_prompt=True)
    text, _ = _text_and_mask(GOLDEN[name])
    assert chat.to_text(prompt) == text[: text.rindex("CAT")]


@pytest.mark.parametrize("name", sorted(TOOL_GOLDEN))
def test_tool_results_are_rendered_and_never_trained(name):
    pieces = chat.render(TOOL_CHAT, chat.get_format(name))
    text, mask = _text_and_mask(TOOL_GOLDEN[name])
    assert chat.to_text(pieces) == text
    assert chat.char_mask(pieces) == mask


def test_content_is_trimmed_where_the_official_template_trims_it():
    messages = [{"role": "user", "content": " hi\n"}, {"role": "assistant", "content": " yo \n"}]
    llama3 = chat.to_text(chat.render(messages, chat.LLAMA3))
    assert llama3.endswith(
        "\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"
    )
    gemma = chat.to_text(chat.render(messages, chat.GEMMA))
    assert gemma.endswith("user\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n")
    chatml = chat.to_text(chat.render(messages, chat.CHATML))
    assert chatml.endswith("assistant\n yo \n<|im_end|>\n")


def test_train_on_last_assistant_and_all():
    fmt = chat.CHATML
    text, _ = _text_and_mask(GOLDEN["chatml"])
    last = chat.render(CHAT, fmt, train_on="last_assistant")
    assert chat.to_text(last) == text
    trained = "CAT<|im_end|>"
    assert chat.char_mask(last) == "0" * (len(text) - len(trained) - 1) + "1" * len(trained) + "0"
    assert chat.char_mask(chat.render(CHAT, fmt, train_on="all")) == "1" * len(text)
    # A format that renders its own BOS trains everything after it.
    llama3_text, _ = _text_and_mask(GOLDEN["llama3"])
    everything = chat.char_mask(chat.render(CHAT, chat.LLAMA3, train_on="all"))
    bos = len("<|begin_of_text|>")
    assert everything == "0" * bos + "1" * (len(llama3_text) - bos)
    with pytest.raises(ValueError, match="train_on='everything'; expected one of"):
        chat.render(CHAT, fmt, train_on="everything")


def _trained_runs(ids, mask):
    """Maximal runs of consecutive trained token ids."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(int(token))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _assert_answers_trained(ids, mask, tok, fmt, answers):
    """Each trained run is one answer's exact tokens and the end of turn; BOS starts the ids."""
    assert ids.shape == mask.shape and ids[0] == tok.bos_id and mask[0] == 0
    end = tok.special_id(fmt.end_of_turn, fmt.special_tokens[fmt.end_of_turn])
    runs = _trained_runs(ids, mask)
    assert [run[-1] for run in runs] == [end] * len(answers)
    assert [tok.decode(run[:-1]) for run in runs] == answers


def test_mask_covers_exactly_the_assistant_tokens(builtin_tokenizer):
    tok, fmt = builtin_tokenizer, chat.CHATML
    ids, mask = chat.tokenize(chat.render(CHAT, fmt), tok, fmt)
    assert ids.shape == mask.shape and ids[0] == tok.bos_id and mask[0] == 0
    end = tok.special_id("<|im_end|>")
    runs = _trained_runs(ids, mask)
    # One run per assistant turn: its content followed by the end-of-turn token, nothing else.
    assert len(runs) == 2
    for run, content in zip(runs, ["3 2 1", "CAT"]):
        assert run[-1] == end
        assert tok.decode(run[:-1]).strip() == content
    # Every untrained token belongs to the prompt side: the whole untrained text, in order, is the
    # chat with the assistant contents removed.
    assert int(mask.sum()) == sum(len(r) for r in runs)
    assert (ids[mask == 1] == end).sum() == 2 and (ids[mask == 0] == end).sum() == 3


@pytest.mark.parametrize("name", sorted(chat.FORMATS))
def test_every_format_trains_the_answers_with_one_bos(builtin_tokenizer, name):
    tok, fmt = builtin_tokenizer, chat.get_format(name)
    ids, mask = chat.tokenize(chat.render(CHAT, fmt), tok, fmt)
    _assert_answers_trained(ids, mask, tok, fmt, ANSWERS)
    # The formats that render a BOS get no second one from `tokenize`.
    assert (ids == tok.bos_id).sum() == 1


@pytest.mark.parametrize("name", sorted(chat.FORMATS))
def test_every_format_with_the_shared_sentencepiece_model(shared_dir, name):
    tok = SentencePieceTokenizer.from_file(str(shared_dir / "tokenizers/unigram_32768.model"))
    fmt = chat.get_format(name)
    ids, mask = chat.tokenize(chat.render(CHAT, fmt), tok, fmt)
    _assert_answers_trained(ids, mask, tok, fmt, ANSWERS)
    # This model has no chat pieces: ChatML's <|im_start|> stands in as BOS at every turn, while
    # the other formats' start-of-turn markers are spelled out as text.
    assert (ids == tok.bos_id).sum() == (1 + len(CHAT) if name == "chatml" else 1)


def test_mask_tokens_match_separate_encoding_of_the_answer(builtin_tokenizer):
    """The trained ids are the ids the tokenizer gives the answer text itself."""
    tok, fmt = builtin_tokenizer, chat.CHATML
    ids, mask = chat.tokenize(chat.render(CHAT[1:3], fmt), tok, fmt)
    trained = ids[mask == 1].tolist()
    assert trained[:-1] == tok.encode("\n3 2 1")[-len(trained) + 1 :]


def test_train_on_variants_at_token_level(builtin_tokenizer):
    tok = builtin_tokenizer
    for fmt in (chat.CHATML, chat.LLAMA3):
        ids, mask = chat.tokenize(chat.render(CHAT, fmt, train_on="all"), tok, fmt)
        assert ids[0] == tok.bos_id and mask[0] == 0 and mask[1:].all()
        ids, mask = chat.tokenize(chat.render(CHAT, fmt, train_on="last_assistant"), tok, fmt)
        _assert_answers_trained(ids, mask, tok, fmt, ["CAT"])


@pytest.mark.parametrize("name", sorted(chat.FORMATS))
def test_tool_turns_at_token_level(shared_dir, name):
    tok = SentencePieceTokenizer.from_file(str(shared_dir / "tokenizers/unigram_32768.model"))
    fmt = chat.get_format(name)
    ids, mask = chat.tokenize(chat.render(TOOL_CHAT, fmt), tok, fmt)
    answers = [m["content"] for m in TOOL_CHAT if m["role"] == "assistant"]
    _assert_answers_trained(ids, mask, tok, fmt, answers)


def test_text_fallback_encodes_special_tokens_with_their_neighbours(builtin_tokenizer):
    """Llama 3's header tokens, absent from the tokenizer, are encoded as part of the text."""
    tok, fmt = builtin_tokenizer, chat.LLAMA3
    ids, _ = chat.tokenize(chat.render(CHAT, fmt), tok, fmt)
    first_turn = "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant."
    n = len(tok.encode(first_turn))
    assert ids[1 : n + 1].tolist() == tok.encode(first_turn) and ids[n + 1] == tok.eos_id


def test_special_tokens_with_their_own_pieces_are_single_ids():
    """A tokenizer trained with a format's special tokens (as the pipeline does) uses its pieces."""
    fmt = chat.LLAMA3
    lines = (
        line
        for i in range(200)
        for line in chat.to_text(
            chat.render(synthetic_tasks.make_example(0, i, "train")["messages"], fmt)
        ).split("\n")
        if line
    )
    tok = SentencePieceTokenizer(train_sentencepiece(lines, 200, list(fmt.special_tokens)))
    ids, mask = chat.tokenize(chat.render(CHAT, fmt), tok, fmt)
    piece = {token: tok.special_id(token) for token in fmt.special_tokens}
    assert ids[0] == piece["<|begin_of_text|>"] and tok.bos_id not in ids.tolist()
    assert (ids == piece["<|start_header_id|>"]).sum() == (ids == piece["<|eot_id|>"]).sum() == 5
    runs = _trained_runs(ids, mask)
    assert [run[-1] for run in runs] == [piece["<|eot_id|>"]] * 2
    assert [tok.decode(run[:-1]) for run in runs] == ANSWERS
    prompt = chat.prompt_ids(CHAT[:-1], tok, fmt)
    assert (
        prompt[0] == piece["<|begin_of_text|>"] and prompt.tolist() == ids[: len(prompt)].tolist()
    )


def test_special_tokens_fall_back_to_control_ids(shared_dir):
    """A SentencePiece model without ChatML pieces uses its BOS/EOS for the turn markers."""
    tok = SentencePieceTokenizer.from_file(str(shared_dir / "tokenizers/unigram_32768.model"))
    fmt = chat.CHATML
    ids, mask = chat.tokenize(chat.render(CHAT[1:3], fmt), tok, fmt)
    assert tok.special_id("<|im_end|>", "eos") == tok.eos_id
    runs = _trained_runs(ids, mask)
    assert len(runs) == 1 and runs[0][-1] == tok.eos_id
    assert tok.decode(runs[0][:-1]).strip() == "3 2 1"
    # The answer's ids are exactly what the tokenizer's own encode gives for the answer.
    assert ids[mask == 1][:-1].tolist() == tok.encode("3 2 1")


TAGS = dict(
    name="tags",
    prefix={"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"},
    suffix={"system": "\n", "user": "\n", "assistant": "<|end|>\n"},
    end_of_turn="<|end|>",
    special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
)


def test_user_defined_format_from_config(builtin_tokenizer):
    fmt = chat.get_format(ml_collections.ConfigDict(TAGS))
    assert fmt == chat.ChatFormat.from_config(TAGS) and not fmt.renders_bos
    # Listed tokens fall back to text, the end of turn to EOS.
    assert fmt.special_tokens == {
        "<|system|>": "text",
        "<|user|>": "text",
        "<|assistant|>": "text",
        "<|end|>": "eos",
    }
    pieces = chat.render(CHAT, fmt)
    text, mask = _text_and_mask(
        [
            (
                "<|system|>\nYou are a helpful assistant.\n"
                "<|user|>\nReverse the list: 1 2 3\n<|assistant|>\n",
                0,
            ),
            ("3 2 1<|end|>", 1),
            ("\n<|user|>\nUppercase this: cat\n<|assistant|>\n", 0),
            ("CAT<|end|>", 1),
            ("\n", 0),
        ]
    )
    assert chat.to_text(pieces) == text and chat.char_mask(pieces) == mask
    ids, mask = chat.tokenize(pieces, builtin_tokenizer, fmt)
    _assert_answers_trained(ids, mask, builtin_tokenizer, fmt, ANSWERS)
    with pytest.raises(ValueError, match="message 2: format 'tags' has no tool role"):
        chat.render(TOOL_CHAT, fmt)
    no_system = dict(TAGS, prefix={k: v for k, v in TAGS["prefix"].items() if k != "system"})
    no_system["suffix"] = {k: v for k, v in TAGS["suffix"].items() if k != "system"}
    with pytest.raises(ValueError, match="message 0: format 'tags' has no system role"):
        chat.render(CHAT, chat.ChatFormat.from_config(no_system))


def test_built_in_formats_round_trip_through_config():
    for fmt in chat.FORMATS.values():
        assert chat.get_format(dataclasses.asdict(fmt)) == fmt
    assert chat.get_format(chat.GEMMA) is chat.GEMMA
    with pytest.raises(ValueError, match="data.chat_format='vicuna'; known formats"):
        chat.get_format("vicuna")


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(turn_end="<|end|>"), r"unknown fields \['turn_end'\]"),
        (dict(prefix={"assistant": ""}), "prefix must define the 'user' role"),
        (dict(prefix={"user": "", "robot": "", "assistant": ""}), r"prefix has unknown roles"),
        (dict(suffix={"assistant": "\n"}), "assistant suffix must contain end_of_turn"),
        (dict(special_tokens={"<|end|>": "text"}), "cannot fall back to text"),
        (dict(special_tokens={"<|end|>": "unk"}), "has fallback 'unk'"),
        (dict(special_tokens=["<|user|>"]), "end_of_turn '<|end|>' is not a special token"),
        (dict(system="drop"), "system='drop'; expected 'turn' or 'merge'"),
    ],
)
def test_bad_format_configs_are_named(change, error):
    with pytest.raises(ValueError, match=error):
        chat.ChatFormat.from_config(dict(TAGS, **change))


def test_unknown_role_and_bad_content_are_named():
    with pytest.raises(ValueError, match="message 0: unknown role 'robot'"):
        chat.render([{"role": "robot", "content": "hi"}], chat.CHATML)
    with pytest.raises(ValueError, match="message 1: content must be a string"):
        chat.render(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], chat.CHATML
        )


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    "messages, fmt, error",
    [
        ([], chat.CHATML, "the conversation has no messages"),
        (["hi"], chat.CHATML, "message 0: expected a dict, got str"),
        (
            [USER, dict(ASSISTANT, content="")],
            chat.CHATML,
            "message 1: the assistant turn is empty",
        ),
        (
            [USER, dict(ASSISTANT, content=" \n")],
            chat.GEMMA,
            "message 1: the assistant turn is empty",
        ),
        ([USER, ASSISTANT, USER], chat.LLAMA3, "message 2: the conversation ends with a user turn"),
        ([USER, SYSTEM, ASSISTANT], chat.CHATML, "message 1: a system message must come first"),
        ([SYSTEM, ASSISTANT], chat.GEMMA, "message 0: format 'gemma' prepends the system message"),
        ([SYSTEM], chat.MISTRAL, "message 0: format 'mistral' prepends .* next message is missing"),
        ([USER, {"role": "user", "content": ["hi"]}], chat.ALPACA, "message 1: content must be"),
    ],
)
def test_invalid_conversations_are_named(messages, fmt, error):
    with pytest.raises(ValueError, match=error):
        chat.render(messages, fmt)


def test_a_generation_prompt_may_follow_any_turn():
    assert chat.to_text(chat.render([USER], chat.MISTRAL, add_generation_prompt=True)) == (
        "<s>[INST] hi [/INST]"
    )
    tool_prompt = chat.render(TOOL_CHAT[:3], chat.ALPACA, add_generation_prompt=True)
    assert chat.to_text(tool_prompt).endswith("### Tool:\n18C, sunny\n\n### Response:\n")
