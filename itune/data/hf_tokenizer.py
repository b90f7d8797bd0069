"""Hugging Face tokenizers (byte-level BPE such as SmolLM2's) behind itune's `Tokenizer` interface.

`HFTokenizer` wraps a ``tokenizers.Tokenizer`` built from a full ``tokenizer.json`` or from a
GPT-2 style ``vocab.json`` + ``merges.txt``. Offsets are byte offsets into ``text.encode()``, as
`itune.data.chat.tokenize` reads its loss mask off byte spans. `load_tokenizer_path` picks
SentencePiece or Hugging Face by what a path holds.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from itune.data.tokenizer import SentencePieceTokenizer, fallback_id, gfile

# Pre-tokenizers for a vocab.json + merges.txt, by the names of llama.cpp's `tokenizer.ggml.pre`.
# SmolLM2 ("smollm") and StarCoder split digits singly before GPT-2's regex, as their
# tokenizer.json does with Sequence[Digits(individual_digits=True), ByteLevel].
_PRE_TOKENIZERS = {
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
}

# ``tokenizer_meta.json`` keys (GGUF metadata names) of the ids HFTokenizer needs.
_META_IDS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-character alphabet used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    kind = _PRE_TOKENIZERS.get(name)
    if kind is None:
        raise ValueError(
            f"pre-tokenizer {name!r} is not supported for vocab.json + merges.txt; "
            f"known: {sorted(_PRE_TOKENIZERS)} (or give a tokenizer.json)"
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _read_text(path: str, what: str) -> str:
    if not gfile().exists(path):
        raise FileNotFoundError(f"no {what} at {path}")
    with gfile().GFile(path, "r") as f:
        return f.read()


def _read_json(path: str, what: str) -> Any:
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _token_name(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` or ``special_tokens_map.json`` write it."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizer:
    """A ``tokenizers.Tokenizer``; special tokens are its added tokens (or any vocabulary entry).

    ``bos``/``eos``/``pad`` are token strings or ids; a missing BOS or EOS is ``-1`` and a
    missing pad is ``0``, as in `SentencePieceTokenizer`. ``add_bos_token`` records whether the
    model's own tokenizer prepends BOS (``None``: not known); itune never adds BOS in `encode`.
    Text containing a special token's string (``<|im_end|>``) encodes to that token's id, as
    with the model's own tokenizer.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        bos: str | int | None = None,
        eos: str | int | None = None,
        pad: str | int | None = None,
        name: str = "huggingface",
        add_bos_token: bool | None = None,
    ):
        self.name = name
        self._tok = tokenizer
        # A tokenizer.json may carry padding or truncation; itune does both itself.
        self._tok.no_padding()
        self._tok.no_truncation()
        # Ids can exceed the model's vocabulary when added tokens extend it.
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.bos_id = self._resolve(bos, "bos")
        self.eos_id = self._resolve(eos, "eos")
        self.pad_id = max(self._resolve(pad, "pad"), 0)
        self.add_bos_token = add_bos_token
        self._byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)
        self._bytes: list[bytes | None] | None = None
        self._max_token_bytes: int | None = None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (to save it as a ``tokenizer.json``)."""
        return self._tok

    def _resolve(self, token: str | int | None, what: str) -> int:
        if token is None:
            return -1
        if isinstance(token, (int, np.integer)):
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"Tokenizer {self.name}: {what} id {token} is outside the vocabulary "
                    f"of {self.vocab_size}"
                )
            return int(token)
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"Tokenizer {self.name}: {what} token {token!r} is not in the vocabulary"
            )
        return token_id

    @classmethod
    def from_tokenizer_json(cls, path: str, **kwargs) -> "HFTokenizer":
        """A full ``tokenizer.json``; ``kwargs`` go to `HFTokenizer` (``bos``, ``eos``, ...)."""
        text = _read_text(path, "tokenizer.json")
        kwargs.setdefault("name", path)
        return cls(tokenizers.Tokenizer.from_str(text), **kwargs)

    @classmethod
    def from_files(
        cls,
        vocab_json: str,
        merges_txt: str,
        special_tokens: Sequence[str | AddedToken] = (),
        bos: str | int | None = None,
        eos: str | int | None = None,
        pad: str | int | None = None,
        pre_tokenizer: str = "gpt2",
        **kwargs,
    ) -> "HFTokenizer":
        """A byte-level BPE from GPT-2 style files.

        ``special_tokens`` (and ``bos``/``eos``/``pad`` given by name) become special added
        tokens: matched whole in text, keeping their vocabulary ids when they have them.
        ``pre_tokenizer`` names the split before BPE (llama.cpp's ``tokenizer.ggml.pre``):
        ``'gpt2'``, or ``'smollm'`` for SmolLM2, which also splits digits singly.
        """
        _pre_tokenizer(pre_tokenizer)  # An unknown name fails before any file is read.
        vocab = _read_json(vocab_json, "vocab.json")
        merges = []
        for n, line in enumerate(_read_text(merges_txt, "merges.txt").split("\n")):
            line = line.rstrip("\r")
            if not line or (n == 0 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{merges_txt}:{n + 1}: expected two tokens, got {line!r}")
            merges.append((pair[0], pair[1]))
        kwargs.setdefault("name", os.path.dirname(vocab_json) or vocab_json)
        return cls.from_vocab_and_merges(
            vocab, merges, special_tokens, bos, eos, pad, pre_tokenizer, **kwargs
        )

    @classmethod
    def from_vocab_and_merges(
        cls,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        special_tokens: Sequence[str | AddedToken] = (),
        bos: str | int | None = None,
        eos: str | int | None = None,
        pad: str | int | None = None,
        pre_tokenizer: str = "gpt2",
        **kwargs,
    ) -> "HFTokenizer":
        """A byte-level BPE from its vocabulary (token -> id, tokens spelled in GPT-2's byte
        alphabet) and merges, as `from_files` reads them or a GGUF's metadata holds them."""
        pre = _pre_tokenizer(pre_tokenizer)
        vocab = dict(vocab)
        tok = tokenizers.Tokenizer(models.BPE(vocab, list(merges)))
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        listed = {t.content if isinstance(t, AddedToken) else t for t in special_tokens}
        # A named BOS/EOS/pad must be in the vocabulary: adding it would give it an id that the
        # model has no embedding for.
        named = [t for t in dict.fromkeys((bos, eos, pad)) if isinstance(t, str) and t in vocab]
        specials = list(special_tokens) + [t for t in named if t not in listed]
        tok.add_special_tokens(
            [
                t if isinstance(t, AddedToken) else AddedToken(t, special=True, normalized=False)
                for t in specials
            ]
        )
        return cls(tok, bos=bos, eos=eos, pad=pad, **kwargs)

    @classmethod
    def from_directory(cls, path: str) -> "HFTokenizer":
        """``tokenizer.json``, else ``vocab.json`` + ``merges.txt``, from a directory.

        Special ids and the pre-tokenizer come from ``tokenizer_meta.json`` (GGUF metadata, as
        in itune's shared files) or, in a Hugging Face layout, ``tokenizer_config.json`` and
        ``special_tokens_map.json``.
        """
        if not gfile().isdir(path):
            raise FileNotFoundError(f"no tokenizer directory at {path}")

        def optional_json(name: str) -> dict:
            file = os.path.join(path, name)
            return _read_json(file, name) if gfile().exists(file) else {}

        meta = optional_json("tokenizer_meta.json")
        config = optional_json("tokenizer_config.json")
        token_map = optional_json("special_tokens_map.json")
        special: dict[str, Any] = {}
        for role in ("bos", "eos", "pad"):
            if meta.get(_META_IDS[role]) is not None:
                special[role] = int(meta[_META_IDS[role]])
            else:
                # tokenizer_config.json wins over special_tokens_map.json, as in transformers.
                name = _token_name(config.get(f"{role}_token"))
                special[role] = name or _token_name(token_map.get(f"{role}_token"))
        add_bos = meta.get("tokenizer.ggml.add_bos_token", config.get("add_bos_token"))
        kwargs = dict(special, name=path, add_bos_token=add_bos)

        tokenizer_json = os.path.join(path, "tokenizer.json")
        if gfile().exists(tokenizer_json):
            return cls.from_tokenizer_json(tokenizer_json, **kwargs)
        vocab_json, merges_txt = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if not gfile().exists(vocab_json) and not gfile().exists(merges_txt):
            raise FileNotFoundError(
                f"no tokenizer at {path}: it has neither tokenizer.json nor vocab.json + merges.txt"
            )
        # Meta ids must name the very tokens the vocabulary has there.
        expected = {str(t): int(i) for i, t in meta.get("special_tokens", {}).items()}
        specials = [
            AddedToken(
                entry["content"],
                special=entry.get("special", True),
                normalized=entry.get("normalized", False),
                lstrip=entry.get("lstrip", False),
                rstrip=entry.get("rstrip", False),
                single_word=entry.get("single_word", False),
            )
            for entry in config.get("added_tokens_decoder", {}).values()
        ]
        listed = {t.content for t in specials}
        extra = list(expected) + [
            t for t in map(_token_name, token_map.get("additional_special_tokens", [])) if t
        ]
        specials += [
            AddedToken(t, special=True, normalized=False) for t in extra if t not in listed
        ]
        tokenizer = cls.from_files(
            vocab_json,
            merges_txt,
            specials,
            pre_tokenizer=meta.get("tokenizer.ggml.pre", "gpt2"),
            **kwargs,
        )
        for token, token_id in expected.items():
            if tokenizer._tok.token_to_id(token) != token_id:
                raise ValueError(
                    f"{path}: tokenizer_meta.json gives {token!r} id {token_id}, but the "
                    f"vocabulary has it at {tokenizer._tok.token_to_id(token)}"
                )
        return tokenizer

    def _token_bytes(self) -> list[bytes | None]:
        """Each id's bytes in the text (None where a token has no byte-level spelling)."""
        if self._bytes is None:
            byte_of = _byte_decoder()
            table: list[bytes | None] = [None] * self.vocab_size
            for token, token_id in self._tok.get_vocab(with_added_tokens=False).items():
                if all(c in byte_of for c in token):
                    table[token_id] = bytes(byte_of[c] for c in token)
            # Added tokens are matched in the raw text, not spelled in the byte alphabet.
            for token_id, added in self._tok.get_added_tokens_decoder().items():
                table[token_id] = added.content.encode("utf-8")
            self._bytes = table
        return self._bytes

    @property
    def max_token_bytes(self) -> int:
        """The longest token in bytes of text (see `itune.data.tokenizer.Tokenizer`)."""
        if self._max_token_bytes is None:
            if self._byte_level:
                spelled = (len(b) for b in self._token_bytes() if b is not None)
            else:
                vocab = self._tok.get_vocab(with_added_tokens=True)
                spelled = (len(t.replace("\u2581", " ").encode()) for t in vocab)
            self._max_token_bytes = max(spelled, default=1)
        return self._max_token_bytes

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._tok.encode(text, add_special_tokens=False)
        ids = encoding.ids
        data = text.encode("utf-8")
        if self._byte_level:
            # Byte-level tokens spell the text byte for byte, so offsets are running sums of
            # their lengths; this is exact also where one token holds part of a character
            # (the library's character offsets give such tokens the whole character).
            table = self._token_bytes()
            pieces = [table[i] for i in ids]
            if None not in pieces and b"".join(pieces) == data:
                ends = np.cumsum([len(p) for p in pieces], dtype=np.int64).tolist()
                return ids, [(end - len(p), end) for p, end in zip(pieces, ends)]
        # Otherwise (a normalizer, an unknown token): the library's character offsets, in bytes.
        codepoints = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        widths = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
        starts = np.concatenate([[0], np.cumsum(widths)]).tolist()
        return ids, [(starts[b], starts[e]) for b, e in encoding.offsets]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._byte_level:
            data = self._token_bytes()[token_id] if 0 <= token_id < self.vocab_size else None
            if data is not None:
                # A token holding part of a character shows as U+FFFD, as the decoder does.
                return data.decode("utf-8", errors="replace")
        text = self._tok.decode([token_id], skip_special_tokens=False)
        # Metaspace-style decoders drop a sequence's leading space; a token keeps its own.
        if (self._tok.id_to_token(token_id) or "").startswith("\u2581") and text[:1] != " ":
            text = " " + text
        return text

    def special_id(self, token: str, fallback: str | None = None) -> int:
        """``token``'s own id, else the BOS or EOS id named by ``fallback`` ('bos'/'eos')."""
        token_id = self._tok.token_to_id(token)
        if token_id is not None:
            return token_id
        return fallback_id(self, token, fallback)


# Readers of tokenizer files by extension that a layer above this one provides: the GGUF
# format's reader lives with the format (`itune.convert.gguf_tokenizer` registers it).
PATH_READERS: dict[str, Any] = {}


def load_tokenizer_path(path: str) -> SentencePieceTokenizer | HFTokenizer:
    """A SentencePiece ``.model`` file, a ``tokenizer.json`` file, a GGUF file's tokenizer, or a
    directory of either Hugging Face layout (see `HFTokenizer.from_directory`)."""
    if path.endswith(".gguf") and gfile().exists(path):
        if ".gguf" not in PATH_READERS:
            raise ValueError(
                f"{path}: reading a GGUF file's tokenizer needs itune.convert.gguf_tokenizer"
            )
        return PATH_READERS[".gguf"](path)
    if gfile().isdir(path):
        return HFTokenizer.from_directory(path)
    if path.endswith(".json"):
        return HFTokenizer.from_tokenizer_json(path)
    if not gfile().exists(path):
        raise FileNotFoundError(
            f"data.tokenizer.path: no tokenizer at {path} (expected a SentencePiece .model file, "
            "a tokenizer.json or a directory holding one)"
        )
    return SentencePieceTokenizer.from_file(path)
