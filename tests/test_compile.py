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
    run_training(
        load_config(None, tiny_overrides(tiny_dir, data, tmp_path / "compiled", **extra, **{"train.compile": "true"}))
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers really were compiled
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(eager, compiled)), (eager, compiled)


def _train(tiny_dir, data, out, env, **extra):
    config = out.parent / "empty.yaml"
    config.write_text("{}\n")
    args = tiny_overrides(tiny_dir, data, out, **{"train.max_steps": 1, "train.compile": "true", **extra})
    return subprocess.run(
        [sys.executable, "-m", "fulltune", "train", str(config), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_a_compile_failure_is_one_line_or_runs_uncompiled_when_allowed(tiny_dir, tmp_path):
    """A machine without a working C++ compiler (inductor's CPU backend needs one)."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(8))
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"),
        CXX="/nonexistent/g++",
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
    )  # a cold cache: nothing compiled before is reused
    proc = _train(tiny_dir, data, tmp_path / "strict", env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("fulltune:")]
    assert len(lines) == 1 and lines[0].startswith("fulltune: error: train.compile: torch.compile failed (")
    assert "Traceback" not in proc.stderr and "train.compile_fallback=true" in lines[0]
    assert not (tmp_path / "strict" / "final").exists()
    proc = _train(tiny_dir, data, tmp_path / "fallback", env, **{"train.compile_fallback": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "fallback" / "final" / "model.safetensors").is_file()


def test_inductor_avx2_code_runs_without_pattern_rewrites(tiny_dir, capsys):
    """AVX2 code is compiled without inductor's pattern rewrites, and torch's global config is left
    as it was (a leaked or deleted inductor key broke a later test's compile: the issue "Green on
    every machine")."""
    import platform

    import torch
    import torch._dynamo
    import torch._inductor.config as inductor_config

    from fulltune import model as M
    from fulltune.config import ModelConfig

    if platform.machine() in (
        "x86_64",
        "AMD64",
    ):  # inductor honours ATEN_CPU_CAPABILITY on x86 (an AVX2 machine's code)
        env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
        isa = subprocess.run(
            [sys.executable, "-c", "from fulltune.model import inductor_cpu_isa; print(inductor_cpu_isa())"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        ).stdout.strip()
        assert isa == "avx2"
    assert M.inductor_options("cpu", "avx2") == {"pattern_matcher": False}
    assert M.inductor_options("cpu", "avx512 avx512_vnni amx_tile") == {} and M.inductor_options("cuda", "avx2") == {}
    before = (inductor_config.pattern_matcher, torch._dynamo.config.suppress_errors)
    model, _, _ = M.load_theta0(ModelConfig(path=str(tiny_dir)), verbose=False)
    assert M.compile_layers(model, True) == 3
    layer = M.decoder_layers(model)[0]
    assert layer.forward.inductor_options == M.inductor_options("cpu", M.inductor_cpu_isa())
    model(torch.tensor([[1, 2, 3, 4]]))  # compiles and runs every layer
    assert (inductor_config.pattern_matcher, torch._dynamo.config.suppress_errors) == before
    note = "inductor vectorises for AVX2 here: its pattern rewrites are off"
    assert (note in capsys.readouterr().out) == (M.inductor_cpu_isa() == "avx2")
    torch._dynamo.reset()
