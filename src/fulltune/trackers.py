"""Where a run's numbers go besides RUN/metrics.jsonl: `train.loggers` (tensorboard, mlflow, wandb).

Each tracker gets every record metrics.jsonl gets, as scalars by tag (`metrics.scalars`), and at the
end of a finished run the forgetting verdicts and the run's files; `train.tensorboard: true` is the
same as naming tensorboard.

- tensorboard: RUN/tensorboard/ (a resumed run purges the events past its checkpoint's step).
- mlflow: the tracking store named by MLFLOW_TRACKING_URI, else a local one in the run directory
  (RUN/mlflow.db, artifacts in RUN/mlflow-artifacts/; `mlflow ui --backend-store-uri
  sqlite:///RUN/mlflow.db`), experiment "fulltune", one MLflow run per fulltune run: params the
  resolved config, metrics per step, artifacts report.html, results.json and config.yaml.
- wandb: offline (RUN/wandb/, `wandb sync` uploads it) unless the user has configured W&B
  (WANDB_MODE, WANDB_API_KEY or a login in ~/.netrc); project WANDB_PROJECT or "fulltune".

RUN/trackers.json keeps each tracker's run id and the last step it was given: a resumed run continues
the same MLflow and W&B run and does not send again the steps they already have. MLflow and W&B are
optional extras (pip install 'fulltune[mlflow]' / 'fulltune[wandb]'); a missing one is one line
before any model loads. Only rank 0 tracks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path

from fulltune.errors import UserError

LOGGERS = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
STATE = "trackers.json"
EXPERIMENT = "fulltune"
ARTIFACTS = ("report.html", "results.json", "config.yaml")


def trackers_of(train_cfg) -> list[str]:
    """train.loggers, with tensorboard added by train.tensorboard (its old switch), each once."""
    names = list(dict.fromkeys(train_cfg.loggers))
    return names + ["tensorboard"] if train_cfg.tensorboard and "tensorboard" not in names else names


def check_installed(names: list[str]) -> None:
    """One line naming what to install, before any model loads."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            extra = f"pip install 'fulltune[{name}]'" if name != "tensorboard" else "pip install tensorboard"
            raise UserError(f"train.loggers: {name} needs the {PACKAGES[name]} package: {extra}")


def open_trackers(names: list[str], run_dir: Path, *, config: dict, resumed_step: int) -> list:
    """The trackers, each continuing its run from RUN/trackers.json when this run resumes."""
    saved = _read_state(run_dir) if resumed_step else {}
    kinds = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}
    trackers = [kinds[n](run_dir, config=config, saved=saved.get(n) or {}, resumed_step=resumed_step) for n in names]
    _write_state(run_dir, trackers)
    return trackers


def _read_state(run_dir: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run_dir / STATE).read_text())
    return {}


def _write_state(run_dir: Path, trackers: list) -> None:
    state = {t.name: t.state() for t in trackers if t.state()}
    if state:
        tmp = run_dir / f".{STATE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(run_dir / STATE)


def log(trackers: list, run_dir: Path, values: dict[str, float], step: int) -> None:
    """One record's scalars to every tracker that did not have this step before this process began
    (`skip_until`: a resumed run's steps that its MLflow or W&B run already holds)."""
    fresh = [t for t in trackers if step > t.skip_until and not getattr(t, "failed", False)]
    for t in fresh:
        if _guarded(t, lambda t: t.log(values, step)):
            t.last_step = max(t.last_step, step)
    if any(t.state() for t in fresh):
        _write_state(run_dir, trackers)


def _guarded(tracker, call) -> bool:
    """call(tracker); a tracker that fails (a server gone, a full disk) is said once and left out, and
    training goes on."""
    try:
        call(tracker)
        return True
    except Exception as exc:  # noqa: BLE001 — whatever the tracker's library raises
        tracker.failed = True
        print(f"[train] warning: {tracker.name} stopped tracking this run ({type(exc).__name__}: {exc})", flush=True)
        return False


def end(trackers: list, run_dir: Path, results: dict | None, status: str = "FINISHED") -> None:
    """A finished run's verdicts and files to each tracker, then its run ended (`status`: FINISHED, or
    KILLED / FAILED for a run that stopped early, whose results are None)."""
    for t in trackers:
        _guarded(t, lambda t: t.end(run_dir, results, status))


