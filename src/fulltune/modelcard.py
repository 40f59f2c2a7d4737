"""A model card (README.md with Hugging Face model-card metadata) in every exported model directory:
RUN/final/ and RUN/best-in-budget/ at the end of `fulltune train`, and each blend `fulltune
interpolate --save-models` writes.

It says what the model is and how it came to be, from the run's own files: the base model, the data
(files, records, tokens), the recipe (the resolved config.yaml, whole), the hardware and the time, the
task accuracy with its paired interval, the forgetting table with each probe's interval and verdict,
the budget's verdict, and the command that reproduces the run. The card is added to the directory's
manifest (`atomic.add_file`), so `fulltune verify` checks it with the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from fulltune.atomic import add_file
from fulltune.evals.forgetting import describe_change
from fulltune.report import budget_verdict, task_change

NAME = "README.md"


def metadata(base: str, accuracy: float | None, task: str) -> str:
    """The YAML header the Hub reads: a hub id as base_model (a local path is named in the text only)."""
    meta: dict = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    meta["tags"] = ["fulltune", "full-fine-tuning"]
    if base.count("/") == 1 and not Path(base).expanduser().exists():
        meta["base_model"] = base
    if accuracy is not None:
        metric = {"type": "accuracy", "value": round(100 * accuracy, 2), "name": "task accuracy (%)"}
        dataset = {"name": task, "type": "json"}
        meta["model-index"] = [
            {
                "name": "fulltune",
                "results": [{"task": {"type": "text-generation"}, "dataset": dataset, "metrics": [metric]}],
            }
        ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _data_lines(cfg: dict, results: dict) -> list[str]:
    data, lines = results.get("data") or {}, []
    for part, key in (("train", "train"), ("validation", "validation")):
        s = data.get(key)
        source = (cfg.get("data") or {}).get(part) or ("held out from train" if part == "validation" else "")
        if s:
            lines.append(
                f"- {part}: `{source}`: {s['kept']:,} of {s['records']:,} records kept, {s['tokens']:,} tokens "
                f"({s['target_tokens']:,} with loss)"
            )
    if data.get("packing"):
        p = data["packing"]
        lines.append(f"- packed: {p['sequences']:,} sequences into {p['rows']:,} rows ({100 * p['fill']:.1f} % filled)")
    seen = results.get("tokens_seen")
    if seen:
        lines.append(f"- seen in training: {seen:,} tokens ({results.get('target_tokens_seen', 0):,} with loss)")
    return lines or ["- (the run recorded no data statistics)"]


def _forgetting_lines(results: dict) -> list[str]:
    probes = (results.get("forgetting") or {}).get("probes") or {}
    if not probes:
        return ["No general-skill probes were scored (`eval.probes`)."]
    lines = [
        "| probe | θ0 | fine-tuned | change [95 % interval], p, verdict | items |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for name, r in probes.items():
        shown = (lambda v: f"{100 * v:.1f} %") if r.get("metric") == "acc" else (lambda v: f"{v:.3f} NLL/token")
        lines.append(
            f"| {name} | {shown(r['before'])} | {shown(r['after'])} | {describe_change(r)} | {r.get('n', '')} |"
        )
    return lines + ["", "Paired on the same items before and after (McNemar for accuracy, bootstrap for NLL)."]


def run_card(run_dir: Path, results: dict, *, hardware: str, which: str = "final") -> str:
    """The card of RUN/`which` (final, best-in-budget) from RUN/config.yaml and the run's results."""
    cfg_text = (run_dir / "config.yaml").read_text()
    cfg = yaml.safe_load(cfg_text) or {}
    base = str((cfg.get("model") or {}).get("path", "default"))
    task_file = (cfg.get("eval") or {}).get("task_file") or ""
    final = results.get("task_accuracy_final")
    out = [metadata(base, final["accuracy"] if final and which == "final" else None, Path(task_file).name or "task")]
    out += [f"# {run_dir.name}: a full fine-tune of {base}", ""]
    if which != "final":
        best = (results.get("budget") or {}).get("best") or {}
        out += [f"This is the run's step {best.get('step')}, the best task score inside its forgetting budget.", ""]
    out += ["Full fine-tuning with fulltune: every weight trained, from the base model's own weights.", ""]
    out += ["## Data", "", *_data_lines(cfg, results), ""]
    time_s = results.get("train_time_s")
    out += ["## Hardware and time", "", f"- {hardware}"]
    out += [
        f"- {time_s:.0f} s of training, {results.get('steps', 0)} steps"
        if time_s is not None
        else "- time not recorded",
        "",
    ]
    out += ["## Results", ""]
    if results.get("task_accuracy_theta0") and final:
        out += [f"- task accuracy (`{task_file}`), θ0 → fine-tuned: {task_change(results)}"]
    if results.get("final_val_loss") is not None:
        out += [f"- validation loss: {results['final_val_loss']:.4f}"]
    if results.get("budget"):
        out += [f"- forgetting budget: {budget_verdict(results['budget'])}"]
    out += ["", "### What fine-tuning cost in general skills", "", *_forgetting_lines(results), ""]
    out += ["## Reproduce", "", "Save the recipe below as `config.yaml` (the run directory has it) and run:", ""]
    out += ["```bash", "fulltune train config.yaml", "```", "", "```yaml", cfg_text.rstrip(), "```", ""]
    return "\n".join(out)


def blend_card(theta0: str, finetuned: str, row: dict, *, hardware: str) -> str:
    """The card of a WiSE-FT blend θ = (1 − α)·θ0 + α·θ*, with the blend's scores from `interpolate`."""
    alpha = row["alpha"]
    out = [metadata(theta0, (row.get("task") or {}).get("accuracy"), "task")]
    out += [f"# WiSE-FT blend at α = {alpha:.2f} of {finetuned} with {theta0}", ""]
    out += [
        f"θ = (1 − α)·θ0 + α·θ*: θ0 = `{theta0}`, θ* = `{finetuned}`, α = {alpha:.2f} (`fulltune interpolate`).",
        "",
    ]
    out += ["## Hardware", "", f"- {hardware}", "", "## Scores at this α", ""]
    if row.get("task"):
        out += [f"- task accuracy {100 * row['task']['accuracy']:.1f} % (n={row['task'].get('n')})"]
    for name, r in (row.get("changes") or {}).items():
        out += [f"- {name}: {describe_change(r)} (against θ0, paired)"]
    out += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"fulltune interpolate {theta0} {finetuned} --alphas {alpha:.2f} --save-models --out OUT",
        "```",
        "",
    ]
    return "\n".join(out)


def hardware(device: torch.device, precision: str | None = None) -> str:
    """Where the model was trained, as the card says it: the GPU and how many, or the CPU and its
    flags; then the precision it trained in and torch's version."""
    from fulltune import distributed as D
    from fulltune.runtime import machine_line

    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} × {D.world_size()}"
    else:
        where = machine_line().removeprefix("[machine] ").split("; inductor")[0]
    return where + (f"; trained in {precision}" if precision else "") + f"; torch {torch.__version__}"


def attach(folder: Path, text: str) -> Path:
    """README.md into an exported model directory, added to its manifest."""
    return add_file(folder, NAME, text)


def attach_run_cards(run_dir: Path, results: dict, hardware: str) -> list[Path]:
    """final/ and, where the budget kept one, best-in-budget/: each gets its card."""
    written = []
    for which in ("final", "best-in-budget"):
        folder = run_dir / which
        if (folder / "config.json").is_file():
            written.append(attach(folder, run_card(run_dir, results, hardware=hardware, which=which)))
    return written
