"""Answers to chats, as text: a model, its tokenizer and chat format, and a sampling setting.

The one path from conversations to answers shared by ``itune-generate``, ``itune-chat``,
``itune-eval`` and the evaluations inside training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from flax import nnx
from jax.sharding import Mesh

from itune import sharding
from itune.data import chat
from itune.evaluation import sampler


def stop_ids(tokenizer: Any, fmt: chat.ChatFormat | chat.ChatTemplate) -> tuple[int, ...]:
    """The end-of-turn token of ``fmt`` and the tokenizer's end of sequence (when it has one)."""
    if isinstance(fmt, chat.ChatTemplate):
        return fmt.stop_ids(tokenizer)
    ids = {tokenizer.special_id(fmt.end_of_turn, fmt.special_tokens.get(fmt.end_of_turn))}
    if getattr(tokenizer, "eos_id", -1) is not None and tokenizer.eos_id >= 0:
        ids.add(tokenizer.eos_id)
    return tuple(sorted(ids))


@dataclasses.dataclass
class Responder:
    """Callable on a list of chats (each a list of ``{role, content}`` ending with a user turn),
    and optionally ``max_new_tokens`` in place of the sampling setting's; returns the model's
    answer to each (an `itune.evaluation.harness.Generate`)."""

    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Any
    chat_format: chat.ChatFormat | chat.ChatTemplate
    sampling: sampler.SamplingConfig
    batch_size: int = 64
    mesh: Mesh | None = None
    rules: sharding.LogicalRules = ()

    def __post_init__(self):
        if not self.sampling.stop_ids:
            self.sampling = dataclasses.replace(
                self.sampling, stop_ids=stop_ids(self.tokenizer, self.chat_format)
            )

    def token_ids(
        self, chats: Sequence[Sequence[Mapping]], max_new_tokens: int | None = None
    ) -> list[list[int]]:
        """The generated ids of each chat's answer, at most ``max_new_tokens`` of them when given
        (else the sampling setting's)."""
        prompts = [
            chat.prompt_ids(messages, self.tokenizer, self.chat_format) for messages in chats
        ]
        sampling = self.sampling
        if max_new_tokens is not None:
            sampling = dataclasses.replace(sampling, max_new_tokens=max_new_tokens)
        return sampler.generate(
            self.graphdef,
            self.params,
            prompts,
            sampling,
            pad_id=max(self.tokenizer.pad_id, 0),
            batch_size=self.batch_size,
            mesh=self.mesh,
            rules=self.rules,
        )

    def __call__(
        self, chats: Sequence[Sequence[Mapping]], max_new_tokens: int | None = None
    ) -> list[str]:
        return [self.tokenizer.decode(ids).strip() for ids in self.token_ids(chats, max_new_tokens)]
