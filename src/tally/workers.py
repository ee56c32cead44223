"""A background thread that works in rounds and sleeps between them until woken: the one loop
of the export worker, the alert evaluator and the alert outbox."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Worker:
    """Runs :meth:`step` on a daemon thread from :meth:`start` to :meth:`stop`. A step
    returns the seconds to sleep before the next one (None: go on at once); :meth:`wake` cuts
    a sleep short. A step that raises is logged and the thread goes on after ``idle``
    seconds: a bug or a failing dependency never ends the worker."""

    def __init__(self, name: str, what: str, idle: float) -> None:
        self._what, self._idle = what, idle
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """After the step in flight (which may look at :attr:`stopping` to end early)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def step(self) -> float | None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.step()
            except Exception:  # a bug or a dependency failing: log it, keep the thread
                log.exception("%s failed; going on", self._what)
                wait = self._idle
            if wait is None:
                continue
            self._wake.wait(wait)
            self._wake.clear()
