"""Files and folders that appear whole or not at all.

A reader (or a later run) never sees half of what was written: the contents go to a temporary
name beside the destination and are renamed onto it only once complete; any failure (a full
disk, Ctrl-C) removes the temporary and leaves the destination as it was.

>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> write_text(os.path.join(root, "a.json"), '{"step": 1}')
>>> with folder(os.path.join(root, "model")) as tmp:
...     write_text(os.path.join(tmp, "config.json"), "{}")
>>> sorted(os.listdir(root)), os.listdir(os.path.join(root, "model"))
(['a.json', 'model'], ['config.json'])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def write_text(path: str, text: str) -> None:
    """Replaces ``path`` with ``text`` (UTF-8): written to a temporary file in the same folder,
    synced to disk, then renamed onto ``path``."""
    folder_name, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def folder(path: str, merge: bool = False) -> Iterator[str]:
    """Yields a new temporary folder beside ``path`` to write into; when the block ends without
    error it becomes ``path``, and on any failure it is removed.

    ``path`` must not exist (or be an empty folder). With ``merge``, an existing folder is kept
    and each written file or subfolder replaces its namesake in it.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not merge and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path} exists; choose a new path")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=parent)
    try:
        yield tmp
        if not os.path.isdir(path) or not os.listdir(path):
            os.replace(tmp, path)  # An empty folder at ``path`` is replaced.
            return
        for entry in os.listdir(tmp):
            target = os.path.join(path, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, entry), target)
        os.rmdir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
