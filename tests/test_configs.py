"""Every shipped config builds and trains one step in its shrunk (``runlocal``) form.

``smollm2_gsm8k`` is checked the same way by ``tests/test_pretrained.py``, which runs it as
``itune-train`` (a run of the real model takes minutes on a CPU; one is enough).
"""

import importlib.util
import json
import threading

import pytest

from itune.training.trainer import train_and_evaluate
from tests.conftest import REPO

RUN_AS_ITUNE_TRAIN = {"smollm2_gsm8k"}  # By tests/test_pretrained.py.
CONFIGS = sorted(
    p
    for p in (REPO / "configs").glob("*.py")
    if not p.name.startswith("_") and p.stem not in RUN_AS_ITUNE_TRAIN
)


def _load(path, arg):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_runs_one_step(path, tmp_path, request):
    if "NEEDS_SHARED" in path.read_text():
        request.getfixturevalue("shared_dir")  # Skips (or fails in CI) without ../shared.
    config = _load(path, "runlocal")
    with config.unlocked():
        config.train.num_steps = 1
    threads = {t.ident for t in threading.enumerate()}
    results = train_and_evaluate(config, str(tmp_path))
    # The run stops the threads it started (the input pipeline's reader, Orbax's writers), so
    # runs in one process (a notebook) do not pile them up. tqdm's monitor is tqdm's own.
    left = [t.name for t in threading.enumerate() if t.ident not in threads]
    assert set(left) <= {"tqdm_monitor"}, left
    assert "eval_loss" in results and results["eval_loss_per_source"]
    if not config.data.sources:
        assert set(results) >= {"trained_templates", "held_out_templates"}
    elif config.eval.prompts_per_source:  # Greedy answers to held-out prompts and references.
        (samples,) = (tmp_path / "samples").glob("step_*.txt")
        assert samples.read_text().count("--- reference ---") == (
            config.eval.prompts_per_source * len(config.data.sources)
        )
    if config.eval.exact_match_sources or config.eval.prompt_sets:  # Generative tasks scored.
        report = json.loads((tmp_path / "eval" / "step_0000001.json").read_text())
        assert report["tasks"] and report["overall"] is not None
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["num_steps"] == 1
    assert (tmp_path / "checkpoints" / "1").is_dir()
