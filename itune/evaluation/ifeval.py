"""Verifiable instructions in the style of IFEval (Zhou et al. 2023, "Instruction-Following
Evaluation for Large Language Models").

A prompt carries instructions such as "answer in fewer than 50 words" or "do not use any commas",
each named by an IFEval instruction id with IFEval's keyword arguments::

    {"key": 7, "prompt": "...", "instruction_id_list": ["punctuation:no_comma",
     "length_constraints:number_words"], "kwargs": [{}, {"num_words": 50, "relation": "less than"}]}

and each checked by a small rule on the response text. All 25 instruction ids of the published
IFEval data are here, and its records are read as they are: the published file (every argument
name an instruction does not use left out) and the Hugging Face copy (every argument name on
every instruction, the unused ones null) alike. The rules are the official checker's, except
where itune deliberately differs; ``official=True`` (`score`, `follows`) restores the official
behaviour where it can:

- Sentences and capitalised words are counted without NLTK (`itune.evaluation.ifeval_text`
  says how close that comes); ``official=True`` uses NLTK and its Punkt model, which must then be
  installed.
- A bullet is a line starting with ``* `` or ``- `` (a marker and a space), so a ``---`` rule or
  an ``*emphasised*`` line is not one; ``official=True``: any line starting with ``-``, or with
  ``*`` and another character than ``*``.
- A postscript marker glued to a preceding letter ("stop.S. Lee" for "P.S.") is not one;
  ``official=True``: it is.
- Keywords, forbidden words and the section splitter are matched as written; the official
  checker reads them as regular expressions (``official=True`` does, where one compiles), which
  is the same for words without ``.``, ``*``, ``?`` and the like.
- A ``letter`` that is not one of a-z (the published data asks for ``#`` and ``!``) is counted
  as given. The official checker replaces it with a random letter, so its verdict there is
  chance; ``official=True`` counts the character as given too.
- Languages are detected with langdetect seeded, so that a score is the same each time; the
  official checker leaves it unseeded (``official=True`` too is seeded).

Scores are strict (the response as written) and loose (IFEval's upper bound: the response also
without its first line, its last line or both, and each of those without ``*``); `aggregate`
gives IFEval's four published accuracies.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Callable, Sequence

from itune.evaluation import ifeval_text
from itune.evaluation.ifeval_text import count_words, split_sentences

__all__ = [
    "CHECKERS",
    "aggregate",
    "arguments",
    "checker",
    "count_words",
    "follows",
    "loose_variants",
    "score",
    "split_sentences",
]

RELATIONS = ("less than", "at least")

# The kinds of argument a checker takes, by how they are validated.
COUNT, TEXT, WORDS, RELATION, LETTER, LANGUAGE = (
    "count",
    "text",
    "words",
    "relation",
    "letter",
    "language",
)


@dataclasses.dataclass(frozen=True)
class Checker:
    """One verifiable instruction: its IFEval id, its arguments (name -> kind) and its rule,
    ``rule(response, **arguments)``; a rule that differs from the official checker's also takes
    ``official=True`` (`has_official_mode`)."""

    id: str
    arguments: dict[str, str]
    rule: Callable[..., bool]
    has_official_mode: bool = False


CHECKERS: dict[str, Checker] = {}


def _register(instruction_id: str, **arguments: str):
    def register(rule):
        has_official_mode = "official" in inspect.signature(rule).parameters
        CHECKERS[instruction_id] = Checker(instruction_id, arguments, rule, has_official_mode)
        return rule

    return register


def _pattern(text: str, *, official: bool) -> str:
    """The official checker reads a keyword as a regular expression; itune as written."""
    if official:
        try:
            re.compile(text)
            return text
        except re.error:
            pass
    return re.escape(text)


def _compare(actual: int, relation: str, threshold: int) -> bool:
    return actual < threshold if relation == "less than" else actual >= threshold


@_register("length_constraints:number_words", num_words=COUNT, relation=RELATION)
def _number_words(response, *, num_words, relation):
    return _compare(count_words(response), relation, num_words)


@_register("length_constraints:number_sentences", num_sentences=COUNT, relation=RELATION)
def _number_sentences(response, *, num_sentences, relation, official=False):
    count = ifeval_text.count_sentences(response, official=official)
    return _compare(count, relation, num_sentences)


@_register("length_constraints:number_paragraphs", num_paragraphs=COUNT)
def _number_paragraphs(response, *, num_paragraphs):
    """Exactly that many paragraphs between ``***`` dividers; an empty paragraph between two
    dividers fails, a divider at the very start or end is tolerated."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    inner = paragraphs[1:-1]
    if any(not p.strip() for p in inner):
        return False
    return sum(1 for p in paragraphs if p.strip()) == num_paragraphs


