"""Tokenizers behind one small interface, and SentencePiece training for the built-in data.

A tokenizer here encodes text *with byte offsets*, so that a loss mask can be read off spans of
the rendered chat instead of re-tokenizing turns separately.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
from typing import Iterable, Iterator, Protocol, Sequence

import sentencepiece as spm


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    # The most bytes of text one token spells (its longest piece); so n tokens never need more
    # than n * max_token_bytes characters, which bounds what a row of n tokens must tokenize.
    max_token_bytes: int

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's ``[begin, end)`` byte offsets into ``text.encode()``."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """One token's text as it appears in a sequence (with its leading space, if any)."""

    def special_id(self, token: str, fallback: str | None = None) -> int:
        """The single id of a special token such as ``<|im_end|>``."""


class SentencePieceTokenizer:
    """A SentencePiece ``.model``; special tokens are its user-defined or control pieces."""

    def __init__(self, model_proto: bytes, name: str = "sentencepiece"):
        self.name = name
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        # Padding is masked out everywhere; models without a pad piece reuse id 0.
        self.pad_id = max(self._sp.pad_id(), 0)

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        if not gfile().exists(path):
            raise FileNotFoundError(f"data.tokenizer.path: no SentencePiece model at {path}")
        with gfile().GFile(path, "rb") as f:
            return cls(f.read(), name=path)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest piece in bytes, ``\u2581`` counted as the one byte of a space; a byte
        piece spells one byte, and control pieces none. A run of unknown characters, which
        SentencePiece merges into one unknown piece, is not bounded."""
        sp, longest = self._sp, 1
        for i in range(sp.vocab_size()):
            if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)):
                longest = max(longest, len(sp.id_to_piece(i).replace("\u2581", " ").encode()))
        return longest

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        proto = self._sp.encode(text, return_type="proto")
        return [p.id for p in proto.pieces], [(p.begin, p.end) for p in proto.pieces]

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_text(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id)).replace("\u2581", " ")

    def special_id(self, token: str, fallback: str | None = None) -> int:
        """``token``'s own piece, else the control token named by ``fallback`` (``'bos'``/``'eos'``)."""
        piece_id = self._sp.piece_to_id(token)
        if piece_id != self._sp.unk_id() and self._sp.id_to_piece(piece_id) == token:
            return piece_id
        return fallback_id(self, token, fallback)


def fallback_id(tokenizer: Tokenizer, token: str, fallback: str | None) -> int:
    """The BOS or EOS id standing in for a special token the tokenizer has no piece for."""
    if fallback in ("bos", "eos"):
        stand_in = tokenizer.bos_id if fallback == "bos" else tokenizer.eos_id
        if stand_in >= 0:
            return stand_in
    raise ValueError(
        f"Tokenizer {tokenizer.name} has no single piece for special token {token!r} "
        f"and no {fallback or 'fallback'} token to stand in for it"
    )


_CONTROL_PIECES = ("<pad>", "<unk>", "<s>", "</s>")
# The longest piece a trained vocabulary gets, in characters (SentencePiece's default).
MAX_PIECE_CHARS = 16


def train_sentencepiece(
    lines: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str],
    byte_fallback: bool = False,
) -> bytes:
    """Trains a unigram SentencePiece model on ``lines``; returns the serialized model.

    Special tokens, and the newline that chat formats use as a separator, become single pieces.
    ``vocab_size`` is an upper bound: a small corpus gets the vocabulary it supports.
    """
    model = io.BytesIO()
    try:
        _train(model, lines, vocab_size, special_tokens, byte_fallback)
    except RuntimeError as e:
        if "Vocabulary size is smaller than required_chars" in str(e):
            needed = str(e).split("Vocabulary size is smaller than required_chars.")[-1].strip()
            raise ValueError(
                f"data.tokenizer.vocab_size={vocab_size} is too small for this corpus ({needed})"
            ) from None
        raise
    return model.getvalue()


def _train(model, lines, vocab_size, special_tokens, byte_fallback) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        # With byte fallback, rare characters are spelled as bytes instead of needing pieces.
        character_coverage=0.9995 if byte_fallback else 1.0,
        byte_fallback=byte_fallback,
        hard_vocab_limit=False,
        max_sentencepiece_length=MAX_PIECE_CHARS,
        # The control pieces exist already; every other special token gets a piece of its own.
        user_defined_symbols=[t for t in special_tokens if t not in _CONTROL_PIECES] + ["\n"],
        normalization_rule_name="identity",
        # Chat text puts content right after a newline: with no dummy prefix, a line's first word
        # gets the same pieces in the training lines as in a rendered chat.
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=1,
        minloglevel=2,
    )


def cached_sentencepiece(
    cache_dir: str,
    key: dict,
    lines_fn,
    vocab_size: int,
    special_tokens: Sequence[str],
    byte_fallback: bool = False,
    corpus_name: str = "the built-in corpus",
) -> SentencePieceTokenizer:
    """Loads the model trained for ``key`` from ``cache_dir``, training and saving it if absent;
    ``corpus_name`` says in the log what ``lines_fn`` yields."""
    digest = hashlib.sha256(
        json.dumps(
            dict(
                key,
                vocab_size=vocab_size,
                special_tokens=list(special_tokens),
                byte_fallback=byte_fallback,
            ),
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    path = os.path.join(cache_dir, f"spm_{vocab_size}_{digest}.model")
    if gfile().exists(path):
        logging.info("Reusing SentencePiece model %s", path)
        return SentencePieceTokenizer.from_file(path)
    logging.info(
        "Training a SentencePiece vocabulary (at most %d pieces) on %s", vocab_size, corpus_name
    )
    proto = train_sentencepiece(lines_fn(), vocab_size, special_tokens, byte_fallback)
    tokenizer = SentencePieceTokenizer(proto, name=path)
    logging.info(
        "Trained a SentencePiece vocabulary of %d pieces%s",
        tokenizer.vocab_size,
        ""
        if tokenizer.vocab_size == vocab_size
        else f", all this corpus supports (data.tokenizer.vocab_size={vocab_size} is a bound)",
    )
    gfile().makedirs(cache_dir)
    tmp = path + ".tmp"
    with gfile().GFile(tmp, "wb") as f:
        f.write(proto)
    gfile().rename(tmp, path, overwrite=True)
    return tokenizer


def gfile():
    """`tf.io.gfile` (local and cloud paths), imported on first use: TensorFlow takes seconds to
    import, and the commands that only decode never need it."""
    import tensorflow as tf  # noqa: PLC0415

    return tf.io.gfile


def _lines(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        if line:
            yield line
