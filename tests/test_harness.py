"""Prompt-set loading and its errors, evaluation with a fake generator, reports, the shipped set."""

import collections
import json

import pytest

from itune.evaluation import harness, ifeval
from itune.evaluation import report as report_lib

GSM8K = [
    {"question": "How many rolls are on 6 trays of 12?", "answer": "6 * 12 = 72\n#### 72"},
    {"question": "Tom has 5 apples and buys 7. How many?", "answer": "5 + 7 = 12\n#### 12"},
    {"question": "What is 1,000 + 500?", "answer": "#### 1,500"},
]
IFEVAL = [
    {
        "key": 11,
        "prompt": "Reply briefly without commas.",
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
        "kwargs": [{}, {"num_words": 10, "relation": "less than"}],
    },
    {
        "key": 12,
        "prompt": "Say goodbye in lowercase, ending with 'bye.'",
        "instruction_id_list": ["change_case:english_lowercase", "startend:end_checker"],
        "kwargs": [{}, {"end_phrase": "bye."}],
    },
]
ROUGE = [
    {"prompt": "Describe the cat.", "reference": "the cat sat on the mat"},
    {"prompt": "Where is the cat?", "reference": "the cat lay on a mat"},
]
ANSWERS = {
    GSM8K[0]["question"]: "6 trays of 12 make 72.\n#### 72",
    GSM8K[1]["question"]: "#### 10",
    GSM8K[2]["question"]: "I think it is 1500.",
    IFEVAL[0]["prompt"]: "Yes, short.",
    IFEVAL[1]["prompt"]: "Here it is:\nall lowercase text. bye.",
    ROUGE[0]["prompt"]: "The cat sat on the mat.",
    ROUGE[1]["prompt"]: "the cat sat on the mat",
}


def _write(path, records):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def prompt_sets(tmp_path):
    return [
        harness.load_prompt_set(_write(tmp_path / "gsm.jsonl", GSM8K)),
        harness.load_prompt_set(_write(tmp_path / "instructions.jsonl", IFEVAL)),
        harness.load_prompt_set(_write(tmp_path / "summaries.jsonl", ROUGE)),
    ]


class FakeGenerate:
    """Answers by looking the last user turn up in a table; records every call and its answer
    length."""

    def __init__(self, answers):
        self.answers, self.calls, self.max_new_tokens = answers, [], []

    def __call__(self, chats, *, max_new_tokens):
        self.calls.append(chats)
        self.max_new_tokens.append(max_new_tokens)
        return [self.answers[chat[-1]["content"]] for chat in chats]


def test_kinds_names_and_chats(prompt_sets):
    assert [(s.name, s.kind, len(s.records)) for s in prompt_sets] == [
        ("gsm", "exact_match", 3),
        ("instructions", "ifeval", 2),
        ("summaries", "rouge", 2),
    ]
    assert prompt_sets[0].chats()[1] == [{"role": "user", "content": GSM8K[1]["question"]}]
    assert prompt_sets[1].chats()[0] == [{"role": "user", "content": IFEVAL[0]["prompt"]}]


def test_messages_replace_the_prompt(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Describe the cat."},
    ]
    path = _write(tmp_path / "chat.jsonl", [{"messages": messages, "reference": "a cat"}])
    prompt_set = harness.load_prompt_set(path)
    assert prompt_set.kind == "rouge"
    assert prompt_set.chats() == [messages]


def test_name_limit_and_offset(tmp_path):
    path = _write(tmp_path / "gsm.jsonl", ["\n", *GSM8K])
    prompt_set = harness.load_prompt_set(path, limit=1, offset=1, name="gsm8k_test")
    assert prompt_set.name == "gsm8k_test"
    assert prompt_set.records == [GSM8K[1]]
    assert harness.load_prompt_set(path, offset=2).records == [GSM8K[2]]
    with pytest.raises(ValueError, match="select none of 3"):
        harness.load_prompt_set(path, offset=3)


GOOD_IFEVAL = json.dumps(IFEVAL[0]) + "\n"


def _ifeval(**changes):
    return dict(IFEVAL[0], **changes)


