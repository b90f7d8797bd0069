"""HFTokenizer: SmolLM2's byte-level BPE against the tokenizers library, byte offsets, chat mask."""

import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from itune.data import chat
from itune.data.hf_tokenizer import HFTokenizer, load_tokenizer_path
from itune.data.tokenizer import SentencePieceTokenizer

# Written to exercise multi-byte characters, including tokens that split one.
NON_ASCII = [
    "Café, naïve résumé, façade, Ångström.",
    "Über große Straßen fährt man mit 120 km/h.",
    "你好，世界！这是一个测试。",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ end",
    "mixed é😀x\t\r\n  trailing  ",
    "  leading spaces, 3.14159 and 1,000,000\n\n\nlines",
]

# Digits split off before the byte-level regex leave the spaces before them in one token; GPT-2's
# regex alone would give " " and " 1" (SmolLM2's vocabulary has no multi-digit tokens).
SPACED_DIGITS = "Steps:\n  1. mix\n  2. bake at  180 C\n"


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character alphabet, inverted (written out here, independently)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_DECODER = gpt2_byte_decoder()


@pytest.fixture(scope="module")
def smollm_dir(shared_dir):
    return shared_dir / "tokenizers" / "smollm2_bpe"


@pytest.fixture(scope="module")
def meta(smollm_dir):
    return json.loads((smollm_dir / "tokenizer_meta.json").read_text())


@pytest.fixture(scope="module")
def tok(smollm_dir):
    return HFTokenizer.from_directory(str(smollm_dir))


@pytest.fixture(scope="module")
def reference(smollm_dir, meta):
    """SmolLM2's tokenizer as its tokenizer.json sets it up, built here straight from the files."""
    ref = Tokenizer(
        models.BPE.from_file(str(smollm_dir / "vocab.json"), str(smollm_dir / "merges.txt"))
    )
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens(list(meta["special_tokens"].values()))
    return ref


@pytest.fixture(scope="module")
def texts(shared_dir):
    data = shared_dir / "data"
    alpaca = json.loads((data / "llamafactory" / "alpaca_en_demo.json").read_text())
    with_non_ascii = [x for x in alpaca if any(ord(c) > 127 for c in json.dumps(x, ensure_ascii=0))]
    out = [
        "\n".join(filter(None, (x["instruction"], x["input"], x["output"])))
        for x in alpaca[:15] + with_non_ascii[:10]
    ]
    with open(data / "gsm8k" / "train.jsonl") as f:
        for _, line in zip(range(12), f):
            row = json.loads(line)
            out.append(row["question"] + "\n" + row["answer"])
    return out + [SPACED_DIGITS] + NON_ASCII


def check_offsets(text, ids, offsets, token_bytes):
    """Offsets are contiguous, cover ``text`` and hold exactly each token's bytes."""
    data = text.encode("utf-8")
    assert len(offsets) == len(ids)
    position = 0
    for token_id, (b, e) in zip(ids, offsets):
        assert b == position, (text, token_id, b, position)
        assert data[b:e] == token_bytes(token_id), (text, token_id, b, e)
        position = e
    assert position == len(data)


def smollm_bytes(ref):
    special = {i: t.content for i, t in ref.get_added_tokens_decoder().items()}

    def token_bytes(token_id):
        if token_id in special:
            return special[token_id].encode()
        return bytes(BYTE_DECODER[c] for c in ref.id_to_token(token_id))

    return token_bytes


def test_byte_alphabet_is_the_libraries():
    assert set(BYTE_DECODER) == set(pre_tokenizers.ByteLevel.alphabet())


def test_smollm2_sizes_and_special_ids(tok, meta):
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.add_bos_token is False
    for token_id, token in meta["special_tokens"].items():
        assert tok.special_id(token) == int(token_id)
        assert tok.encode(token) == [int(token_id)]
        assert tok.token_text(int(token_id)) == token
    assert tok.special_id("<|im_start|>") == meta["tokenizer.ggml.bos_token_id"] == 1
    assert tok.special_id("<|im_end|>") == meta["tokenizer.ggml.eos_token_id"] == 2
    # itune adds BOS itself: encoding never does.
    assert tok.encode("") == [] and tok.encode_with_offsets("") == ([], [])
    assert tok.bos_id not in tok.encode("Hello there")
    assert tok.encode("a<|im_end|>b") == [tok.encode("a")[0], 2, tok.encode("b")[0]]


