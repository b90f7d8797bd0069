"""Chat formats: render a conversation once, then tokenize it with a loss mask from its spans.

A conversation is rendered whole into text pieces, each tagged as trained or not and as plain
text or a special token. Special tokens map to single ids; the plain text between them is
encoded with byte offsets, and a token is trained exactly when it overlaps a trained span.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from itune.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """A turn is ``turn_start + header(role) + content + turn_end + separator``.

    ``special_tokens`` maps each special token to the control token a tokenizer may use in its
    place when it has no piece of its own (``'bos'`` or ``'eos'``).
    """

    name: str
    turn_start: str
    turn_end: str
    headers: dict[str, str]
    separator: str
    special_tokens: dict[str, str]

    @property
    def end_of_turn(self) -> str:
        return self.turn_end


CHATML = ChatFormat(
    name="chatml",
    turn_start="<|im_start|>",
    turn_end="<|im_end|>",
    headers={role: f"{role}\n" for role in ROLES},
    separator="\n",
    special_tokens={"<|im_start|>": "bos", "<|im_end|>": "eos"},
)

FORMATS = {f.name: f for f in (CHATML,)}


def get_format(name: str) -> ChatFormat:
    if name not in FORMATS:
        raise ValueError(f"data.chat_format={name!r}; known formats: {sorted(FORMATS)}")
    return FORMATS[name]


@dataclasses.dataclass(frozen=True)
class Piece:
    text: str
    trained: bool
    special: bool


def render(
    messages: Sequence[dict], fmt: ChatFormat, add_generation_prompt: bool = False
) -> list[Piece]:
    """Renders a conversation into pieces; assistant content and its end of turn are trained.

    With ``add_generation_prompt`` the result ends with an open assistant turn (for sampling).
    """
    pieces: list[Piece] = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        trained = role == "assistant"
        pieces += [
            Piece(fmt.turn_start, False, True),
            Piece(fmt.headers[role], False, False),
            Piece(content, trained, False),
            Piece(fmt.turn_end, trained, True),
            Piece(fmt.separator, False, False),
        ]
    if add_generation_prompt:
        pieces += [
            Piece(fmt.turn_start, False, True),
            Piece(fmt.headers["assistant"], False, False),
        ]
    return pieces


def to_text(pieces: Sequence[Piece]) -> str:
    return "".join(p.text for p in pieces)


def tokenize(
    pieces: Sequence[Piece], tokenizer: Tokenizer, fmt: ChatFormat, add_bos: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a 0/1 loss mask for rendered pieces.

    >>> # user "2+2?" / assistant "4" in chatml, with a tokenizer that spells digits singly:
    >>> # text  <s> <|im_start|> user\\n2+2? <|im_end|> \\n <|im_start|> assistant\\n 4 <|im_end|> \\n
    >>> # mask   0       0          0  ...       0       0       0           0      1     1      0
    """
    ids: list[int] = [tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []
    mask: list[int] = [0] * len(ids)
    i = 0
    while i < len(pieces):
        piece = pieces[i]
        if piece.special:
            ids.append(tokenizer.special_id(piece.text, fmt.special_tokens.get(piece.text)))
            mask.append(int(piece.trained))
            i += 1
            continue
        # Encode each run of plain text between special tokens in one go, so that token boundaries
        # are those of the whole rendered text, and read the mask off the trained byte spans.
        run, spans, offset = [], [], 0
        while i < len(pieces) and not pieces[i].special:
            data = pieces[i].text.encode("utf-8")
            if pieces[i].trained and data:
                spans.append((offset, offset + len(data)))
            run.append(pieces[i].text)
            offset += len(data)
            i += 1
        run_ids, offsets = tokenizer.encode_with_offsets("".join(run))
        ids += run_ids
        mask += [int(any(b < e2 and e > b2 for b2, e2 in spans)) for b, e in offsets]
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def prompt_ids(messages: Sequence[dict], tokenizer: Tokenizer, fmt: ChatFormat) -> np.ndarray:
    """Token ids of a conversation followed by an open assistant turn, ready for generation."""
    ids, _ = tokenize(render(messages, fmt, add_generation_prompt=True), tokenizer, fmt)
    return ids
