"""Chat formats: render a conversation once, then tokenize it with a loss mask from its spans.

A conversation is rendered whole into text pieces, each tagged as trained or not and as plain
text or a special token. Special tokens map to single ids; the plain text between them is
encoded with byte offsets, and a token is trained exactly when it overlaps a trained span.

Built-in formats follow the Hugging Face chat templates of their model families: ``chatml``,
``llama3`` (Llama 3 instruct), ``gemma``, ``mistral`` (the v1 ``[INST]`` template) and ``alpaca``.
A format of one's own comes from a config through `ChatFormat.from_config`. A model's own Jinja
template (`itune.data.jinja_template.ChatTemplate`) renders and tokenizes through the same
`render` and `tokenize`, its trained spans found in its rendering.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any, Mapping, Sequence

import numpy as np

from itune.data.jinja_template import ChatTemplate, special_tokens_of
from itune.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("all_assistant", "last_assistant", "all")
# What a tokenizer without a special token's own piece uses in its place: its BOS or EOS id, or
# the token's text encoded like any other text.
FALLBACKS = ("bos", "eos", "text")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A turn is ``prefix[role] + content + suffix[role]``; turns are joined by ``separator``.

    ``special_tokens`` maps each special token to the stand-in a tokenizer without a piece of its
    own uses (see `FALLBACKS`; ``None``: the tokenizer must have the piece). The assistant suffix
    holds ``end_of_turn``, which is trained along with the assistant content. A non-empty
    ``bos_token`` is rendered at the start, and `tokenize` then adds no BOS of its own. With
    ``system="merge"`` a leading system message is prepended to the first user message,
    followed by ``system_join``; roles missing from ``prefix`` are not supported.

    >>> fmt = get_format("gemma")
    >>> fmt.prefix["assistant"], fmt.suffix["assistant"], fmt.renders_bos
    ('<start_of_turn>model\\n', '<end_of_turn>\\n', True)
    """

    name: str
    prefix: Mapping[str, str]
    suffix: Mapping[str, str]
    end_of_turn: str
    special_tokens: Mapping[str, str | None]
    separator: str = ""
    bos_token: str = ""
    system: str = "turn"
    system_join: str = "\n\n"
    strip_content: bool = False

    def __post_init__(self):
        where = f"chat format {self.name!r}"
        if self.system not in ("turn", "merge"):
            raise ValueError(f"{where}: system={self.system!r}; expected 'turn' or 'merge'")
        for field in ("prefix", "suffix"):
            unknown = set(getattr(self, field)) - set(ROLES)
            if unknown:
                raise ValueError(f"{where}: {field} has unknown roles {sorted(unknown)}")
        for role in ("user", "assistant"):
            if role not in self.prefix:
                raise ValueError(f"{where}: prefix must define the {role!r} role")
        if set(self.suffix) - set(self.prefix):
            raise ValueError(f"{where}: suffix has roles without a prefix")
        for token, fallback in self.special_tokens.items():
            if not token or fallback not in FALLBACKS + (None,):
                raise ValueError(
                    f"{where}: special token {token!r} has fallback {fallback!r}; "
                    f"expected one of {FALLBACKS} or None"
                )
        if self.end_of_turn not in self.special_tokens:
            raise ValueError(f"{where}: end_of_turn {self.end_of_turn!r} is not a special token")
        # Generation stops on the end of turn, so it must have a single id.
        if self.special_tokens[self.end_of_turn] == "text":
            raise ValueError(f"{where}: end_of_turn {self.end_of_turn!r} cannot fall back to text")
        if self.end_of_turn not in self.suffix.get("assistant", ""):
            raise ValueError(
                f"{where}: the assistant suffix must contain end_of_turn {self.end_of_turn!r}"
            )
        if self.bos_token and self.bos_token not in self.special_tokens:
            raise ValueError(f"{where}: bos_token {self.bos_token!r} is not a special token")

    @property
    def renders_bos(self) -> bool:
        return bool(self.bos_token)

    @classmethod
    def from_config(cls, config: Any) -> "ChatFormat":
        """A format from a dict or ``ml_collections.ConfigDict`` with the fields of `ChatFormat`.

        ``special_tokens`` may be a list: the BOS token falls back to ``'bos'``, the end of turn
        to ``'eos'`` and the others to ``'text'``. Missing suffixes are empty.

        >>> fmt = ChatFormat.from_config(dict(
        ...     name="tags", end_of_turn="<end>", special_tokens=["<end>"],
        ...     prefix={"user": "User: ", "assistant": "Bot: "},
        ...     suffix={"user": "\\n", "assistant": "<end>\\n"}))
        >>> to_text(render([{"role": "user", "content": "hi"},
        ...                 {"role": "assistant", "content": "hello"}], fmt))
        'User: hi\\nBot: hello<end>\\n'
        """
        values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(
                f"chat format config has unknown fields {sorted(unknown)}; known: {sorted(fields)}"
            )
        values.setdefault("name", "custom")
        for required in ("prefix", "end_of_turn", "special_tokens"):
            if required not in values:
                raise ValueError(f"chat format config {values['name']!r} needs {required!r}")
        values["prefix"] = dict(values["prefix"])
        values["suffix"] = {role: "" for role in values["prefix"]} | dict(values.get("suffix", {}))
        tokens = values["special_tokens"]
        if not isinstance(tokens, Mapping):
            defaults = {values.get("bos_token", ""): "bos", values["end_of_turn"]: "eos"}
            tokens = {token: defaults.get(token, "text") for token in tokens}
        values["special_tokens"] = dict(tokens)
        if values.get("bos_token"):
            values["special_tokens"].setdefault(values["bos_token"], "bos")
        return cls(**values)


