"""Template banks: determinism, exact rendering, exemplars, few-shot rate, errors, real GSM8K."""

import dataclasses
import doctest
from collections import Counter

import ml_collections
import pytest

from itune.data import templates
from itune.data.templates import (
    GSM8K_BANK,
    INSTRUCTION_BANK,
    TemplateBank,
    apply_template,
    fields_of,
    pick_exemplars,
    template_example,
    template_index,
    uses_few_shot,
)

N = 3000


def qa(user, assistant, line=1, system=None, **raw):
    """A single-turn example; ``raw`` becomes its ``fields``."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    example = {"messages": messages, "source": "toy", "tools": None, "origin": f"toy.jsonl:{line}"}
    if raw:
        example["fields"] = raw
    return example


POOL = [qa(f"What is {i} + {i}?", str(2 * i), line=i + 1) for i in range(40)]


def test_docstring_examples():
    assert doctest.testmod(templates).failed == 0


def test_same_position_same_template_and_all_templates_roughly_uniform():
    bank = INSTRUCTION_BANK
    assert [template_index(bank, 3, i) for i in range(50)] == [
        template_index(bank, 3, i) for i in range(50)
    ]
    example = POOL[0]
    assert apply_template(example, bank, 3, 17) == apply_template(example, bank, 3, 17)
    counts = Counter(template_index(bank, 3, i) for i in range(N))
    expected = N / len(bank.templates)
    assert sorted(counts) == list(range(len(bank.templates)))
    assert all(abs(c - expected) < 0.25 * expected for c in counts.values()), counts
    # Another seed gives another assignment of templates to positions.
    assert [template_index(bank, 4, i) for i in range(50)] != [
        template_index(bank, 3, i) for i in range(50)
    ]


def test_zero_shot_exact_text():
    bank = TemplateBank(("Question: {question}\nAnswer with a number.",), "The answer is {answer}.")
    example = qa("How many legs has a cat?", "4", line=7, question="How many legs?", answer=4)
    out = apply_template(example, bank, seed=0, index=0)
    assert out == {
        "messages": [
            {"role": "user", "content": "Question: How many legs?\nAnswer with a number."},
            {"role": "assistant", "content": "The answer is 4."},
        ],
        "source": "toy",
        "tools": None,
        "origin": "toy.jsonl:7",
        "template": 0,
        "few_shot": 0,
    }


def test_two_shot_exact_text_keeps_system_turn():
    bank = TemplateBank(
        ("Q: {instruction}",),
        "A: {output}",
        few_shot=2,
        few_shot_rate=1.0,
        exemplar_separator="\n\n",
    )
    example = qa("What is 5 + 5?", "10", system="Be brief.")
    out = apply_template(example, bank, 0, 0, [POOL[1], POOL[2], POOL[3]])
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": "Q: What is 1 + 1?\nA: 2\n\nQ: What is 2 + 2?\nA: 4\n\nQ: What is 5 + 5?",
        },
        {"role": "assistant", "content": "A: 10"},
    ]
    assert out["few_shot"] == 2 and out["template"] == 0


def test_exemplars_come_from_pool_and_never_the_example():
    for index in range(300):
        exclude = index % len(POOL)
        picked = pick_exemplars(POOL, 3, seed=1, index=index, exclude=exclude)
        assert len(picked) == 3
        ids = [id(p) for p in picked]
        assert len(set(ids)) == 3 and id(POOL[exclude]) not in ids
        assert all(any(p is q for q in POOL) for p in picked)
        assert picked == pick_exemplars(POOL, 3, 1, index, exclude)
    # Copies of the example are skipped too, and a small pool gives what it has.
    pool = [POOL[0], POOL[1], dict(POOL[0]), POOL[2]]
    for index in range(50):
        assert pick_exemplars(pool, 3, 0, index, exclude=0) in (
            [POOL[1], POOL[2]],
            [POOL[2], POOL[1]],
        )
    # Beyond the first short draw: the one other entry among many copies is still found.
    copies = [dict(POOL[0]) for _ in range(30)] + [POOL[5]]
    assert all(pick_exemplars(copies, 2, 0, i, exclude=0) == [POOL[5]] for i in range(20))
    assert pick_exemplars(POOL, 0, 0, 0, None) == [] and pick_exemplars([], 2, 0, 0, None) == []


def test_few_shot_rate_respected():
    bank = TemplateBank(("Q: {instruction}",), few_shot=2, few_shot_rate=0.3)
    shots = Counter()
    for index in range(N):
        k = index % len(POOL)
        out = template_example(POOL[k], bank, 5, index, POOL, pool_index=k)
        shots[out["few_shot"]] += 1
        assert out["messages"][0]["content"].endswith(f"Q: {POOL[k]['messages'][0]['content']}")
        assert out["messages"][0]["content"].count("Q: ") == out["few_shot"] + 1
    assert set(shots) == {0, 2}
    assert abs(shots[2] / N - 0.3) < 0.04, shots
    # Zero-shot banks ignore exemplars.
    zero = dataclasses.replace(bank, few_shot=0)
    assert not any(uses_few_shot(zero, 5, i) for i in range(100))
    assert apply_template(POOL[0], zero, 5, 0, POOL[1:3])["few_shot"] == 0


def test_fields_of():
    example = qa("Add.\n\n2 3", "5", system="Be brief.", instruction="Add.", input="2 3", n=None)
    assert fields_of(example) == {
        "instruction": "Add.\n\n2 3",
        "input": "2 3",
        "output": "5",
        "system": "Be brief.",
    }


def test_from_config():
    cfg = ml_collections.ConfigDict(
        {"templates": ["Q: {instruction}", "{instruction}?"], "few_shot": 2, "few_shot_rate": 0.5}
    )
    bank = TemplateBank.from_config(cfg)
    assert bank.templates == ("Q: {instruction}", "{instruction}?") and bank.few_shot == 2
    assert TemplateBank.from_config("instruction") is INSTRUCTION_BANK
    with pytest.raises(ValueError, match=r"unknown keys \['k', 'rate'\]"):
        TemplateBank.from_config({"templates": ["{instruction}"], "k": 1, "rate": 0.5})
    with pytest.raises(ValueError, match="unknown template bank 'flan'"):
        TemplateBank.from_config("flan")


def test_missing_field_names_template_field_and_origin():
    bank = TemplateBank(("Context: {context}\n{instruction}",))
    with pytest.raises(ValueError, match=r"toy.jsonl:9: template 'Context: .*'context'"):
        apply_template(qa("Why?", "Because.", line=9), bank, 0, 0)
    # An exemplar lacking the field is named by its own origin.
    shot = TemplateBank(("{question}",), few_shot=1, few_shot_rate=1.0)
    with pytest.raises(ValueError, match=r"toy.jsonl:2: .*'question'"):
        apply_template(qa("a", "b", 1, question="a"), shot, 0, 0, [qa("c", "d", 2)])


def test_multi_turn_rejected_with_origin():
    example = qa("Hi", "Hello", line=4)
    example["messages"] += [
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    with pytest.raises(ValueError, match="toy.jsonl:4: .*single-turn"):
        apply_template(example, INSTRUCTION_BANK, 0, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"templates": ()}, "non-empty"),
        ({"templates": "{instruction}"}, "non-empty"),
        ({"templates": ("Say hi.",)}, "no placeholder"),
        ({"templates": ("{instruction} {output}",)}, "output"),
        ({"templates": ("{0}",)}, "plain names"),
        ({"templates": ("{instruction",)}, "not a str.format"),
        ({"templates": ("{instruction}",), "few_shot": -1}, "few_shot"),
        ({"templates": ("{instruction}",), "few_shot_rate": 1.5}, "few_shot_rate"),
    ],
)
def test_bad_banks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemplateBank(**kwargs)


def test_default_banks():
    for bank in (GSM8K_BANK, INSTRUCTION_BANK):
        assert len(bank.templates) >= 6 and len(set(bank.templates)) == len(bank.templates)
        assert all("{instruction}" in t for t in bank.templates)


def test_gsm8k_bank_on_shared_data(shared_dir):
    from itune.data.sources import SourceSpec, read_source

    path = shared_dir / "data" / "gsm8k" / "train.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    spec = SourceSpec(
        name="gsm8k",
        path=str(path),
        format="alpaca",
        field_map={"instruction": "question", "output": "answer"},
    )
    examples = [ex for _, ex in zip(range(200), read_source(spec))]
    assert len(examples) == 200
    few_shot = dataclasses.replace(GSM8K_BANK, few_shot=2, few_shot_rate=0.5)
    used = Counter()
    for i, example in enumerate(examples):
        question, answer = (m["content"] for m in example["messages"])
        for bank in (GSM8K_BANK, few_shot):
            out = template_example(example, bank, 0, i, examples, pool_index=i)
            user, assistant = (m["content"] for m in out["messages"])
            assert question in user and user.endswith(
                GSM8K_BANK.templates[out["template"]].format(instruction=question)
            )
            assert [m["role"] for m in out["messages"]] == ["user", "assistant"]
            assert assistant == answer
            assert out["origin"] == example["origin"] and out["source"] == "gsm8k"
            used[out["template"], out["few_shot"]] += 1
            # Only the exemplars' answers are in the prompt, never the query's.
            assert user.count("####") == out["few_shot"]
    assert {t for t, _ in used} == set(range(len(GSM8K_BANK.templates)))
    assert 60 < sum(n for (_, k), n in used.items() if k == 2) < 140, used
