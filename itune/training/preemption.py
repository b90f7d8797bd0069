"""Noticing that the run is about to be stopped, so that it can save and exit cleanly.

A single process watches for SIGTERM and Ctrl-C (SIGINT) itself: the run finishes its step,
saves and exits; a second Ctrl-C stops it at once (KeyboardInterrupt). In a multi-process run,
JAX's preemption sync manager (started by `jax.distributed.initialize`) receives the notice,
SIGTERM included, and `orbax`'s `reached_preemption` makes every process agree on the same step
to stop at.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatch:
    """``watch.should_stop(step, manager)`` turns true at a step where every process stops;
    ``watch.reason`` then says why ("for preemption", "on Ctrl-C"). `close` restores the signal
    handlers it replaced."""

    def __init__(self):
        self._signalled = threading.Event()
        self.reason = "for preemption"
        self._previous: dict[int, object] = {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self._signalled.is_set():
                raise KeyboardInterrupt  # The second Ctrl-C: stop now, without saving.
            logging.warning(
                "Ctrl-C: finishing this step, saving, then exiting (Ctrl-C again stops at once, "
                "without saving)."
            )
            self.reason = "on Ctrl-C"
        else:
            logging.warning("Received SIGTERM: finishing this step, saving, then exiting.")
        self._signalled.set()

    def should_stop(self, step: int, manager) -> bool:
        if jax.process_count() == 1:
            return self._signalled.is_set()
        return bool(manager.reached_preemption(step))

    def close(self) -> None:
        for signum, previous in self._previous.items():
            # None: a handler not set from Python, which Python cannot set back.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
