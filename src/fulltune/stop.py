"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM (what SLURM and Kubernetes send before
SIGKILL), in every phase of `fulltune train`.

- During training the current step finishes, a checkpoint is written and the run exits.
- Before training (loading, θ0 evaluation) and after it (the final evaluation, once the trained
  weights are checkpointed) the run stops at once: nothing there is lost that a rerun or
  `train.resume=auto` would not redo.

The exit status is 128 + the signal: 130 for SIGINT, 143 for SIGTERM. A second Ctrl-C while a
step finishes aborts at once; a repeated SIGTERM does not: a scheduler signals every process of the
job (SLURM's scancel), and torchrun passes the one it got on again, so a worker sees it twice.
"""

from __future__ import annotations

import signal
import threading

from fulltune.errors import Interrupted


class StopRequest:
    """Installed for a whole run; `defer` is True while a training step may finish first."""

    def __init__(self):
        self.requested, self.signum, self.defer, self._old = False, 0, False, {}

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.defer and not self.requested:
            self.requested, self.signum = True, signum
            print(f"\n[train] {name}: finishing this step and saving a checkpoint (a second Ctrl-C aborts)", flush=True)
            return
        if self.defer and signum == signal.SIGTERM:  # the same request again (scheduler + launcher)
            return
        why = (
            "a second Ctrl-C during a step; the last checkpoint is intact"
            if self.requested
            else "outside the training steps; no step was lost"
        )
        self.signum = self.signum or signum
        raise Interrupted(f"stopped by {name}, {why}: continue with train.resume=auto", exit_code=128 + signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