def test_ids_offsets_and_decode_match_the_library(tok, reference, texts):
    token_bytes = smollm_bytes(reference)
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False)
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == expected.ids, text
        assert tok.encode(text) == ids
        assert tok.decode(ids) == text == reference.decode(ids, skip_special_tokens=False)
        check_offsets(text, ids, offsets, token_bytes)
        # Each byte span lies within the library's character span of the same token.
        starts = np.cumsum([0] + [len(c.encode()) for c in text])
        for (b, e), (cb, ce) in zip(offsets, expected.offsets):
            assert starts[cb] <= b < e <= starts[ce], text
    assert "".join(tok.token_text(i) for i in tok.encode(texts[0])) == texts[0]


def test_pre_tokenizer_splits_digits_like_smollm2(tok, reference, smollm_dir):
    gpt2 = HFTokenizer.from_files(
        str(smollm_dir / "vocab.json"), str(smollm_dir / "merges.txt"), pre_tokenizer="gpt2"
    )
    expected = reference.encode(SPACED_DIGITS, add_special_tokens=False).ids
    assert tok.encode(SPACED_DIGITS) == expected != gpt2.encode(SPACED_DIGITS)
    assert [tok.token_text(i) for i in tok.encode("x  180")] == ["x", "  ", "1", "8", "0"]


def test_non_ascii_offsets(tok, reference):
    token_bytes = smollm_bytes(reference)
    split_characters = 0
    for text in NON_ASCII:
        ids, offsets = tok.encode_with_offsets(text)
        check_offsets(text, ids, offsets, token_bytes)
        for b, e in offsets:
            try:
                text.encode()[b:e].decode()
            except UnicodeDecodeError:
                split_characters += 1
    # The tricky case is exercised: tokens holding part of a character.
    assert split_characters > 0
    ids, offsets = tok.encode_with_offsets("é😀")
    assert offsets[0][0] == 0 and offsets[-1][1] == len("é😀".encode()) == 6


def test_chatml_mask_trains_exactly_the_assistant_turns(tok, texts):
    contents = [texts[0].split("\n")[-1], texts[-1 - len(NON_ASCII)], NON_ASCII[0] + " 42."]
    messages = [
        {"role": "system", "content": "You are a helpful AI assistant named SmolLM."},
        {"role": "user", "content": texts[1].split("\n")[0]},
        {"role": "assistant", "content": contents[0]},
        {"role": "user", "content": "Now this one: 7+8?"},
        {"role": "assistant", "content": contents[1]},
        {"role": "user", "content": "Et en français ?"},
        {"role": "assistant", "content": contents[2]},
    ]
    fmt = chat.get_format("chatml")
    pieces = chat.render(messages, fmt)
    ids, mask = chat.tokenize(pieces, tok, fmt, add_bos=False)
    assert tok.decode(ids) == chat.to_text(pieces)
    assert ids.tolist() == tok.encode(chat.to_text(pieces))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    runs = [ids[b:e].tolist() for b, e in zip(edges[::2], edges[1::2])]
    assert len(runs) == len(contents)
    for run, content in zip(runs, contents):
        assert run[-1] == tok.special_id("<|im_end|>")
        assert tok.decode(run[:-1]) == content
        assert run[:-1] == tok.encode(content)
    # By default the tokenizer's own add_bos_token (False for SmolLM2) decides; asked, BOS comes.
    assert chat.tokenize(pieces, tok, fmt)[0].tolist() == ids.tolist()
    with_bos, _ = chat.tokenize(pieces, tok, fmt, add_bos=True)
    assert with_bos.tolist() == [tok.bos_id] + ids.tolist()


def test_from_directory_with_a_saved_tokenizer_json(tmp_path, tok, reference, texts):
    reference.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|im_start|>", "__type": "AddedToken"},
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "add_bos_token": False,
            }
        )
    )
    # tokenizer_config.json wins over special_tokens_map.json.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    for loaded in (HFTokenizer.from_directory(str(tmp_path)), load_tokenizer_path(str(tmp_path))):
        assert isinstance(loaded, HFTokenizer)
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (49152, 1, 2, 2)
        assert loaded.add_bos_token is False
        for text in texts[::4] + NON_ASCII:
            assert loaded.encode_with_offsets(text) == tok.encode_with_offsets(text)
            assert loaded.decode(tok.encode(text)) == text
    bare = load_tokenizer_path(str(tmp_path / "tokenizer.json"))
    assert bare.encode(texts[0]) == tok.encode(texts[0])
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (-1, -1, 0)


