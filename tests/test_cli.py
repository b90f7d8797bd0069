"""The commands explain themselves (``--help``) and tell a user's mistake in one line.

Each case runs the command as a user would, in a process of its own: the exit status is 1, the
last line of stderr names what is wrong and where, and there is no traceback unless
``--verbose``. Every mistake here is found before training starts.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from tests.conftest import HANG_GUARD_S, REPO

COMMANDS = ["train", "inspect", "plan", "preflight", "convert", "generate", "chat", "eval"]
# Flags (or arguments) that each command's --help must show, beside --verbose.
OWN_FLAGS = {
    "train": ["--config=FILE[:ARGS]", "--workdir=DIR"],
    "inspect": ["--config=FILE[:ARGS]", "--workdir=DIR", "--rows=N", "--[no]color"],
    "plan": ["--config=FILE[:ARGS]", "--devices=N"],
    "preflight": ["--config=FILE[:ARGS]", "--topology=", "--num_slices=N"],
    "convert": [
        "usage: itune-convert SRC DST",
        "--from={itune,hf,gguf,workdir}",
        "--to={itune,hf}",
    ],
    "generate": ["--checkpoint=PATH", "--prompt=", "--temperature=X"],
    "chat": ["--checkpoint=PATH", "--system="],
    "eval": ["--checkpoint=PATH", "--config=FILE[:ARGS]", "--prompt_sets="],
}
SMOKE = "configs/smoke.py:runlocal"


def _run(command: str, *args: str, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # One CPU device, as a user would have.
    return subprocess.run(
        [sys.executable, "-m", f"itune.cli.{command}", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        **popen,
    )


def _told(result: subprocess.CompletedProcess, program: str = "itune-train") -> str:
    """The one line a failed command ends with, after checking it failed as a user's mistake."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{program}: "), result.stderr[-3000:]
    return last


