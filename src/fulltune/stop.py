"""Stopping a run cleanly: Ctrl-C / SIGTERM finish the current step, then checkpoint and exit."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Ctrl-C / SIGTERM between steps: finish the current step, checkpoint, exit (a second Ctrl-C aborts)."""

    def __init__(self):
        self.requested, self._old = False, {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[train] stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)",
              flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
