import re
from collections import Counter

import pytest

from itune.data import synthetic_tasks
from itune.data.synthetic_tasks import (
    FAMILIES,
    NUM_HELD_OUT_TEMPLATES,
    corpus,
    exact_match,
    make_example,
    templates,
)

N = 3000


def user_text(example):
    return next(m["content"] for m in example["messages"] if m["role"] == "user")


def items_in(text):
    """Digits and lexicon words of a rendered instruction, in order."""
    words = re.findall(r"[A-Za-z]+|\d", text)
    return [w for w in words if w.isdigit() or w in synthetic_tasks.LEXICON]


@pytest.fixture(scope="module")
def examples():
    return [make_example(0, i, "train") for i in range(N)]


@pytest.fixture(scope="module")
def held_out_examples():
    return [make_example(0, i, "eval", held_out_templates=True) for i in range(N)]


def test_families_and_templates():
    assert len(FAMILIES) >= 9 and len(set(FAMILIES)) == len(FAMILIES)
    assert NUM_HELD_OUT_TEMPLATES == 2
    for family in FAMILIES:
        ts = templates(family)
        assert len(ts) >= 8 and len(set(ts)) == len(ts)
        for t in ts:
            # Every template has placeholders and no lexicon word, so inputs parse unambiguously.
            assert "{" in t
            assert not set(re.findall(r"[a-z]+", t.lower())) & set(synthetic_tasks.LEXICON), t


def test_held_out_templates_share_words_with_trained_ones():
    for family in FAMILIES:
        ts = templates(family)
        trained_words = set(re.findall(r"[a-z]+", " ".join(ts[:-NUM_HELD_OUT_TEMPLATES]).lower()))
        for t in ts[-NUM_HELD_OUT_TEMPLATES:]:
            assert t not in ts[:-NUM_HELD_OUT_TEMPLATES]
            words = set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", "", t).lower()))
            assert len(words & trained_words) >= 2, (family, t)


def test_deterministic():
    for i in range(50):
        a = make_example(7, i, "train", system_prompt_rate=0.5)
        assert a == make_example(7, i, "train", system_prompt_rate=0.5)
    users = {user_text(make_example(7, i, "train")) for i in range(200)}
    assert len(users) > 180
    train = [make_example(7, i, "train") for i in range(50)]
    assert train != [make_example(7, i, "eval") for i in range(50)]
    assert train != [make_example(8, i, "train") for i in range(50)]


def test_message_structure_and_template_index(examples, held_out_examples):
    for ex in examples + held_out_examples:
        msgs = ex["messages"]
        roles = [m["role"] for m in msgs]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert msgs[-1]["content"] == ex["answer"]
        assert "\n" not in ex["answer"] and ex["answer"] == ex["answer"].strip()
        assert ex["answer"] and len(ex["answer"].split()) <= 16
        assert ex["answer"][-1] not in ".?!,"
        # The user text really is the claimed template with its fields filled in.
        pattern = re.escape(templates(ex["family"])[ex["template"]])
        pattern = re.sub(r"\\\{\w+\\\}", ".+?", pattern)
        assert re.fullmatch(pattern, user_text(ex), re.S), ex


def _expected(family, text):
    items = items_in(text)
    if family == "arithmetic":
        a, op, b = re.search(r"(\d) ([+-]) (\d)", text).groups()
        assert op == "+" or int(a) >= int(b)
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if family == "reverse":
        assert 2 <= len(items) <= 4
        return " ".join(items[::-1])
    if family == "sort":
        assert 2 <= len(items) <= 5 and all(i.isdigit() for i in items)
        return " ".join(sorted(items, key=int))
    if family == "count":
        assert 2 <= len(items) <= 7 and not any(i.isdigit() for i in items)
        return str(len(items))
    if family == "uppercase":
        assert 1 <= len(items) <= 3
        return " ".join(items).upper()
    if family == "maximum":
        return str(max(map(int, items)))
    if family == "minimum":
        return str(min(map(int, items)))
    if family == "repeat":
        (word,) = [i for i in items if not i.isdigit()]
        (n,) = [i for i in items if i.isdigit()]
        assert 2 <= int(n) <= 5
        return " ".join([word] * int(n))
    if family == "lookup":
        table = dict(re.findall(r"\b([a-z])=(\d)\b", text))
        keys = set(re.findall(r"(?<![\w=])([a-z])(?![\w=])", text))
        assert len(table) >= 2 and len(keys) == 1
        return table[keys.pop()]
    if family == "pattern":
        for period in (2, 3):
            if len(items) >= 2 * period and all(
                items[i] == items[i - period] for i in range(period, len(items))
            ):
                return items[len(items) - period]
        raise AssertionError(f"no repeating pattern in {text!r}")
    raise AssertionError(f"no checker for family {family}")


