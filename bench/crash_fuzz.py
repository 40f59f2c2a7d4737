"""Crash fuzzing: SIGKILL a run at random moments, resume with train.resume=auto, compare the bits.

A trial launches `fulltune train` (tiny random-init Llama, CPU fp32, a checkpoint every step) with
`train.resume=auto`, kills it with SIGKILL after a random delay, and again, `--kills` times; then
lets it finish. The final weights must equal an uninterrupted run's bit for bit, and metrics.jsonl
must hold every step once with the uninterrupted run's losses. A delay is drawn over the whole
run: a quarter of the kills land before training (loading), the rest anywhere in the steps —
mostly inside checkpoint writes, which take most of a tiny model's step. After each kill the
trial records the step reached and whether a write was cut (a `.NAME.tmp-*` directory left).

    .venv/bin/python bench/crash_fuzz.py [--trials 20] [--kills 3] [--steps 24] [--seed 0]

The model: the default model's tokenizer (SmolLM2's, with its chat template) and a random-init
2-layer Llama, hidden 32; the data: builtin:sst2-short/train. Results: bench/results/crash_fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(model_dir: Path, data: str, out: Path, steps: int) -> list[str]:
    keys = {
        "model.path": model_dir,
        "data.train": data,
        "data.max_seq_len": 128,
        "data.val_fraction": 0,
        "train.output_dir": out,
        "train.precision": "fp32",
        "train.device": "cpu",
        "train.micro_batch_size": 4,
        "train.max_steps": steps,
        "train.save_interval": 1,
        "train.keep_checkpoints": 2,
        "train.progress": "false",
        "train.peak_probe_s": 0.02,
        "train.resume": "auto",
        "optim.lr": 1e-3,
        "schedule.warmup_steps": 2,
        "eval.task_file": "",
        "eval.probes": "[]",
    }
    return [
        sys.executable,
        "-m",
        "fulltune",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        *(f"{k}={v}" for k, v in keys.items()),
    ]


def _env() -> dict:
    import os

    return dict(os.environ, PYTHONPATH=str(ROOT / "src"))


def timed_run(cmd: list[str], out: Path, steps: int) -> dict:
    """An uninterrupted run: its wall time, and when its first and last steps were logged."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    first = last = None
    while proc.poll() is None:
        n = _steps(out)
        first = first if first is not None or n == 0 else time.perf_counter() - t0
        last = last if last is not None or n < steps else time.perf_counter() - t0
        time.sleep(0.005)
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "first_step_s": first or 0.0, "last_step_s": last or wall}


def _steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.is_file() else 0


def _losses(out: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def trial(cmd: list[str], out: Path, timing: dict, kills: int, rng: random.Random) -> dict:
    """`kills` SIGKILLs at random moments, each followed by a resume; then a run to the end. A kill
    comes during loading (a quarter of them), or once the launch has logged a step, after a delay
    drawn over this launch's share of the training steps (so the kills spread over the run)."""
    events = []
    window = (timing["last_step_s"] - timing["first_step_s"]) * 1.2 / kills
    for _ in range(kills):
        start = _steps(out)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
        before = rng.random() < 0.25
        delay = rng.uniform(0, timing["first_step_s"]) if before else rng.uniform(0, window)
        if before:
            time.sleep(delay)
        else:
            while proc.poll() is None and _steps(out) <= start:
                time.sleep(0.002)
            time.sleep(delay)
        if proc.poll() is not None:  # it finished first: this kill found nothing to cut
            events.append({"delay_s": round(delay, 3), "finished_first": True})
            continue
        proc.kill()
        proc.wait()
        cut = sorted(str(p.relative_to(out)) for p in out.rglob(".*.tmp-*")) if out.exists() else []
        events.append(
            {
                "phase": "loading" if before else "steps",
                "delay_s": round(delay, 3),
                "step_logged": _steps(out),
                "writes_cut": cut,
            }
        )
    final = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    return {"events": events, "exit": final.returncode, "stderr": final.stderr[-1500:] if final.returncode else ""}


def compare(out: Path, reference: Path) -> dict:
    """Bitwise equal final weights, and every step logged once with the reference's loss."""
    if not (out / "final" / "model.safetensors").is_file():
        return {"bitwise_equal": False, "metrics_equal": False}
    a, b = _weights(out), _weights(reference)
    equal = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    return {"bitwise_equal": equal, "metrics_equal": _losses(out) == _losses(reference)}


def make_tiny_model(dest: Path) -> Path:
    """A random-init 2-layer Llama with the default model's tokenizer (its chat template included)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fulltune.assets import ensure_model

    tok = AutoTokenizer.from_pretrained(ensure_model())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def fuzz(model_dir: Path, data: str, work: Path, trials: int, kills: int, steps: int, seed: int) -> dict:
    reference = work / "straight"
    timing = timed_run(command(model_dir, data, reference, steps), reference, steps)
    rng = random.Random(seed)
    rows = []
    for i in range(trials):
        out = work / f"trial-{i}"
        row = trial(command(model_dir, data, out, steps), out, timing, kills, rng)
        row.update(compare(out, reference), trial=i)
        rows.append(row)
        cut = sum(bool(e.get("writes_cut")) for e in row["events"])
        print(
            f"trial {i}: kills at steps {[e.get('step_logged', 'done') for e in row['events']]}, {cut} cut a write; "
            f"exit {row['exit']}, bitwise equal {row['bitwise_equal']}, metrics equal {row['metrics_equal']}",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    return {
        "timing": timing,
        "steps": steps,
        "kills_per_trial": kills,
        "seed": seed,
        "trials": rows,
        "equal": sum(r["bitwise_equal"] and r["metrics_equal"] and r["exit"] == 0 for r in rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "crash_fuzz.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from common import cpu_flags, cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny")
        result = fuzz(model, "builtin:sst2-short/train", Path(tmp), args.trials, args.kills, args.steps, args.seed)
    result.update(cpu=cpu_name(), cpu_flags=cpu_flags())
    Path(args.out).write_text(json.dumps(result, indent=1))
    kills = [e for r in result["trials"] for e in r["events"]]
    print(
        f"\n{result['equal']}/{args.trials} trials bitwise equal to the uninterrupted run; {len(kills)} kills, "
        f"{sum(e.get('phase') == 'loading' for e in kills)} during loading, "
        f"{sum(e.get('phase') == 'steps' for e in kills)} "
        f"during the steps or after them ({sum(bool(e.get('writes_cut')) for e in kills)} cut a checkpoint or export "
        f"write), {sum('finished_first' in e for e in kills)} too late (the run had finished); "
        f"uninterrupted run {result['timing']['wall_s']:.1f} s, first step at {result['timing']['first_step_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
