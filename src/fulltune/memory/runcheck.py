"""Every run measured against the estimate: the estimator's setup for a run, and the comparison."""

from __future__ import annotations

import functools
import json

from fulltune.distributed import local, sharded, world_size
from fulltune.memory.estimate import GB, TrainSetup, estimate
from fulltune.memory.spec import spec_from_config


def train_setup_for(
    cfg, *, precision: str, device_type: str, rows: int, length: int, targets: int, grads_alive: bool = False
) -> TrainSetup:
    """The TrainSetup of a fulltune run for a micro-batch of rows × length with `targets` loss positions
    (`grads_alive`: not the step's first micro-batch, so the accumulated gradients exist)."""
    optimizer = cfg.optim.name
    if optimizer == "sgd" and cfg.optim.momentum > 0:
        optimizer = "sgd-momentum"
    anchor = (
        cfg.anchor.method if cfg.anchor.method != "none" else ("l2sp" if cfg.optim.decay_toward == "theta0" else "none")
    )
    ranks = world_size()  # FSDP2 over the ranks: ZeRO-3
    return TrainSetup(
        micro_batch=rows,
        seq_len=length,
        precision=precision,
        gpus=ranks,
        zero_stage=3 if sharded() else 0,
        optimizer=optimizer,
        activation_checkpointing=cfg.model.activation_checkpointing,
        loss_fraction=max(targets, 1) / (rows * length),
        device=device_type,
        anchor=anchor,
        grad_accum=2 if grads_alive else 1,
        optimizer_in_backward=cfg.train.optimizer_in_backward,
        activation_offload=cfg.model.activation_offload,
        cpu_offload=cfg.optim.cpu_offload,
        kl_theta0=cfg.loss.kl_to_theta0 > 0,
        kl_live=cfg.loss.kl_reference == "live",
        rank=cfg.optim.rank,
        project_embeddings=cfg.optim.project_embeddings,
    )


def predicted(model, setup: TrainSetup):
    return estimate(_spec(model.config.to_json_string(), getattr(model.config, "_name_or_path", "") or "model"), setup)


@functools.lru_cache(maxsize=4)
def _spec(config_json: str, name: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads(config_json))
    return spec_from_config(config, name)


def heaviest(model, cfg, *, precision: str, device_type: str, current: dict, candidates: list[dict]) -> dict:
    """The micro-batch with the highest predicted peak so far: rows × length alone is not enough, since
    the logits scale with the loss positions and later micro-batches of a step carry the gradients."""

    def peak(c):
        if not c.get("rows"):
            return -1.0
        return predicted(
            model,
            train_setup_for(
                cfg,
                precision=precision,
                device_type=device_type,
                rows=c["rows"],
                length=c["length"],
                targets=c["targets"],
                grads_alive=c.get("grads_alive", False),
            ),
        ).peak

    return max([current, *candidates], key=peak)


def compare(model, cfg, *, precision: str, meter, largest: dict, anchor_bytes: int = 0) -> dict:
    """Predicted vs measured peak for the largest micro-batch the run trained on (highest predicted peak)."""
    setup = train_setup_for(
        cfg,
        precision=precision,
        device_type=meter.device_type,
        rows=largest["rows"],
        length=largest["length"],
        targets=largest["targets"],
        grads_alive=largest.get("grads_alive", False),
    )
    est = predicted(model, setup)
    measured = meter.above_baseline("train")
    how = (
        "CUDA max_memory_allocated during training steps"
        if meter.device_type == "cuda"
        else "peak RSS during training steps minus RSS before the model loaded (2 ms sampling, glibc freeing at once)"
    )
    if meter.device_type == "cpu" and meter.pre_train is not None:
        # Above the RSS just before step 1, plus the fp32 weights already resident then (exact bytes):
        # evaluation run before training leaves caches and heap history that are not training memory.
        # The θ0 copies (anchor, EWC's Fisher, the KL's θ0 model) are resident before step 1 too: counted the same way.
        weights = sum(local(p).numel() * p.element_size() for p in model.parameters()) + anchor_bytes
        measured = meter.sections["train"] - meter.pre_train + weights
        how = (
            "peak RSS over the measured training steps minus RSS just before step 1, "
            f"plus the {weights / GB:.2f} GB of weights{' and θ0 copies' if anchor_bytes else ''} resident then "
            "(2 ms sampling, glibc freeing at once)"
        )
    peak = est.peak - est.get("CUDA context")  # the allocator's figures never include the context
    result = {
        "predicted_peak_gb": peak / GB,
        "measured_peak_gb": measured / GB,
        "error_pct": 100 * (peak - measured) / measured if measured > 0 else None,
        "largest_micro_batch": largest,
        "device": meter.device_type,
        "how_measured": how,
        "predicted_terms_gb": {t.name: t.bytes / GB for t in est.terms},
    }
    if meter.device_type == "cuda":
        result["measured_reserved_gb"] = (meter.sections.get("train_reserved", 0) - meter.baseline) / GB
    return result


def line(result: dict) -> str:
    err = result["error_pct"]
    lb = result["largest_micro_batch"]
    alive = ", after an earlier micro-batch of its step: gradients alive" if lb.get("grads_alive") else ""
    return (
        f"[memory] peak for the largest micro-batch ({lb['rows']} × {lb['length']} tokens{alive}): predicted "
        f"{result['predicted_peak_gb']:.2f} GB, measured {result['measured_peak_gb']:.2f} GB"
        + (f" ({err:+.1f}%)" if err is not None else "")
    )


