"""No run is damaged by a mistake, and faults are found where they happen: a config that does not
fit the run in its workdir stops before anything there is written; config.json and metrics are
written atomically and a resume logs each step once; a failed checkpoint write stops the run
and keeps the last checkpoint; a conversion on a full disk leaves nothing behind."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import HANG_GUARD_S, REPO


def _train_cli(workdir, config="configs/smoke.py:runlocal", *overrides):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # One CPU device, as a user would have.
    cmd = [
        sys.executable,
        "-m",
        "itune.cli.train",
        f"--config={config}",
        f"--workdir={workdir}",
        *overrides,
    ]
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO
    )


def _snapshot(folder) -> dict[str, str]:
    """Every file and folder under ``folder`` by relative path, with a digest of each file."""
    entries = {}
    for root, folders, names in os.walk(folder):
        for name in folders:
            entries[os.path.relpath(os.path.join(root, name), folder)] = "folder"
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                entries[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return entries


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of the smoke config to its end (step 3; checkpoints at steps 2 and 3)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = _train_cli(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    return workdir


def _config(**changes):
    from configs import smoke

    config = smoke.get_config("runlocal")
    with config.unlocked():
        for dotted, value in changes.items():
            section = config
            *parents, name = dotted.split(".")
            for parent in parents:
                section = section[parent]
            section[name] = value
    return config


def _steps(workdir, kind="train"):
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if kind in row]


# ----------------------------------------------------------------------------------------------
# A mistake leaves the run in its workdir as it was.


class _Unloadable:
    """As a config flag whose file failed to load: the error comes at first use."""

    def __getattr__(self, name):
        raise OSError("Failed loading config file configs/smok.py")


def test_a_misspelt_config_path_leaves_a_finished_run_untouched(run_copy):
    from itune.training.trainer import train_and_evaluate

    before = _snapshot(run_copy)
    with pytest.raises(OSError, match="smok.py"):
        train_and_evaluate(_Unloadable(), str(run_copy))
    assert _snapshot(run_copy) == before
    result = _train_cli(run_copy, "configs/smok.py")
    assert result.returncode != 0
    assert _snapshot(run_copy) == before


def test_a_resume_with_another_model_shape_stops_in_one_line_before_writing(run_copy):
    from itune.errors import ConfigError
    from itune.training.trainer import train_and_evaluate

    before = _snapshot(run_copy)
    with pytest.raises(ConfigError) as raised:
        train_and_evaluate(_config(**{"model.d_model": 128}), str(run_copy))
    message = str(raised.value)
    assert "\n" not in message
    assert "model.d_model=64 (this config: 128)" in message and "--workdir" in message
    assert _snapshot(run_copy) == before

    result = _train_cli(run_copy, "configs/smoke.py:runlocal", "--config.model.d_model=128")
    assert result.returncode != 0
    assert "model.d_model=64 (this config: 128)" in result.stderr
    assert _snapshot(run_copy) == before


def test_a_resume_names_each_setting_it_cannot_change(run_copy):
    from itune.errors import ConfigError
    from itune.training import workdir as workdir_lib

    run = json.loads((run_copy / "config.json").read_text())
    changed = json.loads(json.dumps(run))
    changed["data"]["seq_len"] = 256
    changed["data"]["tokenizer"]["vocab_size"] = 512
    changed["optim"]["learning_rate"] = 1.0  # A resume may change this.
    with pytest.raises(ConfigError) as raised:
        workdir_lib.check_resume(changed, str(run_copy))
    message = str(raised.value)
    assert "data.seq_len=128 (this config: 256)" in message
    assert "data.tokenizer.vocab_size=256 (this config: 512)" in message
    assert "learning_rate" not in message
    workdir_lib.check_resume(run, str(run_copy))  # The run's own config resumes.


def test_a_checkpoint_that_does_not_fit_the_optimizer_stops_before_writing(run_copy):
    """Settings that change the train state's layout without a named shape field (here the
    optimizer's clipping, one more state in its chain) are caught by the checkpoint's shapes."""
    from itune.errors import ConfigError
    from itune.training.trainer import train_and_evaluate

    before = _snapshot(run_copy)
    config = _config(**{"optim.grad_clip_norm": 0.0, "train.num_steps": 5})
    with pytest.raises(ConfigError, match="does not fit this config's model and optimizer"):
        train_and_evaluate(config, str(run_copy))
    assert _snapshot(run_copy) == before


def test_an_unreadable_config_json_is_named_and_kept(run_copy):
    from itune.errors import UserError
    from itune.training.trainer import train_and_evaluate

    (run_copy / "config.json").write_text("")  # As a crash while writing it once left it.
    before = _snapshot(run_copy)
    with pytest.raises(UserError, match=r"config\.json: cannot read the run's config"):
        train_and_evaluate(_config(), str(run_copy))
    assert _snapshot(run_copy) == before


def test_config_json_is_written_atomically(tmp_path, monkeypatch):
    from itune.training import workdir as workdir_lib

    workdir_lib.write_config(str(tmp_path), '{"a": 1}')

    def full_disk(fd, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        workdir_lib.write_config(str(tmp_path), '{"a": 2}')
    assert os.listdir(tmp_path) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == '{"a": 1}'


def test_a_resumed_run_logs_each_step_once(run_copy):
    from itune.training.trainer import train_and_evaluate

    # As after a run killed past its last checkpoint: the log goes on to step 3 (train and eval
    # lines, and a last line cut short), the newest checkpoint is step 2.
    shutil.rmtree(run_copy / "checkpoints" / "3")
    assert _steps(run_copy) == [1, 2, 3] and _steps(run_copy, "eval") == [3]
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "tra')
    train_and_evaluate(_config(**{"train.num_steps": 4}), str(run_copy))
    assert _steps(run_copy) == [1, 2, 3, 4]
    assert _steps(run_copy, "eval") == [4]


# ----------------------------------------------------------------------------------------------
# A failed checkpoint write stops the run.


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_last_checkpoint(
    run_copy, monkeypatch
):
    import ml_collections
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    from itune.training import checkpoint
    from itune.training.trainer import train_and_evaluate

    commit = async_checkpointer._background_wait_for_commit_futures

    def disk_full_at_step_4(directory, *args, **kwargs):
        """The background half of a save: for step 4 it fails as on a full disk."""
        if os.path.basename(str(directory)) == "4":
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return commit(directory, *args, **kwargs)

    monkeypatch.setattr(
        async_checkpointer, "_background_wait_for_commit_futures", disk_full_at_step_4
    )
    results_before = _snapshot(run_copy)["eval_results.json"]
    config = _config(**{"train.num_steps": 40})  # Saves every 2 steps.
    with pytest.raises(checkpoint.CheckpointError) as raised:
        train_and_evaluate(config, str(run_copy))
    message = str(raised.value)
    assert "\n" not in message
    assert f"{run_copy}/checkpoints" in message and "No space left on device" in message
    assert "the last complete checkpoint is step 3" in message
    # Found at the latest when the next save (step 6) waits for this one.
    assert max(_steps(run_copy)) <= 6
    assert _snapshot(run_copy)["eval_results.json"] == results_before  # No results claimed.
    assert checkpoint.saved_steps(str(run_copy)) == [2, 3]
    mngr = checkpoint.manager(str(run_copy), ml_collections.ConfigDict({"max_to_keep": 3}))
    assert mngr.latest_step() == 3
    mngr.close()


def test_a_checkpoint_folder_that_cannot_be_made_stops_the_run_at_that_save(
    run_copy, monkeypatch
):
    from orbax.checkpoint._src.path import atomicity

    from itune.training import checkpoint
    from itune.training.trainer import train_and_evaluate

    async def read_only(paths, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(paths[0].get()))

    monkeypatch.setattr(atomicity, "create_all", read_only)
    with pytest.raises(checkpoint.CheckpointError) as raised:
        train_and_evaluate(_config(**{"train.num_steps": 40}), str(run_copy))
    assert "failed: Read-only file system; the last complete checkpoint is step 3" in str(
        raised.value
    )
    assert max(_steps(run_copy)) == 4  # The step of the save.
    assert checkpoint.saved_steps(str(run_copy)) == [2, 3]


# ----------------------------------------------------------------------------------------------
# Conversions on a full disk leave nothing behind.


def _tiny_itune_folder(path, tokenizer):
    from flax import nnx

    from itune import sharding
    from itune.convert import model_dir
    from itune.model.decoder import Decoder
    from tests.util import tiny_model_config

    cfg = tiny_model_config(vocab_size=tokenizer.vocab_size)
    params = nnx.state(Decoder(cfg, sharding.DEFAULT_RULES, rngs=nnx.Rngs(0)))
    model_dir.save_model(str(path), cfg, params, tokenizer, "chatml")
    return cfg, params


def _full_disk_after(limit, real):
    """``real`` (a writer taking ``path`` first) that fails as on a full disk once ``limit``
    calls have succeeded."""
    calls = []

    def write(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return write


def test_saving_a_model_folder_on_a_full_disk_leaves_nothing_behind(
    tmp_path, builtin_tokenizer, monkeypatch
):
    from itune.convert import model_dir, tokenizer_files

    cfg, params = _tiny_itune_folder(tmp_path / "first", builtin_tokenizer)
    before = sorted(os.listdir(tmp_path))
    # The parameters are written (by Orbax), then the tokenizer's files fail.
    monkeypatch.setattr(
        tokenizer_files, "save_tokenizer", _full_disk_after(0, tokenizer_files.save_tokenizer)
    )
    with pytest.raises(OSError, match="No space left"):
        model_dir.save_model(str(tmp_path / "second"), cfg, params, builtin_tokenizer)
    assert sorted(os.listdir(tmp_path)) == before


def test_a_hugging_face_export_on_a_full_disk_leaves_the_folder_as_it_was(
    tmp_path, builtin_tokenizer, monkeypatch
):
    import jax

    from itune.convert import hf

    cfg, params = _tiny_itune_folder(tmp_path / "model", builtin_tokenizer)
    hf.save_hf(str(tmp_path / "hf"), cfg, params, max_shard_bytes=20_000)
    before = _snapshot(tmp_path)
    other = jax.tree.map(lambda x: x * 2, params)  # Other bytes in every file.
    # An export over the first one fails at its second safetensors shard; a new one at its first.
    monkeypatch.setattr(hf, "_write_safetensors", _full_disk_after(1, hf._write_safetensors))
    with pytest.raises(OSError, match="No space left"):
        hf.save_hf(str(tmp_path / "hf"), cfg, other, max_shard_bytes=20_000)
    with pytest.raises(OSError, match="No space left"):
        hf.save_hf(str(tmp_path / "new"), cfg, other, max_shard_bytes=20_000)
    assert _snapshot(tmp_path) == before


# Runs itune-convert with the safetensors writer failing as on a full disk after its first file.
_CONVERT_ON_A_FULL_DISK = """
import errno
from itune.convert import hf
real = hf._write_safetensors
def write(file, *args):
    if file is not None and "-00001-of-" not in file:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(file, *args)
hf._write_safetensors = write
from itune.cli import convert
convert.run()
"""


def test_itune_convert_on_a_full_disk_says_so_in_one_line_and_leaves_nothing(
    tmp_path, builtin_tokenizer
):
    _tiny_itune_folder(tmp_path / "model", builtin_tokenizer)
    before = sorted(os.listdir(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _CONVERT_ON_A_FULL_DISK,
            str(tmp_path / "model"),
            str(tmp_path / "hf"),
            "--max_shard_gb=0.00002",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("itune-convert: ") and str(tmp_path / "hf") in last
    assert "No space left on device" in last
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == before
