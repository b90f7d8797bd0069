"""Two JAX processes on this machine assemble the same global batches as one process, and each
reads only its share of the data files."""

import os
import socket
import subprocess
import sys

from tests.conftest import HANG_GUARD_S, REPO

_SCRIPT = """
import hashlib, sys, threading
import jax
num_processes, process_id, port, workdir, shared = map(str, sys.argv[1:6])
if int(num_processes) > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))
from jax.experimental import multihost_utils
from configs import smoke
from itune import sharding
from itune.data import held_out, pipeline
from itune.data import spec as data_spec
from itune.training import feed
config = smoke.get_config("runlocal")
with config.unlocked():
    config.data.shards = 2
    if shared:
        config.data.sources = {
            "gsm8k": {"path": shared + "/data/gsm8k/train.jsonl", "format": "alpaca",
                      "field_map": {"instruction": "question", "output": "answer"}},
            "chats": {"path": shared + "/data/fastchat/dummy_conversation.json"},
        }
        config.data.seq_len = 256
        config.data.tokenizer.vocab_size = 1024
        config.data.eval_examples_per_source = 24
spec = data_spec.make_spec(config.data, workdir)
for source in spec.sources:
    print("READ", jax.process_index(), source.name, source.stats.read, len(source))
mesh = sharding.make_mesh(config.mesh)
batch_sharding = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
stop = threading.Event()
ds, _ = pipeline.train_dataset(config.data, spec, stop=stop)
batches = feed.BatchIterator(ds, stop=stop)
for _ in range(3):
    batch = feed.global_batch(next(batches), batch_sharding)
    full = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in batch.items()}
    digest = hashlib.sha256(b"".join(full[k].tobytes() for k in sorted(full))).hexdigest()
    if jax.process_index() == 0:
        print("GLOBAL", full["inputs"].shape, digest)
batches.close()
evals, _ = held_out.eval_batches(config.data, spec, 24)
for name, parts in sorted(evals.items()):
    for part in parts:
        batch = feed.global_batch(part, batch_sharding)
        full = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in batch.items()}
        digest = hashlib.sha256(b"".join(full[k].tobytes() for k in sorted(full))).hexdigest()
        if jax.process_index() == 0:
            print("EVAL", name, digest)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(num_processes: int, devices_per_process: int, workdir, shared="") -> list[str]:
    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SCRIPT]
            + [str(num_processes), str(i), str(port), str(workdir), str(shared)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]
    outputs = [p.communicate(timeout=HANG_GUARD_S) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [
        line
        for out, _ in outputs
        for line in out.splitlines()
        if line.split()[:1] in (["GLOBAL"], ["EVAL"], ["READ"])
    ]


def test_two_processes_make_the_same_global_batches_as_one(tmp_path):
    one = _launch(1, 8, tmp_path / "one")
    two = _launch(2, 4, tmp_path / "two")
    one, two = _batches(one), _batches(two)
    assert len(one) == 3 + 1 and len(set(one)) == 3 + 1  # Three train batches, one eval batch.
    assert two == one


def _batches(lines):
    return [line for line in lines if not line.startswith("READ")]


def _reads(lines):
    """{(process, source): (records read, training examples of the source)}."""
    reads = [line.split()[1:] for line in lines if line.startswith("READ")]
    return {(int(p), name): (int(read), int(size)) for p, name, read, size in reads}


def test_two_processes_read_only_their_share_of_files_and_agree_with_one(tmp_path, shared_dir):
    one = _launch(1, 8, tmp_path / "one", shared_dir)
    two = _launch(2, 4, tmp_path / "two", shared_dir)
    batches = _batches(one)
    assert _batches(two) == batches
    assert len(set(batches)) == len(batches)
    assert sum(line.startswith("GLOBAL") for line in batches) == 3
    assert {line.split()[1] for line in batches if line.startswith("EVAL")} == {"gsm8k", "chats"}
    reads_one, reads_two = _reads(one), _reads(two)
    for name, records in (("gsm8k", 7473), ("chats", 500)):
        read, size = reads_one[(0, name)]
        assert read == records and size == records - 24
        # Each process parses its half of the records, and both agree on the source's size.
        halves = [reads_two[(p, name)] for p in (0, 1)]
        assert [read for read, _ in halves] == [records // 2, records - records // 2]
        assert [size for _, size in halves] == [size, size]
