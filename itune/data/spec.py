"""`DataSpec`: what the rest of itune needs to know about a run's data, made once by `make_spec`
from ``config.data`` (its sources read, its tokenizer loaded or trained)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from itune.data import chat, mixture
from itune.data.tokenizer import Tokenizer
from itune.data.vocabulary import load_tokenizer
from itune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Everything the rest of itune needs to know about the data of a run."""

    tokenizer: Tokenizer
    chat_format: chat.ChatFormat | chat.ChatTemplate
    seq_len: int
    global_batch_size: int
    sources: list[mixture.Source]
    on_bad_example: str = "error"
    train_on: str = "all_assistant"

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @functools.cached_property
    def source_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.source_names)}

    @property
    def is_builtin(self) -> bool:
        return len(self.sources) == 1 and self.sources[0].name == mixture.BUILTIN

    @property
    def stop_id(self) -> int:
        fmt = self.chat_format
        if isinstance(fmt, chat.ChatTemplate):
            return fmt.stop_ids(self.tokenizer)[0]
        return self.tokenizer.special_id(fmt.end_of_turn, fmt.special_tokens.get(fmt.end_of_turn))


def make_spec(
    data_config: Any, workdir: str, tokenizer: Tokenizer | None = None, model_format: Any = None
) -> DataSpec:
    """The run's data: its sources, and ``tokenizer`` or else ``data.tokenizer``'s;
    ``model_format`` is the chat template (or format) the run's model brings: ``init_from``'s,
    else the one ``data.tokenizer.path`` ships (`itune.convert.run_model` finds both)."""
    sources = mixture.load_sources(data_config)
    tokenizer = tokenizer or load_tokenizer(data_config, workdir, sources)
    fmt = chat.resolve_format(data_config, model_format, tokenizer)
    if data_config.global_batch_size % jax.process_count():
        raise ConfigError(
            f"data.global_batch_size={data_config.global_batch_size} must divide by the "
            f"number of processes ({jax.process_count()})"
        )
    return DataSpec(
        tokenizer,
        fmt,
        data_config.seq_len,
        data_config.global_batch_size,
        sources,
        data_config.on_bad_example,
        data_config.train_on,
    )
