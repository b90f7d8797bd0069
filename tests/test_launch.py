"""Launch scripts in dry-run mode print the exact commands they would run."""

import os
import shlex
import subprocess

import pytest

from tests.conftest import HANG_GUARD_S, REPO


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
        timeout=HANG_GUARD_S,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for rank, line in enumerate(lines):
        assert f"JAX_PROCESS_ID={rank}" in line and "JAX_NUM_PROCESSES=3" in line
        assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:12999" in line
        assert "--xla_force_host_platform_device_count=2" in line
        assert line.endswith("python -m itune.cli.train --config=configs/smoke.py --workdir=/tmp/x")


def test_local_launch_rejects_unknown_flags():
    result = subprocess.run(
        [str(REPO / "launch/local.sh"), "--procs=2"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 2 and "unknown flag --procs=2" in result.stderr


def _dry_run(script, *args, env=None):
    """The commands ``launch/<script> args`` would run, each as its words. ``--dry-run`` goes
    before any ``--`` (after it, it would be one of itune-train's flags)."""
    first = 1 if script == "tpu.sh" else 0  # After tpu.sh's command.
    args = (*args[:first], "--dry-run", *args[first:])
    result = subprocess.run(
        [str(REPO / "launch" / script), *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.strip().splitlines()]


TPU = ("--name=itune-8b", "--zone=us-east5-a", "--project=proj", "--accelerator=v5p-64")
WHERE = ["--zone=us-east5-a", "--project=proj"]


def _remote(command: list[str]) -> list[str]:
    """The words of the shell command that a `gcloud ... ssh --command=...` runs on workers."""
    (flag,) = [word for word in command if word.startswith("--command=")]
    return shlex.split(flag.removeprefix("--command="))


def test_tpu_launch_creates_directly_or_queued_and_deletes():
    (create,) = _dry_run("tpu.sh", "create", *TPU, "--spot")
    assert create == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "itune-8b", *WHERE,
        "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot",
    ]  # fmt: skip
    (queued,) = _dry_run("tpu.sh", "create", *TPU, "--queued")
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "itune-8b"]
    assert "--node-id=itune-8b" in queued and "--runtime-version=v2-alpha-tpuv5" in queued
    (multi,) = _dry_run("tpu.sh", "create", *TPU, "--slices=2")
    assert "--node-count=2" in multi and "--node-prefix=itune-8b" in multi
    (delete,) = _dry_run("tpu.sh", "delete", *TPU)
    assert delete == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "itune-8b",
        *WHERE,
        "--quiet",
    ]
    (delete,) = _dry_run("tpu.sh", "delete", *TPU, "--slices=2")
    assert delete[3:6] == ["queued-resources", "delete", "itune-8b"] and "--force" in delete


def test_tpu_launch_copies_and_installs_the_checkout_on_every_worker():
    archive, copy, install = _dry_run("tpu.sh", "setup", *TPU)
    assert (
        archive[:2] == ["cd", str(REPO)]
        and "git" in archive
        and "/tmp/itune-itune-8b.tar.gz" in archive
    )
    assert copy == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/itune-itune-8b.tar.gz",
        "itune-8b:itune.tar.gz", *WHERE, "--worker=all",
    ]  # fmt: skip
    assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "itune-8b"]
    assert "--worker=all" in install
    remote = " ".join(_remote(install))
    assert "tar -xzf itune.tar.gz -C itune" in remote and "pip install -q -e .[tpu]" in remote


def test_tpu_launch_runs_itune_train_on_all_workers_of_every_slice():
    args = (
        "--",
        "--config=configs/llama3_8b_sft.py",
        "--workdir=gs://b/run",
        "--config.init_from=gs://b/it's",
    )
    (run,) = _dry_run("tpu.sh", "run", *TPU, "--env=LIBTPU_INIT_ARGS=--xla_flag=1", *args)
    assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "itune-8b"]
    assert "--worker=all" in run
    remote = _remote(run)
    train = remote[remote.index("env") : remote.index(">")]
    assert train == [
        "env", "ITUNE_DISTRIBUTED=1", "LIBTPU_INIT_ARGS=--xla_flag=1", ".venv/bin/python", "-m",
        "itune.cli.train", *args[1:],
    ]  # fmt: skip
    assert remote[-5:] == ["&", "echo", "$!", ">", "train.pid)"] and "(nohup" in remote
    nodes = _dry_run("tpu.sh", "run", *TPU, "--slices=2", *args)
    assert [command[5] for command in nodes] == ["itune-8b-0", "itune-8b-1"]
    (attached,) = _dry_run("tpu.sh", "run", *TPU, "--attach", *args)
    assert "tee train.log" in " ".join(_remote(attached))


