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

One run at a time writes to a directory: `claim_run_dir` takes an exclusive `flock` on the directory
itself before anything in it is cleaned, moved or written, and holds it for the whole run (under
torchrun, rank 0 holds it). A second run into the same directory is refused naming the PID that holds
it (read from /proc/locks). The kernel releases the lock when its process ends, however it ends, so
a lock left by a killed run is never stale: the next run simply gets it. No lock file is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

import yaml

from fulltune.errors import UserError, path_problem

MARKER = ".fulltune-run"
OUTPUTS = (
    "checkpoints",
    "final",
    "metrics.jsonl",
    "results.json",
    "tensorboard",
    "report.html",
    "best-in-budget",
    "records",
    "drift-task.safetensors",
    "drift-general.safetensors",
    "kl-theta0.safetensors",  # loss.kl_reference cached (kl_reference.py)
    "trackers.json",  # train.loggers (trackers.py): the MLflow and W&B runs, and their local stores
    "mlflow.db",
    "mlflow-artifacts",
    "wandb",
)  # what a fresh start replaces
PREVIOUS = ".previous-run"  # the replaced run's outputs, until the run that replaced it finishes
_HELD: dict[str, tuple[int, list[str]]] = {}  # run directory → (its locked descriptor, the folders made for it)


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


def check_output_path(output_dir: str) -> Path:
    """What can be said of train.output_dir before θ0 is even looked at: it is (or can be made) a
    directory: not a file, not below a file, not a FIFO or a symlink loop, its parent writable."""
    run_dir = Path(output_dir).expanduser()
    problem = path_problem(run_dir)
    if problem and "not found" not in problem:
        raise UserError(f"train.output_dir: {problem}")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.output_dir: {run_dir} is a file, not a directory")
    ancestor = run_dir
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != run_dir and not ancestor.is_dir():
        raise UserError(f"train.output_dir: {run_dir} cannot be made: {ancestor} is a file, not a directory")
    if ancestor != run_dir and not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"train.output_dir: {run_dir} cannot be made: {ancestor} is not writable")
    return run_dir


def claim_run_dir(output_dir: str, resume: str, overwrite: bool, lock: bool = True) -> Path:
    """The run directory, locked for this process (`lock`: rank 0 under torchrun), then checked as
    `check_run_dir` does. Under the lock, so no other run can change it between the check and the run."""
    run_dir = check_output_path(output_dir)
    named = Path(resume).expanduser()
    if resume not in ("", "auto") and named.exists() and not named.is_dir():
        raise UserError(
            f"train.resume: {named} is a file; name a checkpoint directory (RUN/checkpoints/step-N) or auto"
        )
    if lock:
        lock_run_dir(run_dir)
    try:
        return check_run_dir(output_dir, resume, overwrite)
    except BaseException:
        release_run_dirs()
        raise


def lock_run_dir(run_dir: Path) -> None:
    """An exclusive flock on the directory (made if missing), held until `release_run_dirs` or the end
    of the process. Taking the same directory again is a no-op; one process runs one run at a time, so
    a lock on another directory (a library caller's earlier run) is released first."""
    key = str(run_dir.resolve())
    if key in _HELD:
        return
    release_run_dirs()
    made = [p for p in (run_dir, *run_dir.parents) if not os.path.lexists(p)]  # leaf first: removed if unused
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise UserError(f"train.output_dir: {run_dir} cannot be made or opened ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = lock_holder(run_dir)
        raise UserError(
            f"train.output_dir: {run_dir} is in use by another fulltune run "
            f"({f'PID {holder}' if holder else 'its PID is not visible here'}); wait for it to end or stop it, "
            "or pick another train.output_dir"
        ) from None
    except OSError as exc:  # a file system without flock (some network mounts): run unlocked, and say so
        print(f"[train] warning: cannot lock {run_dir} ({exc.strerror}); make sure no other run writes there")
    _HELD[key] = (fd, [str(p) for p in made])


@contextlib.contextmanager
def held():
    """The run's lifetime: the run directory it claims (claim_run_dir) is released when it ends, however."""
    try:
        yield
    finally:
        release_run_dirs()


def held_run_dirs() -> list[str]:
    """The run directories this process holds locked now."""
    return sorted(_HELD)


def release_run_dirs() -> None:
    """The end of a run (or of a failed start): its directory is free again. A directory this process
    made and never wrote to is removed, so a start that failed leaves nothing behind."""
    for key, (fd, made) in list(_HELD.items()):
        del _HELD[key]
        os.close(fd)  # closing the descriptor releases the flock
        with contextlib.suppress(OSError):  # not empty: the run wrote to it
            for folder in made:
                os.rmdir(folder)


def lock_holder(run_dir: Path) -> int | None:
    """The PID holding a flock on `run_dir`, from /proc/locks (Linux; None where not visible)."""
    try:
        info = os.stat(run_dir)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        major, minor, inode = fields[5].split(":")
        same_file = int(inode) == info.st_ino and os.makedev(int(major, 16), int(minor, 16)) == info.st_dev
        if same_file and fields[4].isdigit() and int(fields[4]) > 0:
            return int(fields[4])
    return None


def check_run_dir(output_dir: str, resume: str, overwrite: bool) -> Path:
    """The run directory, refused where starting there could delete work that is not a run's own."""
    run_dir = check_output_path(output_dir)
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


def start_run_dir(run_dir: Path, fresh: bool, cfg) -> None:
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
    from fulltune.config import save_config

    save_config(cfg, run_dir / "config.yaml")  # the resolved config, beside the run's outputs
