"""Two JAX processes on this machine assemble the same global batches as one process."""

import hashlib
import os
import socket
import subprocess
import sys

from tests.conftest import REPO

_SCRIPT = """
import hashlib, sys
import jax
num_processes, process_id, port, workdir = map(str, sys.argv[1:5])
if int(num_processes) > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))
from jax.experimental import multihost_utils
from configs import smoke
from itune import sharding
from itune.data import pipeline
config = smoke.get_config("runlocal")
with config.unlocked():
    config.data.shards = 2
spec = pipeline.make_spec(config.data, workdir)
mesh = sharding.make_mesh(config.mesh)
batch_sharding = sharding.batch_sharding(mesh, sharding.DEFAULT_RULES)
ds, _ = pipeline.train_dataset(config.data, spec)
batches = pipeline.BatchIterator(ds)
for _ in range(3):
    batch = pipeline.global_batch(next(batches), batch_sharding)
    full = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in batch.items()}
    digest = hashlib.sha256(b"".join(full[k].tobytes() for k in sorted(full))).hexdigest()
    if jax.process_index() == 0:
        print("GLOBAL", full["inputs"].shape, digest)
batches.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(num_processes: int, devices_per_process: int, workdir) -> list[str]:
    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, str(num_processes), str(i), str(port), str(workdir)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(num_processes)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [line for line in outputs[0][0].splitlines() if line.startswith("GLOBAL")]


def test_two_processes_make_the_same_global_batches_as_one(tmp_path):
    one = _launch(1, 8, tmp_path / "one")
    two = _launch(2, 4, tmp_path / "two")
    assert len(one) == 3 and len(set(one)) == 3
    assert two == one
