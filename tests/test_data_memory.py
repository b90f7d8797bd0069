"""A record costs what a row of ``seq_len`` tokens does, not what its size would: it is cut before
it is tokenized, and what the packer keeps of it is what it keeps of the whole record's tokens."""

import dataclasses
import difflib
import json
import os
import pathlib
import random
import string
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from itune.data import chat, encode, packing
from itune.data import spec as data_spec
from itune.data.hf_tokenizer import load_tokenizer_path

TOKENIZERS = {
    "unigram": "unigram_32768.model",  # SentencePiece unigram: NFKC, merges extra whitespace.
    "sentencepiece_bpe": "bpe_32000_mistral_v1.model",  # SentencePiece BPE, byte fallback.
    "byte_level_bpe": "smollm2_bpe",  # SmolLM2's Hugging Face byte-level BPE.
}
SEQ_LEN = 256  # A normal record fits in a row.


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _chats(shared_dir: pathlib.Path) -> dict[str, list[dict]]:
    """A normal chat and long ones, with the long part in each place and of each kind of text."""
    with open(shared_dir / "data" / "gsm8k" / "train.jsonl") as f:
        gsm8k = [json.loads(line) for _, line in zip(range(150), f)]
    prose = "\n".join(r["question"] + " " + r["answer"] for r in gsm8k)
    return {
        "normal": [_user(gsm8k[0]["question"]), _assistant(gsm8k[0]["answer"])],
        "long answer": [_user("Tell me."), _assistant(prose)],
        "long prompt": [_user(prose), _assistant("Sure.")],
        "long system prompt": [
            {"role": "system", "content": prose},
            _user("Hi"),
            _assistant("Hello there."),
        ],
        "many turns": [m for r in gsm8k for m in (_user(r["question"]), _assistant(r["answer"]))],
        "no spaces": [_user("Repeat."), _assistant("数据集" * 8000)],
        "one long word": [_user("Repeat."), _assistant("ab" * 12000 + " done")],
        "whitespace runs": [_user("Spaces."), _assistant(("word" + " " * 300 + "\n\t ") * 1000)],
        "emoji": [_user("Emoji."), _assistant("😀 ü ß 𝔘 " * 3000)],
    }


def _packed(example, spec, truncation, cut):
    """The rows and stats of a packer given ``example`` whole or cut for ``truncation``."""
    packer = packing.Packer(spec.seq_len, 1, spec.tokenizer.pad_id, truncation)
    encoded = encode.encode_example(example, spec, truncation if cut else None)
    return list(packing.pack([encoded], packer)), packer.stats, len(encoded["inputs"])


@pytest.mark.parametrize("truncation", packing.TRUNCATION)
@pytest.mark.parametrize("tokenizer", sorted(TOKENIZERS))
def test_a_cut_record_packs_as_the_whole_record_does(shared_dir, tokenizer, truncation):
    tok = load_tokenizer_path(str(shared_dir / "tokenizers" / TOKENIZERS[tokenizer]))
    for fmt in ("chatml", "llama3"):
        spec = data_spec.DataSpec(tok, chat.get_format(fmt), SEQ_LEN, 1, [])
        for name, messages in _chats(shared_dir).items():
            example = {"messages": messages, "source": "x"}
            rows, stats, whole = _packed(example, spec, truncation, cut=False)
            cut_rows, cut_stats, kept = _packed(example, spec, truncation, cut=True)
            where = f"{fmt}, {name}"
            # Equal, but for the longest example: a cut chat counts at its window's length.
            assert dataclasses.replace(cut_stats, longest=stats.longest) == stats, where
            assert (stats.longest, cut_stats.longest) == (whole, kept), where
            assert len(cut_rows) == len(rows), where
            for row, cut_row in zip(rows, cut_rows):
                for key in row:
                    np.testing.assert_array_equal(cut_row[key], row[key], err_msg=where)
            if name == "normal":
                assert kept == whole and stats.truncated == 0, where
            else:  # Cut to a few rows' worth, which is what bounds its cost.
                assert stats.truncated + stats.dropped["longer than seq_len"] == 1, where
                assert kept < min(whole, 16 * SEQ_LEN), where