CHATML = ChatFormat(
    name="chatml",
    prefix={role: f"<|im_start|>{role}\n" for role in ROLES},
    suffix={role: "<|im_end|>\n" for role in ROLES},
    end_of_turn="<|im_end|>",
    special_tokens={"<|im_start|>": "bos", "<|im_end|>": "eos"},
)

LLAMA3 = ChatFormat(
    name="llama3",
    prefix={
        # Llama 3.1+ templates call the tool role ``ipython``.
        role: f"<|start_header_id|>{'ipython' if role == 'tool' else role}<|end_header_id|>\n\n"
        for role in ROLES
    },
    suffix={role: "<|eot_id|>" for role in ROLES},
    end_of_turn="<|eot_id|>",
    special_tokens={
        "<|begin_of_text|>": "bos",
        "<|start_header_id|>": "text",
        "<|end_header_id|>": "text",
        "<|eot_id|>": "eos",
    },
    bos_token="<|begin_of_text|>",
    strip_content=True,
)

# Gemma, Mistral (v1) and Alpaca have no tool role: tool results get a turn headed "tool" on the
# user's side. Gemma and Mistral have no system role either: it opens the first user message.
GEMMA = ChatFormat(
    name="gemma",
    prefix={
        "user": "<start_of_turn>user\n",
        "assistant": "<start_of_turn>model\n",
        "tool": "<start_of_turn>tool\n",
    },
    suffix={role: "<end_of_turn>\n" for role in ("user", "assistant", "tool")},
    end_of_turn="<end_of_turn>",
    special_tokens={"<bos>": "bos", "<start_of_turn>": "text", "<end_of_turn>": "eos"},
    bos_token="<bos>",
    system="merge",
    strip_content=True,
)

MISTRAL = ChatFormat(
    name="mistral",
    prefix={"user": "[INST] ", "assistant": "", "tool": "[INST] Tool:\n"},
    suffix={"user": " [/INST]", "assistant": "</s>", "tool": " [/INST]"},
    end_of_turn="</s>",
    special_tokens={"<s>": "bos", "</s>": "eos", "[INST]": "text", "[/INST]": "text"},
    bos_token="<s>",
    system="merge",
)

ALPACA = ChatFormat(
    name="alpaca",
    prefix={
        "system": "",
        "user": "### Instruction:\n",
        "assistant": "### Response:\n",
        "tool": "### Tool:\n",
    },
    suffix={"system": "", "user": "", "assistant": "</s>", "tool": ""},
    end_of_turn="</s>",
    special_tokens={"</s>": "eos"},
    separator="\n\n",
)

