"""Generative evaluation: prompt sets answered through a generation callback, scored by their
kind, and reported in one shape.

Every kind of task is one entry of `KINDS` (a `TaskKind`): how its records are checked, how one
answer is scored, how the scores aggregate, which metric counts, how long an answer may be. The
kinds read from JSONL files are told by their records' fields:

- IFEval's data format ``{"key", "prompt", "instruction_id_list", "kwargs"}``: kind "ifeval",
  scored by the verifiable-instruction checkers of `itune.evaluation.ifeval`, answers of up to
  1,280 new tokens (IFEval's published protocol);
- GSM8K's ``{"question", "answer"}``: kind "exact_match" on the number after the last ``####``
  (`itune.evaluation.scoring.exact_match`);
- ``{"prompt", "reference"}``: kind "rouge", ROUGE-L F-measure against the reference.

Any record may carry ``"messages"`` (``[{"role", "content"}, ...]`` ending with a user turn) in
place of its prompt or question; otherwise the prompt is sent as one user message. A record with
a ``"group"`` field is also scored per group. Two kinds are made by itune rather than read from
files: "builtin", the held-out prompts of the built-in task families
(`itune.evaluation.builtin`), and "transcript", answers to a data source's held-out chats kept
beside their references, unscored (`itune.evaluation.samples`).

`evaluate` calls ``generate(chats, max_new_tokens=n) -> answers`` once per prompt set with all of
its chats (the caller batches), so the same code serves ``itune-eval``, the notebooks and
evaluation during training. Its `itune.evaluation.report.Report` holds, per task, the metrics,
the metrics per group, the counts and every scored answer. The report's ``overall`` is the mean
over tasks of each task's primary metric: every task weighs the same whatever its size, one
number to compare checkpoints by.

Adding a kind is one `TaskKind` in `KINDS`, with its scoring function; here answers of at most
``max_words`` words, in JSONL records that carry that field:

>>> def length_score(record, response):
...     return {"short": len(response.split()) <= record["max_words"]}
>>> KINDS["length"] = TaskKind(
...     "length", score=length_score, aggregate=mean_of(short="short"), metrics=("short",),
...     primary="short", max_new_tokens=128, marker="max_words",
... )
>>> brief = PromptSet("brief", "length", [{"prompt": "Name a colour.", "max_words": 1}])
>>> report = evaluate([brief], lambda chats, max_new_tokens: ["Blue."])
>>> task = report.tasks[0]
>>> task.kind, task.n, task.max_new_tokens, task.metrics
('length', 1, 128, {'short': 1.0})
>>> del KINDS["length"]
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Protocol, Sequence

import numpy as np

from itune.data import synthetic_tasks
from itune.errors import UserError
from itune.evaluation import ifeval, scoring
from itune.evaluation.report import Report, TaskResult, percent

BUILTIN_PROMPT_SETS = {
    "ifeval_sample": os.path.join(os.path.dirname(__file__), "data", "ifeval_sample.jsonl"),
}
# A record with this field is scored per group as well as with its task.
GROUP_FIELD = "group"

Chat = list[dict]


class Generate(Protocol):
    """Answers to chats, at most ``max_new_tokens`` tokens each (a `Responder` is one)."""

    def __call__(self, chats: list[Chat], *, max_new_tokens: int) -> Sequence[str]: ...


class PromptSetError(UserError, ValueError):
    """A prompt set that cannot be scored: ``file:line: problem``."""


class RecordError(Exception):
    """A problem with one record, reported with the file and line by `load_prompt_set`."""


def mean_of(**fields: str) -> Callable[[Sequence[dict], Sequence[dict]], dict[str, float]]:
    """An aggregate: ``{metric: score field}``, each metric the mean over answers of its score
    field (booleans count as 0 and 1)."""

    def aggregate(records: Sequence[dict], scores: Sequence[dict]) -> dict[str, float]:
        return {m: sum(s[f] for s in scores) / len(scores) for m, f in fields.items()}

    return aggregate


# Record checks, one per kind (the prompt or messages are checked for every kind).


def _check_text(record: dict, field: str) -> None:
    if field not in record:
        raise RecordError(f"missing field {field!r}")
    if not isinstance(record[field], str) or not record[field].strip():
        raise RecordError(f"field {field!r} must be a non-blank string")


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ("system", "user", "assistant")
            or not isinstance(message.get("content"), str)
        ):
            raise RecordError(
                f"field 'messages' item {i} must be {{role: system|user|assistant, content: str}}"
            )
    if messages[-1]["role"] != "user":
        raise RecordError("field 'messages' must end with a user turn")


def _check_exact_match(record: dict) -> None:
    _check_text(record, "answer")
    if scoring.final_answer(record["answer"]) is None:
        raise RecordError("field 'answer' has no '#### <number>' final answer")


def _check_ifeval(record: dict) -> None:
    for field in ("instruction_id_list", "kwargs"):
        if field not in record:
            raise RecordError(f"missing field {field!r}")
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise RecordError("field 'instruction_id_list' must be a non-empty list of strings")
    if not isinstance(kwargs, list):
        raise RecordError("field 'kwargs' must be a list")
    if len(kwargs) != len(ids):
        raise RecordError(
            f"field 'kwargs' has {len(kwargs)} entries for {len(ids)} instructions "
            "in 'instruction_id_list'"
        )
    for i, instruction_id in enumerate(ids):
        if instruction_id not in ifeval.CHECKERS:
            raise RecordError(
                f"field 'instruction_id_list': unknown instruction id {instruction_id!r}"
            )
        try:
            ifeval.arguments(instruction_id, kwargs[i])
        except ValueError as e:
            raise RecordError(f"field 'kwargs' item {i}: {e}") from None


def _check_rouge(record: dict) -> None:
    _check_text(record, "reference")


# Scores of one answer, and their aggregates, per kind.


def _score_exact_match(record: dict, response: str) -> dict:
    return {
        "expected": scoring.final_answer(record["answer"]),
        "extracted": scoring.final_answer(response),
        "correct": scoring.exact_match(response, record["answer"]),
        "answer_form": scoring.has_answer_form(response),
    }


def _score_builtin(record: dict, response: str) -> dict:
    return {"correct": synthetic_tasks.exact_match(response, record["answer"])}


def _aggregate_builtin(records: Sequence[dict], scores: Sequence[dict]) -> dict[str, float]:
    """Exact match per family (``exact_match/<family>``) and their mean (``exact_match``): every
    family weighs the same."""
    per_family: dict[str, list[bool]] = {}
    for record, score in zip(records, scores):
        per_family.setdefault(record["family"], []).append(score["correct"])
    families = {f"exact_match/{f}": float(np.mean(v)) for f, v in per_family.items()}
    return {"exact_match": float(np.mean(list(families.values()))), **families}


@dataclasses.dataclass(frozen=True)
class TaskKind:
    """One kind of generative task: everything the harness does by kind is read from here."""

    name: str
    # One answer's scores, JSON-ready, kept in the transcripts: (record, response) -> scores;
    # it also takes the keyword options a prompt set carries (`PromptSet.options`).
    score: Callable[[dict, str], dict]
    # A task's (or a group's) metrics from its answers' scores: (records, scores) -> metrics.
    aggregate: Callable[[Sequence[dict], Sequence[dict]], dict[str, float]]
    # The metrics the summary table shows, in its column order (`aggregate` may return more).
    metrics: tuple[str, ...]
    # The metric `Report.overall` averages; None for a kind whose answers are not scored.
    primary: str | None
    # How many tokens an answer may have unless the caller says otherwise.
    max_new_tokens: int
    # The field whose presence makes a JSONL record one of this kind; None for the kinds whose
    # prompt sets are made by itune, not read from files.
    marker: str | None = None
    # The prompt's text when a record has no "messages".
    prompt_field: str = "prompt"
    # Raises RecordError for a record of this kind that cannot be scored.
    check: Callable[[dict], None] = lambda record: None
    # The record field shown beside each answer in the transcripts.
    reference: str | None = None
    # Record fields copied into each transcript, to find the answer by.
    labels: tuple[str, ...] = ("key", GROUP_FIELD)
    # More markdown for a task of this kind, after the summary table.
    details: Callable[[TaskResult], str] | None = None


def _builtin_details(task: TaskResult) -> str:
    """Exact match per family against the template groups; the mean over families last."""
    groups = list(task.groups)
    families = [m.split("/", 1)[1] for m in task.metrics if m.startswith("exact_match/")]
    lines = [
        "| family | " + " | ".join(g.replace("_", " ") for g in groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for f in families:
        cells = [task.groups[g]["metrics"].get(f"exact_match/{f}") for g in groups]
        lines.append(f"| {f} | " + " | ".join(percent(c) for c in cells) + " |")
    means = [f"**{percent(task.groups[g]['metrics']['exact_match'])}**" for g in groups]
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines)


KINDS: dict[str, TaskKind] = {
    kind.name: kind
    for kind in (
        TaskKind(
            "exact_match",
            score=_score_exact_match,
            aggregate=mean_of(exact_match="correct", answer_form="answer_form"),
            metrics=("exact_match", "answer_form"),
            primary="exact_match",
            max_new_tokens=256,
            marker="answer",
            prompt_field="question",
            check=_check_exact_match,
            reference="answer",
        ),
        TaskKind(
            "ifeval",
            score=ifeval.score,
            aggregate=lambda records, scores: ifeval.aggregate(scores),
            metrics=("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"),
            primary="prompt_strict",
            max_new_tokens=1280,  # IFEval's published protocol.
            marker="instruction_id_list",
            check=_check_ifeval,
        ),
        TaskKind(
            "rouge",
            score=lambda record, response: {
                "rouge_l": scoring.rouge_l(response, record["reference"])
            },
            aggregate=mean_of(rouge_l="rouge_l"),
            metrics=("rouge_l",),
            primary="rouge_l",
            max_new_tokens=256,
            marker="reference",
            check=_check_rouge,
            reference="reference",
        ),
        TaskKind(
            "builtin",
            score=_score_builtin,
            aggregate=_aggregate_builtin,
            metrics=("exact_match",),
            primary="exact_match",
            max_new_tokens=24,  # The built-in tasks' answers are a few words.
            reference="answer",
            labels=(GROUP_FIELD, "family"),
            details=_builtin_details,
        ),
        TaskKind(
            "transcript",
            score=lambda record, response: {},
            aggregate=lambda records, scores: {},
            metrics=(),
            primary=None,
            max_new_tokens=24,  # A glimpse of each answer, to watch a run learn.
            reference="reference",
        ),
    )
}


def kind(name: str) -> TaskKind:
    """The `TaskKind` called ``name``; ValueError naming the known kinds if there is none."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task kind {name!r} (kinds: {', '.join(KINDS)})") from None


