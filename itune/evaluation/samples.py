"""Answers to a fixed set of held-out prompts, for watching a run learn.

The prompts are the first ``eval.prompts_per_source`` chats of each source's eval slice, cut
before their last answer; the model's greedy answers are written beside the references at every
evaluation (`itune.training.metrics.MetricsWriter.write_transcripts`).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from itune.data import chat, pipeline
from itune.evaluation.generate import greedy_generate


def sample_prompts(data_config: Any, spec: pipeline.DataSpec, per_source: int) -> list[dict]:
    """``{source, messages, reference}`` per prompt: each chat up to its last user turn."""
    prompts = []
    for source, chats in pipeline.eval_chats(data_config, spec, per_source).items():
        for example in chats:
            messages = list(example["messages"])
            while messages and messages[-1]["role"] == "assistant":
                reference = messages.pop()["content"]
            if messages:
                prompts.append({"source": source, "messages": messages, "reference": reference})
    return prompts


def generate_samples(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    data_config: Any,
    eval_config: Any,
    spec: pipeline.DataSpec,
) -> list[dict]:
    """Transcripts ``{source, prompt, reference, answer}`` of greedy answers."""
    prompts = sample_prompts(data_config, spec, eval_config.prompts_per_source)
    if not prompts:
        return []
    ids = [chat.prompt_ids(p["messages"], spec.tokenizer, spec.chat_format) for p in prompts]
    generated = greedy_generate(
        graphdef,
        params,
        ids,
        max_new_tokens=eval_config.max_new_tokens,
        stop_id=spec.stop_id,
        pad_id=spec.tokenizer.pad_id,
        batch_size=eval_config.batch_size,
    )
    return [
        {
            "source": p["source"],
            "prompt": p["messages"][-1]["content"],
            "reference": p["reference"],
            "answer": spec.tokenizer.decode(out),
        }
        for p, out in zip(prompts, generated)
    ]
