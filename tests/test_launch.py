"""Launch scripts in dry-run mode print the exact commands they would run."""

import subprocess

from tests.conftest import REPO


def test_local_launch_dry_run_starts_one_process_per_rank():
    result = subprocess.run(
        [
            str(REPO / "launch/local.sh"),
            "--processes=3",
            "--devices=2",
            "--port=12999",
            "--dry-run",
            "--",
            "--config=configs/smoke.py",
            "--workdir=/tmp/x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        assert f"JAX_PROCESS_ID={rank}" in line and "JAX_NUM_PROCESSES=3" in line
        assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:12999" in line
        assert "--xla_force_host_platform_device_count=2" in line
        assert line.endswith("python -m itune.train --config=configs/smoke.py --workdir=/tmp/x")


def test_local_launch_rejects_unknown_flags():
    result = subprocess.run(
        [str(REPO / "launch/local.sh"), "--procs=2"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "unknown flag --procs=2" in result.stderr
