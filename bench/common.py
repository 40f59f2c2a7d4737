"""What the quickstart benches share: the CPU they ran on, one short quickstart run in its own
process, its per-step records, and the loop over modes that writes the results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# A CPU without AVX512/AMX, emulated on one that has them: oneDNN, ATen and MKL kernels capped at AVX2
# (fp32 matmul ~0.23 instead of ~0.32 TFLOP/s on the 2-core Xeon here; bf16 only in software, ~2 GFLOP/s).
AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


# The quickstart these tables were measured on: SST-2 with the instruction in the user turn, padded
# batches of 8 sequences, lr 5e-5 (a mode's overrides change what it measures).
OLD_QUICKSTART = ROOT / "configs" / "quickstart-2026-11.yaml"


def bench_env(avx2: bool = False) -> dict:
    """The environment a benchmarked run gets: this checkout's fulltune, optionally capped at AVX2."""
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), **(AVX2_CAP if avx2 else {}))


def save_results(name: str, rows: list[dict], **extra) -> None:
    """bench/results/NAME.json: the CPU, its flags, `extra` and the rows."""
    out = {"cpu": cpu_name(), "flags": cpu_flags(), **extra, "rows": rows}
    (ROOT / "bench" / "results" / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")


def print_table(head: list[str], aligns: str, lines: list[list[str]]) -> None:
    """A markdown table: `aligns` one letter a column (l left, r right)."""
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" if a == "l" else "---:" for a in aligns) + " |")
    for cells in lines:
        print("| " + " | ".join(cells) + " |")


def cpu_flags() -> list[str]:
    return sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in FLAGS})


def cpu_name() -> str:
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )


def quickstart_steps(
    label: str, out: Path, steps: int, memory_steps: int, overrides: list[str], avx2: bool = False
) -> tuple[list[dict], list[float], str]:
    """`fulltune train configs/quickstart-2026-11.yaml` for `steps` steps in its own process, without
    evaluation: the data and padded 8-sequence batches these benches were measured on (a mode's
    overrides come last): (its step records, each step's seconds, its stdout)."""
    cmd = [
        sys.executable,
        "-m",
        "fulltune",
        "train",
        str(OLD_QUICKSTART),
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "train.progress=false",
        "train.save_interval=0",
        "train.val_interval=0",
        "data.val_fraction=0",
        "eval.task_file=",
        "eval.probes=[]",
        f"train.memory_steps={memory_steps}",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bench_env(avx2))
    if proc.returncode != 0:
        raise SystemExit(f"{label}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    times = [r["elapsed_s"] for r in rows]
    return rows, [b - a for a, b in zip([0.0] + times, times)], proc.stdout


def run_modes(modes, only, run_one, describe, out_file: str, steps: int, avx2: bool = False) -> list[dict]:
    """Each (label, overrides) of `modes` (those in `only`, if given) through `run_one(label, overrides,
    folder)`, a line each (`describe(row)`), then every row into `out_file` with the CPU's flags."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in modes:
            if only and label not in only:
                continue
            rows.append(run_one(label, overrides, Path(tmp)))
            print(f"{label}: {describe(rows[-1])}", flush=True)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    Path(out_file).write_text(
        json.dumps(
            {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "avx2_cap": avx2, "steps": steps, "rows": rows}, indent=1
        )
    )
    print(f"CPU: {cpu_name()}, flags {' '.join(cpu_flags())}{' (capped at AVX2)' if avx2 else ''}\n")
    return rows
