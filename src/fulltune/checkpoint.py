"""Atomic checkpoints, exact resume, and the HF safetensors export.

A checkpoint is written into a temporary directory and renamed into place, so a crash leaves
either the old set of checkpoints or the new one, never half a checkpoint. It holds the fp32
weights (safetensors), the optimiser state (torch.save, loaded with weights_only=True), the
trainer state (step, sampler position, counters) and the RNG states.

A sharded run (FSDP2, several ranks) writes weights and optimiser state with
torch.distributed.checkpoint instead (`dcp/`: each rank its own shard, keyed by parameter name, so
no rank gathers the model); either kind resumes on any number of ranks.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint import CheckpointException

from fulltune import distributed as D
from fulltune.atomic import MANIFEST, file_entry, verify_dir, write_dir_atomically
from fulltune.errors import UserError
from fulltune.state import TrainerState

CKPT_PREFIX = "step-"


def weights_finite(model) -> bool:
    """Every weight finite, on every rank (under FSDP2 each rank checks its shards)."""
    bad = any(not bool(torch.isfinite(D.local(p.detach())).all()) for p in model.parameters())
    return not D.any_rank(bad)


def refuse_nonfinite_weights(model, what) -> None:
    """No checkpoint or export ever holds a non-finite weight (health.py)."""
    if not weights_finite(model):
        raise UserError(
            f"{what}: not written, the weights hold NaN or inf; the previous checkpoint is kept "
            "(lower optim.lr, set optim.grad_clip, or check the data)"
        )


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
        _set_cuda_rng(state["cuda"], torch.cuda.device_count())


def _set_cuda_rng(saved: list, visible: int) -> None:
    """Each visible GPU's generator from the checkpoint's; a checkpoint from a machine that showed more
    GPUs (a scheduler that shows each process only its own) restores the first ones, and says so:
    torch.cuda.set_rng_state_all would index past the visible devices."""
    for index, generator_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(generator_state, index)
    if len(saved) != visible:
        print(
            f"[train] the checkpoint holds {len(saved)} GPUs' random states and {visible} are visible: "
            f"restored {min(len(saved), visible)}; a GPU without one keeps its own seed",
            flush=True,
        )


class Checkpointer:
    """Says when the run checkpoints (every `train.save_interval` steps before the last; the end of the
    run and a stop request save too) and writes the checkpoint: RUN/checkpoints/step-NNNNNNN."""

    def __init__(self, run_dir: Path, interval: int, keep: int, total_steps: int):
        self.run_dir, self.interval, self.keep, self.total_steps = run_dir, interval, keep, total_steps

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0 and step < self.total_steps

    def save(self, run) -> Path:
        """`run`: run_setup.Run; its sampler's position goes into the trainer state first."""
        run.state.sampler = run.sampler.state_dict()
        return save_checkpoint(
            self.run_dir,
            step=run.state.step,
            model=run.model,
            optimizer=run.optimizer,
            trainer_state=run.state.state_dict(),
            keep=self.keep,
        )


def save_checkpoint(run_dir: Path, *, step: int, model, optimizer, trainer_state: dict, keep: int) -> Path:
    final = run_dir / "checkpoints" / f"{CKPT_PREFIX}{step:07d}"
    refuse_nonfinite_weights(model, f"checkpoint {final}")

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        shutil.copy(run_dir / "config.yaml", tmp / "config.yaml")

    previous = list_checkpoints(run_dir)
    needed = _bytes(previous[-1]) if previous else 3 * sum(D.local(p).numel() * 4 for p in model.parameters())
    if D.sharded():
        if D.is_main():
            hashed: dict = {}  # every rank's shards, hashed by the rank that wrote them
            write_dir_atomically(
                final,
                lambda tmp: hashed.update(
                    _write_sharded(tmp, run_dir, model=model, optimizer=optimizer, trainer_state=trainer_state)
                ),
                manifest=True,
                needed=needed,
                hashed=hashed,
            )
        else:
            _write_sharded(None, run_dir, model=model, optimizer=optimizer, trainer_state=trainer_state)
    else:
        write_dir_atomically(final, write, manifest=True, needed=needed)
    if D.is_main():
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    D.barrier()  # no rank goes on before the checkpoint is in place
    return final