@pytest.mark.parametrize("tokenizer", sorted(TOKENIZERS))
def test_a_cut_before_a_word_keeps_the_tokens_of_the_whole_text(shared_dir, tokenizer):
    """Cut at the start, a chat's ids are the first ids of the whole chat, mask and all; cut at
    the end, the last ones but for the first few (a word's leading space, the BOS), which the
    cut's slack keeps out of a row, and but for near-ties of a unigram model (`_same_but_ties`).
    """
    tok = load_tokenizer_path(str(shared_dir / "tokenizers" / TOKENIZERS[tokenizer]))
    text = "\n".join(m["content"] for m in _chats(shared_dir)["many turns"][:80])
    text += "\n\n```\nx  = [1,2]  # 😀 ü\n```\t" + text  # Code, emoji, runs of whitespace.
    pieces = chat.render([_user("Go on."), _assistant(text)], chat.CHATML)
    ids, mask = chat.tokenize(pieces, tok, chat.CHATML)
    first = encode._SLACK_TOKENS
    for max_chars in range(100, len(text), 1999):
        head, was_cut = encode.cut_pieces(pieces, max_chars)
        tail, _ = encode.cut_pieces(pieces, max_chars, keep_end=True)
        head_ids, head_mask = chat.tokenize(head, tok, chat.CHATML)
        tail_ids, tail_mask = chat.tokenize(tail, tok, chat.CHATML)
        assert was_cut and len(head_ids) > first and len(tail_ids) > first
        np.testing.assert_array_equal(head_ids, ids[: len(head_ids)], err_msg=f"{max_chars}")
        np.testing.assert_array_equal(head_mask, mask[: len(head_ids)], err_msg=f"{max_chars}")
        kept, whole = tail_ids[first:], ids[first - len(tail_ids) :]
        if tokenizer == "unigram":
            _same_but_ties(tok, kept, whole)
        else:
            np.testing.assert_array_equal(kept, whole, err_msg=f"{max_chars}")
            np.testing.assert_array_equal(tail_mask[first:], mask[first - len(tail_ids) :])


def _same_but_ties(tok, cut_ids, whole_ids):
    """The ids of the same text, differing only where a unigram model's two segmentations of a
    word score within float32 rounding of each other: its Viterbi sums scores from the start of
    the text, so the rounding (hence the pick) depends on where the text starts."""
    score = lambda ids: sum(tok._sp.get_score(int(i)) for i in ids)  # noqa: E731
    blocks = difflib.SequenceMatcher(None, list(cut_ids), list(whole_ids), autojunk=False)
    for op, a, b, c, d in blocks.get_opcodes():
        if op != "equal":
            assert tok.decode(cut_ids[a:b]) == tok.decode(whole_ids[c:d])
            assert abs(score(cut_ids[a:b]) - score(whole_ids[c:d])) < 0.01


_CHILD = textwrap.dedent(
    """
    import itertools, os, sys
    from itune import configlib
    from itune.data import packing, pipeline
    from itune.data import spec as data_spec

    def peak_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmHWM"))

    def train_on(path, workdir):
        c = configlib.base_config()
        c.data.sources = {"data": {"path": path, "format": "alpaca"}}
        c.data.tokenizer.path = sys.argv[3]
        c.data.chat_format = "chatml"
        c.data.seq_len = 256
        c.data.global_batch_size = 2
        c.data.eval_examples_per_source = 0
        spec = data_spec.make_spec(c.data, workdir)
        stats = packing.PackingStats()
        rows = pipeline.train_rows(c.data, spec, stats)
        # Until every record has been encoded once, and on for a few rows more.
        while stats.examples < 4:
            next(rows)
        list(itertools.islice(rows, 4))
        return stats

    assert train_on(sys.argv[1], sys.argv[4] + "/small").truncated == 0
    with open(sys.argv[4] + "/baseline.tmp", "w") as f:
        f.write(str(peak_mb()))
    os.rename(sys.argv[4] + "/baseline.tmp", sys.argv[4] + "/baseline")
    assert train_on(sys.argv[2], sys.argv[4] + "/large").truncated >= 1
    print("peak", peak_mb())
    """
)
_HEADROOM_MB = 300


def _records_file(path: pathlib.Path, large_chars: int) -> str:
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))) for _ in range(999)]
    answer = " ".join(rng.choices(words, k=40))  # Most of a row: about 160 tokens.
    records = [{"instruction": f"Question {i}?", "output": answer} for i in range(3)]
    if large_chars:
        text = " ".join(rng.choices(words, k=large_chars // 6))
        records.insert(1, {"instruction": "Summarise.", "output": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_huge_record_costs_about_what_a_row_does(shared_dir, tmp_path):
    """A train run's data on a file with a 20 MB record peaks within ``_HEADROOM_MB`` of the same
    run on records of about a row: reading the record and holding it, nothing that grows with
    its tokens (whole, it took over 7 GB)."""
    small = _records_file(tmp_path / "small.jsonl", 0)
    large = _records_file(tmp_path / "large.jsonl", 20_000_000)
    tokenizer = str(shared_dir / "tokenizers" / TOKENIZERS["unigram"])
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, small, large, tokenizer, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    baseline_file, baseline, killed_at = tmp_path / "baseline", None, None
    # Stop the child once it is over the bound, so that a regression fails rather than takes
    # the machine's memory; the sleep only paces the polling.
    while child.poll() is None:
        if baseline is None and baseline_file.exists():
            baseline = int(baseline_file.read_text())
        rss = _rss_mb(child.pid)
        if baseline is not None and rss is not None and rss > baseline + _HEADROOM_MB:
            killed_at = rss
            child.kill()
        time.sleep(0.05)
    out, err = child.communicate()
    assert killed_at is None, f"{killed_at} MB, over {baseline} MB + {_HEADROOM_MB} MB"
    assert child.returncode == 0, err[-3000:]
    peak = int(out.split()[-1])
    assert peak < baseline + _HEADROOM_MB, (peak, baseline)


def _rss_mb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return None
