"""The optimiser step fused into the backward pass (`train.optimizer_in_backward`).

One optimiser per parameter, stepped by a post-accumulate-grad hook the moment that parameter's
gradient is complete; the gradient is freed right after, so the whole model's gradients are never
alive together (saving up to 4 B/param in fp32, 2 in bf16). What this rules out, refused in the
config before any model loads: gradient accumulation (the update would happen per micro-batch). The
gradient norm is measured from each gradient as it passes, and logged as before.

Clipping (`optim.grad_clip` c > 0): the global norm of a step is known only after every update has
been applied, so each gradient is scaled by min(1, c / ‖g‖) of the previous step's norm, which tracks
the current one (lean's measurement: docs/memory.md). The first step has none: one forward and
backward measure its norm without updating (`measuring`, once a run), so step 1, whose gradient is
usually the largest, is clipped exactly. The last norm is saved with the state: resume is exact.

The object stands in for the optimiser everywhere the loop and checkpoints touch one:
`param_groups` (one group per parameter, so the stateless schedule sets every rate),
`state` (for the model-state bytes), `state_dict` keyed by parameter name (exact resume),
`step`/`zero_grad` (nothing left to do: the hooks did it).
"""

from __future__ import annotations

import contextlib
import math

import torch


class InBackward:
    def __init__(self, model: torch.nn.Module, groups: list[dict], make, clip: float = 0.0):
        self.clip, self.last_norm, self.scale = clip, None, 1.0  # the scale: min(1, clip / last_norm)
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

    @property
    def needs_norm(self) -> bool:
        """Clipping with no norm yet: the first step measures one before it updates."""
        return self.clip > 0 and self.last_norm is None

    @contextlib.contextmanager
    def measuring(self):
        """Backward passes inside only measure the gradients' norm (no update), and set the clip's scale."""
        self._measuring = True
        try:
            yield
        finally:
            self._measuring = False
        self.take_grad_norm()

    def take_grad_norm(self) -> float:
        """‖g‖₂ over every gradient since the last call (the step's norm before clipping, as
        clip_grad_norm_ returns it); the next step's clip scale is set from it."""
        total = float(sum(s.cpu() for s in self._squares)) if self._squares else 0.0
        self._squares = []
        self._set_norm(math.sqrt(total))
        return math.sqrt(total)

    def _set_norm(self, norm: float | None) -> None:
        self.last_norm = norm
        finite = norm is not None and math.isfinite(norm)
        self.scale = min(1.0, self.clip / (norm + 1e-6)) if self.clip > 0 and finite else 1.0

    def step(self) -> None:
        """Nothing to do: every parameter was updated in the backward pass."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each gradient was freed right after its update."""

    def state_dict(self) -> dict:
        return {
            "in_backward": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "last_norm": self.last_norm,
        }

    def load_state_dict(self, state: dict) -> None:
        self._set_norm(state.get("last_norm"))  # checkpoints from before clipping here: measured again
        saved = state["in_backward"]
        if set(saved) != set(self.optimizers):
            raise ValueError("the checkpoint's per-parameter optimisers do not match the model's parameters")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])