def final_values(results: dict) -> tuple[dict[str, float], dict[str, str]]:
    """(numbers, verdicts) of a finished run: task accuracy, validation loss, each probe's change."""
    numbers, verdicts = {}, {}
    for key in ("task_accuracy_theta0", "task_accuracy_final"):
        if results.get(key):
            numbers[f"final/{key}"] = results[key]["accuracy"]
    if results.get("final_val_loss") is not None:
        numbers["final/val_loss"] = results["final_val_loss"]
    forgetting = results.get("forgetting") or {}
    rows = dict(forgetting.get("probes") or {}) | ({"task": forgetting["task"]} if forgetting.get("task") else {})
    for name, row in rows.items():
        numbers[f"forgetting/{name}/change"] = row["change"]
        if row.get("ci95"):
            numbers[f"forgetting/{name}/ci95_lo"], numbers[f"forgetting/{name}/ci95_hi"] = row["ci95"]
        verdicts[f"forgetting/{name}/verdict"] = str(row.get("verdict"))
    if results.get("budget"):
        verdicts["forgetting/budget"] = "inside" if results["budget"].get("best") else "no step inside"
    return numbers, verdicts


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, *, config: dict, saved: dict, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1 if resumed_step else None)
        self.skip_until = self.last_step = resumed_step if resumed_step else -1  # the events past it were purged

    def state(self) -> dict:
        return {}

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def end(self, run_dir: Path, results: dict | None, status: str) -> None:
        self.writer.close()


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Libraries that announce every step at INFO (MLflow and alembic their tables, lm-eval its defaults):
    warnings only, while we call them."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _metric_key(tag: str) -> str:
    return re.sub(r"[^\w\-. :/]", "_", tag)  # the characters MLflow accepts in a metric name


class MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, *, config: dict, saved: dict, resumed_step: int):
        from mlflow.tracking import MlflowClient

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        self.uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}" if local else os.environ["MLFLOW_TRACKING_URI"]
        with quiet_loggers("mlflow", "alembic"):
            self.client = MlflowClient(tracking_uri=self.uri)
            if saved.get("run_id") and saved.get("tracking_uri") == self.uri:
                self.run_id, self.last_step = saved["run_id"], saved.get("last_step", -1)
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id, self.last_step = self._new_run(run_dir, config, local), -1
        self.skip_until = self.last_step

    def _new_run(self, run_dir: Path, config: dict, local: bool) -> str:
        from mlflow.entities import Param

        found = self.client.get_experiment_by_name(EXPERIMENT)
        where = (run_dir / "mlflow-artifacts").resolve().as_uri() if local else None
        experiment = (
            found.experiment_id if found else self.client.create_experiment(EXPERIMENT, artifact_location=where)
        )
        run = self.client.create_run(
            experiment, run_name=run_dir.name, tags={"fulltune.run_dir": str(run_dir.resolve())}
        )
        params = [Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 params a call
            self.client.log_batch(run.info.run_id, params=params[start : start + 100])
        return run.info.run_id

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "last_step": self.last_step}

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_metric_key(k), v, now, step) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def end(self, run_dir: Path, results: dict | None, status: str) -> None:
        if results is not None:
            numbers, verdicts = final_values(results)
            self.log(numbers, self.last_step)
            for key, value in verdicts.items():
                self.client.set_tag(self.run_id, key, value)
            for name in ARTIFACTS:
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name))
        self.client.set_terminated(self.run_id, status)


class WandB:
    name = "wandb"

    def __init__(self, run_dir: Path, *, config: dict, saved: dict, resumed_step: int):
        import wandb

        configured = any(os.environ.get(k) for k in ("WANDB_MODE", "WANDB_API_KEY")) or _netrc_has("api.wandb.ai")
        self.own_service = "WANDB_SERVICE" not in os.environ  # W&B's process is ours to stop at the end
        resume_id = saved.get("id")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", EXPERIMENT),
            name=run_dir.name,
            dir=str(run_dir),
            mode=None if configured else "offline",
            config=config,
            id=resume_id,
            resume="allow" if resume_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.skip_until = self.last_step = saved.get("last_step", -1) if resume_id else -1

    def state(self) -> dict:
        return {"id": self.run.id, "last_step": self.last_step}

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def end(self, run_dir: Path, results: dict | None, status: str) -> None:
        if results is not None:
            numbers, verdicts = final_values(results)
            self.run.summary.update({**numbers, **verdicts})
            import wandb

            files = wandb.Artifact(re.sub(r"[^\w\-.]", "-", run_dir.name) + "-files", type="fulltune-run")
            for name in ARTIFACTS:
                if (run_dir / name).is_file():
                    files.add_file(str(run_dir / name))
            self.run.log_artifact(files)
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        if self.own_service:  # the process as we found it: no W&B service left running, nor its variable
            import wandb

            wandb.teardown()
            os.environ.pop("WANDB_SERVICE", None)


def _netrc_has(host: str) -> bool:
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    with contextlib.suppress(OSError):
        return host in path.read_text()
    return False


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
