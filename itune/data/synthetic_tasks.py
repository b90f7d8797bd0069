"""Built-in instruction-tuning data: a procedural FLAN-style task mixture.

Every example is generated from a seed, so nothing is downloaded and every run
sees the same data. There are ten task families (arithmetic, reverse, sort,
count, uppercase, maximum, minimum, repeat, lookup, pattern). Each family has
eight natural-language instruction templates that phrase the same operation in
different words and layouts (instruction first, input first, an "Input:" label,
a question). The last ``NUM_HELD_OUT_TEMPLATES`` templates of every family are
never used for training: evaluating on them measures whether a model follows
paraphrased instructions rather than memorised sentences.

The tasks are deliberately easy for a tiny transformer trained from scratch.
Inputs are space-separated single digits or words from a fixed lexicon of short
lowercase words, which a SentencePiece tokenizer with ``split_digits=True``
turns into one token per item. Answers are at most a few items long, with no
trailing punctuation and no newlines, and are scored by ``exact_match``.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Sequence

NUM_HELD_OUT_TEMPLATES = 2

# Short words that never occur in any template, so a list item can always be
# told apart from instruction text.
LEXICON = (
    "cat",
    "dog",
    "red",
    "sun",
    "box",
    "cup",
    "hat",
    "pen",
    "map",
    "car",
    "bus",
    "egg",
    "fox",
    "ice",
    "jam",
    "leg",
    "man",
    "net",
    "owl",
    "pig",
    "rat",
    "sky",
    "toy",
    "van",
    "web",
    "bed",
    "bag",
    "tree",
    "fish",
    "bird",
)

# Table keys for the lookup family; "a" and "i" are left out because they are
# also English words.
KEYS = ("b", "c", "d", "f", "g", "h", "k", "m", "n", "p")

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer briefly.",
    "Follow the instruction and give only the answer.",
    "You are a careful assistant that answers exactly.",
)

_SPLITS = ("train", "eval")

Fields = dict[str, str]


def _digits(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [str(rng.randint(0, 9)) for _ in range(rng.randint(lo, hi))]


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(LEXICON) for _ in range(rng.randint(lo, hi))]


def _arithmetic(rng: random.Random) -> tuple[Fields, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return {"expr": f"{a} + {b}"}, str(a + b)
    a, b = max(a, b), min(a, b)  # keep results non-negative
    return {"expr": f"{a} - {b}"}, str(a - b)


def _reverse(rng: random.Random) -> tuple[Fields, str]:
    items = _digits(rng, 2, 4) if rng.random() < 0.5 else _words(rng, 2, 4)
    return {"items": " ".join(items)}, " ".join(reversed(items))


def _sort(rng: random.Random) -> tuple[Fields, str]:
    items = _digits(rng, 2, 5)
    return {"items": " ".join(items)}, " ".join(sorted(items))


def _count(rng: random.Random) -> tuple[Fields, str]:
    items = _words(rng, 2, 7)
    return {"items": " ".join(items)}, str(len(items))


def _uppercase(rng: random.Random) -> tuple[Fields, str]:
    text = " ".join(_words(rng, 1, 3))
    return {"text": text}, text.upper()


def _maximum(rng: random.Random) -> tuple[Fields, str]:
    items = _digits(rng, 3, 7)
    return {"items": " ".join(items)}, max(items)


def _minimum(rng: random.Random) -> tuple[Fields, str]:
    items = _digits(rng, 3, 7)
    return {"items": " ".join(items)}, min(items)


def _repeat(rng: random.Random) -> tuple[Fields, str]:
    word, n = rng.choice(LEXICON), rng.randint(2, 5)
    return {"word": word, "n": str(n)}, " ".join([word] * n)


def _lookup(rng: random.Random) -> tuple[Fields, str]:
    keys = rng.sample(KEYS, rng.randint(2, 4))
    values = [str(rng.randint(0, 9)) for _ in keys]
    key = rng.randrange(len(keys))
    table = ", ".join(f"{k}={v}" for k, v in zip(keys, values))
    return {"table": table, "key": keys[key]}, values[key]


def _pattern(rng: random.Random) -> tuple[Fields, str]:
    period = rng.randint(2, 3)
    # Distinct items within one period, so the period is unambiguous.
    pool = [str(d) for d in range(10)] if rng.random() < 0.5 else list(LEXICON)
    unit = rng.sample(pool, period)
    length = rng.randint(2 * period, 3 * period)  # at least two full periods
    items = [unit[i % period] for i in range(length)]
    return {"items": " ".join(items)}, unit[length % period]


_FAMILIES: dict[str, tuple[Callable[[random.Random], tuple[Fields, str]], tuple[str, ...]]] = {
    "arithmetic": (
        _arithmetic,
        (
            "What is {expr}?",
            "Compute {expr}.",
            "Calculate: {expr}",
            "{expr} = ?",
            "Input: {expr}\nCompute the result.",
            "Work out the value of {expr}.",
            "Calculate the result of {expr}.",
            "Input: {expr}\nWhat is the value?",
        ),
    ),
    "reverse": (
        _reverse,
        (
            "Reverse the list: {items}",
            "Write these items in reverse order: {items}",
            "{items}\nReverse this list.",
            "Input: {items}\nOutput the items backwards.",
            "What is {items} reversed?",
            "List backwards: {items}",
            "Give the list {items} in reverse order.",
            "Input: {items}\nWhat is this list reversed?",
        ),
    ),
    "sort": (
        _sort,
        (
            "Sort the digits: {items}",
            "Sort in ascending order: {items}",
            "{items}\nSort these numbers.",
            "Input: {items}\nArrange the digits in increasing order.",
            "Put {items} in ascending order.",
            "What is {items} sorted?",
            "Input: {items}\nSort the numbers in ascending order.",
            "Arrange {items} in increasing order.",
        ),
    ),
    "count": (
        _count,
        (
            "How many words are in this list: {items}",
            "Count the items: {items}",
            "{items}\nHow many items are there?",
            "Input: {items}\nCount the words.",
            "Count how many words appear in: {items}",
            "Number of items in {items}?",
            "How many items are in {items}?",
            "Input: {items}\nHow many words are there?",
        ),
    ),
    "uppercase": (
        _uppercase,
        (
            "Convert to uppercase: {text}",
            "Write in capital letters: {text}",
            "{text}\nMake this uppercase.",
            "Input: {text}\nOutput it in uppercase.",
            "Uppercase this: {text}",
            "Rewrite {text} in capital letters.",
            "Input: {text}\nConvert it to capital letters.",
            "Make {text} uppercase.",
        ),
    ),
    "maximum": (
        _maximum,
        (
            "What is the largest number in {items}?",
            "Find the maximum: {items}",
            "{items}\nWhich digit is the biggest?",
            "Input: {items}\nOutput the largest digit.",
            "Give the maximum of {items}.",
            "Biggest number in this list: {items}",
            "Input: {items}\nFind the largest number.",
            "Which is the maximum digit in {items}?",
        ),
    ),
    "minimum": (
        _minimum,
        (
            "What is the smallest number in {items}?",
            "Find the minimum: {items}",
            "{items}\nWhich digit is the lowest?",
            "Input: {items}\nOutput the smallest digit.",
            "Give the minimum of {items}.",
            "Lowest number in this list: {items}",
            "Input: {items}\nFind the smallest number.",
            "Which is the minimum digit in {items}?",
        ),
    ),
    "repeat": (
        _repeat,
        (
            "Repeat the word {word} {n} times.",
            "Say {word} {n} times.",
            "Write {word} {n} times.",
            "Input: {word}\nRepeat it {n} times.",
            "What is {word} repeated {n} times?",
            "Repeat {word} exactly {n} times.",
            "Write the word {word} {n} times.",
            "Input: {word}\nSay it {n} times.",
        ),
    ),
    "lookup": (
        _lookup,
        (
            "Given {table}, what is {key}?",
            "{table}\nWhat is the value of {key}?",
            "Look up {key} in: {table}",
            "Table: {table}\nKey: {key}\nValue?",
            "In {table}, find the value of {key}.",
            "Input: {table}\nLook up the value of {key}.",
            "Given the table {table}, find the value of {key}.",
            "What is {key} in {table}?",
        ),
    ),
    "pattern": (
        _pattern,
        (
            "Continue the pattern: {items}",
            "What comes next? {items}",
            "{items}\nWhat is the next item in the pattern?",
            "Input: {items}\nComplete the pattern with the next item.",
            "Next in the sequence {items}?",
            "Give the next item: {items}",
            "What comes next in the pattern {items}?",
            "Input: {items}\nContinue the sequence.",
        ),
    ),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _family(family: str):
    if family not in _FAMILIES:
        raise ValueError(f"unknown task family {family!r}; expected one of {', '.join(FAMILIES)}")
    return _FAMILIES[family]


def templates(family: str) -> tuple[str, ...]:
    """All instruction templates of ``family``; the last NUM_HELD_OUT_TEMPLATES are held out."""
    return _family(family)[1]


def _example(
    rng: random.Random, families: Sequence[str], held_out: bool, system_prompt_rate: float
) -> dict:
    family = rng.choice(families)
    generate, family_templates = _family(family)
    first_held_out = len(family_templates) - NUM_HELD_OUT_TEMPLATES
    choices = range(first_held_out, len(family_templates)) if held_out else range(first_held_out)
    template = rng.choice(choices)
    fields, answer = generate(rng)
    messages = []
    if rng.random() < system_prompt_rate:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": family_templates[template].format(**fields)})
    messages.append({"role": "assistant", "content": answer})
    return {
        "messages": messages,
        "family": family,
        "template": template,
        "held_out": held_out,
        "answer": answer,
    }


def make_example(
    seed: int,
    index: int,
    split: str,
    held_out_templates: bool = False,
    system_prompt_rate: float = 0.25,
    families: Sequence[str] | None = None,
) -> dict:
    """Build example ``index`` of the ``split`` stream; a pure function of its arguments.

    With ``held_out_templates=True`` the instruction uses one of the family's held-out
    templates instead of a trained one. A generic system message is prepended with
    probability ``system_prompt_rate``.

    Example: ``make_example(0, 5, "train")`` returns::

        {'messages': [{'role': 'user', 'content': 'Sort the digits: 4 2 5 5 4'},
                      {'role': 'assistant', 'content': '2 4 4 5 5'}],
         'family': 'sort', 'template': 0, 'held_out': False, 'answer': '2 4 4 5 5'}
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(_SPLITS)}")
    if not 0.0 <= system_prompt_rate <= 1.0:
        raise ValueError(f"system_prompt_rate must be in [0, 1], got {system_prompt_rate}")
    if isinstance(families, str):  # a bare name would otherwise iterate as letters
        families = (families,)
    pool = tuple(families or FAMILIES)
    for family in pool:
        _family(family)
    rng = random.Random(f"itune-tasks/{seed}/{split}/{index}")
    return _example(rng, pool, held_out_templates, system_prompt_rate)


def exact_match(prediction: str, answer: str) -> bool:
    """Case-sensitive equality after trimming and collapsing whitespace runs."""
    return " ".join(prediction.split()) == " ".join(answer.split())


def corpus(seed: int, num_examples: int) -> Iterator[str]:
    """Text lines for training a tokenizer on this dataset.

    Starts with every system prompt and one rendering of every template (held-out
    ones included) so all instruction words reach the vocabulary, then yields the
    user and assistant lines of ``num_examples`` examples, a quarter of them with
    held-out templates. Multi-line user messages are split into their lines.
    """
    rng = random.Random(f"itune-tasks/{seed}/corpus")
    yield from SYSTEM_PROMPTS
    for family in FAMILIES:
        generate, family_templates = _FAMILIES[family]
        for template in family_templates:
            yield from template.format(**generate(rng)[0]).split("\n")
    for i in range(num_examples):
        example = _example(rng, FAMILIES, i % 4 == 3, 0.0)
        for message in example["messages"]:
            yield from (line for line in message["content"].split("\n") if line)
