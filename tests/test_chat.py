"""Chat rendering and the loss mask."""

import numpy as np
import pytest

from itune.data import chat
from itune.data.tokenizer import SentencePieceTokenizer

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Reverse the list: 1 2 3"},
    {"role": "assistant", "content": "3 2 1"},
    {"role": "user", "content": "Uppercase this: cat"},
    {"role": "assistant", "content": "CAT"},
]


def test_chatml_rendering_is_exact():
    text = chat.to_text(chat.render(CHAT[1:3], chat.CHATML))
    assert text == (
        "<|im_start|>user\nReverse the list: 1 2 3<|im_end|>\n"
        "<|im_start|>assistant\n3 2 1<|im_end|>\n"
    )
    prompt = chat.to_text(chat.render(CHAT[1:2], chat.CHATML, add_generation_prompt=True))
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


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


def test_mask_tokens_match_separate_encoding_of_the_answer(builtin_tokenizer):
    """The trained ids are the ids the tokenizer gives the answer text itself."""
    tok, fmt = builtin_tokenizer, chat.CHATML
    ids, mask = chat.tokenize(chat.render(CHAT[1:3], fmt), tok, fmt)
    trained = ids[mask == 1].tolist()
    assert trained[:-1] == tok.encode("\n3 2 1")[-len(trained) + 1 :]


def test_unknown_role_and_bad_content_are_named():
    with pytest.raises(ValueError, match="message 0: unknown role 'robot'"):
        chat.render([{"role": "robot", "content": "hi"}], chat.CHATML)
    with pytest.raises(ValueError, match="message 1: content must be a string"):
        chat.render(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}], chat.CHATML
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
