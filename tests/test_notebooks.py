"""Every notebook in ``notebooks/`` runs top to bottom as a notebook, in its quick form.

The notebooks are jupytext percent-format ``.py`` files, and only those are committed. Each test
generates the ``.ipynb`` with jupytext in its temporary folder and executes it there with a
``python3`` Jupyter kernel (ipykernel, driven by nbclient), as CI does on every run: a cell that
raises fails the test with its traceback, and the executed notebook is left beside it. A
notebook that declares ``NEEDS_SHARED = True`` reads ``../shared`` and is skipped without it
(failed instead under ``ITUNE_REQUIRE_SHARED=1``).
"""

import os
import re

import jupytext
import nbclient
import pytest

from tests.conftest import HANG_GUARD_S, REPO

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.py"))
IDS = [p.stem for p in NOTEBOOKS]


def _needs_shared(path) -> bool:
    return re.search(r"^NEEDS_SHARED = True$", path.read_text(encoding="utf-8"), re.M) is not None


def test_the_notebooks():
    assert IDS == [
        "01_data_pipeline",
        "02_train_and_sample",
        "03_pretrained_model",
        "04_evaluation",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_opens_with_what_it_shows(path):
    """A markdown cell first, saying how to open the notebook; every cell has content."""
    notebook = jupytext.read(path)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert f"jupytext --to notebook notebooks/{path.name}" in first.source
    assert all(cell.source.strip() for cell in notebook.cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path, request, tmp_path):
    # One CPU device, as on a laptop; plots inline; the notebook's workdir (a temporary folder)
    # inside this test's.
    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("XLA_FLAGS", None)
    env.pop("MPLBACKEND", None)
    if _needs_shared(path):
        env["ITUNE_SHARED"] = str(request.getfixturevalue("shared_dir"))
    generated = tmp_path / f"{path.stem}.ipynb"
    jupytext.write(jupytext.read(path), generated)
    notebook = jupytext.read(generated)
    client = nbclient.NotebookClient(
        notebook,
        timeout=HANG_GUARD_S,
        startup_timeout=HANG_GUARD_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute(env=env)
    finally:
        jupytext.write(notebook, generated)
    outputs = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]
    assert any(output.get("name") == "stdout" for output in outputs)
    # Every figure is shown inline and saved as a PNG in the notebook's workdir.
    shown = [output for output in outputs if "image/png" in output.get("data", {})]
    saved = sorted(tmp_path.glob("itune_*/*.png"))
    assert shown and len(shown) == len(saved), (len(shown), saved)