@dataclasses.dataclass
class PromptSet:
    """Records of one kind, scored together as one task. ``options``: keyword arguments of the
    kind's score function, such as ``{"official": True}`` for IFEval's official rules
    (`itune.evaluation.tasks.official_ifeval`)."""

    name: str
    kind: str
    records: list[dict]
    options: dict = dataclasses.field(default_factory=dict)

    def chats(self) -> list[Chat]:
        return [record_chat(record, self.kind) for record in self.records]


def record_chat(record: dict, kind_name: str) -> Chat:
    """The chat sent for a record: its messages (tool calls and tool results included), or its
    prompt as one user message."""
    if "messages" in record:
        return [dict(m) for m in record["messages"]]
    return [{"role": "user", "content": record[kind(kind_name).prompt_field]}]


def _file_kinds() -> dict[str, TaskKind]:
    return {name: k for name, k in KINDS.items() if k.marker is not None}


def _kind_of(record: dict) -> str:
    file_kinds = _file_kinds()
    kinds = [name for name, k in file_kinds.items() if k.marker in record]
    if len(kinds) == 1:
        return kinds[0]
    if not kinds:
        needs = ", ".join(f"{k.marker!r} ({name})" for name, k in file_kinds.items())
        raise RecordError(f"cannot tell the record's kind: it needs one of the fields {needs}")
    fields = " and ".join(repr(file_kinds[k].marker) for k in kinds)
    raise RecordError(f"fields {fields} make the kind ambiguous ({' or '.join(kinds)})")