@_register(
    "length_constraints:nth_paragraph_first_word",
    num_paragraphs=COUNT,
    nth_paragraph=COUNT,
    first_word=TEXT,
)
def _nth_paragraph_first_word(response, *, num_paragraphs, nth_paragraph, first_word):
    """Exactly that many non-blank paragraphs between blank lines, the nth (from 1) starting with
    the word, compared without case and up to the first punctuation mark. As in the official
    checker, the nth piece between two newlines counts, blank ones included, and a blank nth
    piece fails."""
    pieces = response.split("\n\n")
    paragraphs = sum(1 for p in pieces if p.strip())
    if not 1 <= nth_paragraph <= paragraphs or not pieces[nth_paragraph - 1].strip():
        return False
    word = pieces[nth_paragraph - 1].split()[0].lstrip("'").lstrip('"')
    word = re.split(r"[.,?!'\"]", word)[0]
    return paragraphs == num_paragraphs and word.lower() == first_word.lower()


@_register("keywords:existence", keywords=WORDS)
def _keywords_existence(response, *, keywords, official=False):
    """Every keyword appears, ignoring case, also inside a longer word."""
    return all(
        re.search(_pattern(k, official=official), response, flags=re.IGNORECASE) for k in keywords
    )


@_register("keywords:forbidden_words", forbidden_words=WORDS)
def _forbidden_words(response, *, forbidden_words, official=False):
    """No forbidden word appears as a whole word, ignoring case."""
    return not any(
        re.search(rf"\b{_pattern(w, official=official)}\b", response, flags=re.IGNORECASE)
        for w in forbidden_words
    )


@_register("keywords:frequency", keyword=TEXT, frequency=COUNT, relation=RELATION)
def _keyword_frequency(response, *, keyword, frequency, relation, official=False):
    """Occurrences of the keyword, ignoring case and also inside longer words (as IFEval)."""
    pattern = _pattern(keyword.strip(), official=official)
    return _compare(len(re.findall(pattern, response, flags=re.IGNORECASE)), relation, frequency)


@_register("keywords:letter_frequency", letter=LETTER, let_frequency=COUNT, let_relation=RELATION)
def _letter_frequency(response, *, letter, let_frequency, let_relation):
    """Occurrences of the character, ignoring case; any character, "#" as well as "a"."""
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


@_register("language:response_language", language=LANGUAGE)
def _response_language(response, *, language):
    """langdetect names the response's language; a response it cannot read (no letters) passes,
    as in the official checker."""
    detected = ifeval_text.detect_language(response)
    return detected is None or detected == language


def _english(response: str) -> bool:
    detected = ifeval_text.detect_language(response)
    return detected is None or detected == "en"


@_register("change_case:english_lowercase")
def _english_lowercase(response):
    """At least one letter, no capitals, and English (as `_response_language` with "en")."""
    return response.islower() and _english(response)


@_register("change_case:english_capital")
def _english_capital(response):
    """At least one letter, no lowercase letters, and English."""
    return response.isupper() and _english(response)


@_register("change_case:capital_word_frequency", capital_frequency=COUNT, capital_relation=RELATION)
def _capital_word_frequency(response, *, capital_frequency, capital_relation, official=False):
    """Words in capitals, split as `ifeval_text.capital_words` says ("WELL-KNOWN" is one,
    "DON'T" two, the "I" of "I'm" one)."""
    count = len(ifeval_text.capital_words(response, official=official))
    return _compare(count, capital_relation, capital_frequency)


