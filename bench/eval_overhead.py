"""What paired per-item records cost the quickstart's evaluation, and what θ0's cache saves.

One process, the real SmolLM2-135M-Instruct, the quickstart's probes and task at the config's sizes
(configs/quickstart.yaml), the precision `auto` picks. Times, side by side:
- one scoring pass: the task accuracy (200 reviews) and the probes (50 / 50 / 50 / 30 / 30 items);
- what paired statistics add per run: taking the per-item records out and writing them (θ0 and θ*),
  pairing them (bootstrap, McNemar) for the forgetting report, the `[detect]` lines;
- the θ0 cache: hashing the model directory (first time, then remembered), reading an entry.
A run scores twice (θ0 and θ*), so the overhead is compared with two passes; a second run on the
same θ0 skips one of them.

    .venv/bin/python bench/eval_overhead.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fulltune.config import load_config  # noqa: E402
from fulltune.evals import records, theta0  # noqa: E402
from fulltune.evals.classify import label_accuracy  # noqa: E402
from fulltune.evals.forgetting import ProbeSet, forgetting_report  # noqa: E402
from fulltune.model import load_theta0, resolve_model_path  # noqa: E402
from fulltune.runtime import autocast_factory, machine_line, pick_device, resolve_precision  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    device = pick_device("auto")
    precision = resolve_precision("auto", device)
    autocast = autocast_factory(precision, device)
    model, tokenizer, _ = load_theta0(cfg.model, verbose=False)
    model.eval()
    from fulltune.assets import resolve_data_path
    from fulltune.data.sources import load_records

    task_path = resolve_data_path(cfg.eval.task_file)
    task = load_records(task_path)
    probes = ProbeSet(list(cfg.eval.probes), tokenizer, cfg.eval.probe_items, cfg.eval.probe_code_items)
    labels = list(cfg.eval.labels)

    def task_pass():
        return label_accuracy(model, tokenizer, task, source=task_path, labels=labels, batch_size=16, autocast=autocast)

    passes, task_s, probe_s = [], [], []
    for _ in range(args.repeats):
        t, ts = timed(task_pass)
        p, ps = timed(lambda: probes.run(model, autocast, 16))
        passes.append((t, p))
        task_s.append(ts)
        probe_s.append(ps)
    (t0, p0), (t1, p1) = passes[0], passes[-1]
    model_dir = resolve_model_path(cfg.model.path)  # before FULLTUNE_HOME points at the empty cache below
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FULLTUNE_HOME"] = tmp  # a cold cache of θ0's scores and file digests

        def bookkeeping():
            summaries = []
            for step, (t, p) in ((0, (t0, p0)), (70, (t1, p1))):
                ts, ti = records.split(t)
                ps, pi = records.split(p)
                records.write(Path(tmp) / "run", step, "task", ti[""])
                records.write(Path(tmp) / "run", step, "probes", pi)
                summaries.append((ts, ps, ti[""], pi))
            (ts0, ps0, ti0, pi0), (ts1, ps1, ti1, pi1) = summaries
            report = forgetting_report(
                ps0, ps1, (pi0, pi1), {"before": {**ts0, "items": ti0}, "after": {**ts1, "items": ti1}}
            )
            theta0.detectable_lines(theta0.detectable(ps0))
            return report

        _, book_s = timed(bookkeeping)
        _, digest_cold = timed(lambda: records.model_digest(model_dir))
        _, digest_warm = timed(lambda: records.model_digest(model_dir))
        records.store_theta0("k", {"task": t0, "probes": p0})
        _, read_s = timed(lambda: records.cached_theta0("k"))
    one_pass = min(task_s) + min(probe_s)
    overhead = book_s + digest_warm + read_s
    out = {
        "machine": machine_line(),
        "precision": precision,
        "task_pass_s": task_s,
        "probe_pass_s": probe_s,
        "paired_bookkeeping_s": book_s,
        "model_digest_first_s": digest_cold,
        "model_digest_again_s": digest_warm,
        "cache_read_s": read_s,
        "overhead_vs_two_passes_pct": 100 * overhead / (2 * one_pass),
        "overhead_first_time_pct": 100 * (book_s + digest_cold) / (2 * one_pass),
        "second_run_saves_s": one_pass - read_s - digest_warm,
        "torch": torch.__version__,
    }
    print(json.dumps(out, indent=1))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "eval_overhead.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