FORMATS = {f.name: f for f in (CHATML, LLAMA3, GEMMA, MISTRAL, ALPACA)}
# Markers by which a model's Jinja chat template reveals its format, most specific first.
_TEMPLATE_MARKERS = (
    ("<|start_header_id|>", "llama3"),
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("[INST]", "mistral"),
    ("### Instruction:", "alpaca"),
)


def format_for_template(template: str | None) -> str | None:
    """The built-in format a model's Jinja chat template writes, by its markers (None if none).

    >>> format_for_template("{{ '<|im_start|>' + message['role'] }}")
    'chatml'
    """
    for marker, name in _TEMPLATE_MARKERS:
        if template and marker in template:
            return name
    return None


def get_format(name_or_config: Any) -> ChatFormat | ChatTemplate:
    """A built-in format by name, a format from a config (see `ChatFormat.from_config`), or a
    Jinja chat template: a `ChatTemplate`, a ``.jinja`` file, or the template's own text.

    >>> get_format("llama3").end_of_turn
    '<|eot_id|>'
    >>> get_format("{{ messages[0].content }}").name
    'data.chat_format'
    """
    if isinstance(name_or_config, (ChatFormat, ChatTemplate)):
        return name_or_config
    if not isinstance(name_or_config, str):
        return ChatFormat.from_config(name_or_config)
    if name_or_config.endswith(".jinja"):
        return ChatTemplate.from_file(name_or_config)
    if "{{" in name_or_config or "{%" in name_or_config:
        return ChatTemplate(name_or_config, name="data.chat_format")
    if name_or_config not in FORMATS:
        raise ValueError(
            f"data.chat_format={name_or_config!r}; known formats: {sorted(FORMATS)} "
            "(or a config of one's own)"
        )
    return FORMATS[name_or_config]


AUTO = "auto"


def format_choice(data_config: Any, model_format: Any = None) -> Any:
    """What ``data.chat_format`` picks: with ``'auto'``, the model's own template (or format) when
    the run starts from a model that has one, else chatml; any other value as it is.

    >>> format_choice({"chat_format": "auto"}), format_choice({"chat_format": "gemma"}, "x")
    ('chatml', 'gemma')
    """
    configured = data_config.get("chat_format", AUTO)
    if configured in (AUTO, None, ""):
        return model_format or "chatml"
    return configured


def resolve_format(
    data_config: Any, model_format: Any = None, tokenizer: Tokenizer | None = None
) -> ChatFormat | ChatTemplate:
    """The run's chat format (`format_choice`); a Jinja template gets ``data.chat_template_kwargs``,
    ``data.train_on_reasoning``, and the tokenizer's named tokens when it has none yet."""
    fmt = get_format(format_choice(data_config, model_format))
    if isinstance(fmt, ChatTemplate):
        kwargs = data_config.get("chat_template_kwargs") or {}
        kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
        changes: dict[str, Any] = dict(
            kwargs={**fmt.kwargs, **kwargs},
            train_on_reasoning=bool(data_config.get("train_on_reasoning", True)),
        )
        if not fmt.special_tokens and tokenizer is not None:
            changes["special_tokens"] = special_tokens_of(tokenizer)
        fmt = fmt.replace(**changes)
    return fmt


@dataclasses.dataclass(frozen=True)
class Piece:
    text: str
    trained: bool
    special: bool


@functools.lru_cache(maxsize=64)
def _special_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    # Longest first, so that a token containing another is matched whole.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _template(text: str, trained: bool, fmt: ChatFormat) -> list[Piece]:
    """Format text (never message content) split into plain and special pieces."""
    pieces, start = [], 0
    if fmt.special_tokens:
        for match in _special_pattern(tuple(fmt.special_tokens)).finditer(text):
            if match.start() > start:
                pieces.append(Piece(text[start : match.start()], trained, False))
            pieces.append(Piece(match.group(), trained, True))
            start = match.end()
    if start < len(text):
        pieces.append(Piece(text[start:], trained, False))
    return pieces