def test_tpu_launch_follows_collects_and_stops():
    (logs,) = _dry_run("tpu.sh", "logs", *TPU, "--worker=3")
    assert "--worker=3" in logs and _remote(logs) == ["tail", "-n", "100", "-F", "itune/train.log"]
    mkdir, *copies = _dry_run("tpu.sh", "collect", *TPU, "--logs-dir=/tmp/logs")
    assert mkdir == ["mkdir", "-p", "/tmp/logs"] and len(copies) == 8  # v5p-64: 8 workers.
    assert copies[7][5:7] == ["itune-8b:itune/train.log", "/tmp/logs/itune-8b-worker-7.log"]
    assert copies[7][-1] == "--worker=7"
    (stop,) = _dry_run("tpu.sh", "stop", *TPU)
    assert "kill -TERM $(cat train.pid)" in " ".join(_remote(stop))


def test_tpu_launch_takes_its_settings_from_the_environment():
    env = dict(os.environ, ITUNE_TPU_NAME="envtpu", ITUNE_TPU_ZONE="europe-west4-a")
    env.update(ITUNE_TPU_ACCELERATOR="v5e-16", ITUNE_TPU_SPOT="1")
    (create,) = _dry_run("tpu.sh", "create", env=env)
    assert create[5:] == [
        "envtpu", "--zone=europe-west4-a", "--accelerator-type=v5e-16",
        "--version=v2-alpha-tpuv5-lite", "--spot",
    ]  # fmt: skip
    (create,) = _dry_run("tpu.sh", "create", "--name=flag", env=env)
    assert create[5] == "flag"  # A flag wins.


@pytest.mark.parametrize(
    "args, message",
    [
        (["frob", "--name=x", "--zone=z"], "unknown command frob"),
        (["create", "--zone=z"], "--name"),
        (["create", "--name=x", "--zone=z", "--accelerator=v5p-63"], "2 per chip"),
        (["create", "--name=x", "--zone=z", "--accelerator=v3-8"], "expected v4-N"),
        (["run", "--name=x", "--zone=z"], "itune-train's flags go after --"),
        (["create", "--name=x", "--zone=z", "--acelerator=v5p-8"], "unknown flag --acelerator"),
    ],
)
def test_tpu_launch_rejects_bad_settings(args, message):
    result = subprocess.run(
        [str(REPO / "launch/tpu.sh"), *args, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 2 and message in result.stderr


def test_slurm_launch_starts_one_process_per_gpu_or_per_node():
    args = ("--", "--config=configs/llama3_8b_sft.py", "--workdir=/shared/run")
    (per_gpu,) = _dry_run("slurm.sh", "--nodes=4", "--gpus-per-node=8", "--partition=a100", *args)
    assert per_gpu[:7] == [
        "sbatch", "--job-name=itune", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
        "--time=24:00:00", "--output=logs/%x-%j.out",
    ]  # fmt: skip
    assert "--partition=a100" in per_gpu
    task = shlex.split(per_gpu[-1].removeprefix("--wrap="))
    assert task == [
        "srun", "--kill-on-bad-exit=1", "env", "ITUNE_DISTRIBUTED=1", "python", "-m",
        "itune.cli.train", *args[1:],
    ]  # fmt: skip
    env = dict(os.environ, ITUNE_SLURM_NODES="2", ITUNE_SLURM_PER="node")
    (per_node,) = _dry_run("slurm.sh", "--gpus-per-node=4", *args, env=env)
    assert "--nodes=2" in per_node and "--ntasks-per-node=1" in per_node
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in shlex.split(per_node[-1].removeprefix("--wrap="))


def test_hosts_launch_gives_explicit_addresses():
    lines = _dry_run("hosts.sh", "--hosts=gpu-0,me@gpu-1", "--port=2222", "--", "--workdir=/w")
    assert [line[:2] for line in lines] == [["ssh", "gpu-0"], ["ssh", "me@gpu-1"]]
    for rank, line in enumerate(lines):
        remote = shlex.split(line[2])
        assert remote[:3] == ["cd", "itune", "&&"]
        assert remote[3:7] == [
            "env", "JAX_COORDINATOR_ADDRESS=gpu-0:2222", "JAX_NUM_PROCESSES=2",
            f"JAX_PROCESS_ID={rank}",
        ]  # fmt: skip
        assert remote[-4:] == [".venv/bin/python", "-m", "itune.cli.train", "--workdir=/w"]


def test_tpu_launch_copies_folders_the_run_reads_beside_the_checkout():
    lines = _dry_run("tpu.sh", "setup", *TPU, "--with=../shared")
    pack, copy, unpack = lines[2:5]
    assert pack == ["tar", "-czf", "/tmp/itune-itune-8b-shared.tar.gz", "-C", "..", "shared"]
    assert copy[5:7] == ["/tmp/itune-itune-8b-shared.tar.gz", "itune-8b:shared.tar.gz"]
    assert _remote(unpack) == ["tar", "-xzf", "shared.tar.gz", "&&", "rm", "shared.tar.gz"]