@pytest.mark.parametrize(
    "lines, line, words",
    [
        ([GOOD_IFEVAL, '{"key": 2, "prompt": \n'], 2, ["malformed JSON"]),
        ([GOOD_IFEVAL, "[1, 2]\n"], 2, ["JSON object"]),
        ([{"prompt": "p"}], 1, ["instruction_id_list", "answer", "reference"]),
        ([{"answer": "#### 3"}], 1, ["missing field 'question'"]),
        ([{"question": "q", "answer": "three"}], 1, ["'answer'", "####"]),
        ([{"prompt": " ", "reference": "r"}], 1, ["'prompt'"]),
        ([{"prompt": "p", "reference": 3}], 1, ["'reference'"]),
        ([{"prompt": "p", "reference": "r", "answer": "#### 1"}], 1, ["ambiguous"]),
        (["\n", GSM8K[0], {"prompt": "p", "reference": "r"}], 3, ["'reference'", "line 2"]),
        ([_ifeval(instruction_id_list=["no:such_check"], kwargs=[{}])], 1, ["no:such_check"]),
        ([_ifeval(instruction_id_list=[])], 1, ["'instruction_id_list'"]),
        ([_ifeval(kwargs=[{}])], 1, ["'kwargs'", "1 entries for 2 instructions"]),
        ([{k: v for k, v in IFEVAL[0].items() if k != "kwargs"}], 1, ["missing field 'kwargs'"]),
        ([_ifeval(kwargs=[{}, {"relation": "less than"}])], 1, ["'kwargs' item 1", "'num_words'"]),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "x"},
                    ],
                    "reference": "r",
                }
            ],
            1,
            ["'messages'", "user turn"],
        ),
        ([{"messages": [{"role": "robot", "content": "hi"}], "reference": "r"}], 1, ["'messages'"]),
    ],
)
def test_loading_errors_name_file_line_and_field(tmp_path, lines, line, words):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as error:
        harness.load_prompt_set(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: ")
    for word in words:
        assert word in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="no such prompt set file.*ifeval_sample"):
        harness.load_prompt_set(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="no records"):
        harness.load_prompt_set(_write(tmp_path / "empty.jsonl", ["\n"]))


EXPECTED_MARKDOWN = """\
| task | kind | n | exact_match | answer_form | prompt_strict | prompt_loose | instruction_strict | instruction_loose | rouge_l |
|---|---|---|---|---|---|---|---|---|---|
| gsm | exact_match | 3 | **33.3%** | 66.7% |  |  |  |  |  |
| instructions | ifeval | 2 |  |  | **0.0%** | 50.0% | 50.0% | 75.0% |  |
| summaries | rouge | 2 |  |  |  |  |  |  | **83.3%** |

**overall: 38.9%**, the mean over tasks of each task's primary metric (exact_match for \
exact_match, prompt_strict for ifeval, rouge_l for rouge)."""


def test_evaluate_with_a_fake_generator(prompt_sets):
    generate = FakeGenerate(ANSWERS)
    report = harness.evaluate(prompt_sets, generate)
    # One call per prompt set, with all of its chats.
    assert [len(chats) for chats in generate.calls] == [3, 2, 2]
    gsm, instructions, summaries = report.tasks
    assert (gsm.n, gsm.metrics) == (3, pytest.approx({"exact_match": 1 / 3, "answer_form": 2 / 3}))
    assert instructions.metrics == {
        "prompt_strict": 0.0,
        "prompt_loose": 0.5,
        "instruction_strict": 0.5,
        "instruction_loose": 0.75,
    }
    # The second answer shares "the cat on mat" with its reference: F = 2/3.
    assert summaries.metrics == pytest.approx({"rouge_l": (1 + 2 / 3) / 2})
    assert report.overall == pytest.approx((1 / 3 + 0 + 5 / 6) / 3)
    assert report.markdown() == EXPECTED_MARKDOWN


def test_examples_keep_prompt_response_and_scores(prompt_sets):
    report = harness.evaluate(prompt_sets, FakeGenerate(ANSWERS))
    outputs = report.outputs()
    assert len(outputs) == 7
    assert outputs[1] == {
        "task": "gsm",
        "index": 1,
        "prompt": GSM8K[1]["question"],
        "response": "#### 10",
        "reference": GSM8K[1]["answer"],
        "scores": {"expected": "12", "extracted": "10", "correct": False, "answer_form": True},
    }
    assert outputs[3]["key"] == 11
    assert outputs[3]["scores"]["strict"] == [False, True]
    assert outputs[6]["scores"] == {"rouge_l": pytest.approx(2 / 3)}


