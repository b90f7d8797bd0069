"""itune-generate (sampling flags), itune-chat and itune-eval end to end on the real SmolLM2."""

import importlib.util
import json
import re

import pytest

from itune.cli.chat import converse
from tests.test_convert_cli import GGUF, _run


@pytest.fixture(scope="module")
def gguf(shared_dir):
    return shared_dir / GGUF


def test_itune_generate_samples_reproducibly_with_a_seed(gguf, tmp_path):
    outputs = []
    for seed in (1, 1, 2):
        out = tmp_path / f"answers_{len(outputs)}.jsonl"
        result = _run(
            "itune.cli.generate",
            f"--checkpoint={gguf}",
            "--prompt=Write a short poem about the sea.",
            "--prompt=Name a color.",
            "--max_new_tokens=12",
            "--temperature=1.0",
            "--top_p=0.9",
            "--top_k=50",
            f"--seed={seed}",
            f"--output={out}",
            python_options=("-X", "importtime"),  # Each import, on stderr.
        )
        assert result.returncode == 0, result.stderr[-3000:]
        # TensorFlow feeds training data only; importing it would add seconds to every start.
        assert not re.search(r"\|\s*tensorflow$", result.stderr, re.M)
        outputs.append([json.loads(line)["answer"] for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2
    assert outputs[0] != outputs[2]


def test_itune_chat_keeps_the_conversation(gguf, tmp_path):
    session = "My name is Ada.\nWhat is my name?\n/exit\nThis line is never read.\n"
    result = _run("itune.cli.chat", f"--checkpoint={gguf}", "--max_new_tokens=24", input_text=session)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    answers = [a.strip() for a in result.stdout.split("\n\n") if a.strip()]
    assert len(answers) == 2
    # The second answer is the model's answer to the whole conversation, first answer included.
    conversation = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "What is my name?"},
    ]
    prompts = tmp_path / "conversation.jsonl"
    prompts.write_text(json.dumps({"messages": conversation}) + "\n")
    out = tmp_path / "answer.jsonl"
    result = _run(
        "itune.cli.generate",
        f"--checkpoint={gguf}",
        f"--prompts_file={prompts}",
        "--max_new_tokens=24",
        f"--output={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(out.read_text())["answer"] == answers[1]


def test_converse_sends_the_whole_conversation_and_resets():
    seen = []

    def respond(chats):
        seen.append([dict(m) for m in chats[0]])
        return [f"answer {len(seen)}"]

    printed = []
    messages = converse(respond, ["hi", "", "again", "/reset", "new"], printed.append, "be brief")
    assert [len(s) for s in seen] == [2, 4, 2]
    assert seen[1][2] == {"role": "assistant", "content": "answer 1"}
    assert seen[2][0] == {"role": "system", "content": "be brief"}
    assert messages[-1]["content"] == "answer 3" and "(new conversation)\n" in printed


def test_itune_eval_reports_every_task_kind(gguf, tmp_path):
    rouge = tmp_path / "capitals.jsonl"
    rouge.write_text(
        json.dumps({"prompt": "What is the capital of France?", "reference": "Paris"}) + "\n"
    )
    math = tmp_path / "math.jsonl"
    math.write_text(
        json.dumps({"question": "What is 2 + 3? End with '#### <number>'.", "answer": "#### 5"})
        + "\n"
    )
    result = _run(
        "itune.cli.eval",
        f"--checkpoint={gguf}",
        f"--prompt_sets={rouge},{math},ifeval_sample",
        "--limit=2",
        "--max_new_tokens=16",
        f"--output_dir={tmp_path / 'report'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    tasks = report["tasks"]
    assert set(tasks) == {"capitals", "math", "ifeval_sample"}
    assert tasks["capitals"]["n"] == 1 and tasks["ifeval_sample"]["n"] == 2
    assert tasks["capitals"]["metrics"]["rouge_l"] > 0  # "Paris" is in the answer.
    assert set(tasks["ifeval_sample"]["metrics"]) == {
        "prompt_strict",
        "prompt_loose",
        "instruction_strict",
        "instruction_loose",
    }
    outputs = (tmp_path / "report" / "eval_outputs.jsonl").read_text().splitlines()
    assert len(outputs) == 4
    assert "| capitals | rouge |" in result.stdout


def test_itune_eval_names_a_bad_prompt_file(gguf, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "2 + 2?", "answer": "#### 4"}\n{"question": 3}\n')
    result = _run("itune.cli.eval", f"--checkpoint={gguf}", f"--prompt_sets={bad}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{bad}:2" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("nltk") is not None, reason="NLTK is installed")
def test_itune_eval_ifeval_official_without_nltk_ends_in_one_line(gguf):
    result = _run(
        "itune.cli.eval",
        f"--checkpoint={gguf}",
        "--prompt_sets=ifeval_sample",
        "--limit=1",
        "--max_new_tokens=1",
        "--ifeval_official",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("itune-eval: official IFEval scoring") and last.endswith(
        "pip install nltk && python -m nltk.downloader punkt_tab"
    )
    # It fails before the model is loaded and any answer generated.
    assert "Scoring" not in result.stderr
