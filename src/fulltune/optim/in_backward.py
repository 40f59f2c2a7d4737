"""The optimiser step fused into the backward pass (`train.optimizer_in_backward`).

One optimiser per parameter, stepped by a post-accumulate-grad hook the moment that parameter's
gradient is complete; the gradient is freed right after, so the whole model's gradients are never
alive together (saving up to 4 B/param in fp32, 2 in bf16). What this rules out, refused in the
config before any model loads: gradient accumulation (the update would happen per micro-batch). The
gradient norm is measured from each gradient as it passes, and logged as before.

Clipping (`optim.grad_clip` c > 0) needs the step's global norm before any update, and the norm is
known only once backward has passed every parameter. So each step runs forward and backward twice:
the first pass only measures the norm (`measuring`: every gradient freed as it passes, nothing
updated, the random state restored after it so dropout draws the same masks), the second scales each
gradient by min(1, c / ‖g‖) and updates: exactly the ordinary clipped step, for one more forward and
backward a step. (The previous step's norm is no substitute: with small batches it swings 5–10× from
one step to the next, and a lagged clip missed exactly the spikes it is for; docs/memory.md.)
"""

from __future__ import annotations

import contextlib
import math

import torch


class InBackward:
    def __init__(self, model: torch.nn.Module, groups: list[dict], make, clip: float = 0.0):
        self.clip, self.scale = clip, 1.0  # the scale: min(1, clip / this step's norm), set by `measuring`
        self._measuring = False
        names = {id(p): n for n, p in model.named_parameters()}  # a tied tensor once, under its first name
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for group in groups:
            for p in group["params"]:
                self.optimizers[names[id(p)]] = make([{**group, "params": [p]}])
        self._squares: list[torch.Tensor] = []  # each gradient's ‖g‖², on its device (no sync per parameter)
        self._handles = [
            p.register_post_accumulate_grad_hook(self._hook(self.optimizers[names[id(p)]])) for p in model.parameters()
        ]

    def _hook(self, optimizer: torch.optim.Optimizer):
        def step_now(p: torch.Tensor) -> None:
            # ‖g‖ in the gradient's dtype, squared in fp64: no fp64 copy of the gradient (8 B a value: 2 GB on
            # an 8B model's embedding), no sync here
            self._squares.append(torch.linalg.vector_norm(p.grad.detach()).double().square())
            if not self._measuring:
                if self.scale < 1.0:
                    p.grad.mul_(self.scale)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # freed now: no two layers' gradients wait together

        return step_now

    @property
    def param_groups(self) -> list[dict]:
        """Read anew each time: load_state_dict replaces each optimiser's group dicts, and a list kept from
        before would set rates nobody reads (the resumed run would train at the checkpoint's rate)."""
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    @contextlib.contextmanager
    def measuring(self):
        """Backward passes inside only measure the gradients' norm (nothing updated); the clip's scale
        for the pass after is set from it."""
        self._measuring = True
        try:
            yield
        finally:
            self._measuring = False
        norm = self.take_grad_norm()
        self.scale = min(1.0, self.clip / (norm + 1e-6)) if math.isfinite(norm) else 1.0

    def take_grad_norm(self) -> float:
        """‖g‖₂ over every gradient since the last call (before clipping, as clip_grad_norm_ returns it)."""
        total = float(sum(s.cpu() for s in self._squares)) if self._squares else 0.0
        self._squares = []
        return math.sqrt(total)

    def step(self) -> None:
        """Nothing to do: every parameter was updated in the backward pass."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each gradient was freed right after its update."""

    def state_dict(self) -> dict:
        return {"in_backward": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["in_backward"]
        if set(saved) != set(self.optimizers):
            raise ValueError("the checkpoint's per-parameter optimisers do not match the model's parameters")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])