@_register("detectable_format:json_format")
def _json_format(response):
    """The whole response parses as JSON, optionally inside a ``` or ```json fence."""
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        if text.startswith(fence):
            text = text[len(fence) :]
            break
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@_register("detectable_format:number_bullet_lists", num_bullets=COUNT)
def _number_bullet_lists(response, *, num_bullets, official=False):
    """Exactly that many lines starting (after indentation) with ``* `` or ``- ``."""
    if official:
        stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
        dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
        return len(stars) + len(dashes) == num_bullets
    bullets = re.findall(r"^[ \t]*[*-][ \t]+\S", response, flags=re.MULTILINE)
    return len(bullets) == num_bullets


@_register("detectable_format:title")
def _title(response):
    """A non-blank title on one line inside double angular brackets: <<like this>>."""
    titles = re.findall(r"<<[^\n]+>>", response)
    return any(t.lstrip("<").rstrip(">").strip() for t in titles)


@_register("detectable_format:number_highlighted_sections", num_highlights=COUNT)
def _number_highlighted_sections(response, *, num_highlights):
    """At least that many non-blank *highlighted* or **bold** spans, each within one line."""
    single = re.findall(r"\*([^\n*]*)\*", response)
    double = re.findall(r"\*\*([^\n*]*)\*\*", response)
    return sum(1 for h in single + double if h.strip()) >= num_highlights


@_register("detectable_format:multiple_sections", section_spliter=TEXT, num_sections=COUNT)
def _multiple_sections(response, *, section_spliter, num_sections, official=False):
    """At least that many sections opened by the splitter word and a number ("SECTION 2")."""
    splitter = rf"\s?{_pattern(section_spliter.strip(), official=official)}\s?\d+\s?"
    return len(re.split(splitter, response)) - 1 >= num_sections


_CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@_register("detectable_format:constrained_response")
def _constrained_response(response):
    """One of IFEval's fixed options appears: "My answer is yes.", "... no." or "... maybe."."""
    return any(option in response for option in _CONSTRAINED_RESPONSES)


@_register("detectable_content:postscript", postscript_marker=TEXT)
def _postscript(response, *, postscript_marker, official=False):
    """The marker appears, ignoring case, not glued to a preceding letter. "P.S." and "P.P.S"
    also match spelled with spaces ("P. S.")."""
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = _pattern(marker.lower(), official=official)
    if not official:
        pattern = r"(?<![a-z])" + pattern
    return re.search(pattern, response.lower()) is not None


@_register("detectable_content:number_placeholders", num_placeholders=COUNT)
def _number_placeholders(response, *, num_placeholders):
    """At least that many [placeholders] in square brackets."""
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


@_register("startend:end_checker", end_phrase=TEXT)
def _end_checker(response, *, end_phrase):
    """The response ends with the phrase, ignoring case, surrounding whitespace and quotes."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@_register("startend:quotation")
def _quotation(response):
    """The whole response is wrapped in double quotation marks."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


@_register("punctuation:no_comma")
def _no_comma(response):
    return "," not in response


@_register("combination:two_responses")
def _two_responses(response):
    """Two different non-blank answers separated by ``******``, and nothing blank between."""
    parts = response.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p.strip() for p in parts if p.strip()]
    return len(answers) == 2 and answers[0] != answers[1]


