"""Per-item records: each scored item's outcome, kept so that changes are judged on the same items.

A scoring (evals/probes.summarise, evals/classify.label_accuracy) returns its summary with an
`items` entry of per-item lists:
    multiple choice and the task: correct (0/1), gold_logprob (the gold answer's summed
        log-probability), gold_tokens (its length in tokens), margin (gold minus the best wrong
        choice, summed log-probabilities);
    text and code: nll (summed over the continuation), tokens.
`split` takes them out of the summary (results.json keeps summaries); `write` puts them in
RUN/records/step_NNNNNN.json, one file per scored step (step 0 is θ0), with the task under "task"
and each probe under its name. The report, compare, interpolate and the budget pair them up
(evals/paired.py).

θ0's records are also cached across runs under $FULLTUNE_HOME/theta0-scores/, keyed by the
model's content, the items scored, the precision, the device and the scorer's version
(`theta0_key`): a second run on the same θ0 skips that pass. A damaged entry is ignored with one
line and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from fulltune import distributed as D

DIR = "records"
SCORER_VERSION = 1  # bump when scoring changes what an item's numbers mean


def split(result: dict) -> tuple[dict, dict]:
    """(the summaries without their per-item lists, {name: per-item lists}) of a probe set's result
    ({name: summary, "_seconds": …}) or of one summary (name "")."""
    if "items" in result:
        return {k: v for k, v in result.items() if k != "items"}, {"": result["items"]}
    summaries, items = {}, {}
    for name, summary in result.items():
        if isinstance(summary, dict) and "items" in summary:
            items[name] = summary["items"]
            summary = {k: v for k, v in summary.items() if k != "items"}
        summaries[name] = summary
    return summaries, items


def path_for(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / DIR / f"step_{step:06d}.json"


def write(run_dir: Path, step: int, part: str, items: dict) -> None:
    """Add `items` under `part` ("task" or "probes") to the step's record file (rank 0; atomic)."""
    if not D.is_main():
        return
    path = path_for(run_dir, step)
    record = read(run_dir, step) or {"step": step, "scorer_version": SCORER_VERSION}
    record[part] = items
    _write_json(path, record)


def read(run_dir: Path, step: int) -> dict | None:
    """The step's records ({"task": …, "probes": {name: …}}), or None when there are none."""
    try:
        return json.loads(path_for(run_dir, step).read_text())
    except (OSError, ValueError):
        return None


def steps(run_dir: Path) -> list[int]:
    """The steps that have records, in order."""
    folder = Path(run_dir) / DIR
    found = []
    for p in folder.glob("step_*.json") if folder.is_dir() else []:
        try:
            found.append(int(p.stem.removeprefix("step_")))
        except ValueError:
            continue
    return sorted(found)


def trim(run_dir: Path, step: int) -> None:
    """A resumed run: drop the records of steps past its checkpoint (they are scored again)."""
    for later in (s for s in steps(run_dir) if s > step):
        path_for(run_dir, later).unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


# θ0's records across runs


def model_digest(model_dir: Path) -> str:
    """sha256 over every file of the model directory (weights, config, tokenizer, template), or of
    the model file itself (a .gguf), each file's digest remembered by path, size and mtime so an
    unchanged model is hashed once."""
    from fulltune.assets import home
    from fulltune.atomic import sha256_file

    memo_path = home() / "theta0-scores" / "file-digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h, changed = hashlib.sha256(), False
    root = Path(model_dir)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            memo[key], changed = sha256_file(f), True
        h.update(f"{f.name if f == root else f.relative_to(root)}={memo[key]};".encode())
    if changed and D.is_main():
        _write_json(memo_path, memo)
    return h.hexdigest()


def device_name(device: torch.device) -> str:
    """What the scores were computed on: kernels differ between GPUs and between CPU kinds."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from fulltune.runtime import machine_line

    return machine_line().split("; precision")[0]  # CPU model, flags, inductor ISA (not the core count)


def theta0_key(*, model_digest: str, what: object, precision: str, device: str, batch_size: int) -> str:
    """The cache key of θ0's scores: the model's content, what was scored (items, labels), the
    precision, the device, the batch size (padding changes low-precision sums) and the versions."""
    parts = {
        "model": model_digest,
        "what": what,
        "precision": precision,
        "device": device,
        "batch_size": batch_size,
        "scorer": SCORER_VERSION,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_theta0(key: str) -> dict | None:
    """θ0's scores for this key from $FULLTUNE_HOME, or None (absent; damaged: one line, recomputed)."""
    from fulltune.assets import home

    path = home() / "theta0-scores" / f"{key}.json"
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") != key or not isinstance(entry.get("result"), dict):
            raise ValueError("not an entry for this key")
        return entry["result"]
    except (OSError, ValueError) as exc:
        print(f"[eval] ignoring a damaged cache of θ0's scores ({path}: {exc}); scoring θ0 again", flush=True)
        return None


def store_theta0(key: str, result: dict) -> None:
    from fulltune.assets import home

    if D.is_main():
        _write_json(home() / "theta0-scores" / f"{key}.json", {"key": key, "result": result})