def validate(
    messages: Sequence[Mapping], fmt: ChatFormat, add_generation_prompt: bool = False
) -> None:
    """Raises a ValueError naming the first message that ``fmt`` cannot render, and why.

    >>> validate([{"role": "user", "content": "hi"}], CHATML)
    Traceback (most recent call last):
    ValueError: message 0: the conversation ends with a user turn; training needs an assistant turn
    """
    if not messages:
        raise ValueError("the conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise ValueError(f"message {i}: the assistant turn is empty")
        if role == "system" and i:
            raise ValueError(f"message {i}: a system message must come first")
        if role == "system" and fmt.system == "merge":
            following = messages[1].get("role") if len(messages) > 1 else None
            if following != "user":
                raise ValueError(
                    f"message {i}: format {fmt.name!r} prepends the system message to the "
                    f"first user message, but the next message is {following or 'missing'}"
                )
        elif role not in fmt.prefix:
            raise ValueError(f"message {i}: format {fmt.name!r} has no {role} role")
    last = messages[-1]["role"]
    if not add_generation_prompt and last != "assistant":
        raise ValueError(
            f"message {len(messages) - 1}: the conversation ends with a {last} turn; "
            "training needs an assistant turn"
        )


def calls_as_text(message: Mapping) -> Mapping:
    """An assistant turn's OpenAI ``tool_calls`` written into its content, for a built-in format:
    after the content and a newline, ``{"name": ..., "arguments": ...}`` as JSON, or a list of
    them for several calls (ShareGPT's ``function_call`` text).

    >>> call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    >>> calls_as_text({"role": "assistant", "content": "", "tool_calls": [call]})
    {'role': 'assistant', 'content': '{"name": "add", "arguments": {"a": 1}}'}
    """
    calls, content = message.get("tool_calls"), message.get("content") or ""
    if message.get("role") != "assistant" or not isinstance(calls, list) or not calls:
        return message
    if not isinstance(content, str):
        return message
    named = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, Mapping) else {}
        named.append({"name": function.get("name"), "arguments": function.get("arguments")})
    text = json.dumps(named[0] if len(named) == 1 else named, ensure_ascii=False)
    rest = {k: v for k, v in message.items() if k not in ("content", "tool_calls")}
    return {**rest, "content": f"{content}\n{text}" if content.strip() else text}