def state_memory(model, cfg, *, precision: str, device_type: str, per_rank: list[dict], anchor_bytes: int = 0) -> dict:
    """Each rank's measured bytes of parameters, gradients and optimiser state (its shards) against the
    estimator's per-GPU figures (ZeRO-3 over the ranks when there are several)."""
    setup = train_setup_for(cfg, precision=precision, device_type=device_type, rows=1, length=1, targets=1)
    est = predicted(model, setup)
    freed = setup.optimizer_in_backward or setup.cpu_offload  # no gradient is left once the update is applied
    pred = {
        "params": est.get("weights"),
        "grads": 0.0 if freed else est.get("gradients"),
        "optimizer": est.get("optimizer state") + est.get("master weights"),
    }
    # A term predicted to be 0 (gradients freed in backward) is off by its share of the whole predicted state.
    errors = [100 * (r[k] - pred[k]) / (pred[k] or sum(pred.values())) for r in per_rank for k in pred]
    return {
        "ranks": len(per_rank),
        "zero_stage": 3 if sharded() else 0,
        "measured_per_rank_gb": [{k: r[k] / GB for k in ("params", "grads", "optimizer")} for r in per_rank],
        "predicted_per_rank_gb": {k: v / GB for k, v in pred.items()},
        "anchor_gb_per_rank": anchor_bytes / GB,
        "max_error_pct": max(errors, key=abs) if errors else None,
        "how_measured": "bytes of each rank's local shards after the first optimiser step (before zero_grad)",
    }


def state_memory_line(result: dict) -> str:
    m = result["measured_per_rank_gb"][0]
    p = result["predicted_per_rank_gb"]
    where = f"per rank (FSDP2 over {result['ranks']})" if result["zero_stage"] == 3 else "(one process)"
    return (
        f"[memory] model state {where}: parameters {m['params']:.3f} GB, gradients {m['grads']:.3f} GB, "
        f"optimizer {m['optimizer']:.3f} GB; predicted {p['params']:.3f} / {p['grads']:.3f} / {p['optimizer']:.3f} GB"
        + (f" (largest gap {result['max_error_pct']:+.1f}%)" if result["max_error_pct"] is not None else "")
    )


def available_bytes(device) -> int:
    """What this rank may use: CUDA's free memory on its device, or MemAvailable shared by the ranks on
    this host."""
    import os

    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    return kb * 1024 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def warn_if_too_big(cfg, precision: str, device) -> str | None:
    """Before θ0 loads: the estimated peak for a full micro-batch against what the device has. A line
    with the estimate and the planner's suggestion when it does not fit (the run still starts)."""
    from fulltune.memory.plan import plan
    from fulltune.memory.spec import load_spec

    if str(cfg.model.path).endswith(".gguf"):
        return None
    rows, length = cfg.train.micro_batch_size, cfg.data.max_seq_len
    setup = train_setup_for(
        cfg, precision=precision, device_type=device.type, rows=rows, length=length, targets=rows * length
    )
    try:
        spec = load_spec(cfg.model.path)
    except Exception:  # noqa: BLE001 — a broken model directory is reported, in one line, when θ0 loads
        return None
    peak, free = estimate(spec, setup).peak, available_bytes(device)
    if peak <= free:
        return None
    where = f"{device.type} ({'free on the GPU' if device.type == 'cuda' else 'MemAvailable'})"
    advice = plan(spec, "", world_size(), setup, device=(where, free / GB))
    return (
        f"[memory] warning: the estimated peak is {peak / GB:.1f} GB (micro-batch {rows} × {length} tokens, "
        f"{precision}, {cfg.optim.name}) and {free / GB:.1f} GB is available on {where}: the run may run out of "
        f"memory. The planner: {advice.summary}"
    )


def out_of_memory_line(model, cfg, *, precision: str, device, step: int, checkpoint) -> str:
    """A step ran out of memory: where, the estimate's breakdown for a full micro-batch, what the device
    has, the planner's answer for that capacity, and the checkpoint to resume from."""
    from fulltune.memory.plan import plan

    rows, length = cfg.train.micro_batch_size, cfg.data.max_seq_len
    setup = train_setup_for(
        cfg,
        precision=precision,
        device_type=device.type,
        rows=rows,
        length=length,
        targets=rows * length,
        grads_alive=cfg.train.grad_accum_steps > 1,
    )
    est = predicted(model, setup)
    parts = ", ".join(f"{t.name} {_size(t.bytes)}" for t in est.terms if t.bytes >= 0.01 * est.peak)
    total = __import__("torch").cuda.mem_get_info(device)[1] if device.type == "cuda" else available_bytes(device)
    where = f"{device.type} ({'the GPU' if device.type == 'cuda' else 'MemAvailable'})"
    if est.peak <= total:
        advice = (
            "the estimate fits, so something else holds memory: another process on the device, or the "
            "allocator's fragmentation (on CUDA: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True); or lower "
            "train.micro_batch_size, or set model.activation_checkpointing=true"
        )
    else:
        advice = "the planner: " + plan(est.spec, "", world_size(), setup, device=(where, total / GB)).summary
    resume = (
        f"checkpoint {checkpoint} is intact: train.resume=auto continues from it with "
        "model.activation_checkpointing or model.activation_offload switched on; other changes start a new run"
        if checkpoint
        else "no checkpoint was written yet"
    )
    return (
        f"out of memory in step {step} (micro-batch {rows} × {length} tokens, {precision}, {cfg.optim.name}): "
        f"estimated peak {_size(est.peak)} ({parts}) against {_size(total)} on {where}. "
        f"{advice[0].upper() + advice[1:]}. {resume[0].upper() + resume[1:]}"
    )


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.01 * GB else f"{nbytes / 2**20:.1f} MB"