def check_record(record: dict, kind_name: str) -> None:
    """Raises RecordError for a record of the kind that cannot be scored."""
    task_kind = kind(kind_name)
    if "messages" in record:
        _check_messages(record["messages"])
    else:
        _check_text(record, task_kind.prompt_field)
    task_kind.check(record)


def _resolve(path: str) -> str:
    if not os.path.exists(path) and path in BUILTIN_PROMPT_SETS:
        return BUILTIN_PROMPT_SETS[path]
    if not os.path.isfile(path):
        builtin = ", ".join(BUILTIN_PROMPT_SETS)
        raise PromptSetError(f"{path}: no such prompt set file (built-in prompt sets: {builtin})")
    return path


def load_prompt_set(
    path: str, limit: int | None = None, offset: int = 0, name: str | None = None
) -> PromptSet:
    """A prompt set from a JSONL file (or a `BUILTIN_PROMPT_SETS` name), records
    ``[offset, offset + limit)``, named after the file's stem unless ``name`` is given.

    Every line is checked, also outside the selected range. A problem raises a `PromptSetError`
    (a ValueError) that names the file, the line and the field: malformed JSON, a missing or
    mistyped field, a kind other than the first record's, an unknown instruction id, kwargs
    that do not match the instructions one for one. Blank lines are skipped.
    """
    if offset < 0 or (limit is not None and limit < 0):
        raise PromptSetError(
            f"{path}: offset and limit must be non-negative, got {offset}, {limit}"
        )
    name = name or os.path.splitext(os.path.basename(path))[0]
    path = _resolve(path)
    kind_name, first_line, records = None, None, []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"malformed JSON: {e.msg} at column {e.colno}") from None
                if not isinstance(record, dict):
                    raise RecordError("a record must be a JSON object")
                record_kind = _kind_of(record)
                if kind_name is None:
                    kind_name, first_line = record_kind, line_number
                elif record_kind != kind_name:
                    raise RecordError(
                        f"field {KINDS[record_kind].marker!r} makes a {record_kind} record, but "
                        f"line {first_line} made this a {kind_name} prompt set (one kind per file)"
                    )
                check_record(record, kind_name)
            except RecordError as e:
                raise PromptSetError(f"{path}:{line_number}: {e}") from None
            records.append(record)
    if not records:
        raise PromptSetError(f"{path}: no records")
    selected = records[offset : None if limit is None else offset + limit]
    if not selected:
        raise PromptSetError(
            f"{path}: offset {offset} and limit {limit} select none of {len(records)}"
        )
    return PromptSet(name=name, kind=kind_name, records=selected)


