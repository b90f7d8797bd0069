"""Two JAX processes of four CPU devices each train exactly as one process of eight."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import HANG_GUARD_S, REPO

_STEPS = 3
_ARGS = [
    f"--config={REPO / 'configs/smoke.py'}:runlocal",
    f"--config.train.num_steps={_STEPS}",
    "--config.train.log_every=1",
    "--config.data.shards=2",  # The same data shards for one process or two.
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [l["train"]["loss"] for l in lines if "train" in l]


def _params(workdir):
    """The run's newest parameters, restored onto this process's devices."""
    import jax

    from itune.convert import model_dir

    loaded = model_dir.load_model(str(workdir))
    return [np.asarray(x) for x in jax.tree.leaves(loaded.params)]


def test_two_processes_train_like_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("XLA_FLAGS", None)
    two = subprocess.run(
        [
            str(REPO / "launch/local.sh"),
            "--processes=2",
            "--devices=4",
            f"--port={_free_port()}",
            "--",
            f"--workdir={tmp_path / 'two'}",
            *_ARGS,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    one = subprocess.run(
        [sys.executable, "-m", "itune.cli.train", f"--workdir={tmp_path / 'one'}", *_ARGS],
        env=one_env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    losses_one, losses_two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(losses_one) == _STEPS
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-6)
    params_one, params_two = _params(tmp_path / "one"), _params(tmp_path / "two")
    assert len(params_one) == len(params_two) > 0
    for a, b in zip(params_one, params_two):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # Collectives sum in another order.
