"""Atomic checkpoints, exact resume, and the HF safetensors export.

A checkpoint is written into a temporary directory and renamed into place, so a crash leaves
either the old set of checkpoints or the new one, never half a checkpoint. It holds the fp32
weights (safetensors), the optimiser state (torch.save, loaded with weights_only=True), the
trainer state (step, sampler position, counters) and the RNG states.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

from fulltune.atomic import write_dir_atomically
from fulltune.errors import UserError

CKPT_PREFIX = "step-"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, trainer_state: dict, keep: int) -> Path:
    final = run_dir / "checkpoints" / f"{CKPT_PREFIX}{step:07d}"

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        shutil.copy(run_dir / "config.yaml", tmp / "config.yaml")
    write_dir_atomically(final, write)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def resolve_resume(spec: str, run_dir: Path) -> Path | None:
    if not spec:
        return None
    if spec == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(spec).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"train.resume: {path} is not a fulltune checkpoint (no trainer_state.json)")
    return path


# Settings that change what the resumed steps compute; max_steps / epochs may change (to extend a run).
RESUME_FIXED = {"model": None, "data": None, "optim": None,
                "schedule": None, "anchor": None, "train": ("seed", "precision", "micro_batch_size", "grad_accum_steps"),
                "eval": ("task_file", "labels", "probes", "probe_items", "probe_code_items")}  # θ0 scores: same items


def check_compatible(path: Path, cfg) -> None:
    """Refuse to resume with settings that differ from the checkpoint's where they change the run."""
    saved = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    now = cfg.to_dict()
    changed = []
    for section, keys in RESUME_FIXED.items():
        for key in keys or now[section].keys():
            old = saved.get(section, {}).get(key, now[section][key])
            if old != now[section][key]:
                changed.append(f"{section}.{key}: {old!r} → {now[section][key]!r}")
    if changed:
        raise UserError(f"cannot resume from {path}: the config changed in ways that alter the run ("
                        + "; ".join(changed) + "); start a new run (another train.output_dir) instead")


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore weights, optimiser and RNG in place; return the trainer state."""
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise UserError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        return json.loads((path / "trainer_state.json").read_text())
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(f"{path}: cannot restore this checkpoint into the configured model/optimiser "
                        f"({type(exc).__name__}: {str(exc)[:200]})") from None


def drop_later_checkpoints(run_dir: Path, step: int) -> None:
    for path in list_checkpoints(run_dir):
        if int(path.name[len(CKPT_PREFIX):]) > step:
            shutil.rmtree(path)


def export_hf(model, tokenizer, dest: Path) -> Path:
    """`dest` as an HF model directory (safetensors) that from_pretrained loads and generates with."""
    use_cache = model.config.use_cache
    model.config.use_cache = True

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    try:
        return write_dir_atomically(dest, write)
    finally:
        model.config.use_cache = use_cache
