"""bench/gpu_check.sh dry-runs on CPU, so the GPU check cannot rot between the sessions lent a GPU:
every step runs or is skipped with its reason (a skipped step's config still loads), the checks
between runs hold, and only the three small files come back."""

import json
import os
import subprocess
from pathlib import Path

from conftest import ROOT

STEPS = ["one", "torchrun1", "resume", "packing", "lean", "cpu_offload", "act_offload", "syncs", "generate", "mfu"]


def test_the_gpu_check_dry_runs_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(env["OUT"])
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "report.md"]
    results = {r["step"]: r for r in json.loads((out / "gpu_check.json").read_text())}
    assert list(results) == STEPS
    for name in ("one", "torchrun1", "resume", "packing", "generate", "mfu"):
        assert results[name]["status"] == "ok", results[name]
    for name in ("lean", "cpu_offload", "act_offload", "syncs"):
        assert results[name]["status"] == "skipped" and "its config loads" in results[name]["detail"], results[name]
    assert "largest relative loss gap 0.0e+00" in results["torchrun1"]["detail"]  # gloo on CPU: the same losses
    assert results["resume"]["detail"].count("largest relative loss gap") == 2
    assert results["one"]["tok_per_s"] > 0 and results["mfu"]["probe_tflops"] > 0
    assert "| torchrun1 | ok |" in (out / "report.md").read_text()