@_register("combination:repeat_prompt", prompt_to_repeat=TEXT)
def _repeat_prompt(response, *, prompt_to_repeat):
    """The response starts with the request repeated word for word, ignoring case."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def _valid(kind: str, value) -> bool:
    if kind == COUNT:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == TEXT:
        return isinstance(value, str) and bool(value.strip())
    if kind == WORDS:
        return (
            isinstance(value, list)
            and bool(value)
            and all(isinstance(w, str) and w.strip() for w in value)
        )
    if kind == RELATION:
        return value in RELATIONS
    if kind == LANGUAGE:
        return value in ifeval_text.languages()
    return isinstance(value, str) and len(value) == 1 and not value.isspace()


_EXPECTED = {
    COUNT: "a non-negative integer",
    TEXT: "a non-blank string",
    WORDS: "a non-empty list of non-blank strings",
    RELATION: f"one of {RELATIONS}",
    LETTER: "a single character",
    LANGUAGE: "a language code langdetect knows (en, fr, zh-cn, ...)",
}


def checker(instruction_id: str) -> Checker:
    """The checker of an IFEval instruction id; ValueError naming the id if there is none."""
    try:
        return CHECKERS[instruction_id]
    except KeyError:
        raise ValueError(f"unknown instruction id {instruction_id!r}") from None


def arguments(instruction_id: str, kwargs: dict | None) -> dict:
    """The checker's arguments taken from an instruction's kwargs, validated.

    Null values are dropped first: the published IFEval data lists every argument name on every
    instruction and sets the unused ones to null. A missing, unexpected or mistyped argument is a
    ValueError naming the instruction id and the argument.
    """
    spec = checker(instruction_id).arguments
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{instruction_id}: kwargs must be an object, got {kwargs!r}")
    given = {k: v for k, v in kwargs.items() if v is not None}
    for name in given:
        if name not in spec:
            raise ValueError(f"{instruction_id}: unexpected argument {name!r}")
    for name, kind in spec.items():
        if name not in given:
            raise ValueError(f"{instruction_id}: missing argument {name!r}")
        if not _valid(kind, given[name]):
            raise ValueError(
                f"{instruction_id}: argument {name!r} must be {_EXPECTED[kind]}, "
                f"got {given[name]!r}"
            )
    return given


def follows(
    instruction_id: str, kwargs: dict | None, response: str, *, official: bool = False
) -> bool:
    """Whether the response follows one instruction. A blank response follows none (as in
    IFEval's evaluation, where it would otherwise pass "no commas" and the like). With
    ``official=True``, by the official checker's rule where itune's differs (module docstring).
    """
    args = arguments(instruction_id, kwargs)
    check = CHECKERS[instruction_id]
    if check.has_official_mode:
        args["official"] = official
    return bool(response.strip()) and check.rule(response, **args)


def loose_variants(response: str) -> list[str]:
    """IFEval's loose readings of a response: as written, without its first line, without its
    last line, without both, and each of those four with every ``*`` removed. The first and last
    lines are where a preamble ("Sure, here it is:") or a closing remark usually goes."""
    lines = response.split("\n")
    trimmed = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return trimmed + [r.replace("*", "") for r in trimmed]


def score(record: dict, response: str, *, official: bool = False) -> dict:
    """Strict and loose results of one response to an IFEval record::

    {"instruction_id_list": [...], "strict": [bool per instruction], "loose": [...],
     "prompt_strict": all(strict), "prompt_loose": all(loose)}

    An instruction is followed loosely when any of `loose_variants` follows it. ``official``:
    as in `follows`.
    """
    ids, all_kwargs = record["instruction_id_list"], record["kwargs"]
    if len(ids) != len(all_kwargs):
        raise ValueError(
            f"record {record.get('key')!r}: {len(ids)} instructions but {len(all_kwargs)} kwargs"
        )
    variants = loose_variants(response)
    strict, loose = [], []
    for instruction_id, kwargs in zip(ids, all_kwargs):
        strict.append(follows(instruction_id, kwargs, response, official=official))
        loose.append(
            strict[-1]
            or any(follows(instruction_id, kwargs, v, official=official) for v in variants)
        )
    return {
        "instruction_id_list": list(ids),
        "strict": strict,
        "loose": loose,
        "prompt_strict": all(strict),
        "prompt_loose": all(loose),
    }


def aggregate(scores: Sequence[dict]) -> dict[str, float]:
    """IFEval's four accuracies over `score` results: prompt level (the share of prompts with
    every instruction followed) and instruction level (the share of all instructions followed),
    each strict and loose."""
    if not scores:
        raise ValueError("no scores to aggregate")
    strict = [followed for s in scores for followed in s["strict"]]
    loose = [followed for s in scores for followed in s["loose"]]
    return {
        "prompt_strict": sum(s["prompt_strict"] for s in scores) / len(scores),
        "prompt_loose": sum(s["prompt_loose"] for s in scores) / len(scores),
        "instruction_strict": sum(strict) / len(strict) if strict else 0.0,
        "instruction_loose": sum(loose) / len(loose) if loose else 0.0,
    }