def test_answers_are_correct(examples, held_out_examples):
    checked = Counter()
    for ex in examples + held_out_examples:
        assert ex["answer"] == _expected(ex["family"], user_text(ex)), ex
        checked[ex["family"]] += 1
    assert set(checked) == set(FAMILIES)


def test_every_family_and_template_appears(examples, held_out_examples):
    first_held = {f: len(templates(f)) - NUM_HELD_OUT_TEMPLATES for f in FAMILIES}
    seen = {(ex["family"], ex["template"]) for ex in examples}
    assert seen == {(f, t) for f in FAMILIES for t in range(first_held[f])}
    seen_held = {(ex["family"], ex["template"]) for ex in held_out_examples}
    assert seen_held == {(f, t) for f in FAMILIES for t in range(first_held[f], len(templates(f)))}
    counts = Counter(ex["family"] for ex in examples)
    assert min(counts.values()) > 0.5 * N / len(FAMILIES)


def test_held_out_flag(examples, held_out_examples):
    assert not any(ex["held_out"] for ex in examples)
    assert all(ex["held_out"] for ex in held_out_examples)


def test_families_filter():
    exs = [make_example(1, i, "train", families=["sort", "lookup"]) for i in range(200)]
    assert {ex["family"] for ex in exs} == {"sort", "lookup"}
    assert {make_example(1, i, "train", families="count")["family"] for i in range(20)} == {"count"}


def test_system_prompt_rate():
    def rate(r):
        exs = [make_example(3, i, "train", system_prompt_rate=r) for i in range(2000)]
        systems = [
            ex["messages"][0]["content"] for ex in exs if ex["messages"][0]["role"] == "system"
        ]
        assert set(systems) <= set(synthetic_tasks.SYSTEM_PROMPTS)
        return len(systems) / len(exs)

    assert rate(0.0) == 0.0
    assert rate(1.0) == 1.0
    assert 0.21 < rate(0.25) < 0.29


def test_errors():
    with pytest.raises(ValueError, match="train"):
        make_example(0, 0, "test")
    with pytest.raises(ValueError, match="unknown task family"):
        make_example(0, 0, "train", families=["sort", "nope"])
    with pytest.raises(ValueError, match="unknown task family"):
        templates("nope")


def test_exact_match():
    assert exact_match("3 7 1", "3 7 1")
    assert exact_match("  3   7\t1\n", "3 7 1")
    assert exact_match("CAT DOG", " CAT  DOG ")
    assert not exact_match("cat dog", "CAT DOG")
    assert not exact_match("3 7", "3 7 1")
    assert not exact_match("37", "3 7")


def test_corpus_covers_templates_and_prompts():
    lines = list(corpus(0, 300))
    assert lines == list(corpus(0, 300))
    assert all(line and "\n" not in line for line in lines)
    text = "\n".join(lines)
    for prompt in synthetic_tasks.SYSTEM_PROMPTS:
        assert prompt in lines
    for family in FAMILIES:
        for t in templates(family):
            for chunk in re.split(r"\{\w+\}|\n", t):
                assert chunk.strip() in text, (family, t, chunk)
    words = set(text.split())
    assert {w.upper() for w in synthetic_tasks.LEXICON} & words
    assert len(lines) > 600
