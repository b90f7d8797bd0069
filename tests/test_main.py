"""The main job end to end from the command line: train, evaluate, save, resume."""

import json
import os
import subprocess
import sys

from tests.conftest import HANG_GUARD_S, REPO


def _train(workdir, *overrides):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # One CPU device, as a user would have.
    cmd = [
        sys.executable,
        "-m",
        "itune.cli.train",
        f"--config={REPO / 'configs/smoke.py'}:runlocal",
        f"--workdir={workdir}",
        *overrides,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO)


def test_cli_trains_evaluates_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    first = _train(workdir, "--config.train.num_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((workdir / "eval_results.json").read_text())
    for group in ("trained_templates", "held_out_templates"):
        assert 0.0 <= results[group]["exact_match"] <= 1.0
        assert len(results[group]["per_family"]) >= 8
    assert "| **mean** |" in first.stdout + first.stderr
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l["train"] for l in lines if "train" in l]
    assert {
        "loss",
        "accuracy",
        "learning_rate",
        "grad_norm",
        "tokens_per_sec",
        "trained_tokens_per_sec",
        "step_time",
        "data_wait",
        "mfu",
    } <= set(train_lines[0])
    assert 0 < train_lines[-1]["mfu"] < 1
    assert (workdir / "checkpoints" / "4").is_dir()
    assert (workdir / "tokenizer").is_dir()

    # Same workdir, more steps: resumes at step 4 and reuses the cached tokenizer.
    second = _train(workdir, "--config.train.num_steps=6")
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "Restoring checkpoint at step 4" in log and "Reusing SentencePiece model" in log
    assert (workdir / "checkpoints" / "6").is_dir()
    steps = [
        json.loads(l)["step"]
        for l in (workdir / "metrics.jsonl").read_text().splitlines()
        if "train" in json.loads(l)
    ]
    assert steps[-2:] == [5, 6] and 4 in steps


def test_misspelt_override_on_the_cli_names_the_key(tmp_path):
    result = _train(tmp_path / "bad", "--config.optim.learnig_rate=1")
    assert result.returncode != 0 and "learnig_rate" in result.stderr
    assert "Traceback" not in result.stderr
