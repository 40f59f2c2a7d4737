"""The run's memory check, behind one object the loop calls at two named points.

    with run.memory.step(batches):             # 1: the step as a whole, its peak measured
        ... forward / backward ...
        optimizer.step()
        run.memory.update_applied(model, opt)  # 2: model-state bytes, once, before zero_grad
        optimizer.zero_grad()

Point 1 keeps the micro-batch with the highest predicted peak (what the peak is compared with) and
closes the measurement after `train.memory_steps` steps: on CPU glibc's measuring mode is slow, and on
CUDA each measured step synchronises the device twice and counts its target tokens on the host.
Point 2 measures each rank's bytes of parameters, gradients and optimiser state against the estimator.
Both results live in the trainer state (`state.results.memory`, `.state_memory`), so a resumed run
keeps them.
"""

from __future__ import annotations

import contextlib

from fulltune import distributed as D
from fulltune.data.loader import count_targets
from fulltune.memory.measure import PeakMeter, state_bytes
from fulltune.memory.runcheck import compare, heaviest, line, out_of_memory_line, state_memory, state_memory_line
from fulltune.state import TrainerState


class RunMemory:
    def __init__(self, meter: PeakMeter, model, cfg, *, precision: str, state: TrainerState, anchor_bytes: int = 0):
        self.meter, self.model, self.cfg, self.precision = meter, model, cfg, precision
        self.state, self.anchor_bytes = state, anchor_bytes  # the trainer state: checkpointed with the run
        self.measured_steps = 0
        self._measure_state = False

    @contextlib.contextmanager
    def step(self, batches: list[dict]):
        """Named point 1: around one optimiser step."""
        self._measure_state = (self.state.results.state_memory or {}).get("ranks") != D.world_size()
        if self.meter.active:
            self._track_largest(batches)
        with self.meter.section("train"):
            yield
        self.measured_steps += int(self.meter.active)
        if self.meter.active and self.measured_steps >= self.cfg.train.memory_steps:
            self.close()  # the peak repeats every step once the optimiser state exists: full speed now

    def update_applied(self, model, optimizer) -> None:
        """Named point 2: after the update, before the gradients are freed (measured once per rank count)."""
        if not self._measure_state:
            return
        self._measure_state = False
        per_rank = D.gather(state_bytes(model, optimizer))
        measured = state_memory(
            self.model,
            self.cfg,
            precision=self.precision,
            device_type=self.meter.device_type,
            per_rank=per_rank,
            anchor_bytes=self.anchor_bytes,
        )
        self.state.results.state_memory = measured
        print(state_memory_line(measured), flush=True)

    def _track_largest(self, batches: list[dict]) -> None:
        candidates = [
            {
                "rows": b["input_ids"].shape[0],
                "length": b["input_ids"].shape[1],
                "targets": count_targets(b),
                "grads_alive": i > 0,
            }
            for i, b in enumerate(batches)
        ]
        self.state.largest_micro_batch = heaviest(
            self.model,
            self.cfg,
            precision=self.precision,
            device_type=self.meter.device_type,
            current=self.state.largest_micro_batch,
            candidates=candidates,
        )

    def close(self) -> None:
        """Stop measuring; store predicted vs measured peak (once per run, kept across resumes)."""
        was_active = self.meter.active
        self.meter.stop()
        if was_active and self.state.largest_micro_batch["rows"] and self.meter.sections.get("train"):
            self.state.results.memory = compare(
                self.model,
                self.cfg,
                precision=self.precision,
                meter=self.meter,
                largest=self.state.largest_micro_batch,
                anchor_bytes=self.anchor_bytes,
            )
            print(line(self.state.results.memory), flush=True)

    def out_of_memory_line(self, device, *, step: int, checkpoint) -> str:
        """A step ran out of memory: the estimate's breakdown, the capacity, the planner's answer, and
        the checkpoint to resume from (memory/runcheck.py)."""
        return out_of_memory_line(
            self.model, self.cfg, precision=self.precision, device=device, step=step, checkpoint=checkpoint
        )