def _write_sharded(tmp: Path | None, run_dir: Path, *, model, optimizer, trainer_state: dict) -> dict:
    """Every rank writes its shards into rank 0's temporary directory, then fsyncs and hashes its own
    files (the ranks in parallel, not rank 0 alone while the others wait); rank 0 adds the small files.
    Returns the manifest entries of every rank's files (rank 0's are what counts)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = Path(D.broadcast(str(tmp) if tmp else None))
    torch.save(rng_state(), tmp / rng_file(D.rank()))  # every rank's own generators, before the collective save
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "dcp"))
    mine = [tmp / rng_file(D.rank()), *sorted((tmp / "dcp").glob(f"__{D.rank()}_*"))]  # dcp's shard files by rank
    entries = {}
    for part in D.gather({str(p.relative_to(tmp)): file_entry(p) for p in mine}):
        entries.update(part)
    if D.is_main():
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        shutil.copy(run_dir / "config.yaml", tmp / "config.yaml")
    return entries


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    done = [p for p in folder.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX) :]))


def resolve_resume(spec: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: `spec`'s, or with auto the latest that verifies (rank 0 reads
    the manifests, every rank gets its answer)."""
    if not spec:
        return None
    found = D.broadcast(_resolve_on_main(spec, run_dir) if D.is_main() else None)
    if isinstance(found, tuple):  # ("error", message)
        raise UserError(found[1])
    return Path(found) if found else None


def _resolve_on_main(spec: str, run_dir: Path):
    if spec == "auto":
        for path in reversed(list_checkpoints(run_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return str(path)
            print(f"[train] checkpoint {path} is damaged ({problem}); trying the one before", flush=True)
        return None
    path = Path(spec).expanduser()
    if not path.is_dir():
        return (
            "error",
            f"train.resume: {path} does not exist (auto resumes the latest checkpoint in train.output_dir)",
        )
    if not (path / "trainer_state.json").is_file():
        return ("error", f"train.resume: {path} is not a fulltune checkpoint (no trainer_state.json)")
    problem = checkpoint_problem(path)
    return ("error", f"train.resume: {path} is damaged ({problem})") if problem else str(path)


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint, or None. One written before manifests existed (no manifest
    and no trace of a write in progress: atomic.py renames only after the manifest) is taken as is."""
    if not (path / MANIFEST).is_file() and (path / "trainer_state.json").is_file():
        return None
    return verify_dir(path)


# Settings that change what the resumed steps compute (the run's length and resolved precision: check_resumed_run).
# The activation savers recompute or move the same values, so a run that ran out of memory may resume with them.
RESUME_FIXED = {
    "model": ("path", "trust_remote_code", "attn_implementation"),
    "data": None,
    "optim": None,
    "schedule": None,
    "anchor": None,
    "loss": None,
    "train": ("seed", "precision", "micro_batch_size", "grad_accum_steps", "optimizer_in_backward"),
    "eval": ("task_file", "labels", "probes", "probe_items", "probe_code_items"),
}  # θ0 scores: same items


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
        raise UserError(
            f"cannot resume from {path}: the config changed in ways that alter the run ("
            + "; ".join(changed)
            + "); start a new run (another train.output_dir) instead"
        )


def check_resumed_run(path: Path, state: TrainerState, cfg, *, total: int, precision: str) -> None:
    """The resumed steps compute what the checkpointed run would have: the same resolved precision,
    and the same length (so the same lr curve) unless train.allow_schedule_change."""
    from fulltune.optim.schedules import schedule_fn

    was = state.precision or precision
    if was != precision:
        raise UserError(
            f"cannot resume from {path}: it trained in {was}, and train.precision "
            f"{cfg.train.precision} resolves to {precision} here; set train.precision={was} "
            "(with train.force_precision=true on a device without bf16 units) to continue it as it was"
        )
    step, old = state.step, state.total_steps
    if old is None:  # a checkpoint from before total_steps was saved: compare the settings that set it
        saved = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
        t = saved.get("train", {})
        old = (
            total
            if (t.get("max_steps"), t.get("epochs")) in ((None, None), (cfg.train.max_steps, cfg.train.epochs))
            else "?"
        )
    if old == total:
        return
    if not cfg.train.allow_schedule_change:
        raise UserError(
            f"cannot resume from {path}: the run had {old} steps and now has {total} (train.max_steps / "
            f"train.epochs), which re-stretches the lr schedule after step {step}; set "
            "train.allow_schedule_change=true to continue on the new curve"
        )
    if total < step:
        raise UserError(f"train.max_steps: {total} steps is below the checkpoint's step {step}")
    new_lr = cfg.optim.lr * schedule_fn(cfg.schedule, cfg.optim.lr, total)(step)
    old_lr = (
        cfg.optim.lr * schedule_fn(cfg.schedule, cfg.optim.lr, old)(step)
        if isinstance(old, int) and step < old
        else None
    )
    print(
        f"[train] schedule changed (train.allow_schedule_change): {old} → {total} steps; lr at step {step + 1}: "
        f"{'–' if old_lr is None else f'{old_lr:.3g}'} on the old curve → {new_lr:.3g} on the new one, which ends "
        f"at step {total}",
        flush=True,
    )


def load_checkpoint(path: Path, model, optimizer) -> TrainerState:
    """Restore weights, optimiser and RNG in place; return the trainer state."""
    try:
        if (path / "dcp").is_dir():
            _load_sharded(path, model, optimizer)
        elif D.sharded():
            _load_full_into_shards(path, model, optimizer)
        else:
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
            if missing or unexpected:
                raise UserError(
                    f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        mine = path / rng_file(D.rank())  # a rank the checkpoint did not have (more ranks now) takes rank 0's
        set_rng_state(torch.load(mine if mine.is_file() else path / "rng.pt", weights_only=True))
        return TrainerState.from_dict(json.loads((path / "trainer_state.json").read_text()))
    except (RuntimeError, ValueError, KeyError, OSError, CheckpointException) as exc:
        raise UserError(
            f"{path}: cannot restore this checkpoint into the configured model/optimiser "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def _load_sharded(path: Path, model, optimizer) -> None:
    """A torch.distributed.checkpoint checkpoint into this run's model (sharded or not): resharded by name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is what we mean
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "dcp"), no_dist=not D.sharded())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _load_full_into_shards(path: Path, model, optimizer) -> None:
    """A single-process checkpoint into a sharded model: rank 0 reads the full tensors and sends each
    rank its shard; the optimiser state's parameter indices become parameter names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    full, by_name, problem = {}, {}, None
    if D.is_main():
        try:
            full, by_name = _read_full_checkpoint(path, model, optimizer)
        except (OSError, RuntimeError, ValueError, KeyError, UserError) as exc:
            problem = str(exc) if isinstance(exc, UserError) else f"{path}: cannot read this checkpoint ({exc})"
    problem = D.broadcast(problem)  # every rank fails together, or none
    if problem:
        raise UserError(problem)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, full, options=options)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _read_full_checkpoint(path: Path, model, optimizer) -> tuple[dict, dict]:
    """model.safetensors (tied aliases filled in) and optimizer.pt keyed by parameter name."""
    from safetensors.torch import load_file

    full = load_file(str(path / "model.safetensors"))
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    for names in names_of.values():  # a tied tensor is stored under one of its names
        stored = [n for n in names if n in full]
        for n in names if stored else []:
            full.setdefault(n, full[stored[0]])
    missing = set(model.state_dict()) - set(full)
    if missing or set(full) - set(model.state_dict()):
        raise UserError(f"{path}: checkpoint does not match the model (missing {sorted(missing)[:3]})")
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    by_name = {
        "state": {order[i]: v for i, v in saved["state"].items()},
        "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in saved["param_groups"]],
    }
    return full, by_name


def _tied_aliases(model) -> set[str]:
    """Names under which a tied parameter appears a second time (e.g. lm_head.weight)."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def drop_later_checkpoints(run_dir: Path, step: int) -> None:
    for path in list_checkpoints(run_dir):
        if int(path.name[len(CKPT_PREFIX) :]) > step:
            shutil.rmtree(path)


