"""Noticing that the run is about to be stopped, so that it can save and exit cleanly.

A single process watches for SIGTERM itself. In a multi-process run, JAX's preemption sync
manager (started by `jax.distributed.initialize`) receives the notice, SIGTERM included, and
`orbax`'s `reached_preemption` makes every process agree on the same step to stop at.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax


class PreemptionWatch:
    """``watch.should_stop(step, manager)`` turns true at a step where every process stops."""

    def __init__(self):
        self._signalled = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        logging.warning("Received SIGTERM: finishing this step, saving, then exiting.")
        self._signalled.set()

    def should_stop(self, step: int, manager) -> bool:
        if jax.process_count() == 1:
            return self._signalled.is_set()
        return bool(manager.reached_preemption(step))

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
