"""Feeding the train loop: batches read ahead in a background thread, placed on the mesh.

`BatchIterator` runs the input pipeline's tf.data dataset (`itune.data.pipeline`) and a
``transform`` such as `global_batch` in its own thread, so the loop finds the next batch on its
devices.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import queue
import sys
import threading
import traceback
import weakref

import jax
import numpy as np
import tensorflow as tf

from itune.data import packing


class BatchIterator:
    """Numpy batches of a tf.data dataset, read ahead by a background thread.

    ``transform`` (e.g. `global_batch`) runs in that thread too, so the training loop finds the
    next batch ready, on its devices; the time it still waits is the real input stall. A live
    iterator over a generator-backed dataset blocks interpreter shutdown, so every one is closed
    by an exit hook (and can be closed earlier with `close`).

    ``stop`` is the event that ends ``dataset``'s source (`train_dataset`'s ``stop``). With it,
    `close` reads the dataset to its end, so that tf.data's own threads have finished calling
    into the Python source before the reader ends: a tf.data thread that enters Python while the
    interpreter shuts down aborts the process.

    >>> import numpy as np, threading
    >>> stop = threading.Event()
    >>> def rows():
    ...     while not stop.is_set():
    ...         yield np.int32(7)
    >>> ds = tf.data.Dataset.from_generator(rows, output_signature=tf.TensorSpec((), tf.int32))
    >>> batches = BatchIterator(ds, stop=stop)
    >>> int(next(batches))
    7
    >>> batches.close()  # Returns once the reader and the source have ended.
    >>> batches._thread.is_alive()
    False
    """

    _live: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()

    # Four batches ahead absorb the producer's slow moments (it shares the cores with XLA).
    def __init__(
        self,
        dataset: tf.data.Dataset,
        transform=None,
        buffer: int = 4,
        stop: threading.Event | None = None,
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=buffer)
        self._stop = stop if stop is not None else threading.Event()
        self._source_stops = stop is not None
        self._thread = threading.Thread(
            target=self._fill, args=(dataset, transform), daemon=True, name="itune-batches"
        )
        self._thread.start()
        BatchIterator._live.add(self)

    def _fill(self, dataset: tf.data.Dataset, transform) -> None:
        iterator = dataset.as_numpy_iterator()
        try:
            while not self._stop.is_set():
                try:
                    item = next(iterator)
                    item = transform(item) if transform else item
                except BaseException as e:  # Handed to the consumer, raised there.
                    item = _Failure(e)
                # A full queue is waited on in short turns that look at the stop, so a reader
                # whose consumer has gone ends once closed.
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, _Failure):
                    return
            if self._source_stops:
                # The source has seen the stop: the batches tf.data still holds or is making are
                # read and dropped, until the dataset ends.
                try:
                    for _ in iterator:
                        pass
                except Exception:  # Closed: what the source would have said no longer matters.
                    pass
        finally:
            del iterator  # Released in this thread, before the interpreter shuts down.

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _Failure):
            # The reader has ended: every later call raises the same instead of waiting forever.
            self._queue.put(item)
            raise item.error
        return item

    def close(self, warn_after: float = 30.0) -> None:
        """Stops the reader and returns once it has finished, however long that takes.

        A busy machine only makes this slower: the reader ends once its current batch is done (and,
        with ``stop``, once the source has ended), so there is no time limit to miss. A reader still
        running after ``warn_after`` seconds is reported once, with where it is, and awaited.
        """
        self._stop.set()
        self._thread.join(warn_after)
        if self._thread.is_alive():
            frame = sys._current_frames().get(self._thread.ident)
            # From the reader's own code down (the threading module's frames say nothing).
            stack = traceback.format_stack(frame) if frame else ["(unknown)\n"]
            where = "".join(line for line in stack if f"{os.sep}threading.py" not in line)
            logging.warning(
                "The input pipeline's reader thread is still running %g s after close; waiting "
                "for it to finish. It is at:\n%s",
                warn_after,
                where.rstrip(),
            )
            self._thread.join()
        BatchIterator._live.discard(self)


@dataclasses.dataclass
class _Failure:
    error: BaseException


@atexit.register
def _close_live_iterators() -> None:
    for iterator in list(BatchIterator._live):
        iterator.close()


def global_batch(
    local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
    """Per-process numpy rows -> global arrays (the row fields) sharded along the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k]))
        for k in packing.ROW_FIELDS
    }
