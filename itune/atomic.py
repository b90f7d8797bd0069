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
import errno
import os
import shutil
import tempfile
import time
from typing import Iterator

# The reasons a write fails that a user can act on.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


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
        _remove(tmp)
        raise


def _remove(tmp: str) -> None:
    # A writer's own threads (TensorStore's, under Orbax) may still be finishing when its error
    # surfaces, and create the folder again: remove it until it stays away for a second.
    removed, deadline = time.monotonic(), time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed = time.monotonic()
        elif time.monotonic() - removed >= 1.0:
            return
        time.sleep(0.02)


def write_failure(error: BaseException) -> str | None:
    """The operating system's reason that a write failed, from ``error`` (an OSError, or a
    library's error that quotes one, as TensorStore's do); None for any other error.

    >>> write_failure(OSError(errno.ENOSPC, "No space left on device"))
    'No space left on device'
    >>> write_failure(ValueError("RESOURCE_EXHAUSTED: Failed to write 9 bytes to file 13: "
    ...                          "No space left on device [source locations='...']"))
    'No space left on device'
    >>> write_failure(ValueError("dtype='int4'; expected one of bfloat16, float16, float32"))
    """
    if isinstance(error, OSError) and error.errno is not None:
        return error.strerror or os.strerror(error.errno)
    text = str(error)
    return next((os.strerror(n) for n in _WRITE_ERRNOS if os.strerror(n) in text), None)
