"""The run's tokenizer: ``data.tokenizer.path``'s, or a SentencePiece vocabulary trained on the
run's own chats (the built-in tasks or ``data.sources``) and cached in ``<workdir>/tokenizer``."""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils

from itune.data import chat, mixture, synthetic_tasks
from itune.data.encode import cut_pieces
from itune.data.hf_tokenizer import load_tokenizer_path
from itune.data.tokenizer import MAX_PIECE_CHARS, Tokenizer, cached_sentencepiece


def load_tokenizer(
    data_config: Any, workdir: str, sources: list[mixture.Source] | None = None
) -> Tokenizer:
    """The tokenizer of ``data.tokenizer``: a ``.model`` path, or a SentencePiece vocabulary
    trained on the run's own data and cached in ``<workdir>/tokenizer``."""
    tok_config = data_config.tokenizer
    if tok_config.path:
        return load_tokenizer_path(tok_config.path)
    fmt = chat.resolve_format(data_config)
    seed, n = data_config.seed, tok_config.num_corpus_examples
    builtin = not data_config.sources
    num_shards, _ = mixture.data_shards(data_config)
    if sources is None and not builtin and jax.process_count() > 1:
        # Every process takes part in reading the sources; process 0 then trains on them.
        sources = mixture.load_sources(data_config, log_skips=False)

    def corpus() -> Iterator[str]:
        # Called only when a vocabulary is trained. The sources are read here, not as the trainer
        # iterates: an error raised inside the trainer reaches the caller as a RuntimeError.
        if builtin:
            lines = synthetic_tasks.corpus(seed, n)
            chats = (
                mixture.builtin_example(data_config, i, "train") for i in range(min(n, 2000))
            )
        else:
            # Training reads the sources again, and tells of their bad records then.
            data = sources or mixture.load_sources(data_config, log_skips=False)
            lines = iter(())
            # Shard 0, which process 0 (the one that trains the vocabulary) reads.
            stream = mixture.train_stream(data_config, data, 0, num_shards)
            chats = (example for example, _ in itertools.islice(stream, n))
        return itertools.chain(lines, _rendered_lines(chats, fmt, data_config))

    def cached() -> Tokenizer:
        key = {"seed": seed, "corpus_examples": n, "version": 2}
        key["sources"] = "builtin" if builtin else repr(data_config.sources.to_dict())
        return cached_sentencepiece(
            cache_dir=f"{workdir}/tokenizer",
            key=key,
            lines_fn=corpus,
            vocab_size=tok_config.vocab_size,
            special_tokens=list(fmt.special_tokens) if isinstance(fmt, chat.ChatFormat) else [],
            # Real text has characters the training sample may miss.
            byte_fallback=not builtin,
            corpus_name="the built-in tasks" if builtin else f"data.sources (up to {n} examples)",
        )

    if jax.process_count() == 1:
        return cached()
    # Process 0 trains and saves the vocabulary; the others then load the same file.
    tokenizer = cached() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("itune: tokenizer ready")
    return tokenizer or cached()


def _rendered_lines(
    chats: Iterator[dict], fmt: chat.ChatFormat | chat.ChatTemplate, data_config: Any
) -> Iterator[str]:
    """The lines of each chat as rendered, so that the chat markup's words become pieces too;
    each only as far as a row's tokens can reach into it, so that a huge record is not all of
    the corpus."""
    keep_end = data_config.truncation == "truncate_prompt_left"
    max_chars = (data_config.seq_len + 1) * MAX_PIECE_CHARS
    for example in chats:
        rendered = chat.render(example["messages"], fmt, tools=example.get("tools"))
        pieces, _ = cut_pieces(rendered, max_chars, keep_end)
        yield from filter(None, chat.to_text(pieces).split("\n"))