def export_hf(model, tokenizer, dest: Path) -> Path:
    """`dest` as an HF model directory (safetensors) that from_pretrained loads and generates with."""
    refuse_nonfinite_weights(model, f"the fine-tuned model {dest}")
    use_cache = model.config.use_cache
    model.config.use_cache = True
    needed = sum(D.local(p).numel() * 4 for p in model.parameters()) * max(1, D.world_size())  # fp32 weights

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    try:
        if not D.sharded():
            return write_dir_atomically(dest, write, manifest=True, needed=needed)
        if D.is_main():
            write_dir_atomically(dest, lambda tmp: _export_sharded(tmp, model, tokenizer), manifest=True, needed=needed)
        else:
            _export_sharded(None, model, tokenizer)
        D.barrier()
        return dest
    finally:
        model.config.use_cache = use_cache


def _export_sharded(tmp: Path | None, model, tokenizer) -> None:
    """Each rank writes its shards as safetensors; rank 0 then streams them into one model.safetensors
    (torch's HF consolidation: one tensor at a time assembled from the shard files, never the whole model)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tmp = Path(D.broadcast(str(tmp) if tmp else None))
    aliases = _tied_aliases(model)  # a tied tensor once, under its first name, as save_pretrained does
    state = {name: t for name, t in get_model_state_dict(model).items() if name not in aliases}
    dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True, enable_consolidation=True))
    if D.is_main():
        shutil.rmtree(tmp / "sharded")
        (files,) = [list(tmp.glob("model-*.safetensors"))]
        assert len(files) == 1, f"expected one consolidated file, found {files}"
        files[0].rename(tmp / "model.safetensors")
        (tmp / "model.safetensors.index.json").unlink(missing_ok=True)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