def render(
    messages: Sequence[Mapping],
    fmt: ChatFormat | ChatTemplate,
    add_generation_prompt: bool = False,
    train_on: str = "all_assistant",
    tools: Any = None,
) -> list[Piece]:
    """Renders a conversation into pieces, trained as ``train_on`` says.

    ``all_assistant`` trains every assistant content and its end of turn, ``last_assistant``
    only the last one's, and ``all`` every piece but a rendered BOS. With
    ``add_generation_prompt`` the result ends with an open assistant turn (for sampling), and the
    conversation need not end with an assistant turn.

    >>> chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    >>> [(p.text, p.trained) for p in render(chat, CHATML)][-4:]
    [('assistant\\n', False), ('4', True), ('<|im_end|>', True), ('\\n', False)]

    A `ChatTemplate` renders the chat with ``tools`` and each assistant turn's ``tool_calls``.
    Built-in formats have no place for ``tools``, and write an assistant turn's tool calls as
    JSON text after its content (`calls_as_text`).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on={train_on!r}; expected one of {TRAIN_ON}")
    if isinstance(fmt, ChatTemplate):
        return fmt.render(messages, add_generation_prompt, train_on, tools)
    messages = [calls_as_text(m) if isinstance(m, Mapping) else m for m in messages]
    validate(messages, fmt, add_generation_prompt)
    everything = train_on == "all"
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    pieces = _template(fmt.bos_token, False, fmt)
    system = ""
    turns = list(enumerate(messages))
    if fmt.system == "merge" and messages[0]["role"] == "system":
        system = messages[0]["content"] + fmt.system_join
        turns = turns[1:]
    for n, (i, message) in enumerate(turns):
        role, content = message["role"], message["content"]
        if fmt.strip_content:
            content = content.strip()
        trained = everything or (role == "assistant" and (train_on == "all_assistant" or i == last))
        if n:
            pieces += _template(fmt.separator, everything, fmt)
        pieces += _template(fmt.prefix[role], everything, fmt)
        if n == 0 and system:
            pieces.append(Piece(system, everything, False))
        pieces.append(Piece(content, trained, False))
        suffix = fmt.suffix.get(role, "")
        # The model learns to end its turn: the assistant suffix is trained through end_of_turn.
        cut = suffix.index(fmt.end_of_turn) + len(fmt.end_of_turn) if role == "assistant" else 0
        pieces += _template(suffix[:cut], trained, fmt) + _template(suffix[cut:], everything, fmt)
    if add_generation_prompt:
        pieces += _template(fmt.separator if turns else "", everything, fmt)
        pieces += _template(fmt.prefix["assistant"], everything, fmt)
    return [p for p in pieces if p.text]


def to_text(pieces: Sequence[Piece]) -> str:
    return "".join(p.text for p in pieces)


def char_mask(pieces: Sequence[Piece]) -> str:
    """``to_text(pieces)`` with each trained character as ``1`` and every other one as ``0``.

    >>> char_mask([Piece("Q: ", False, False), Piece("yes", True, False)])
    '000111'
    """
    return "".join(("1" if p.trained else "0") * len(p.text) for p in pieces)


def _resolve(
    pieces: Sequence[Piece], tokenizer: Tokenizer, fmt: ChatFormat
) -> list[tuple[Piece, int | None]]:
    """``(piece, id)`` pairs; ``id`` is None for plain text and for special tokens spelled out."""
    ids: dict[str, int | None] = {}
    resolved = []
    for piece in pieces:
        if piece.special and piece.text not in ids:
            fallback = fmt.special_tokens.get(piece.text)
            if fallback == "text":
                try:
                    ids[piece.text] = tokenizer.special_id(piece.text)
                except ValueError:
                    ids[piece.text] = None
            else:
                ids[piece.text] = tokenizer.special_id(piece.text, fallback)
        resolved.append((piece, ids[piece.text] if piece.special else None))
    return resolved


def tokenize(
    pieces: Sequence[Piece], tokenizer: Tokenizer, fmt: ChatFormat, add_bos: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a 0/1 loss mask for rendered pieces.

    ``add_bos`` prepends the tokenizer's BOS unless the format renders a BOS of its own; by
    default it follows the tokenizer's own ``add_bos_token`` where it has one (SmolLM2: none).

    >>> # user "2+2?" / assistant "4" in chatml, with a tokenizer that spells digits singly:
    >>> # text  <s> <|im_start|> user\\n2+2? <|im_end|> \\n <|im_start|> assistant\\n 4 <|im_end|> \\n
    >>> # mask   0       0          0  ...       0       0       0           0      1     1      0
    """
    if add_bos is None:
        add_bos = getattr(tokenizer, "add_bos_token", None) is not False
    add = add_bos and not fmt.renders_bos and tokenizer.bos_id >= 0
    ids: list[int] = [tokenizer.bos_id] if add else []
    mask: list[int] = [0] * len(ids)
    resolved = _resolve(pieces, tokenizer, fmt)
    i = 0
    while i < len(resolved):
        piece, piece_id = resolved[i]
        if piece_id is not None:
            ids.append(piece_id)
            mask.append(int(piece.trained))
            i += 1
            continue
        # Encode each run of plain text between special tokens in one go, so that token boundaries
        # are those of the whole rendered text, and read the mask off the trained byte spans.
        run, spans, offset = [], [], 0
        while i < len(resolved) and resolved[i][1] is None:
            text = resolved[i][0].text
            data = text.encode("utf-8")
            if resolved[i][0].trained and data:
                spans.append((offset, offset + len(data)))
            run.append(text)
            offset += len(data)
            i += 1
        run_ids, offsets = tokenizer.encode_with_offsets("".join(run))
        ids += run_ids
        mask += [int(any(b < e2 and e > b2 for b2, e2 in spans)) for b, e in offsets]
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def prompt_ids(
    messages: Sequence[Mapping],
    tokenizer: Tokenizer,
    fmt: ChatFormat | ChatTemplate,
    tools: Any = None,
) -> np.ndarray:
    """Token ids of a conversation followed by an open assistant turn, ready for generation.

    >>> # chatml, [user "2+2?"] -> the ids of
    >>> # <s> <|im_start|> user\\n2+2? <|im_end|> \\n <|im_start|> assistant\\n
    """
    pieces = render(messages, fmt, add_generation_prompt=True, tools=tools)
    ids, _ = tokenize(pieces, tokenizer, fmt)
    return ids
