"""FSDP2 on 2 gloo ranks ≡ 1 process: losses, final weights, resume across rank counts, export, state bytes.

The 2-rank runs go through `fulltune train CONFIG --nproc 2` (torchrun's launcher, two CPU processes).
One run covers gradient accumulation, null micro-batches (an epoch's last step is one sequence),
data mixing, discriminative rates, clipping, decay toward θ0, EWC (its Fisher too) and validation.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, sentiment_records, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from fulltune.config import load_config
from fulltune.distributed import my_share
from fulltune.train import run_training

STEPS = 4


def _general(path):
    g = torch.Generator().manual_seed(5)
    rows = [
        {"text": " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (10,), generator=g))} for _ in range(20)
    ]
    return write_jsonl(path, rows)


MC = [
    {"context": "the movie was", "choices": [" great fun", " dull", " slow and boring"], "gold": 0},
    {"context": "the plot was", "choices": [" dull", " good"], "gold": 1},
    {"context": "what is the capital of france", "choices": [" paris", " the film"], "gold": 0},
]


def _settings(tmp: Path) -> dict:
    return {
        "eval.task_file": write_jsonl(tmp / "task.jsonl", sentiment_records(7, seed=3)),
        "eval.labels": "[positive, negative]",
        "eval.probes": f"[mc:{write_jsonl(tmp / 'mc.jsonl', MC)}]",
        "train.max_steps": STEPS,
        "train.micro_batch_size": 2,
        "train.grad_accum_steps": 3,
        "train.save_interval": 2,
        "train.keep_checkpoints": 5,
        "train.val_interval": 2,
        "data.val_fraction": 0.2,
        "data.general": f"[{_general(tmp / 'general.jsonl')}]",
        "data.mix_ratio": 0.2,
        "optim.layer_lr_decay": 1.3,
        "optim.grad_clip": 0.5,
        "optim.weight_decay": 0.1,
        "optim.decay_toward": "theta0",
        "anchor.method": "ewc",
        "anchor.lam": 0.1,
        "anchor.fisher_batches": 2,
    }


def _torchrun(tmp: Path, overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    config = tmp / "empty.yaml"
    config.write_text("{}\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.run(
        [sys.executable, "-m", "fulltune", "train", str(config), *overrides, "--nproc", str(nproc)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _losses(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = write_jsonl(tmp / "chat.jsonl", sentiment_records(24))
    settings = _settings(tmp)

    def overrides(name, **extra):
        return tiny_overrides(tiny_dir, data, tmp / name, **settings, **extra)

    run_training(load_config(None, overrides("one")))
    out = {"one": tmp / "one"}
    for name, extra in (
        ("two", {}),
        ("two_then_two", {"train.resume": tmp / "two" / "checkpoints" / "step-0000002"}),
        ("one_then_two", {"train.resume": tmp / "one" / "checkpoints" / "step-0000002"}),
    ):
        proc = _torchrun(tmp, overrides(name, **extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = tmp / name
    run_training(
        load_config(None, overrides("two_then_one", **{"train.resume": tmp / "two" / "checkpoints" / "step-0000002"}))
    )
    out["two_then_one"] = tmp / "two_then_one"
    return out


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert set(wa) == set(wb)
    for name in wa:
        diff = float((wa[name] - wb[name]).abs().max())
        assert diff <= 1e-5 * float(wa[name].abs().max()) + 1e-7, f"{name}: max |Δ| {diff}"


def test_two_ranks_follow_the_one_process_trajectory(runs):
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        for key in ("loss", "grad_norm", "penalty", "theta0_distance"):
            assert _close(one[step][key], two[step][key]), (step, key, one[step][key], two[step][key])
        assert one[step]["lr"] == two[step]["lr"] and one[step]["target_tokens_seen"] == two[step]["target_tokens_seen"]
    assert any(r["grad_norm"] > 0.5 for r in one.values()), "clipping never engaged: the test would miss it"
    assert one[1]["loss"] != one[2]["loss"]
    r1, r2 = (json.loads((runs[n] / "results.json").read_text()) for n in ("one", "two"))
    assert _close(r1["final_val_loss"], r2["final_val_loss"])
    assert r1["mixing"] == r2["mixing"] and r1["mixing"]["general_sequences"] > 0
    for key in ("task_accuracy_theta0", "task_accuracy_final", "probes_theta0", "probes_final"):  # prefix-tree scoring
        assert r1[key].keys() == r2[key].keys() and r1[key] != {}
    assert r1["task_accuracy_final"]["correct"] == r2["task_accuracy_final"]["correct"]
    assert r1["probes_final"]["mc"]["acc"] == r2["probes_final"]["mc"]["acc"]
    _assert_same_weights(runs["one"], runs["two"])


def test_the_fisher_shards_are_the_one_process_fisher(runs):
    full = load_file(str(runs["one"] / "fisher.safetensors"))
    shards = [load_file(str(runs["two"] / f"fisher-rank{r}-of-2.safetensors")) for r in range(2)]
    for key, tensor in full.items():
        joined = torch.cat([s[key] for s in shards])  # FSDP2 shards dim 0: rank 0 first
        assert joined.shape == tensor.shape
        diff = float((joined - tensor).abs().max())
        assert diff <= 1e-5 * float(tensor.abs().max()), (key, diff, float(tensor.abs().max()))
    assert float(full["0"].abs().sum()) > 0


def test_a_two_rank_checkpoint_resumes_on_one_and_on_two_ranks(runs):
    straight = _losses(runs["two"])
    assert (runs["two"] / "checkpoints" / "step-0000002" / "dcp").is_dir()
    assert not (runs["two"] / "checkpoints" / "step-0000002" / "model.safetensors").exists()  # no rank gathered
    for name in ("two_then_one", "two_then_two"):
        resumed = _losses(runs[name])
        assert sorted(resumed) == [3, 4], name
        for step in (3, 4):
            assert _close(resumed[step]["loss"], straight[step]["loss"]), (name, step)
        _assert_same_weights(runs["two"], runs[name])


def test_a_one_process_checkpoint_resumes_on_two_ranks(runs):
    straight, resumed = _losses(runs["one"]), _losses(runs["one_then_two"])
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert _close(resumed[step]["loss"], straight[step]["loss"]), step
    _assert_same_weights(runs["one"], runs["one_then_two"])


def test_the_two_rank_export_loads_with_from_pretrained(runs):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(runs["two"] / "final", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reference = AutoModelForCausalLM.from_pretrained(runs["one"] / "final")
    ids = torch.tensor([[5, 9, 12, 40, 7, 3]])
    with torch.no_grad():
        a, b = model(ids).logits, reference(ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (runs["two"] / "final").glob("*.safetensors")) == ["model.safetensors"]


def test_each_rank_holds_half_of_the_model_state(runs):
    one = json.loads((runs["one"] / "results.json").read_text())["state_memory"]
    two = json.loads((runs["two"] / "results.json").read_text())["state_memory"]
    assert one["ranks"] == 1 and two["ranks"] == 2 and two["zero_stage"] == 3
    full = one["measured_per_rank_gb"][0]
    for key in ("params", "grads", "optimizer"):
        shares = [r[key] / full[key] for r in two["measured_per_rank_gb"]]
        assert all(0.45 < s < 0.55 for s in shares), (key, shares)
        assert abs(sum(shares) - 1) < 1e-9, (key, shares)  # the shards add up to the whole, nothing twice
        assert abs(two["predicted_per_rank_gb"][key] - one["predicted_per_rank_gb"][key] / 2) < 1e-12


def test_share_of_a_step_splits_sequences_without_overlap(monkeypatch):
    import fulltune.distributed as D

    step = [[0, 1], [2, 3], [4]]
    got = {}
    for r in range(2):
        monkeypatch.setattr(D, "world_size", lambda: 2)
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        got[r] = my_share(step, 2)
    assert got[0] == [[0, 1], []] and got[1] == [[2, 3], [4]]  # rank 0 pads with a null micro-batch
    assert sorted(i for r in got.values() for b in r for i in b) == [0, 1, 2, 3, 4]
    monkeypatch.setattr(D, "world_size", lambda: 3)
    shares = []
    for r in range(3):
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        shares.append(my_share([[0]], 4))
    assert shares == [[[]], [[]], [[0]]]


def _wait_for_steps(metrics: Path, n: int) -> None:
    import time

    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= n) and time.time() < deadline:
        time.sleep(0.2)
    assert metrics.exists(), "training never started"


def _one_checkpoint_then_resume(tiny_dir, data: Path, config: Path, run: Path, env: dict) -> None:
    """After a stop: exactly one sharded checkpoint at the last logged step; 2 more steps on 2 ranks resume it."""
    (saved,) = sorted((run / "checkpoints").iterdir())
    step = json.loads((saved / "trainer_state.json").read_text())["step"]
    assert (saved / "dcp").is_dir() and step >= 3 and len((run / "metrics.jsonl").read_text().splitlines()) == step
    overrides = tiny_overrides(
        tiny_dir,
        data,
        run,
        **{"train.max_steps": step + 2, "train.micro_batch_size": 1, "train.allow_schedule_change": True},
    )
    done = subprocess.run(
        [sys.executable, "-m", "fulltune", "train", str(config), *overrides, "--resume", "auto", "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(_losses(run)) == list(range(1, step + 3))


def test_sigterm_on_two_ranks_checkpoints_once_and_resumes(tiny_dir, tmp_path):
    """SIGTERM to the launcher (what SLURM sends; Ctrl-C's SIGINT takes the same path, exit 130 —
    tests/test_cli.py): both ranks stop after the same step, one sharded checkpoint is written, exit
    143 without a traceback, and the run resumes on 2 ranks."""
    import signal

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(400))
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    overrides = tiny_overrides(
        tiny_dir, data, tmp_path / "run", **{"train.max_steps": 100000, "train.micro_batch_size": 1}
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fulltune", "train", str(config), *overrides, "--nproc", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    _wait_for_steps(tmp_path / "run" / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-2000:]
    assert "continue with train.resume=auto" in err and "Traceback" not in err
    assert err.count("stopped at step") == 1  # rank 0 reports
    _one_checkpoint_then_resume(tiny_dir, data, config, tmp_path / "run", env)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_scancel_under_raw_torchrun_checkpoints_once_and_resumes(tiny_dir, tmp_path):
    """A user's own `torchrun -m fulltune train ...` and SLURM's scancel, which sends SIGTERM to every
    process of the job: torchrun passes its SIGTERM on, so each worker gets two. They finish the step,
    one sharded checkpoint is written and the run resumes. torchrun itself exits 1 with its own
    SignalException traceback (not ours to change; `--nproc` returns 143)."""
    import signal

    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(400))
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    overrides = tiny_overrides(
        tiny_dir, data, tmp_path / "run", **{"train.max_steps": 100000, "train.micro_batch_size": 1}
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            "localhost:0",
            "--max-restarts",
            "0",
            "--shutdown-timeout",
            "120",
            "-m",
            "fulltune",
            "train",
            str(config),
            *overrides,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    _wait_for_steps(tmp_path / "run" / "metrics.jsonl", 3)
    workers = _children(proc.pid)
    assert len(workers) == 2
    for pid in [proc.pid, *workers]:  # scancel: every process of the job
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert err.count("stopped at step") == 1 and "continue with train.resume=auto" in err, err[-3000:]
    assert proc.returncode == 1 and "SignalException" in err  # torchrun's own status: it re-raises the SIGTERM it got
    _one_checkpoint_then_resume(tiny_dir, data, config, tmp_path / "run", env)


def test_a_user_error_on_two_ranks_is_one_line(tiny_dir, tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    overrides = tiny_overrides(tiny_dir, tmp_path / "missing.jsonl", tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "fulltune", "train", str(config), *overrides, "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"fulltune: error: data file not found: {tmp_path / 'missing.jsonl'}"], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_every_rank_saves_its_own_rng_state(runs):
    for ckpt in (runs["two"] / "checkpoints").iterdir():
        states = [torch.load(ckpt / name, weights_only=True) for name in ("rng.pt", "rng-rank1.pt")]
        assert all(set(s) >= {"torch", "python"} for s in states)
    assert not any((runs["one"] / "checkpoints").glob("*/rng-rank*.pt"))


def test_a_missing_fisher_shard_makes_every_rank_recompute(runs, tiny_dir, tmp_path):
    """One rank's cached Fisher shard gone when resuming (the one time a cache is read): both ranks
    recompute (no rank waits in a collective alone)."""
    import shutil

    run = tmp_path / "again"
    shutil.copytree(runs["two"], run)
    (run / "fisher-rank1-of-2.safetensors").unlink()
    before = load_file(str(run / "fisher-rank0-of-2.safetensors"))
    data = runs["one"].parent / "chat.jsonl"
    settings = {**_settings(runs["one"].parent), "train.resume": "auto"}
    overrides = tiny_overrides(tiny_dir, data, run, **settings)
    proc = _torchrun(tmp_path, overrides)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "computed, cached in" in proc.stdout and "reused" not in proc.stdout
    after = load_file(str(run / "fisher-rank0-of-2.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (run / "fisher-rank1-of-2.safetensors").is_file()
    assert _close(_losses(run)[1]["loss"], _losses(runs["two"])[1]["loss"])


def _torchrun_module(tmp: Path, overrides: list[str], nproc: int) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node=G -m fulltune train ...`, as a user launches it (G = 1 included)."""
    config = tmp / "empty.yaml"
    config.write_text("{}\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "fulltune",
            "train",
            str(config),
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


@pytest.fixture(scope="module")
def policy_runs(tiny_dir, tmp_path_factory):
    """bf16-mixed on one process, under torchrun on 1 rank and on 2 ranks."""
    tmp = tmp_path_factory.mktemp("policy")
    data = write_jsonl(tmp / "chat.jsonl", sentiment_records(24))
    settings = {
        "train.max_steps": 3,
        "train.micro_batch_size": 2,
        "train.grad_accum_steps": 2,
        "train.precision": "bf16-mixed",
        "train.force_precision": "true",
        "train.save_interval": 2,
        "optim.lr": 3e-3,
    }
    run_training(load_config(None, tiny_overrides(tiny_dir, data, tmp / "one", **settings)))
    out = {"one": tmp / "one"}
    for name, nproc in (("torchrun1", 1), ("torchrun2", 2)):
        proc = _torchrun_module(tmp, tiny_overrides(tiny_dir, data, tmp / name, **settings), nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = tmp / name
        out[name + ".stdout"] = proc.stdout
    return out


def test_one_rank_under_torchrun_runs_the_sharded_path(policy_runs):
    """One GPU under torchrun takes the FSDP2 path with its collectives, as G GPUs do: its checkpoint
    is sharded (dcp/) and it follows the one-process trajectory."""
    assert "FSDP2 over 1 rank," in policy_runs["torchrun1.stdout"]
    assert (policy_runs["torchrun1"] / "checkpoints" / "step-0000002" / "dcp").is_dir()
    state = json.loads((policy_runs["torchrun1"] / "results.json").read_text())["state_memory"]
    assert state["ranks"] == 1 and state["zero_stage"] == 3
    one, fsdp1 = _losses(policy_runs["one"]), _losses(policy_runs["torchrun1"])
    assert sorted(one) == sorted(fsdp1) == [1, 2, 3]
    for step in one:
        assert _close(one[step]["loss"], fsdp1[step]["loss"], 1e-6), (step, one[step]["loss"], fsdp1[step]["loss"])


def test_bf16_mixed_numerics_are_the_same_on_one_and_two_ranks(policy_runs):
    """The same numerics policy on 1 and G devices: fp32 shards gathered as fp32, bf16 autocast in
    both. A bf16 gather (FSDP2's param_dtype=bf16) computes norms and the residual stream in bf16: it
    moved the losses by 5e-5–1e-4 and the grad norms by up to 2.4e-3 relative here (measured); with
    one policy they agree to summation order (≤ 1e-7)."""
    from fulltune.distributed import mixed_precision_policy

    policy = mixed_precision_policy("bf16-mixed")
    assert policy.param_dtype is None and policy.reduce_dtype is None
    one, two = _losses(policy_runs["one"]), _losses(policy_runs["torchrun2"])
    for step in one:
        for key in ("loss", "grad_norm"):
            assert _close(one[step][key], two[step][key], 1e-5), (step, key, one[step][key], two[step][key])
    assert one[1]["loss"] != one[3]["loss"]


def test_pure_bf16_on_two_ranks_reduces_gradients_in_fp32(tiny_dir, tmp_path):
    """Pure bf16 under FSDP2 reduce-scattered its gradients in bf16, rounding at every hop of the
    ring. The policy reduces them in fp32 (rounded to bf16 once); the run trains on two ranks and
    follows the one-process pure-bf16 trajectory."""
    from fulltune.distributed import mixed_precision_policy

    assert mixed_precision_policy("bf16").reduce_dtype == torch.float32
    assert mixed_precision_policy("fp32").reduce_dtype is None  # fp32 shards: reduced in fp32 already
    data = write_jsonl(tmp_path / "chat.jsonl", sentiment_records(24))
    settings = {"train.max_steps": 3, "train.micro_batch_size": 2, "train.precision": "bf16",
                "train.force_precision": "true", "optim.lr": 3e-3}  # fmt: skip
    run_training(load_config(None, tiny_overrides(tiny_dir, data, tmp_path / "one", **settings)))
    proc = _torchrun_module(tmp_path, tiny_overrides(tiny_dir, data, tmp_path / "two", **settings), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:  # bf16 weights: the sums' order alone moves the last bits
        assert _close(one[step]["loss"], two[step]["loss"], 2e-2), (step, one[step]["loss"], two[step]["loss"])
        assert _close(one[step]["grad_norm"], two[step]["grad_norm"], 5e-2), step
