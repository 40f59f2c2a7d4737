"""train.compile: the compiled run trains as the eager one does; a compile failure is one line, or
(when allowed) the run goes on uncompiled."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import sentiment_records, tiny_overrides, write_jsonl
from fulltune.config import load_config
from fulltune.train import run_training


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_a_compiled_run_follows_the_eager_one(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(24))
    extra = {"train.max_steps": 3, "data.packing": "true"}  # packed rows: the compiled layers see position ids
    run_training(load_config(None, tiny_overrides(tiny_dir, data, tmp_path / "eager", **extra)))
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run_training(load_config(None, tiny_overrides(tiny_dir, data, tmp_path / "compiled", **extra, **{"train.compile": "true"})))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers really were compiled
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(eager, compiled)), (eager, compiled)


def _train(tiny_dir, data, out, env, **extra):
    config = out.parent / "empty.yaml"
    config.write_text("{}\n")
    args = tiny_overrides(tiny_dir, data, out, **{"train.max_steps": 1, "train.compile": "true", **extra})
    return subprocess.run([sys.executable, "-m", "fulltune", "train", str(config), *args],
                          capture_output=True, text=True, timeout=600, env=env)


def test_a_compile_failure_is_one_line_or_runs_uncompiled_when_allowed(tiny_dir, tmp_path):
    """A machine without a working C++ compiler (inductor's CPU backend needs one)."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(8))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), CXX="/nonexistent/g++",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))  # a cold cache: nothing compiled before is reused
    proc = _train(tiny_dir, data, tmp_path / "strict", env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("fulltune:")]
    assert len(lines) == 1 and lines[0].startswith("fulltune: error: train.compile: torch.compile failed (")
    assert "Traceback" not in proc.stderr and "train.compile_fallback=true" in lines[0]
    assert not (tmp_path / "strict" / "final").exists()
    proc = _train(tiny_dir, data, tmp_path / "fallback", env, **{"train.compile_fallback": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "fallback" / "final" / "model.safetensors").is_file()
