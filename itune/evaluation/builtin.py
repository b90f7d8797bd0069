"""Instruction-following evaluation on the built-in task mixture.

Greedy answers to held-out prompts (the ``eval`` split), scored by exact match per task family,
separately for the templates seen in training and for the held-out templates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from itune.data import pipeline, synthetic_tasks
from itune.evaluation.responder import Responder

GROUPS = ("trained_templates", "held_out_templates")
# Generation prompts come from their own index range of the eval split, apart from the eval loss.
_PROMPT_INDEX_OFFSET = 1_000_000


def eval_prompts(data_config: Any, prompts_per_family: int) -> list[dict]:
    families = data_config.builtin.families or synthetic_tasks.FAMILIES
    examples = []
    for group in GROUPS:
        for f, family in enumerate(families):
            for k in range(prompts_per_family):
                index = _PROMPT_INDEX_OFFSET + f * prompts_per_family + k
                example = pipeline.builtin_example(
                    data_config,
                    index,
                    "eval",
                    held_out=group == "held_out_templates",
                    families=(family,),
                )
                examples.append(dict(example, group=group))
    return examples


def evaluate_generation(
    respond: Responder, data_config: Any, eval_config: Any
) -> tuple[dict, list[dict]]:
    """Exact-match results ``{group: {exact_match, per_family}}`` and the scored transcripts."""
    examples = eval_prompts(data_config, eval_config.prompts_per_family)
    answers = respond([ex["messages"][:-1] for ex in examples])
    transcripts = []
    for ex, answer in zip(examples, answers):
        transcripts.append(
            {
                "group": ex["group"],
                "family": ex["family"],
                "prompt": ex["messages"][-2]["content"],
                "target": ex["answer"],
                "answer": answer,
                "correct": synthetic_tasks.exact_match(answer, ex["answer"]),
            }
        )
    results = {}
    for group in GROUPS:
        per_family: dict[str, list[bool]] = {}
        for t in transcripts:
            if t["group"] == group:
                per_family.setdefault(t["family"], []).append(t["correct"])
        scores = {f: float(np.mean(v)) for f, v in per_family.items()}
        results[group] = {
            "exact_match": float(np.mean(list(scores.values()))),
            "per_family": scores,
        }
    return results, transcripts


def results_table(results: dict) -> str:
    """A markdown table of exact match per family, trained against held-out templates (or the
    eval loss per source when there was no generation eval)."""
    if GROUPS[0] not in results:
        lines = ["| source | eval loss |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in results["eval_loss_per_source"].items()]
        return "\n".join(lines)
    families = list(results[GROUPS[0]]["per_family"])
    lines = ["| family | trained templates | held-out templates |", "|---|---|---|"]
    for f in families:
        lines.append(
            f"| {f} | " + " | ".join(f"{results[g]['per_family'][f]:.1%}" for g in GROUPS) + " |"
        )
    lines.append(
        "| **mean** | " + " | ".join(f"**{results[g]['exact_match']:.1%}**" for g in GROUPS) + " |"
    )
    return "\n".join(lines)
