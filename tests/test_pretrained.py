"""Fine-tuning a pretrained model: ``config.init_from`` (full and LoRA) on the real SmolLM2.

The runs are ``configs/smollm2_gsm8k.py`` in its ``runlocal`` form, through ``itune-train``.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tests.conftest import HANG_GUARD_S, REPO
from tests.test_convert_cli import GGUF

CONFIG = REPO / "configs/smollm2_gsm8k.py"


def _train(workdir, variant, *overrides):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "itune.cli.train",
        f"--config={CONFIG}:runlocal{variant}",
        f"--workdir={workdir}",
        "--config.train.num_steps=1",
        *overrides,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _flat(params):
    return {
        "/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(params)
    }


@pytest.fixture(scope="module")
def pretrained(shared_dir):
    from itune.convert import model_dir

    return _flat(model_dir.load_model(str(shared_dir / GGUF)).params)


def test_full_fine_tune_starts_from_the_pretrained_weights(shared_dir, pretrained, tmp_path):
    from itune.convert import model_dir

    # AdamW's first update moves each weight by at most the learning rate (|g| / (|g| + eps),
    # no weight decay in this config): the run started from the pretrained weights, and moved them.
    result = _train(tmp_path / "run", "", "--config.optim.learning_rate=1e-4")
    after = _flat(model_dir.load_model(str(tmp_path / "run")).params)
    assert after.keys() == pretrained.keys()
    for name, value in pretrained.items():
        np.testing.assert_allclose(after[name], value, rtol=1e-6, atol=1e-4, err_msg=name)
    assert any(not np.array_equal(after[k], v) for k, v in pretrained.items())
    # The held-out GSM8K problems were scored by exact match during training.
    report = json.loads((tmp_path / "run" / "eval" / "step_0000001.json").read_text())
    task = report["tasks"]["gsm8k_held_out"]
    assert task["n"] == 2 and set(task["metrics"]) == {"exact_match", "answer_form"}
    assert "gsm8k_held_out" in result.stdout + result.stderr
    # What tests/test_configs.py checks of every other shipped config.
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert "eval_loss" in results and set(results["eval_loss_per_source"]) == {"gsm8k"}
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["num_steps"] == 1 and saved["optim"]["weight_decay"] == 0.0
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


def test_lora_fine_tune_trains_only_adapters_on_the_pretrained_base(pretrained, tmp_path):
    from itune.convert import model_dir

    # The generative task is checked by the full fine-tune's run; without it this run is faster.
    _train(tmp_path / "lora", ",lora", "--config.eval.exact_match_sources=()")
    loaded = model_dir.load_model(str(tmp_path / "lora"))
    assert loaded.config.lora_rank == 16
    after = _flat(loaded.params)
    adapters = [k for k in after if "_lora_" in k]
    assert len(adapters) == 2 * 7  # A and B of each of the seven projections (stacked layers).
    for name, value in pretrained.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    assert any(np.abs(after[k]).sum() > 0 for k in adapters if k.endswith("_lora_b"))


def test_a_model_field_that_changes_shapes_is_refused():
    from itune.convert import run_model
    from tests.util import tiny_model_config

    base = tiny_model_config()
    section = {"preset": "", "d_model": 64, "dtype": "bfloat16", "vocab_size": 0}
    with pytest.raises(ValueError, match=r"model.d_model=64 \(the model has 32\)"):
        run_model.with_run_fields(section, base, "x.gguf")
    section["d_model"] = None
    assert run_model.with_run_fields(section, base, "x.gguf").dtype == "bfloat16"
