"""Every worked example in itune's docstrings runs and shows what it returns.

Every module under ``itune/`` is imported (a module that cannot be imported fails here, none is
skipped) and its examples run as doctests, one test per module.
"""

import doctest
import importlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import HANG_GUARD_S, REPO

MODULES = sorted(
    ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for path in (REPO / "itune").rglob("*.py")
)
# The command modules define absl flags when imported, several under one name (--config), so
# two of them cannot share a process: each is imported and checked in a process of its own.
COMMANDS = [name for name in MODULES if name.startswith("itune.cli.")]
LIBRARY = [name for name in MODULES if name not in COMMANDS]


def run_examples(name: str) -> dict:
    """Imports module ``name`` and runs its docstring examples: the tries, failures, report."""
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=report.append)
    return {"tries": runner.tries, "failures": runner.failures, "report": "".join(report)}


def test_every_module_is_checked():
    assert len(MODULES) > 40 and "itune.training.feed" in LIBRARY
    assert "itune.cli.common" in COMMANDS and "itune.cli" in LIBRARY


@pytest.mark.parametrize("name", LIBRARY)
def test_library_examples(name):
    result = run_examples(name)
    assert result["failures"] == 0, result["report"]


@pytest.mark.parametrize("name", COMMANDS)
def test_command_examples(name):
    script = (
        "import json, sys\n"
        "from tests.test_doctests import run_examples\n"
        "print(json.dumps(run_examples(sys.argv[1])))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(
        [sys.executable, "-c", script, name],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["failures"] == 0, result["report"]
