"""The one shape of an evaluation's results (`itune.evaluation.harness.evaluate` makes it): per
task its kind, counts, metrics over all its answers and per group, and every scored answer;
the overall score; as JSON, as markdown, and as files.

``itune-eval``, the notebooks and the evaluation during training
(`itune.evaluation.in_training`) all report in it.
"""

from __future__ import annotations

import dataclasses
import json
import os

from itune import atomic

# The fields that say where an answer comes from, in the transcripts.
_ORIGIN = ("task", "group", "family")


def percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


@dataclasses.dataclass
class TaskResult:
    """One prompt set's metrics (over all its answers, and per group), its answers' length limit,
    and its scored examples (prompt, response, scores), with what its kind says of them."""

    name: str
    kind: str
    n: int
    metrics: dict[str, float]
    examples: list[dict]
    max_new_tokens: int = 0
    # The metric `Report.overall` averages; None for a kind whose answers are not scored.
    primary_metric: str | None = None
    # The metrics the summary table shows.
    columns: tuple[str, ...] = ()
    # {group: {"n": answers, "metrics": {...}}} for records that carry a group.
    groups: dict[str, dict] = dataclasses.field(default_factory=dict)
    # Markdown its kind adds after the summary table.
    details: str = ""

    @property
    def primary(self) -> float | None:
        """The task's primary metric; None for a kind that is not scored."""
        return None if self.primary_metric is None else self.metrics[self.primary_metric]

    def to_json(self) -> dict:
        summary = {
            "kind": self.kind,
            "n": self.n,
            "max_new_tokens": self.max_new_tokens,
            "primary_metric": self.primary_metric,
            "metrics": dict(self.metrics),
        }
        if self.groups:
            summary["groups"] = {
                g: {"n": v["n"], "metrics": dict(v["metrics"])} for g, v in self.groups.items()
            }
        return summary


@dataclasses.dataclass
class Report:
    """What an evaluation found: one `TaskResult` per prompt set."""

    tasks: list[TaskResult]

    @property
    def scored(self) -> list[TaskResult]:
        """The tasks with a primary metric."""
        return [t for t in self.tasks if t.primary_metric is not None]

    @property
    def overall(self) -> float | None:
        """The mean over tasks of each task's primary metric; None without scored tasks."""
        scored = self.scored
        return sum(t.primary for t in scored) / len(scored) if scored else None

    @property
    def overall_definition(self) -> str:
        primaries = dict.fromkeys((t.kind, t.primary_metric) for t in self.scored)
        listed = ", ".join(f"{metric} for {kind}" for kind, metric in primaries)
        return "mean over tasks of each task's primary metric" + (f" ({listed})" if listed else "")

    def to_json(self) -> dict:
        """The summary, ready for `json.dump` (the examples are in `outputs`)."""
        return {
            "overall": self.overall,
            "overall_definition": self.overall_definition,
            "tasks": {t.name: t.to_json() for t in self.tasks},
        }

    def outputs(self) -> list[dict]:
        """Every scored example of every task, in order, for transcripts."""
        return [example for t in self.tasks for example in t.examples]

    def markdown(self) -> str:
        """A table of tasks (and their groups) against metrics, each task's primary metric in
        bold; the overall score and its definition; then each task's details."""
        columns = list(dict.fromkeys(m for t in self.tasks for m in t.columns))
        lines = [
            "| " + " | ".join(["task", "kind", "n", *columns]) + " |",
            "|" + "---|" * (3 + len(columns)),
        ]

        def row(name: str, t: TaskResult, n: int, metrics: dict) -> str:
            cells = [percent(metrics.get(metric)) for metric in columns]
            cells = [
                f"**{c}**" if c and metric == t.primary_metric else c
                for c, metric in zip(cells, columns)
            ]
            return "| " + " | ".join([name, t.kind, str(n), *cells]) + " |"

        for t in self.tasks:
            lines.append(row(t.name, t, t.n, t.metrics))
            for group, result in t.groups.items():
                lines.append(row(f"{t.name}/{group}", t, result["n"], result["metrics"]))
        if self.overall is not None:
            lines += ["", f"**overall: {self.overall:.1%}**, the {self.overall_definition}."]
        lines += [line for t in self.tasks if t.details for line in ("", t.details)]
        return "\n".join(lines)

    def write(self, directory: str, stem: str) -> dict[str, str]:
        """Writes ``<stem>.json`` (the summary), ``<stem>.md`` (the table) and
        ``<stem>_outputs.jsonl`` (one scored example a line) into the directory, each file whole
        or not at all; returns their paths by format."""
        os.makedirs(directory, exist_ok=True)
        paths = {
            "json": os.path.join(directory, f"{stem}.json"),
            "markdown": os.path.join(directory, f"{stem}.md"),
            "outputs": os.path.join(directory, f"{stem}_outputs.jsonl"),
        }
        atomic.write_text(paths["json"], json.dumps(self.to_json(), indent=2) + "\n")
        atomic.write_text(paths["markdown"], self.markdown() + "\n")
        atomic.write_text(
            paths["outputs"],
            "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.outputs()),
        )
        return paths


def transcript(example: dict) -> str:
    """An example as text: where it is from, the prompt, the answer and the reference."""
    head = "/".join(str(example[k]) for k in _ORIGIN if k in example)
    text = f"[{head}] {example['prompt']}\n--- answer ---\n{example['response']}"
    if "reference" in example:
        text += f"\n--- reference ---\n{example['reference']}"
    return text


def one_line(example: dict, width: int = 200) -> str:
    """An example in a line: where it is from, prompt -> answer, the reference, and whether the
    answer is correct when its kind says."""
    head = "/".join(str(example[k]) for k in _ORIGIN if k in example)
    correct = example.get("scores", {}).get("correct")
    mark = "" if correct is None else ("[ok ] " if correct else "[bad] ")
    line = f"{mark}[{head}] {example['prompt'][:width]!r} -> {example['response'][:width]!r}"
    if "reference" in example:
        line += f" (reference {str(example['reference'])[:width]!r})"
    return line
