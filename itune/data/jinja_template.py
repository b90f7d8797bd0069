"""A model's own Jinja chat template: rendered as transformers' ``apply_chat_template`` renders it,
with the loss mask found in the rendering itself.

Rendering uses the environment transformers builds (`environment`): a sandbox that cannot change
its inputs, ``trim_blocks`` and ``lstrip_blocks``, loop controls, ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps key order and writes ``", "``/``": "`` with no HTML
escaping, and the ``{% generation %}`` block. The inputs are prepared as transformers prepares
them: keys whose value is None dropped, reasoning given under ``reasoning_content``,
``thinking`` or ``reasoning`` passed under all of those names, and the tokenizer's special
tokens (``bos_token``, ``eos_token``...) and the template kwargs (``enable_thinking``...) as
variables. A ``raise_exception`` of the template becomes a `TemplateError` with its message.

The trained text of an assistant turn is found by rendering, never by markers (`trained_spans`):

- it starts where the whole chat's render leaves the turn's generation prompt (the chat up to
  the turn, rendered with ``add_generation_prompt``); the last turn must continue its generation
  prompt exactly, so that the model is trained on the very text it is prompted with;
- it ends where the turn, rendered as the last message of the chat, ends (its content, tool
  calls and end of turn; trailing whitespace is the template's separator). Where the template
  renders a turn otherwise when more follows (reasoning stripped before a later question, another
  end token), the trained text is the part that both renders share, at its start or its end.

``{% generation %}`` blocks, where a template has them, give the trained text instead. With
``train_on_reasoning=False`` the reasoning text of each turn, found by rendering the chat again
with that reasoning replaced by a sentinel, is not trained. A turn that cannot be located is a
`TemplateError` naming the template and the message.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Stands in for a turn's reasoning when finding where the template renders it.
_SENTINEL = "\ue000"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """A chat the template refuses (its own ``raise_exception``) or a turn it cannot locate."""


class _GenerationBlocks(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body and, while a render tracks
    them, records where in the output each body lands (transformers' AssistantTracker)."""

    tags = {"generation"}

    def __init__(self, env: jinja2.Environment):
        super().__init__(env)
        self.tracker: dict | None = None

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

    def _block(self, caller):
        text = caller()
        if self.tracker is not None:
            start = self.tracker["length"]
            self.tracker["spans"].append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` inside a template, with no attributes to reach Python's internals by."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}"
            )


def environment() -> ImmutableSandboxedEnvironment:
    """A new environment as transformers builds one for each template it compiles."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlocks, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    return environment().from_string(source)


def _plain(value: Any) -> Any:
    """Plain JSON-like data, as the template sees it."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if hasattr(value, "item"):  # A numpy scalar.
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def prepare_messages(messages: Sequence[Mapping]) -> list[dict]:
    """The messages as the template sees them: None values dropped, reasoning under each of its
    names (``thinking`` first, ``reasoning_content`` last, as transformers orders them).

    >>> prepare_messages([{"role": "assistant", "content": "4", "reasoning": "2+2", "x": None}])
    [{'thinking': '2+2', 'role': 'assistant', 'content': '4', 'reasoning': '2+2', \
'reasoning_content': '2+2'}]
    """
    prepared = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(f"message {i}: expected a dict, got {type(message).__name__}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def parse_tools(tools: Any) -> list | None:
    """A ``tools`` list from a record: a list of JSON schemas, or its JSON text."""
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise TemplateError(f"tools: not valid JSON ({e})") from None
    if isinstance(tools, Mapping):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise TemplateError(f"tools: expected a list of JSON schemas, got {tools!r:.80}")
    return _plain(tools)


def _common_prefix(a: str, b: str, start_a: int = 0, start_b: int = 0) -> int:
    """The length of the common prefix of ``a[start_a:]`` and ``b[start_b:]``."""
    n = min(len(a) - start_a, len(b) - start_b)
    lo, hi = 0, n
    while lo < hi:  # Bisect on equal slices: C-speed comparisons, no Python loop per character.
        mid = (lo + hi + 1) // 2
        if a[start_a : start_a + mid] == b[start_b : start_b + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _out_of_tag(text: str, floor: int, cut: int) -> int:
    """``cut``, or the start of the ``<...>`` tag that it falls inside: two renders that part
    ways inside a tag (``<think>`` against ``<tool_call>``) part before it."""
    opening = text.rfind("<", floor, cut)
    if opening >= 0 and opening > text.rfind(">", floor, cut):
        if not any(c.isspace() for c in text[opening:cut]):
            return opening
    return cut


def _rstrip_to(text: str, floor: int, end: int) -> int:
    while end > floor and text[end - 1].isspace():
        end -= 1
    return end


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template with what it is rendered with.

    ``special_tokens`` are the tokenizer's named tokens (``bos_token``, ``eos_token``...) as
    transformers passes them; ``kwargs`` further template variables (``enable_thinking``,
    ``date_string``...). ``train_on_reasoning`` decides whether reasoning text is trained.
    ``name`` says where the template came from, in messages.

    >>> t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
    ...                  "{% if add_generation_prompt %}<assistant>{% endif %}", name="tags")
    >>> chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    >>> t.render_text(chat)
    '<user>2+2?</s><assistant>4</s>'
    >>> text, spans = t.trained_spans(chat)
    >>> [text[a:b] for a, b in spans]
    ['4</s>']
    """

    source: str
    name: str = "chat template"
    special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train_on_reasoning: bool = True

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise TemplateError(f"{self.name}: the chat template is empty")
        try:
            _compile(self.source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TemplateError(f"{self.name}: line {e.lineno}: {e.message}") from None

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "ChatTemplate":
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), name=kwargs.pop("name", os.path.basename(path)), **kwargs)

    # Duck-typed beside `itune.data.chat.ChatFormat`.
    @property
    def renders_bos(self) -> bool:
        """The template writes every token itself: no BOS is added to its text."""
        return True

    def replace(self, **changes) -> "ChatTemplate":
        return dataclasses.replace(self, **changes)

    def _error(self, message: str) -> TemplateError:
        return TemplateError(f"{self.name}: {message}")

    def render_text(
        self,
        messages: Sequence[Mapping],
        tools: Any = None,
        add_generation_prompt: bool = False,
        _tracker: dict | None = None,
        **kwargs,
    ) -> str:
        """The text that ``apply_chat_template(messages, tools=tools, tokenize=False,
        add_generation_prompt=..., **kwargs)`` gives with the same tokenizer."""
        if not messages:
            raise self._error("the chat has no messages")
        variables = {**self.special_tokens, **self.kwargs, **kwargs}
        template = _compile(self.source)
        try:
            context = dict(
                messages=prepare_messages(messages),
                tools=parse_tools(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_plain(variables),
            )
            if _tracker is None:
                return template.render(**context)
            blocks = []
            for block in template.generate(**context):
                blocks.append(block)
                _tracker["length"] += len(block)
            return "".join(blocks)
        except jinja2.exceptions.TemplateError as e:
            raise self._error(str(e)) from None
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            raise self._error(f"cannot render the chat: {type(e).__name__}: {e}") from None

    def _generation_spans(self, messages, tools) -> tuple[str, list[tuple[int, int]]]:
        extension = next(
            e
            for e in _compile(self.source).environment.extensions.values()
            if isinstance(e, _GenerationBlocks)
        )
        tracker = {"length": 0, "spans": []}
        extension.tracker = tracker
        try:
            text = self.render_text(messages, tools, _tracker=tracker)
        finally:
            extension.tracker = None
        return text, [(a, b) for a, b in tracker["spans"] if b > a]

    def _turn_span(self, messages, tools, i: int, text: str, floor: int) -> tuple[int, int]:
        """Where assistant message ``i``'s trained text lies in ``text``, the whole chat's
        render (module docstring)."""
        where = f"assistant message {i}"
        if i == 0:
            raise self._error(f"{where}: a chat cannot open with the assistant's turn")
        prompt = self.render_text(messages[:i], tools, add_generation_prompt=True)
        start = _out_of_tag(text, floor, _common_prefix(prompt, text))
        last = i == len(messages) - 1
        if last and start < len(prompt):
            raise self._error(
                f"{where}: the chat renders {text[start : start + 40]!r} where the last turn's "
                f"generation prompt has {prompt[start : start + 40]!r}, so the model would be "
                "trained on text it is never prompted with; name a template that "
                "renders the turn as it prompts for it (data.chat_format)"
            )
        alone = self.render_text(messages[: i + 1], tools)
        alone_start = _out_of_tag(alone, 0, _common_prefix(prompt, alone))
        turn = alone[alone_start : _rstrip_to(alone, alone_start, len(alone))]
        if last:
            return start, start + len(turn)
        # The longest start of the turn as the chat renders it that the turn rendered alone
        # holds too (all of it, unless the template renders earlier turns otherwise).
        lo, hi = 0, min(len(turn), len(text) - start)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if text[start : start + mid] in turn:
                lo = mid
            else:
                hi = mid - 1
        length = _rstrip_to(text, start, _out_of_tag(text, start, start + lo)) - start
        if length == 0:
            raise self._error(
                f"{where}: cannot locate the turn in the rendered chat: rendered as the last "
                f"message it reads {turn[:40]!r}, in the chat {text[start : start + 40]!r}"
            )
        return start, start + length

    def _reasoning_span(self, messages, tools, i: int, text: str) -> tuple[int, int] | None:
        """Where the reasoning of message ``i`` is rendered in ``text``, if it is."""
        message = dict(messages[i])
        fields = [k for k in REASONING_FIELDS if isinstance(message.get(k), str)]
        if fields:
            if not message[fields[0]].strip():
                return None
            for field in fields:
                message[field] = _SENTINEL
        else:
            content = message.get("content")
            if not isinstance(content, str) or "</think>" not in content:
                return None
            before, _, after = content.partition("</think>")
            opened = before.rfind("<think>")
            thought = before[opened + len("<think>") :] if opened >= 0 else before
            if not thought.strip():
                return None
            kept = before[: opened + len("<think>")] if opened >= 0 else ""
            message["content"] = kept + _SENTINEL + "</think>" + after
        changed = list(messages[:i]) + [message] + list(messages[i + 1 :])
        other = self.render_text(changed, tools)
        if _SENTINEL not in other:
            return None
        start = _common_prefix(text, other)
        end = len(text) - _common_suffix(text, other)
        return (start, end) if end > start else None

    def trained_spans(
        self, messages: Sequence[Mapping], tools: Any = None, train_on: str = "all_assistant"
    ) -> tuple[str, list[tuple[int, int]]]:
        """The chat rendered for training, and the character spans of it that are trained."""
        roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
        if not messages or roles[-1] != "assistant":
            last = len(messages) - 1
            raise self._error(
                f"message {last}: the chat ends with a {roles[-1] if messages else 'missing'} "
                "turn; training needs an assistant turn"
            )
        assistant = [i for i, role in enumerate(roles) if role == "assistant"]
        if _GENERATION_TAG.search(self.source):
            text, spans = self._generation_spans(messages, tools)
            turns = list(zip(assistant, spans)) if len(spans) == len(assistant) else None
            if train_on == "last_assistant":
                spans = spans[-1:]
        else:
            text = self.render_text(messages, tools)
            turns, floor = [], 0
            for i in assistant if train_on != "last_assistant" else assistant[-1:]:
                span = self._turn_span(messages, tools, i, text, floor)
                turns.append((i, span))
                floor = span[1]
            spans = [span for _, span in turns]
        if train_on == "all":
            bos = self.special_tokens.get("bos_token") or ""
            skip = len(bos) if bos and text.startswith(bos) else 0
            spans = [(skip, len(text))]
        if not self.train_on_reasoning and turns is not None:
            spans = _without(
                spans, [self._reasoning_span(messages, tools, i, text) for i, _ in turns]
            )
        return text, [(a, b) for a, b in spans if b > a]

    def render(
        self,
        messages: Sequence[Mapping],
        add_generation_prompt: bool = False,
        train_on: str = "all_assistant",
        tools: Any = None,
    ) -> list:
        """The chat as `itune.data.chat.Piece` s: plain text, trained where `trained_spans`
        says; with ``add_generation_prompt`` the prompt for the next turn, untrained."""
        from itune.data.chat import Piece  # noqa: PLC0415  (chat imports this module)

        if add_generation_prompt:
            return [
                Piece(self.render_text(messages, tools, add_generation_prompt=True), False, False)
            ]
        text, spans = self.trained_spans(messages, tools, train_on)
        pieces, at = [], 0
        for a, b in spans:
            pieces += [Piece(text[at:a], False, False), Piece(text[a:b], True, False)]
            at = b
        pieces.append(Piece(text[at:], False, False))
        return [p for p in pieces if p.text]

    @functools.cached_property
    def end_of_turn(self) -> str:
        """The text that ends an assistant turn: what follows a probe answer when it is rendered
        as the chat's last message, up to its first whitespace (``<|im_end|>``)."""
        probe = [{"role": "user", "content": "\ue001"}, {"role": "assistant", "content": "\ue002"}]
        try:
            text = self.render_text(probe)
        except TemplateError:
            return ""
        after = text[text.rfind("\ue002") + 1 :].strip()
        return after.split()[0] if after else ""

    def stop_ids(self, tokenizer: Any) -> tuple[int, ...]:
        """The ids that end an answer: the first token of `end_of_turn`, and EOS."""
        ids = set()
        if self.end_of_turn:
            first = tokenizer.encode(self.end_of_turn)
            if first:
                ids.add(int(first[0]))
        if getattr(tokenizer, "eos_id", -1) >= 0:
            ids.add(int(tokenizer.eos_id))
        return tuple(sorted(ids))


def _without(spans, holes) -> list[tuple[int, int]]:
    """``spans`` less the ``holes`` (None entries are skipped)."""
    out = []
    for a, b in spans:
        pieces = [(a, b)]
        for hole in holes:
            if hole is None:
                continue
            h0, h1 = hole
            pieces = [
                part
                for x, y in pieces
                for part in ((x, min(y, h0)), (max(x, h1), y))
                if part[1] > part[0]
            ]
        out += pieces
    return out


def special_tokens_of(tokenizer: Any) -> dict[str, str]:
    """``bos_token``/``eos_token``/``pad_token`` of an itune tokenizer, as template variables."""
    tokens = {}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_id", -1)
        if token_id is not None and token_id >= 0:
            backend = getattr(tokenizer, "backend", None)
            text = backend.id_to_token(token_id) if backend is not None else None
            tokens[f"{role}_token"] = text or tokenizer.token_text(token_id)
    return tokens


def openai_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages with ShareGPT's tool turns in the OpenAI form that templates read: a
    ``function_call`` turn (its value ``{"name", "arguments"}`` JSON, or a list of them) becomes
    an assistant turn with ``tool_calls``, an ``observation`` turn a ``tool`` turn.

    >>> openai_messages([{"role": "function_call", "content": '{"name": "f", "arguments": {}}'},
    ...                  {"role": "observation", "content": "ok"}])  # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'assistant', 'content': '', 'tool_calls': [{'type': 'function',
      'function': {'name': 'f', 'arguments': {}}}]}, {'role': 'tool', 'content': 'ok'}]
    """
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "function_call":
            try:
                calls = json.loads(message.get("content") or "")
            except json.JSONDecodeError as e:
                raise TemplateError(
                    f"message {i}: a function_call that is not JSON ({e})"
                ) from None
            calls = calls if isinstance(calls, list) else [calls]
            tool_calls = [
                {
                    "type": "function",
                    "function": {"name": c.get("name"), "arguments": c.get("arguments", {})},
                }
                for c in calls
            ]
            out.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
        elif role == "observation":
            out.append({**message, "role": "tool"})
        else:
            out.append(dict(message))
    return out
