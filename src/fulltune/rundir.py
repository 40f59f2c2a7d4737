"""The run directory: what a run may delete, and when it may start over.

A run deletes only what a run wrote. Its directory carries a marker file (`.fulltune-run`); a
directory that holds anything else, and no marker, is refused rather than cleared. A run directory
written before the marker existed is recognised by its config.yaml (a mapping with the model,
data and train sections of a fulltune config).

`resume=auto` restarts from θ0 only where there is nothing to lose: an empty or new directory,
or a run that stopped before its first checkpoint and has no final model. A finished run whose
checkpoints are gone is refused, never retrained over its `final/`.

Writes interrupted by a kill leave `.NAME.tmp-*` directories (and, between two renames,
`.NAME.old`) behind (atomic.py); they are removed, or put back, when a run starts or resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from fulltune.errors import UserError

MARKER = ".fulltune-run"
OUTPUTS = (
    "checkpoints",
    "final",
    "metrics.jsonl",
    "results.json",
    "tensorboard",
    "report.html",
    "best-in-budget",
)  # what a fresh start replaces
PREVIOUS = ".previous-run"  # the replaced run's outputs, until the run that replaced it finishes


def finish_run_dir(run_dir: Path) -> None:
    """The run finished: the outputs of the run it replaced are no longer needed."""
    shutil.rmtree(run_dir / PREVIOUS, ignore_errors=True)


def is_run_dir(path: Path) -> bool:
    if (path / MARKER).is_file():
        return True
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and {"model", "data", "train"} <= saved.keys()


def check_run_dir(output_dir: str, resume: str, overwrite: bool) -> Path:
    """The run directory, refused where starting there could delete work that is not a run's own."""
    run_dir = Path(output_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.output_dir: {run_dir} is a file, not a directory")
    contents = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if not contents:
        return run_dir
    if not is_run_dir(run_dir):
        shown = ", ".join(contents[:3]) + (f" and {len(contents) - 3} more" if len(contents) > 3 else "")
        raise UserError(
            f"train.output_dir: {run_dir} holds files that no fulltune run wrote ({shown}); "
            "a run only clears its own directory: pick a new or empty train.output_dir"
        )
    if not resume and not overwrite:
        raise UserError(
            f"{run_dir} already holds a run; resume it with train.resume=auto, "
            "pick another train.output_dir, or set train.overwrite=true"
        )
    if not os.access(run_dir, os.W_OK):
        raise UserError(f"train.output_dir: {run_dir} is not writable")
    return run_dir


def refuse_restart_over_final(run_dir: Path, overwrite: bool) -> None:
    """resume=auto found no checkpoint: starting from θ0 is refused where a final model would be lost."""
    if (run_dir / "final").exists() and not overwrite:
        raise UserError(
            f"train.resume=auto: {run_dir} holds a finished run (final/) and no checkpoint to resume "
            "from; it is kept. Train again from θ0 with train.overwrite=true, or use another "
            "train.output_dir"
        )


def clean_interrupted_writes(run_dir: Path) -> list[str]:
    """Remove the temporary directories of writes a kill interrupted; put back an `.old` whose
    replacement never arrived. Returns what was done, one line each."""
    done = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(".*.old")):
            target = path.with_name(path.name[1 : -len(".old")])
            if target.exists():
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path}")
            else:
                os.replace(path, target)
                done.append(f"restored {target} (a kill came between two renames)")
        for path in sorted(folder.glob(".*.tmp-*")):
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path} (an interrupted write)")
    return done


def start_run_dir(run_dir: Path, fresh: bool, write_config) -> None:
    """Called once θ0 and the data have loaded, so a failed start never clears an old run. A fresh
    start (train.overwrite) moves the previous run's outputs (only those: other files stay) into
    PREVIOUS, removed only when the new run finishes; if PREVIOUS is already there, the outputs
    in place belong to an overwrite that never finished, and they are the ones removed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        keep = not (run_dir / PREVIOUS).exists() and any((run_dir / name).exists() for name in OUTPUTS)
        if keep:
            (run_dir / PREVIOUS).mkdir()
        for name in OUTPUTS:
            target = run_dir / name
            if keep and target.exists():
                os.replace(target, run_dir / PREVIOUS / name)
            elif target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        if keep:
            print(
                f"[train] the previous run's outputs are kept in {run_dir / PREVIOUS} until this run finishes",
                flush=True,
            )
    (run_dir / MARKER).write_text(json.dumps({"written_by": "fulltune", "note": "a fulltune run directory"}) + "\n")
    write_config(run_dir / "config.yaml")
