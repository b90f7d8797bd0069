"""FLAN-style instruction template banks for single-turn sources.

A single-turn example (one user turn and one assistant turn, after an optional system turn) is
rephrased with one of several ``str.format`` templates from a `TemplateBank`. The fields a template
can use are those of `fields_of`: ``instruction`` (the user turn), ``output`` (the assistant turn),
``system`` when there is a system turn, and whatever raw fields the example carries in its
``fields`` dict (``question``, ``answer``, ...). The bank's templates write the user turn and its
``answer_template`` the assistant turn.

With ``few_shot = k > 0`` a share ``few_shot_rate`` of the examples gets the few-shot variant: k
exemplars of the same source, each rendered with the same template and followed by its answer,
come before the query in the user turn.

Like the mixture (`itune.data.mixture`), every choice is a pure function of the data seed and the
example's stream position ``index``, each drawn from its own ``np.random.default_rng([seed, tag,
index])``: the template (tag 17), whether the example is few-shot (tag 19) and its exemplars (tag
23). A resumed run therefore renders every position exactly as before.

Built-in banks: `GSM8K_BANK` (math word problems) and `INSTRUCTION_BANK` (any instruction), also
by name in `BANKS`.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Sequence

import numpy as np

# Tags of the random streams; distinct from the mixture's (7, 11, 13), so that the template choice
# is independent of which source and which example a position gets.
_TEMPLATE_TAG = 17
_FEW_SHOT_TAG = 19
_EXEMPLAR_TAG = 23
# Candidates drawn beyond k when picking exemplars, to step over the example and its duplicates
# without permuting a large pool.
_EXTRA_CANDIDATES = 8


@dataclasses.dataclass(frozen=True)
class TemplateBank:
    """The templates of one source and how often its examples are few-shot.

    ``templates`` write the user turn and must not use ``{output}``, the answer, which
    ``answer_template`` writes as the assistant turn. A few-shot user turn is the exemplars, each
    ``template + answer_separator + answer``, then the query, joined by ``exemplar_separator``.

    >>> bank = TemplateBank(("Q: {instruction}", "{instruction}\\nAnswer briefly."), few_shot=2)
    >>> bank.few_shot, bank.answer_template
    (2, '{output}')
    """

    templates: tuple[str, ...]
    answer_template: str = "{output}"
    few_shot: int = 0  # Exemplars in a few-shot user turn; 0 is zero-shot only.
    few_shot_rate: float = 0.0  # Share of the examples that are few-shot when few_shot > 0.
    exemplar_separator: str = "\n\n"
    answer_separator: str = "\n"  # Between an exemplar's question and its answer.

    def __post_init__(self):
        if isinstance(self.templates, str) or not self.templates:
            raise ValueError(
                f"a template bank needs a non-empty list of templates: {self.templates!r}"
            )
        object.__setattr__(self, "templates", tuple(self.templates))
        for template in self.templates:
            names = _placeholders(template)
            if not names:
                raise ValueError(f"template {template!r} has no placeholder for the user's text")
            if "output" in names:
                raise ValueError(
                    f"template {template!r} uses {{output}}, the answer; only answer_template may"
                )
        if not _placeholders(self.answer_template):
            raise ValueError(f"answer_template {self.answer_template!r} has no placeholder")
        if type(self.few_shot) is not int or self.few_shot < 0:  # bool is an int too.
            raise ValueError(f"few_shot must be a non-negative integer, got {self.few_shot!r}")
        if not 0.0 <= self.few_shot_rate <= 1.0:
            raise ValueError(f"few_shot_rate must be in [0, 1], got {self.few_shot_rate!r}")
        for name in ("exemplar_separator", "answer_separator"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> TemplateBank:
        """From a dict or ``ml_collections.ConfigDict``, or the name of one of `BANKS`; a
        ``bank`` key starts from that built-in bank and changes the other keys given.

        >>> TemplateBank.from_config({"templates": ["Q: {instruction}"], "few_shot": 1}).templates
        ('Q: {instruction}',)
        >>> TemplateBank.from_config("gsm8k") is GSM8K_BANK
        True
        >>> TemplateBank.from_config({"bank": "gsm8k", "few_shot": 2}).few_shot
        2
        >>> TemplateBank.from_config({"templates": ["{instruction}"], "shots": 2})
        Traceback (most recent call last):
        ValueError: template bank: unknown keys ['shots']; known: ['templates', 'answer_template', \
'few_shot', 'few_shot_rate', 'exemplar_separator', 'answer_separator']
        """
        if isinstance(cfg, str):
            if cfg not in BANKS:
                raise ValueError(f"unknown template bank {cfg!r}; built-in banks: {sorted(BANKS)}")
            return BANKS[cfg]
        values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        if "bank" in values:  # A built-in bank with some fields changed, e.g. few_shot.
            base = cls.from_config(values.pop("bank"))
            return cls.from_config(dataclasses.asdict(base) | values)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"template bank: unknown keys {unknown}; known: {known}")
        if "templates" in values and not isinstance(values["templates"], str):
            values["templates"] = tuple(values["templates"])
        return cls(**values)


def fields_of(example: dict) -> dict[str, str]:
    """The fields a template can use, from a normal-form single-turn example.

    ``instruction`` is the user turn, ``output`` the assistant turn and ``system`` the system turn
    when there is one; the example's ``fields`` dict adds more names. The turns win over a
    same-named raw field, so ``{instruction}`` is always the whole user text of the source.

    >>> example = {"messages": [{"role": "user", "content": "2+2?"},
    ...                         {"role": "assistant", "content": "4"}],
    ...            "fields": {"question": "2+2?", "answer": 4}, "origin": "x.jsonl:1"}
    >>> fields_of(example)
    {'question': '2+2?', 'answer': '4', 'instruction': '2+2?', 'output': '4'}
    """
    system, user, assistant = _turns(example)
    # Raw fields may hold numbers (an answer of 4); None counts as absent.
    fields = {k: str(v) for k, v in (example.get("fields") or {}).items() if v is not None}
    fields |= {"instruction": user, "output": assistant}
    if system is not None:
        fields["system"] = system
    return fields


def uses_few_shot(bank: TemplateBank, seed: int, index: int) -> bool:
    """Whether stream position ``index`` gets the few-shot variant of ``bank``.

    >>> bank = TemplateBank(("{instruction}",), few_shot=2, few_shot_rate=1.0)
    >>> uses_few_shot(bank, 0, 5), uses_few_shot(TemplateBank(("{instruction}",)), 0, 5)
    (True, False)
    """
    if bank.few_shot == 0 or bank.few_shot_rate == 0.0:
        return False
    return bool(np.random.default_rng([seed, _FEW_SHOT_TAG, index]).random() < bank.few_shot_rate)


def template_index(bank: TemplateBank, seed: int, index: int) -> int:
    """The template that stream position ``index`` uses, uniform over the bank.

    >>> template_index(INSTRUCTION_BANK, 0, 5) == template_index(INSTRUCTION_BANK, 0, 5)
    True
    """
    return int(np.random.default_rng([seed, _TEMPLATE_TAG, index]).integers(len(bank.templates)))


def apply_template(
    example: dict, bank: TemplateBank, seed: int, index: int, exemplars: Sequence[dict] = ()
) -> dict:
    """``example`` rephrased with the template that ``(seed, index)`` picks from ``bank``.

    Returns a new normal-form example: the system turn (if any) unchanged, the user turn from the
    template and the assistant turn from ``answer_template``; ``source``, ``tools`` and ``origin``
    are kept, the raw ``fields`` dropped. ``template`` is the template's index in the bank and
    ``few_shot`` the number of exemplars used: the first ``bank.few_shot`` of ``exemplars`` when
    `uses_few_shot` says so (fewer if fewer are given), else none. Raises ValueError for a
    multi-turn example, or for a template field that the example or an exemplar lacks.

    >>> def qa(q, a, line):
    ...     return {"messages": [{"role": "user", "content": q},
    ...                          {"role": "assistant", "content": a}],
    ...             "source": "toy", "tools": None, "origin": f"toy.jsonl:{line}"}
    >>> bank = TemplateBank(("Question: {instruction}",), "Answer: {output}", 1, 1.0)
    >>> out = apply_template(qa("1+1?", "2", 1), bank, 0, 0, [qa("2+2?", "4", 2)])
    >>> print(out["messages"][0]["content"])
    Question: 2+2?
    Answer: 4
    <BLANKLINE>
    Question: 1+1?
    >>> out["messages"][1]["content"], out["template"], out["few_shot"], out["origin"]
    ('Answer: 2', 0, 1, 'toy.jsonl:1')
    """
    system, _, _ = _turns(example)
    choice = template_index(bank, seed, index)
    template = bank.templates[choice]
    shots = list(exemplars[: bank.few_shot]) if uses_few_shot(bank, seed, index) else []
    parts = []
    for exemplar in shots:
        if exemplar is example or exemplar.get("messages") == example.get("messages"):
            raise ValueError(f"{_origin(example)}: an exemplar is the example itself")
        question = _render(template, exemplar)
        parts.append(question + bank.answer_separator + _render(bank.answer_template, exemplar))
    parts.append(_render(template, example))
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": bank.exemplar_separator.join(parts)})
    messages.append({"role": "assistant", "content": _render(bank.answer_template, example)})
    return {
        "messages": messages,
        "source": example.get("source", ""),
        "tools": example.get("tools"),
        "origin": example.get("origin", ""),
        "template": choice,
        "few_shot": len(shots),
    }


def pick_exemplars(
    pool: Sequence[dict], k: int, seed: int, index: int, exclude: int | None
) -> list[dict]:
    """``k`` distinct exemplars from ``pool`` for stream position ``index``; a pure function.

    ``exclude`` is the example's own position in ``pool`` (None when it is not in the pool, e.g.
    an eval example): neither it nor any pool entry with the same messages is picked, so that the
    answer is never in the prompt. Fewer than ``k`` come back when the pool has fewer.

    >>> pool = [{"messages": [{"role": "user", "content": str(i)}]} for i in range(5)]
    >>> picked = pick_exemplars(pool, 2, seed=0, index=9, exclude=3)
    >>> len(picked), pool[3] in picked, picked == pick_exemplars(pool, 2, 0, 9, 3)
    (2, False, True)
    """
    n = len(pool)
    if k <= 0 or n == 0:
        return []
    own = pool[exclude].get("messages") if exclude is not None else None
    rng = np.random.default_rng([seed, _EXEMPLAR_TAG, index])
    # A short draw without replacement is enough unless the pool is full of the example's copies;
    # then a full permutation, continuing the same stream, decides.
    candidates = rng.choice(n, size=min(n, k + _EXTRA_CANDIDATES), replace=False)
    picked: list[int] = []
    while True:
        for i in map(int, candidates):
            if i != exclude and i not in picked and (own is None or pool[i].get("messages") != own):
                picked.append(i)
                if len(picked) == k:
                    return [pool[j] for j in picked]
        if len(candidates) == n:  # Every entry was a candidate: the pool has no more.
            return [pool[j] for j in picked]
        candidates = rng.permutation(n)


def template_example(
    example: dict,
    bank: TemplateBank,
    seed: int,
    index: int,
    pool: Sequence[dict] = (),
    pool_index: int | None = None,
) -> dict:
    """`apply_template`, with exemplars from ``pool`` picked only for few-shot positions.

    ``pool`` is the source's training examples and ``pool_index`` the example's place in it.

    >>> pool = [{"messages": [{"role": "user", "content": f"{i}+{i}?"},
    ...                       {"role": "assistant", "content": str(2 * i)}]} for i in range(4)]
    >>> bank = TemplateBank(("Q: {instruction}",), "A: {output}", 1, 1.0)
    >>> out = template_example(pool[1], bank, 0, 0, pool, pool_index=1)
    >>> out["few_shot"], out["messages"][0]["content"].endswith("Q: 1+1?")
    (1, True)
    """
    exemplars: list[dict] = []
    if uses_few_shot(bank, seed, index):
        exemplars = pick_exemplars(pool, bank.few_shot, seed, index, pool_index)
    return apply_template(example, bank, seed, index, exemplars)


def _turns(example: dict) -> tuple[str | None, str, str]:
    """(system or None, user, assistant) of a single-turn example; ValueError otherwise."""
    messages = list(example.get("messages") or ())
    system = None
    if messages and messages[0].get("role") == "system":
        system = messages.pop(0)["content"]
    roles = [m.get("role") for m in messages]
    if roles != ["user", "assistant"]:
        raise ValueError(
            f"{_origin(example)}: template banks take single-turn examples (one user turn, one "
            f"assistant turn, optionally after a system turn), got roles {roles}"
        )
    return system, messages[0]["content"], messages[1]["content"]


def _render(template: str, example: dict) -> str:
    fields = fields_of(example)
    missing = [name for name in _placeholders(template) if name not in fields]
    if missing:
        raise ValueError(
            f"{_origin(example)}: template {template!r} uses field {missing[0]!r}, which the "
            f"example lacks; it has {sorted(fields)}"
        )
    return template.format(**fields)


def _placeholders(template: str) -> list[str]:
    """The field names of a ``str.format`` template, in order; ValueError if it is not one."""
    if not isinstance(template, str):
        raise ValueError(f"templates must be strings, got {template!r}")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a str.format template: {e}") from None
    # Fields are plain strings: positional ({}) or attribute/index fields cannot be filled.
    bad = [name for name in names if not name.isidentifier()]
    if bad:
        raise ValueError(f"template {template!r}: fields must be plain names, got {bad}")
    return list(dict.fromkeys(names))


def _origin(example: dict) -> str:
    return example.get("origin") or "<example without origin>"


GSM8K_BANK = TemplateBank(
    templates=(
        "Solve this math word problem: {instruction}",
        "{instruction}\nWork out the answer step by step.",
        "Question: {instruction}\nShow your reasoning, then give the final answer.",
        "Here is a grade-school math problem.\n\n{instruction}\n\nSolve it.",
        "{instruction}",
        "Answer the following question with a step-by-step solution.\n{instruction}",
        "Problem: {instruction}\nSolution:",
        "Read the problem and calculate the answer.\n\n{instruction}",
    ),
)

INSTRUCTION_BANK = TemplateBank(
    templates=(
        "{instruction}",
        "Instruction: {instruction}",
        "{instruction}\n\nRespond to the request above.",
        "Here is a task for you.\n\n{instruction}",
        "Please help with the following.\n{instruction}",
        "Task:\n{instruction}\n\nResponse:",
        "Complete the following request.\n\n{instruction}",
        "Read the instruction carefully and answer it.\n{instruction}",
    ),
)

BANKS = {"gsm8k": GSM8K_BANK, "instruction": INSTRUCTION_BANK}
