"""The tokenizer of a llama.cpp GGUF file, as an `HFTokenizer`, built as transformers' GGUF loader
builds it.

Two kinds of vocabulary (``tokenizer.ggml.model``):

- ``'gpt2'``, byte-level BPE with its merges. ``tokenizer.ggml.pre`` names the split before BPE:
  GPT-2's regex (``'gpt2'``), digits split singly first (``'smollm'``, ``'starcoder'``...), or the
  regex of Qwen2/Qwen3 (``'qwen2'``) or Llama 3 (``'llama-bpe'``).
- ``'llama'``, SentencePiece, read for Gemma files (``gemma2``, ``gemma3``) only: BPE with byte
  fallback, spaces written as ``▁``, no prefix space. The file lists no merges; they are rebuilt
  from the vocabulary in the order its tokens appear (Gemma's scores do not follow its merge
  order), and tokens of two or more plain spaces are respelled with ``▁``.

In both, control tokens (``<|im_start|>``, ``<start_of_turn>``...) become special tokens with
their own single ids, and user-defined ones (``<think>``) added tokens, as llama.cpp matches both
whole in text.
"""

from __future__ import annotations

import os

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from itune.convert.gguf import GGUFError, _File, _open
from itune.data.jinja_template import ChatTemplate, special_tokens_of
from itune.data import hf_tokenizer
from itune.data.hf_tokenizer import _PRE_TOKENIZERS, HFTokenizer, _byte_decoder

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Byte-level pre-tokenizers that split by a regex of their own, by tokenizer.ggml.pre.
_SPLITS = {
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
}
# Architectures whose SentencePiece vocabulary is read ('llama' tokenizer model).
_SENTENCEPIECE_ARCHITECTURES = ("gemma2", "gemma3")


def load_gguf_tokenizer(path: str | os.PathLike) -> tuple[HFTokenizer, ChatTemplate | None]:
    """``(HFTokenizer, the file's chat template or None)`` from a GGUF file's tokenizer metadata
    (``tokenizer.chat_template``, rendered with the tokenizer's named tokens).

    A vocabulary of another kind, or a pre-tokenizer not listed above, is a `GGUFError`.
    """
    file = _open(path)
    model = file.require("tokenizer.ggml.model")
    if model == "gpt2":
        build = _byte_level
    elif model == "llama" and file.arch in _SENTENCEPIECE_ARCHITECTURES:
        build = _sentencepiece
    else:
        raise GGUFError(
            f"{file.path}: tokenizer.ggml.model is {model!r} in a {file.arch!r} file; "
            "load_gguf_tokenizer reads byte-level BPE ('gpt2'), and SentencePiece ('llama') "
            f"in {' and '.join(_SENTENCEPIECE_ARCHITECTURES)} files"
        )
    tokens = list(file.require("tokenizer.ggml.tokens"))
    types = list(file.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(
            f"{file.path}: tokenizer.ggml.token_type has {len(types)} entries for "
            f"{len(tokens)} tokens"
        )
    tokenizer = build(file, tokens, types)
    source = file.get("tokenizer.chat_template")
    if not source:
        return tokenizer, None
    name = f"{os.path.basename(file.path)} (tokenizer.chat_template)"
    return tokenizer, ChatTemplate(source, name=name, special_tokens=special_tokens_of(tokenizer))


def _ids(file: _File) -> dict:
    """`HFTokenizer`'s special ids and BOS flag, from the metadata."""

    def special_id(key: str) -> int | None:
        value = file.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    add_bos = file.get("tokenizer.ggml.add_bos_token")
    return dict(
        bos=special_id("bos_token_id"),
        eos=special_id("eos_token_id"),
        pad=special_id("padding_token_id"),
        name=file.path,
        add_bos_token=None if add_bos is None else bool(add_bos),
    )


def _byte_level(file: _File, tokens: list[str], types: list[int]) -> HFTokenizer:
    pre = file.get("tokenizer.ggml.pre") or "gpt2"
    if pre not in _PRE_TOKENIZERS and pre not in _SPLITS:
        raise GGUFError(
            f"{file.path}: tokenizer.ggml.pre is {pre!r}; load_gguf_tokenizer knows "
            f"{sorted(set(_PRE_TOKENIZERS) | set(_SPLITS))}"
        )
    merges = []
    for n, merge in enumerate(file.require("tokenizer.ggml.merges")):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise GGUFError(f"{file.path}: tokenizer.ggml.merges[{n}] is {merge!r}")
        merges.append((pair[0], pair[1]))
    spell = {byte: char for char, byte in _byte_decoder().items()}
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    specials = []
    for token_id, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (_CONTROL, _USER_DEFINED):
            # Matched whole in the raw text: kept as spelled, with its own id.
            specials.append(AddedToken(token, special=kind == _CONTROL, normalized=False))
        elif not set(token) <= alphabet:
            # A normal token spelled in plain text rather than the byte alphabet.
            token = "".join(spell[byte] for byte in token.encode("utf-8"))
        vocab.setdefault(token, token_id)
    named = pre if pre in _PRE_TOKENIZERS else "gpt2"  # A regex of its own replaces GPT-2's.
    tokenizer = HFTokenizer.from_vocab_and_merges(
        vocab, merges, specials, pre_tokenizer=named, **_ids(file)
    )
    if pre in _SPLITS:
        tokenizer.backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return tokenizer


def _sentencepiece(file: _File, tokens: list[str], types: list[int]) -> HFTokenizer:
    # A token of two or more spaces is stored as spaces; the pieces spell a space "▁".
    pieces = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {piece: token_id for token_id, piece in enumerate(pieces)}
    unknown = file.get("tokenizer.ggml.unknown_token_id")
    tok = tokenizers.Tokenizer(
        models.BPE(
            vocab,
            _merges_by_position(pieces, vocab),
            unk_token="<unk>" if unknown is None else tokens[int(unknown)],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, types)
            if kind == _CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, kind in zip(tokens, types)
            if kind == _USER_DEFINED and token in vocab
        ]
    )
    return HFTokenizer(tok, **_ids(file))


def _merges_by_position(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary, earlier pieces' first (longer
    left halves first within one piece): transformers' ``generate_merges`` ranked by position.

    >>> pieces = ["a", "b", "c", "ab", "abc"]
    >>> _merges_by_position(pieces, {piece: n for n, piece in enumerate(pieces)})
    [('a', 'b'), ('ab', 'c')]
    """
    rank = {piece: -position for position, piece in enumerate(pieces)}
    merges = []
    for piece, score in rank.items():
        splits = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges += sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


hf_tokenizer.PATH_READERS[".gguf"] = lambda path: load_gguf_tokenizer(path)[0]