def test_write_report(prompt_sets, tmp_path):
    report = harness.evaluate(prompt_sets, FakeGenerate(ANSWERS))
    paths = report.write(str(tmp_path / "out"), "step_100")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "step_100.json",
        "step_100.md",
        "step_100_outputs.jsonl",
    ]
    summary = json.loads(open(paths["json"]).read())
    assert summary["overall"] == pytest.approx(7 / 18)
    assert "primary metric" in summary["overall_definition"]
    assert summary["tasks"]["gsm"] == {
        "kind": "exact_match",
        "n": 3,
        "max_new_tokens": 256,
        "primary_metric": "exact_match",
        "metrics": pytest.approx({"exact_match": 1 / 3, "answer_form": 2 / 3}),
    }
    assert open(paths["markdown"]).read() == EXPECTED_MARKDOWN + "\n"
    lines = open(paths["outputs"]).read().splitlines()
    assert [json.loads(line)["task"] for line in lines] == ["gsm"] * 3 + ["instructions"] * 2 + [
        "summaries"
    ] * 2


def test_generate_must_answer_every_chat(prompt_sets):
    with pytest.raises(ValueError, match="3 chats of 'gsm', got 2 answers"):
        harness.evaluate(prompt_sets[:1], lambda chats, max_new_tokens: ["#### 1"] * 2)


def test_prompt_set_names_must_be_unique(prompt_sets):
    with pytest.raises(ValueError, match="repeated: gsm"):
        harness.evaluate([prompt_sets[0], prompt_sets[0]], FakeGenerate(ANSWERS))


def test_empty_report():
    report = harness.evaluate([], FakeGenerate({}))
    assert report.overall is None
    assert report.to_json()["tasks"] == {}


def test_shipped_ifeval_sample():
    prompt_set = harness.load_prompt_set("ifeval_sample")
    assert prompt_set.name == "ifeval_sample" and prompt_set.kind == "ifeval"
    assert harness.BUILTIN_PROMPT_SETS["ifeval_sample"].endswith("ifeval_sample.jsonl")
    assert 25 <= len(prompt_set.records) <= 40
    assert len({r["key"] for r in prompt_set.records}) == len(prompt_set.records)
    uses = collections.Counter()
    for record in prompt_set.records:
        assert 1 <= len(record["instruction_id_list"]) <= 3
        for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
            assert instruction_id in ifeval.CHECKERS
            ifeval.arguments(instruction_id, kwargs)
            uses[instruction_id] += 1
    assert {i: uses[i] for i in ifeval.CHECKERS if uses[i] < 2} == {}


def test_each_kind_answers_at_its_own_length_unless_told(prompt_sets):
    assert harness.KINDS["ifeval"].max_new_tokens == 1280  # IFEval's published protocol.
    generate = FakeGenerate(ANSWERS)
    report = harness.evaluate(prompt_sets, generate)
    assert generate.max_new_tokens == [256, 1280, 256]
    assert [t.max_new_tokens for t in report.tasks] == [256, 1280, 256]
    assert report.to_json()["tasks"]["instructions"]["max_new_tokens"] == 1280
    generate = FakeGenerate(ANSWERS)
    harness.evaluate(prompt_sets, generate, max_new_tokens=16)
    assert generate.max_new_tokens == [16, 16, 16]


def _length_score(record, response):
    return {"short": len(response.split()) <= record["max_words"]}