def test_hugging_face_layout_with_vocab_and_merges(tmp_path, smollm_dir, tok):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(smollm_dir / name, tmp_path / name)
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": {"content": "<|im_end|>", "special": True},
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            }
        )
    )
    loaded = HFTokenizer.from_directory(str(tmp_path))
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 0)
    assert loaded.encode("hi<|im_end|>") == tok.encode("hi<|im_end|>")


def test_special_id_fallbacks_and_errors(tok, smollm_dir):
    assert tok.special_id("<|eot_id|>", "eos") == tok.eos_id
    assert tok.special_id("<|begin_of_text|>", "bos") == tok.bos_id
    for fallback in (None, "text"):
        with pytest.raises(ValueError, match=r"special token '<\|eot_id\|>'"):
            tok.special_id("<|eot_id|>", fallback)
    no_eos = HFTokenizer.from_files(
        str(smollm_dir / "vocab.json"), str(smollm_dir / "merges.txt"), pre_tokenizer="smollm"
    )
    assert no_eos.eos_id == -1
    with pytest.raises(ValueError, match="bos token '<s>' is not in the vocabulary"):
        HFTokenizer.from_files(
            str(smollm_dir / "vocab.json"), str(smollm_dir / "merges.txt"), bos="<s>"
        )
    with pytest.raises(ValueError, match=r"'<\|eot_id\|>' and no eos token"):
        no_eos.special_id("<|eot_id|>", "eos")
    # A chat format's 'text' fallback spells the token out.
    fmt = chat.get_format("llama3")
    pieces = chat.render(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], fmt
    )
    ids, mask = chat.tokenize(pieces, tok, fmt)
    assert tok.decode(ids).startswith("<|im_start|><|start_header_id|>user<|end_header_id|>")
    assert tok.decode(ids[mask == 1]) == "yo<|im_end|>"
    with pytest.raises(ValueError, match="pre-tokenizer 'llama-bpe'"):
        HFTokenizer.from_files(
            str(smollm_dir / "vocab.json"),
            str(smollm_dir / "merges.txt"),
            pre_tokenizer="llama-bpe",
        )


def test_sentencepiece_paths(shared_dir):
    path = str(shared_dir / "tokenizers" / "unigram_32768.model")
    assert isinstance(load_tokenizer_path(path), SentencePieceTokenizer)


def test_missing_files_name_their_path(tmp_path):
    absent = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=absent):
        HFTokenizer.from_directory(absent)
    with pytest.raises(FileNotFoundError, match=absent):
        load_tokenizer_path(absent)
    with pytest.raises(FileNotFoundError, match=absent):
        load_tokenizer_path(absent + ".model")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_tokenizer_json(str(tmp_path / "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.json"):
        HFTokenizer.from_directory(str(tmp_path))
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "merges.txt")):
        HFTokenizer.from_directory(str(tmp_path))


def test_small_byte_level_bpe_offsets():
    """A byte-level BPE trained here (no shared files needed): offsets cover split characters."""
    lines = ["héllo wörld 😀😀", "naïve 你好 你好 1234", "hello world"] * 5
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=300,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<|im_end|>"],
            show_progress=False,
        ),
    )
    small = HFTokenizer(bpe, eos="<|im_end|>", name="small")
    assert small.eos_id == small.special_id("<|im_end|>", None) == 0
    token_bytes = smollm_bytes(bpe)
    for text in lines[:3] + ["😀 é<|im_end|>x", "Ünseen ß 字"]:
        ids, offsets = small.encode_with_offsets(text)
        check_offsets(text, ids, offsets, token_bytes)
        assert small.decode(ids) == text


def test_character_offsets_become_byte_offsets():
    """A tokenizer that is not byte-level keeps the library's offsets, in bytes."""
    vocab = {"[UNK]": 0, "café": 1, "über": 2, "😀": 3, "字": 4}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    small = HFTokenizer(word_level, name="words")
    text = "café  über 😀 字 ?"
    ids, offsets = small.encode_with_offsets(text)
    assert ids == [1, 2, 3, 4, 0]
    data = text.encode()
    assert [data[b:e].decode() for b, e in offsets] == ["café", "über", "😀", "字", "?"]


def test_metaspace_tokens_keep_their_leading_space():
    vocab = {"[UNK]": 0, "▁héllo": 1, "▁wörld": 2}
    metaspace = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.decoder = decoders.Metaspace()
    small = HFTokenizer(metaspace, name="metaspace")
    text = "héllo wörld"
    ids, offsets = small.encode_with_offsets(text)
    assert ids == [1, 2] and offsets == [(0, 6), (6, 13)]
    assert [small.token_text(i) for i in ids] == [" héllo", " wörld"]
    assert small.decode(ids) == text
