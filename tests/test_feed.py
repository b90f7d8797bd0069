"""The batch reader: `close` returns once the reader thread has really ended, however slow the
machine; nothing it waits on can block it forever once stopped."""

import logging
import threading

import numpy as np
import tensorflow as tf

from itune.training import feed


def _dataset(rows):
    return tf.data.Dataset.from_generator(rows, output_signature=tf.TensorSpec((), tf.int32))


class _OnWarning(logging.Handler):
    """Sets an event when a warning is logged: the test goes on when `close` has said it waits."""

    def __init__(self, event: threading.Event):
        super().__init__(logging.WARNING)
        self.event = event

    def emit(self, record):
        self.event.set()


def _closed_after_warning(batches, release: threading.Event, caplog) -> str:
    """Closes ``batches`` with no grace time; its warning releases the reader. The log."""
    handler = _OnWarning(release)
    logging.getLogger().addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING):
            batches.close(warn_after=0)
    finally:
        logging.getLogger().removeHandler(handler)
    return caplog.text


def test_close_waits_for_a_reader_stuck_in_its_source_and_says_where_it_is(caplog):
    entered, release = threading.Event(), threading.Event()

    def slow_rows():
        entered.set()
        release.wait()
        yield np.int32(1)

    batches = feed.BatchIterator(_dataset(slow_rows))
    entered.wait()
    log = _closed_after_warning(batches, release, caplog)
    assert "reader thread is still running 0 s after close; waiting" in log
    assert "_fill" in log  # Where the reader is.
    assert not batches._thread.is_alive()


def test_close_waits_until_a_slow_source_has_ended(caplog):
    # The source takes its time to end after the stop, as on a loaded machine: close waits for
    # it (and for tf.data's threads to be done with it) rather than for a number of seconds.
    stop, release, ends = threading.Event(), threading.Event(), []

    def rows():
        while not stop.is_set():
            yield np.int32(1)
        release.wait()
        ends.append("returned")

    batches = feed.BatchIterator(_dataset(rows).prefetch(2), stop=stop)
    assert next(batches) == 1
    _closed_after_warning(batches, release, caplog)
    assert ends == ["returned"]
    assert not batches._thread.is_alive()


def test_closing_a_reader_with_its_stop_lets_the_source_end_first():
    # tf.data's threads call into the Python source; they must be done with it when the reader
    # ends, or one of them may enter Python while the interpreter shuts down (an abort).
    stop, ends = threading.Event(), []

    def rows():
        try:
            while not stop.is_set():
                yield np.int32(1)
            ends.append("returned")
        except GeneratorExit:
            ends.append("closed from outside")
            raise

    batches = feed.BatchIterator(_dataset(rows).prefetch(2), stop=stop)
    assert next(batches) == 1
    batches.close()
    assert not batches._thread.is_alive()
    assert ends == ["returned"]


def test_a_reader_whose_queue_is_full_ends_when_closed():
    def endless():
        while True:
            yield np.int32(1)

    batches = feed.BatchIterator(_dataset(endless), buffer=1)
    assert next(batches) == 1  # The reader has filled the queue again and waits to put more.
    batches.close()
    assert not batches._thread.is_alive()
    try:
        next(batches)
    except StopIteration:
        pass
    else:
        raise AssertionError("a closed reader gave a batch")


def test_a_failure_is_raised_again_by_every_later_call():
    def failing():
        yield np.int32(1)
        raise ValueError("bad record")

    batches = feed.BatchIterator(_dataset(failing))
    assert next(batches) == 1
    for _ in range(2):  # The second call would wait forever for a reader that has ended.
        try:
            next(batches)
        except Exception as e:  # tf.data wraps the source's error.
            assert "bad record" in str(e)
        else:
            raise AssertionError("no error")
    batches.close()
