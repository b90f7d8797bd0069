"""Training on file sources end to end: a vocabulary trained on them, eval loss per source."""

import json

from configs import smoke
from itune.training.trainer import train_and_evaluate


def test_train_two_steps_on_a_mixture_of_real_files(tmp_path, shared_dir):
    config = smoke.get_config("runlocal")
    with config.unlocked():
        config.data.sources = {
            "identity": {"path": str(shared_dir / "data/llamafactory/identity.json")},
            "seed_tasks": {
                "path": str(shared_dir / "data/self_instruct/seed_tasks.jsonl"),
                "format": "alpaca",
                "field_map": {"input": "instances.0.input", "output": "instances.0.output"},
            },
        }
        config.data.eval_examples_per_source = 8
        config.data.tokenizer.vocab_size = 1024
        config.train.num_steps = 2
    results = train_and_evaluate(config, str(tmp_path))
    assert set(results["eval_loss_per_source"]) == {"identity", "seed_tasks"}
    assert "trained_templates" not in results and results["eval_loss"] > 0
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["eval_loss_per_source"] == results["eval_loss_per_source"]
    assert list((tmp_path / "tokenizer").glob("spm_*.model"))
    # Training metrics carry each source's trained tokens and loss.
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [l["train"] for l in lines if "train" in l][-1]
    for name in ("identity", "seed_tasks"):
        assert f"loss/{name}" in train and f"trained_tokens/{name}" in train
    total = train["trained_tokens/identity"] + train["trained_tokens/seed_tasks"]
    assert abs(total - train["trained_tokens"]) < 1e-3
