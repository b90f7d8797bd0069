"""The built-in task families as a prompt set of kind "builtin" (`itune.evaluation.harness`).

Greedy answers to held-out prompts (the ``eval`` split) of every family, half with the templates
seen in training and half with the held-out templates (the ``group`` of each record), scored by
exact match per family; a group's ``exact_match`` is the mean over its families.
"""

from __future__ import annotations

from typing import Any

from itune.data import synthetic_tasks
from itune.evaluation import harness
from itune.evaluation.report import Report

NAME = "builtin"
GROUPS = ("trained_templates", "held_out_templates")
# Generation prompts come from their own index range of the eval split, apart from the eval loss.
_PROMPT_INDEX_OFFSET = 1_000_000


def prompt_set(data_config: Any, prompts_per_family: int) -> harness.PromptSet:
    """``prompts_per_family`` prompts of each family in each template group: records
    ``{messages, answer, family, group}``, the messages up to the user turn."""
    families = data_config.builtin.families or synthetic_tasks.FAMILIES
    records = []
    for group in GROUPS:
        for f, family in enumerate(families):
            for k in range(prompts_per_family):
                example = synthetic_tasks.make_example(
                    data_config.seed,
                    _PROMPT_INDEX_OFFSET + f * prompts_per_family + k,
                    "eval",
                    held_out_templates=group == "held_out_templates",
                    system_prompt_rate=data_config.builtin.system_prompt_rate,
                    families=(family,),
                )
                records.append(
                    {
                        "messages": example["messages"][:-1],
                        "answer": example["answer"],
                        "family": family,
                        "group": group,
                    }
                )
    return harness.PromptSet(name=NAME, kind="builtin", records=records)


def group_results(report: Report) -> dict:
    """The built-in task's result per template group, ``{group: {exact_match, per_family}}``,
    as ``eval_results.json`` and the metrics have always named it; empty without that task."""
    tasks = [t for t in report.tasks if t.kind == "builtin"]
    if not tasks:
        return {}
    results = {}
    for group, result in tasks[0].groups.items():
        metrics = result["metrics"]
        results[group] = {
            "exact_match": metrics["exact_match"],
            "per_family": {
                name.split("/", 1)[1]: value
                for name, value in metrics.items()
                if name.startswith("exact_match/")
            },
        }
    return results