def test_a_new_kind_is_one_entry_of_the_table(tmp_path, monkeypatch):
    records = [
        {"prompt": "Describe the cat.", "max_words": 3, "group": "animals"},
        {"prompt": "Where is the cat?", "max_words": 3, "group": "animals"},
        {"prompt": "Name a colour.", "max_words": 1, "group": "colours"},
    ]
    path = _write(tmp_path / "brief.jsonl", records)
    with pytest.raises(ValueError, match="cannot tell the record's kind"):
        harness.load_prompt_set(path)
    monkeypatch.setitem(
        harness.KINDS,
        "length",
        harness.TaskKind(
            "length",
            score=_length_score,
            aggregate=harness.mean_of(short="short"),
            metrics=("short",),
            primary="short",
            max_new_tokens=128,
            marker="max_words",
        ),
    )
    prompt_set = harness.load_prompt_set(path)
    assert prompt_set.kind == "length"
    generate = FakeGenerate({**ANSWERS, "Name a colour.": "Blue.", ROUGE[0]["prompt"]: "A cat."})
    report = harness.evaluate(
        [prompt_set, harness.load_prompt_set(_write(tmp_path / "s.jsonl", ROUGE))], generate
    )
    assert generate.max_new_tokens == [128, 256]
    brief = report.tasks[0]
    assert (brief.kind, brief.n, brief.metrics) == ("length", 3, {"short": pytest.approx(2 / 3)})
    assert brief.groups == {
        "animals": {"n": 2, "metrics": {"short": 0.5}},
        "colours": {"n": 1, "metrics": {"short": 1.0}},
    }
    assert brief.examples[2]["group"] == "colours"
    assert report.overall == pytest.approx((2 / 3 + report.tasks[1].primary) / 2)
    assert "short for length" in report.to_json()["overall_definition"]
    lines = report.markdown().splitlines()
    assert lines[0] == "| task | kind | n | short | rouge_l |"
    assert lines[2:5] == [
        "| brief | length | 3 | **66.7%** |  |",
        "| brief/animals | length | 2 | **50.0%** |  |",
        "| brief/colours | length | 1 | **100.0%** |  |",
    ]


def test_transcripts_are_kept_but_not_scored(tmp_path):
    chats = [{"messages": [{"role": "user", "content": ROUGE[0]["prompt"]}], "reference": "r"}]
    sets = [
        harness.PromptSet("notes_samples", "transcript", chats),
        harness.load_prompt_set(_write(tmp_path / "s.jsonl", ROUGE)),
    ]
    report = harness.evaluate(sets, FakeGenerate(ANSWERS))
    samples, summaries = report.tasks
    assert (samples.metrics, samples.primary) == ({}, None)
    assert report.overall == summaries.primary
    assert report.to_json()["tasks"]["notes_samples"]["primary_metric"] is None
    assert samples.examples[0]["reference"] == "r"
    assert report_lib.transcript(samples.examples[0]) == (
        "[notes_samples] Describe the cat.\n--- answer ---\nThe cat sat on the mat.\n"
        "--- reference ---\nr"
    )
    report = harness.evaluate(sets[:1], FakeGenerate(ANSWERS))
    assert report.overall is None and "overall" not in report.markdown()


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown task kind 'poetry'.*ifeval"):
        harness.evaluate([harness.PromptSet("p", "poetry", [{"prompt": "x"}])], FakeGenerate({}))


def _builtin_answers(prompt_set):
    """Fixed answers by position: wrong at every third and seventh prompt, the target otherwise
    (every other one with its spaces stretched, which exact match ignores)."""
    answers = []
    for i, record in enumerate(prompt_set.records):
        if i % 3 == 0 or i % 7 == 0:
            answers.append("wrong")
        elif i % 2:
            answers.append("  " + record["answer"].replace(" ", "   ") + "\n")
        else:
            answers.append(record["answer"])
    return answers