def _finished_run(tmp_path) -> pathlib.Path:
    """A workdir as a run leaves it: its config.json, and a completed checkpoint's folder."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"seed": 0}))
    return workdir


def _file_config(tmp_path, data_path) -> str:
    """A config file: the smoke run on one file source, ``data_path``."""
    config = tmp_path / "on_file.py"
    config.write_text(
        "from itune import configlib\n"
        "\n"
        "\n"
        "def get_config(arg=None):\n"
        f"    config = configlib.sibling({str(REPO / 'configs/smoke.py')!r}, 'smoke')"
        ".get_config('runlocal')\n"
        "    with config.unlocked():\n"
        f"        config.data.sources = {{'mine': {{'path': {str(data_path)!r}}}}}\n"
        "    return config\n"
    )
    return str(config)


# ------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_the_commands_own_flags(command):
    result = _run(command, "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert text.startswith(f"usage: itune-{command} ")
    for shown in OWN_FLAGS[command] + ["--[no]verbose"]:
        assert shown in text, (shown, text)
    # Not absl's own flags, which --helpfull lists.
    assert "--alsologtostderr" not in text and "--helpfull" in text
    if "--config=FILE[:ARGS]" in OWN_FLAGS[command]:
        for path in sorted((REPO / "configs").glob("[!_]*.py")):
            assert f"  configs/{path.name}\n" in text
        assert "arguments: runlocal, lora, steps=40" in text  # smollm2_gsm8k's get_config.
        assert "--config=configs/smollm2_gsm8k.py:lora,steps=40" in text
        assert "--config.FIELD=VALUE" in text and "--config.train.num_steps=10" in text


def test_convert_help_names_the_formats():
    text = _run("convert", "--help").stdout
    for kind in ("itune model folder", "Hugging Face folder", "GGUF file", "training workdir"):
        assert kind in text


# ------------------------------------------------------------------- mistakes in the flags


def test_a_misspelt_config_file_names_the_configs_and_leaves_the_run_alone(tmp_path):
    workdir = _finished_run(tmp_path)
    before = (workdir / "config.json").read_bytes()
    line = _told(_run("train", "--config=configs/smok.py", f"--workdir={workdir}"))
    assert line.startswith("itune-train: --config=configs/smok.py: no such config file")
    assert "configs/smoke.py" in line and "configs/smollm2_gsm8k.py" in line
    assert (workdir / "config.json").read_bytes() == before


def test_verbose_shows_the_traceback():
    result = _run("train", "--config=configs/smok.py", "--workdir=/tmp/unused", "--verbose")
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert "no such config file" in result.stderr


def test_an_unknown_config_argument_is_named():
    line = _told(_run("train", "--config=configs/smoke.py:nosuch", "--workdir=/tmp/unused"))
    assert line.startswith("itune-train: --config=configs/smoke.py:nosuch: ")
    assert "'nosuch'" in line and "runlocal" in line


def test_an_override_of_a_missing_field_suggests_the_field():
    result = _run("train", f"--config={SMOKE}", "--config.train.num_stepz=3", "--workdir=/w")
    line = _told(result)
    assert line.startswith("itune-train: --config.train.num_stepz: config.train has no field")
    assert "did you mean --config.train.num_steps?" in line


def test_an_override_of_the_wrong_type_names_the_field_and_type():
    result = _run("train", f"--config={SMOKE}", "--config.train.num_steps=abc", "--workdir=/x")
    line = _told(result)
    assert line.startswith("itune-train: --config.train.num_steps=abc: expected an int")


# ------------------------------------------------------------------------ mistakes in files


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    workdir = tmp_path / "file"
    workdir.write_text("not a folder")
    line = _told(_run("train", f"--config={SMOKE}", f"--workdir={workdir}"))
    assert line == f"itune-train: --workdir={workdir}: a file, not a folder; choose a folder"
    assert workdir.read_text() == "not a folder"


def test_a_workdir_that_cannot_be_written_is_named(tmp_path):
    if os.geteuid() == 0:  # Permissions do not stop root; the kernel's own folders do.
        workdir = pathlib.Path("/sys/itune-test-workdir")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        workdir = locked / "run"
    line = _told(_run("train", f"--config={SMOKE}", f"--workdir={workdir}"))
    assert line.startswith(f"itune-train: {workdir}") or f"--workdir={workdir}" in line
    assert "permi" in line or "read-only" in line  # Permission denied, not permitted, read-only.


def test_a_corrupt_config_json_in_the_workdir_is_named(tmp_path):
    workdir = _finished_run(tmp_path)
    (workdir / "config.json").write_text('{"seed": ')
    line = _told(_run("train", f"--config={SMOKE}", f"--workdir={workdir}"))
    assert f"{workdir / 'config.json'}" in line
    assert (workdir / "config.json").read_text() == '{"seed": '


def test_a_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    config = _file_config(tmp_path, missing)
    line = _told(_run("train", f"--config={config}", f"--workdir={tmp_path / 'run'}"))
    assert "no such file" in line and str(missing) in line
    assert not (tmp_path / "run").exists()  # A new run's folder is not left behind, empty.


def test_an_empty_data_file_is_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    workdir = tmp_path / "run"
    result = _run("train", f"--config={_file_config(tmp_path, empty)}", f"--workdir={workdir}")
    assert _told(result) == (
        f"itune-train: data.sources.mine ({empty}): has no records; give it some, or remove it "
        "from data.sources"
    )
    assert not workdir.exists()  # Nothing written, and no empty folder left.
    verbose = _run("train", *result.args[3:], "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_ctrl_c_ends_in_one_line(tmp_path):
    # A config that says it has started, then waits until a signal ends the wait: Ctrl-C
    # comes while the command runs. (Waiting on stdin instead would race with communicate(),
    # which closes it.)
    config = tmp_path / "waits.py"
    # The command gets Ctrl-C's default handler, as in a terminal, also when this test runs in
    # the background, whose children inherit SIGINT ignored.
    config.write_text(
        "import signal, sys, time\n"
        "\n"
        "\n"
        "def get_config(arg=None):\n"
        "    signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "    print('waiting', file=sys.stderr, flush=True)\n"
        "    while True:\n"
        "        time.sleep(3600)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "itune.cli.train", f"--config={config}", f"--workdir={tmp_path}"],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:  # Ends early only if the command does.
        if line.strip() == "waiting":
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=HANG_GUARD_S)
    line = _told(subprocess.CompletedProcess(process.args, process.returncode, "", stderr))
    assert line.startswith("itune-train: interrupted; start it again with the same --workdir")
