"""The evaluation a training run makes at its eval steps: the eval loss per source, and every
generative task of its config (`itune.evaluation.tasks`) answered by the model and scored into
one `itune.evaluation.report.Report`.

`evaluate` returns the results that ``eval_results.json`` and the metrics are written from:

- ``eval_loss``, ``eval_accuracy`` and ``eval_loss_per_source``;
- ``tasks``: the report's summary (`Report.to_json`), and ``transcripts``: every scored answer
  (`Report.outputs`);
- for the built-in tasks, ``trained_templates`` and ``held_out_templates``, each
  ``{exact_match, per_family}`` (`builtin.group_results`);
- ``report``: the `Report` itself, taken out by `write_report`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from itune.evaluation import builtin, harness

REPORT = "report"


def eval_loss(eval_step, params, eval_batches: dict[str, list[dict[str, jax.Array]]]) -> dict:
    """``{eval_loss_per_source, eval_loss, eval_accuracy}`` over the held-out batches."""
    results: dict = {"eval_loss_per_source": {}}
    overall = None
    for name, batches in eval_batches.items():
        totals = None
        for batch in batches:
            sums = eval_step(params, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        overall = totals if overall is None else jax.tree.map(lambda a, b: a + b, overall, totals)
        weight = max(float(totals["weight_sum"]), 1.0)
        results["eval_loss_per_source"][name] = float(totals["loss_sum"]) / weight
    weight = max(float(overall["weight_sum"]), 1.0)
    results["eval_loss"] = float(overall["loss_sum"]) / weight
    results["eval_accuracy"] = float(overall["correct_sum"]) / weight
    return results


def evaluate(
    config: Any,
    params,
    eval_step,
    eval_batches: dict[str, list[dict[str, jax.Array]]],
    respond: Callable[[Any], harness.Generate],
    task_sets: Sequence[harness.PromptSet] = (),
) -> dict:
    """The eval loss, and the report of ``task_sets`` answered by ``respond(params)``, each
    answer at most ``config.eval.max_new_tokens`` tokens (0: its task kind's default)."""
    results = eval_loss(eval_step, params, eval_batches)
    if task_sets:
        report = harness.evaluate(
            task_sets, respond(params), max_new_tokens=config.eval.max_new_tokens or None
        )
        results.update(builtin.group_results(report))
        results.update(tasks=report.to_json(), transcripts=report.outputs())
        results[REPORT] = report
    return results


def loss_table(results: dict) -> str:
    """A markdown table of the eval loss per source."""
    lines = ["| source | eval loss |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in results["eval_loss_per_source"].items()]
    return "\n".join(lines)


def write_report(results: dict, workdir: str, step: int, print_fn: Callable[[str], Any]) -> None:
    """Takes the report out of ``results``, writes it in ``<workdir>/eval`` as
    ``step_<N>.{json,md}`` and ``step_<N>_outputs.jsonl`` (`report.Report.write`), and prints
    the eval loss per source and the report's tables."""
    report = results.pop(REPORT, None)
    if jax.process_index() != 0:
        return
    print_fn(loss_table(results))
    if report is not None:
        report.write(os.path.join(workdir, "eval"), f"step_{step:07d}")
        print_fn(report.markdown())