def test_builtin_kind_scores_as_the_builtin_evaluation_did():
    from configs import smoke
    from itune.evaluation import builtin

    data_config = smoke.get_config("runlocal").data
    prompt_set = builtin.prompt_set(data_config, 3)
    assert (prompt_set.name, prompt_set.kind, len(prompt_set.records)) == ("builtin", "builtin", 60)
    assert prompt_set.chats()[0][-1]["content"] == "Work out the value of 1 + 0."
    answers = _builtin_answers(prompt_set)
    generate = lambda chats, max_new_tokens: answers  # noqa: E731
    report = harness.evaluate([prompt_set], generate)
    # The numbers of the evaluation before the task kinds, on these answers.
    third, two_thirds = 1 / 3, 2 / 3
    expected = {
        "trained_templates": {
            "exact_match": 0.5666666666666667,
            "per_family": dict(
                zip(
                    data_config.builtin.families or builtin.synthetic_tasks.FAMILIES,
                    [two_thirds, two_thirds, third, two_thirds, third]
                    + [two_thirds, two_thirds, two_thirds, two_thirds, third],
                )
            ),
        },
        "held_out_templates": {
            "exact_match": 0.5666666666666667,
            "per_family": dict(
                zip(
                    data_config.builtin.families or builtin.synthetic_tasks.FAMILIES,
                    [two_thirds, third, two_thirds, two_thirds, two_thirds]
                    + [two_thirds, third, two_thirds, third, two_thirds],
                )
            ),
        },
    }
    assert builtin.group_results(report) == expected
    assert list(expected["trained_templates"]["per_family"])[:2] == ["arithmetic", "reverse"]
    (task,) = report.tasks
    assert task.max_new_tokens == 24 and task.primary == task.metrics["exact_match"]
    assert task.examples[0] == {
        "task": "builtin",
        "index": 0,
        "group": "trained_templates",
        "family": "arithmetic",
        "prompt": "Work out the value of 1 + 0.",
        "response": "wrong",
        "reference": "1",
        "scores": {"correct": False},
    }
    markdown = report.markdown()
    assert "| builtin/held_out_templates | builtin | 30 | **56.7%** |" in markdown
    assert "| family | trained templates | held out templates |" in markdown
    assert "| arithmetic | 66.7% | 66.7% |" in markdown
    assert "| **mean** | **56.7%** | **56.7%** |" in markdown
    assert report_lib.one_line(task.examples[1]).startswith("[ok ] [builtin/trained_templates/")


def test_a_config_without_data_sources_is_scored_on_the_builtin_families():
    from configs import smoke
    from itune.evaluation import tasks

    config = smoke.get_config("runlocal")
    (prompt_set,) = tasks.prompt_sets(config)
    assert (prompt_set.kind, len(prompt_set.records)) == ("builtin", 2 * 10)
    with config.unlocked():
        config.eval.prompt_sets = ("ifeval_sample",)
    sets = tasks.prompt_sets(config, limit=2)
    assert [(s.name, len(s.records)) for s in sets] == [("builtin", 20), ("ifeval_sample", 2)]


# "-" with no space after it: a bullet by the official checker's rule, not by itune's.
BULLETS = {
    "key": 21,
    "prompt": "List two fruits as bullets.",
    "instruction_id_list": ["detectable_format:number_bullet_lists"],
    "kwargs": [{"num_bullets": 2}],
}


def test_ifeval_official_rules_reach_the_scorer(tmp_path, monkeypatch):
    from configs import smoke
    from itune.evaluation import ifeval_text, tasks

    path = _write(tmp_path / "bullets.jsonl", [BULLETS])
    generate = FakeGenerate({BULLETS["prompt"]: "-apple\n-pear"})
    (itune_rules,) = harness.evaluate([harness.load_prompt_set(path)], generate).tasks
    assert itune_rules.examples[0]["scores"]["strict"] == [False]
    nltk_checks = []
    monkeypatch.setattr(ifeval_text, "official_nltk", lambda: nltk_checks.append(True))
    config = smoke.get_config("runlocal")
    with config.unlocked():
        config.eval.prompt_sets = (path,)
        config.eval.ifeval_official = True
    builtin_set, bullets = tasks.prompt_sets(config)
    assert nltk_checks == [True]
    assert (builtin_set.options, bullets.options) == ({}, {"official": True})
    (official_rules,) = harness.evaluate([bullets], generate).tasks
    assert official_rules.examples[0]["scores"]["strict"] == [True]


def test_ifeval_official_rules_without_nltk_fail_before_generating(tmp_path, monkeypatch):
    import sys

    from itune.errors import UserError
    from itune.evaluation import tasks

    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk raises ImportError
    sets = [harness.load_prompt_set(_write(tmp_path / "bullets.jsonl", [BULLETS]))]
    with pytest.raises(UserError, match=r"pip install nltk && python -m nltk.downloader punkt_tab"):
        tasks.official_ifeval(sets)
    assert sets[0].options == {}
    # Without an IFEval set there is nothing to check.
    rouge = harness.load_prompt_set(_write(tmp_path / "summaries.jsonl", ROUGE))
    tasks.official_ifeval([rouge])
    assert rouge.options == {}
