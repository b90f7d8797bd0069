"""itune-convert and itune-generate end to end on the real SmolLM2 GGUF, and on a training run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import HANG_GUARD_S, REPO

GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def _run(module, *args, timeout=HANG_GUARD_S, input_text=None, python_options=()):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # One CPU device, as a user would have.
    cmd = [sys.executable, *python_options, "-m", module, *map(str, args)]
    return subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        input=input_text,
    )


@pytest.fixture(scope="module")
def converted(shared_dir, tmp_path_factory):
    """The GGUF converted to an itune folder, and that folder to a Hugging Face one."""
    root = tmp_path_factory.mktemp("convert")
    itune_dir, hf_dir = root / "smollm2", root / "smollm2_hf"
    first = _run("itune.cli.convert", shared_dir / GGUF, itune_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run("itune.cli.convert", itune_dir, hf_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    return itune_dir, hf_dir


def test_gguf_to_itune_to_hugging_face_keeps_the_logits(converted):
    import torch
    import transformers

    from itune.convert import model_dir

    itune_dir, hf_dir = converted
    # The model keeps SmolLM2's own chat template (in tokenizer/), not a built-in format.
    assert json.loads((itune_dir / "model.json").read_text())["chat_format"] is None
    hf_template = json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert "You are a helpful AI assistant named SmolLM" in hf_template
    assert (hf_dir / "config.json").exists() and (hf_dir / "model.safetensors").exists()
    loaded = model_dir.load_model(str(itune_dir))
    ids = loaded.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    tokens = np.asarray([ids], np.int32)
    ours = np.asarray(
        loaded.model(tokens, np.arange(len(ids))[None], np.ones_like(tokens)), np.float32
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = reference(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    error = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(
        f"itune folder vs transformers on its Hugging Face export: max relative error {error:.2e}"
    )
    assert error < 1e-4
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tokenizer.encode("Natalia sold 48 clips.", add_special_tokens=False) == (
        loaded.tokenizer.encode("Natalia sold 48 clips.")
    )


def test_itune_generate_answers_a_question_with_the_converted_model(converted, tmp_path):
    itune_dir, _ = converted
    out = tmp_path / "answers.jsonl"
    result = _run(
        "itune.cli.generate",
        f"--checkpoint={itune_dir}",
        "--prompt=What is the capital of France?",
        "--max_new_tokens=16",
        f"--output={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    answer = json.loads(out.read_text().splitlines()[0])["answer"]
    assert "Paris" in answer and "Paris" in result.stdout


def test_conversion_errors_are_one_line_and_leave_nothing_behind(converted, tmp_path):
    itune_dir, _ = converted
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    result = _run("itune.cli.convert", not_a_model, tmp_path / "out")
    assert result.returncode != 0 and "not a model" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    result = _run("itune.cli.convert", itune_dir, itune_dir)
    assert result.returncode != 0 and "exists" in result.stderr
    # A tensor of the wrong shape in a Hugging Face folder: named, and no output written.
    broken = tmp_path / "broken"
    result = _run("itune.cli.convert", itune_dir, broken)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    result = _run("itune.cli.convert", broken, tmp_path / "from_broken")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "mlp" in result.stderr and "shape" in result.stderr
    assert not (tmp_path / "from_broken").exists()
    assert not (tmp_path / "from_broken.partial").exists()


def test_a_training_run_exports_to_hugging_face(tmp_path):
    import torch
    import transformers

    from itune.convert import model_dir

    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "itune.cli.train",
            f"--config={REPO / 'configs/smoke.py'}:runlocal",
            f"--workdir={workdir}",
            "--config.train.num_steps=2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    result = _run("itune.cli.convert", workdir, tmp_path / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = model_dir.load_model(str(workdir))
    assert loaded.chat_format == "chatml"
    ids = loaded.tokenizer.encode("Add 3 and 4.")
    tokens = np.asarray([ids], np.int32)
    ours = np.asarray(loaded.model(tokens, np.arange(len(ids))[None], np.ones_like(tokens)))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32
    )
    with torch.no_grad():
        theirs = reference(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4
