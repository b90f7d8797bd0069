"""Answers to a fixed set of held-out prompts, for watching a run learn: prompt sets of kind
"transcript" (`itune.evaluation.harness`), kept beside their references, unscored.

The prompts are the first ``eval.prompts_per_source`` chats of each source's eval slice, cut
before their last answer; the model's answers are written beside the references at every
evaluation (``<workdir>/samples``).
"""

from __future__ import annotations

from typing import Any

from itune.data import held_out
from itune.data import spec as data_spec
from itune.evaluation import harness


def prompt_sets(
    data_config: Any, spec: data_spec.DataSpec, per_source: int
) -> list[harness.PromptSet]:
    """One prompt set ``<source>_samples`` per source with held-out chats, records
    ``{messages, reference}``: each chat up to its last user turn, and the answer after it."""
    sets = []
    for source, chats in held_out.eval_chats(data_config, spec, per_source).items():
        records = []
        for example in chats:
            messages, reference = list(example["messages"]), None
            while messages and messages[-1]["role"] == "assistant":
                reference = messages.pop()["content"]
            if messages and reference is not None:
                records.append({"messages": messages, "reference": reference})
        if records:
            sets.append(harness.PromptSet(f"{source}_samples", "transcript", records))
    return sets
