"""Exact resume: the input pipeline's state is checkpointed and continued in a new process."""

import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp

from tests.conftest import HANG_GUARD_S, REPO

# Runs the pipeline of a file mixture in a fresh process: from the start or from a saved state.
_SCRIPT = """
import hashlib, json, sys, threading
from configs import smoke
from itune.data import pipeline
from itune.data import spec as data_spec
from itune.training import feed
from itune import runtime
shared, workdir, mode, n, k = sys.argv[1:6]
config = smoke.get_config("runlocal")
with config.unlocked():
    config.data.sources = {
        "gsm8k": {"path": shared + "/data/gsm8k/train.jsonl", "format": "alpaca",
                  "field_map": {"instruction": "question", "output": "answer"}},
        "chats": {"path": shared + "/data/fastchat/dummy_conversation.json", "weight": 2.0},
    }
    config.data.seq_len = 256
    config.data.tokenizer.vocab_size = 1024
spec = data_spec.make_spec(config.data, workdir)
state = json.load(open(workdir + "/state.json"))[0] if mode == "resume" else None
states = pipeline.RowStates(1000)
stop = threading.Event()
ds, _ = pipeline.train_dataset(config.data, spec, state=state, states=states, stop=stop)
batches = feed.BatchIterator(ds, stop=stop)
for step in range(int(n)):
    batch = next(batches)
    last_row = int(batch.pop(pipeline.ROW_ID)[-1])
    digest = hashlib.sha256(b"".join(batch[key].tobytes() for key in sorted(batch))).hexdigest()
    print("BATCH", digest)
    if mode == "first" and step + 1 == int(k):
        json.dump(runtime.gather_json(states.after(last_row)), open(workdir + "/state.json", "w"))
batches.close()
"""


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line.split()[1] for line in result.stdout.splitlines() if line.startswith("BATCH")]


def test_pipeline_resumes_exactly_in_a_new_process(tmp_path, shared_dir):
    uninterrupted = _run(shared_dir, tmp_path, "first", 7, 3)
    resumed = _run(shared_dir, tmp_path, "resume", 4, 0)
    state = json.loads((tmp_path / "state.json").read_text())[0]
    # The state holds the stream position, the packer's open rows and the row count.
    shard = state["shards"]["0"]
    assert shard["stream"]["index"] > 0 and shard["packer"]["open"] and state["row_id"] == 3 * 8
    assert len(set(uninterrupted)) == 7
    assert resumed == uninterrupted[3:]


def _train(workdir, steps):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "itune.cli.train",
        f"--config={REPO / 'configs/smoke.py'}:runlocal",
        f"--workdir={workdir}",
        f"--config.train.num_steps={steps}",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_a_resumed_run_reaches_the_same_parameters_bit_for_bit(tmp_path):
    _train(tmp_path / "straight", 4)
    _train(tmp_path / "split", 2)
    log = _train(tmp_path / "split", 4)
    assert "Restoring checkpoint at step 2" in log and "replaying" not in log

    def params(workdir):
        with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "meta")) as m:
            restored = m.restore(
                4,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                ),
            )
        return restored.state["params"], restored.meta

    straight, straight_meta = params(tmp_path / "straight")
    split, split_meta = params(tmp_path / "split")
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(straight)]
    other = [np.asarray(x) for x in __import__("jax").tree.leaves(split)]
    assert len(leaves) == len(other) > 0
    for a, b in zip(leaves, other):
        np.testing.assert_array_equal(a, b)
    assert straight_meta["data_state"] == split_meta["data_state"]
