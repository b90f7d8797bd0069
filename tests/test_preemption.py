"""A run killed without warning resumes bit for bit; SIGTERM saves and exits 0; non-finite steps
are skipped, counted and stop the run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import HANG_GUARD_S, REPO


def _command(workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "itune.cli.train",
        f"--config={REPO / 'configs/smoke.py'}:runlocal",
        f"--workdir={workdir}",
        "--config.train.log_every=1",
        *overrides,
    ]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    return env


def _train(workdir, *overrides):
    result = subprocess.run(
        _command(workdir, *overrides),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )
    return result


def _start(workdir, *overrides):
    return subprocess.Popen(
        _command(workdir, *overrides),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )


def _wait_for(condition, process):
    """Until ``condition()`` holds, however slow the run (it fails if the run ends first)."""
    hung = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < hung, "the run hung"
        time.sleep(0.05)  # How often to look.


def _params(workdir, step):
    import jax

    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "meta")) as m:
        restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return [np.asarray(x) for x in jax.tree.leaves(restored.state["params"])]


def _steps_logged(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max([line["step"] for line in lines if "train" in line], default=0)


def test_a_run_killed_with_sigkill_resumes_to_the_same_parameters(tmp_path):
    steps = ("--config.train.num_steps=8", "--config.checkpoint.every_steps=2")
    assert _train(tmp_path / "straight", *steps).returncode == 0
    victim = _start(tmp_path / "killed", *steps)
    # Killed mid-run, once at least one checkpoint is complete and training has moved on.
    _wait_for(lambda: (tmp_path / "killed/checkpoints/4").is_dir(), victim)
    _wait_for(lambda: _steps_logged(tmp_path / "killed") >= 5, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _train(tmp_path / "killed", *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring checkpoint at step" in resumed.stderr
    for a, b in zip(_params(tmp_path / "straight", 8), _params(tmp_path / "killed", 8)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "signum, reason", [(signal.SIGTERM, "for preemption"), (signal.SIGINT, "on Ctrl-C")]
)
def test_sigterm_or_ctrl_c_finishes_the_step_saves_and_exits_zero(tmp_path, signum, reason):
    workdir = tmp_path / "run"
    # No periodic checkpoint: the one found afterwards is the preemption save. So many steps
    # that the signal comes first however slowly this test gets to send it.
    run = _start(
        workdir, "--config.train.num_steps=1000000", "--config.checkpoint.every_steps=0"
    )
    _wait_for(lambda: _steps_logged(workdir) >= 3, run)
    run.send_signal(signum)
    output, _ = run.communicate(timeout=HANG_GUARD_S)
    assert run.returncode == 0, output[-3000:]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 1000000
    assert f"Stopped at step {saved[0]} {reason}; checkpoint saved" in output
    assert all(np.isfinite(x).all() for x in _params(workdir, saved[0]))


def test_a_second_ctrl_c_stops_at_once_and_close_restores_the_handlers():
    from itune.training import preemption

    received = []
    outer = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        watch = preemption.PreemptionWatch()
        signal.raise_signal(signal.SIGINT)
        assert watch.should_stop(1, None) and watch.reason == "on Ctrl-C"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        watch.close()
        assert received == []
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    finally:
        signal.signal(signal.SIGINT, outer)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    # A learning rate this large makes the parameters overflow within a few steps.
    result = _train(
        tmp_path / "run",
        "--config.train.num_steps=40",
        "--config.optim.learning_rate=1e36",
        "--config.optim.warmup_steps=1",
        "--config.optim.grad_clip_norm=0",
        "--config.checkpoint.every_steps=1",
    )
    assert result.returncode != 0
    assert "had a non-finite loss or gradient norm" in result.stderr
    assert "Traceback" not in result.stderr.splitlines()[-1]
    lines = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert any(l["train"]["nonfinite"] == 1.0 for l in lines if "train" in l)
    for step in sorted(
        int(p.name) for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit()
    ):
        assert all(np.isfinite(x).all() for x in _params(tmp_path / "run", step))


def test_a_run_stopped_by_non_finite_steps_leaves_no_threads_or_handler_behind(tmp_path):
    import threading

    from configs import smoke
    from itune.training.trainer import train_and_evaluate

    config = smoke.get_config("runlocal")
    with config.unlocked():
        config.train.num_steps = 3
        config.train.max_nonfinite_steps = 1
        config.optim.learning_rate = 1e36
        config.optim.warmup_steps = 1
        config.optim.grad_clip_norm = 0
    threads = {t.ident for t in threading.enumerate()}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient norm"):
        train_and_evaluate(config, str(tmp_path))
    left = [t.name for t in threading.enumerate() if t.ident not in threads]
    assert set(left) <= {"tqdm_monitor"}, left  # tqdm's own monitor.
    assert {s: signal.getsignal(s) for s in handlers} == handlers