def _task_result(prompt_set: PromptSet, generate: Generate, max_new_tokens: int | None):
    task_kind = kind(prompt_set.kind)
    if not prompt_set.records:
        raise ValueError(f"prompt set {prompt_set.name!r} has no records")
    limit = max_new_tokens or task_kind.max_new_tokens
    chats = prompt_set.chats()
    responses = list(generate(chats, max_new_tokens=limit))
    if len(responses) != len(chats) or not all(isinstance(r, str) for r in responses):
        raise ValueError(
            f"generate must return one string per chat: {len(chats)} chats of "
            f"{prompt_set.name!r}, got {len(responses)} answers"
        )
    examples = []
    for index, (record, messages, response) in enumerate(zip(prompt_set.records, chats, responses)):
        example = {"task": prompt_set.name, "index": index}
        example.update({f: record[f] for f in task_kind.labels if f in record})
        example["prompt"] = messages[-1]["content"]
        example["response"] = response
        if task_kind.reference is not None:
            example["reference"] = record[task_kind.reference]
        example["scores"] = task_kind.score(record, response, **prompt_set.options)
        examples.append(example)
    scores = [e["scores"] for e in examples]
    grouped: dict[str, list[int]] = {}
    for i, record in enumerate(prompt_set.records):
        if GROUP_FIELD in record:
            grouped.setdefault(str(record[GROUP_FIELD]), []).append(i)
    groups = {
        group: {
            "n": len(indices),
            "metrics": task_kind.aggregate(
                [prompt_set.records[i] for i in indices], [scores[i] for i in indices]
            ),
        }
        for group, indices in grouped.items()
    }
    result = TaskResult(
        name=prompt_set.name,
        kind=prompt_set.kind,
        n=len(examples),
        metrics=task_kind.aggregate(prompt_set.records, scores),
        examples=examples,
        max_new_tokens=limit,
        primary_metric=task_kind.primary,
        columns=task_kind.metrics,
        groups=groups,
    )
    if task_kind.details is not None:
        result.details = task_kind.details(result)
    return result


def evaluate(
    prompt_sets: Sequence[PromptSet], generate: Generate, max_new_tokens: int | None = None
) -> Report:
    """Answers every prompt set through ``generate`` (one call per set, with all its chats) and
    scores the answers by the set's kind.

    An answer may have ``max_new_tokens`` tokens when given, else its kind's default
    (`TaskKind.max_new_tokens`).
    """
    names = [s.name for s in prompt_sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"prompt set names must be unique, repeated: {', '.join(repeated)}")
    return Report([_task_result(s, generate, max_new_tokens) for s in prompt_sets])
