"""The generative tasks a config names (``config.eval``), for training and ``itune-eval``.

- the built-in task families, when the run trains on them (no ``data.sources``):
  ``eval.prompts_per_family`` prompts per family and template group (`builtin`);
- ``eval.prompt_sets``: JSONL prompt sets (paths, or `harness.BUILTIN_PROMPT_SETS` names);
- ``eval.exact_match_sources``: file sources of ``data.sources`` whose held-out slice (the
  examples never trained on) is scored by exact match of the ``#### <number>`` final answer;
- ``eval.rouge_sources``: the same, scored by ROUGE-L against the held-out answer;
- given the run's data spec, ``eval.prompts_per_source`` held-out chats of each file source,
  answered beside their references and not scored (`samples`);

the prompt sets and sources each cut to their first ``eval.prompts_per_task`` prompts (0: all).
With ``eval.ifeval_official``, the IFEval sets are scored by the official checker's rules
(`official_ifeval`).
"""

from __future__ import annotations

from typing import Any, Sequence

from itune.data import mixture
from itune.errors import ConfigError
from itune.evaluation import builtin, harness, ifeval_text, samples

# The config fields naming the file sources whose held-out slices are scored, by kind.
SOURCE_FIELDS = {"exact_match": "exact_match_sources", "rouge": "rouge_sources"}


def _held_out(source: mixture.Source, kind: str, limit: int) -> harness.PromptSet:
    field = harness.kind(kind).reference
    records = []
    for example in source.eval[: limit or None]:
        messages = list(example["messages"])
        if not messages or messages[-1]["role"] != "assistant":
            continue
        answer = messages.pop()["content"]
        records.append({"messages": messages, field: answer})
    if not records:
        raise ConfigError(
            f"eval: source {source.name!r} has no held-out examples to score; raise "
            "data.eval_examples_per_source"
        )
    return harness.PromptSet(name=f"{source.name}_held_out", kind=kind, records=records)


def official_ifeval(sets: Sequence[harness.PromptSet]) -> None:
    """Makes the IFEval sets among ``sets`` score by the official checker's rules where itune's
    differ (`itune.evaluation.ifeval.score` with ``official=True``). Those need NLTK and its
    Punkt model: a UserError saying how to install them comes first, before any answer is
    generated, if they are missing."""
    ifeval_sets = [s for s in sets if s.kind == "ifeval"]
    if ifeval_sets:
        ifeval_text.official_nltk()
    for prompt_set in ifeval_sets:
        prompt_set.options["official"] = True


def prompt_sets(config: Any, spec: Any = None, limit: int | None = None) -> list[harness.PromptSet]:
    """The prompt sets of ``config.eval``. ``spec`` (a `itune.data.spec.DataSpec`): the run's data,
    whose sources are read when not given, and whose held-out chats become the unscored
    transcripts. ``limit``: prompts per prompt set and source, in place of
    ``eval.prompts_per_task``."""
    eval_config = config.eval
    limit = limit or eval_config.get("prompts_per_task", 0) or None
    sets = []
    if not config.data.sources and eval_config.get("prompts_per_family", 0):
        sets.append(builtin.prompt_set(config.data, eval_config.prompts_per_family))
    sets += [
        harness.load_prompt_set(path, limit=limit) for path in eval_config.get("prompt_sets", ())
    ]
    by_kind = {kind: eval_config.get(field, ()) for kind, field in SOURCE_FIELDS.items()}
    if any(by_kind.values()):
        sources = spec.sources if spec is not None else mixture.load_sources(config.data)
        named = {s.name: s for s in sources}
        for kind, names in by_kind.items():
            for name in names:
                if name not in named:
                    raise ConfigError(
                        f"eval.{SOURCE_FIELDS[kind]} names {name!r}, not one of data.sources "
                        f"{sorted(named)}"
                    )
                sets.append(_held_out(named[name], kind, limit or 0))
    if spec is not None and not spec.is_builtin and eval_config.get("prompts_per_source", 0):
        sets += samples.prompt_sets(config.data, spec, eval_config.prompts_per_source)
    if eval_config.get("ifeval_official", False):
        official_ifeval(sets)
    return sets
