"""Throughput accounting: the FLOP formula against torch's own FLOP counter, the peak probe's
arithmetic on a known matmul, and the numbers a run logs."""

import json
import re

import torch
from conftest import make_model, sentiment_records, tiny_overrides, write_jsonl
from torch.utils.flop_counter import FlopCounterMode

from fulltune import throughput
from fulltune.config import load_config
from fulltune.data.formats import Example
from fulltune.data.loader import collate, count_targets
from fulltune.loss import loss_sum
from fulltune.train import run_training


def test_step_flops_equal_torchs_count_of_a_forward_and_backward():
    """Eager attention (its QKᵀ and AV are bmm calls the counter sees); sequences of one length, so
    the computed square is exactly the sequences' own; the head runs on the target positions only."""
    model = make_model(64, layers=2)
    model.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(0)
    examples = [Example(torch.randint(3, 64, (12,), generator=g).tolist(), [0] * 4 + [1] * 8) for _ in range(3)]
    batch = collate(examples, 2)
    with FlopCounterMode(display=False) as counter:
        loss_sum(model, batch).backward()
    fm = throughput.flop_model(model)
    assert fm.body_params == 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64) and fm.head_on_targets
    assert fm.step_flops([12, 12, 12], count_targets(batch)) == counter.get_total_flops()
    assert throughput.sequence_lengths([Example([1] * 5, [1] * 5, (2, 3)), Example([1] * 4, [1] * 4)]) == [2, 3, 4]


def test_the_peak_probe_divides_a_matmuls_flops_by_its_best_time(monkeypatch):
    clock = iter(i * 0.001 for i in range(10**6))  # every perf_counter call 1 ms later: 4 matmuls take 1 ms
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    peak = throughput.matmul_peak(torch.device("cpu"), torch.float32, rows=64, hidden=32, inner=48, seconds=0.01)
    assert peak == 2 * 64 * 32 * 48 / (0.001 / 4)


def test_a_run_logs_useful_tokens_padding_flops_mfu_and_memory(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(16))
    cfg = load_config(
        None, tiny_overrides(tiny_dir, data, tmp_path / "run", **{"train.max_steps": 2, "train.peak_probe_s": 0.05})
    )
    run = run_training(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    step = run.sampler.__class__(len(run.data.train), 4, 1, 0)  # the same seeded order: step 1's sequences
    examples = run.examples(step.next_step()[0])
    tokens = sum(len(e.input_ids) for e in examples)
    targets = sum(sum(e.target_mask[1:]) for e in examples)
    padded = len(examples) * max(len(e.input_ids) for e in examples)
    dt = tokens / first["tokens_per_s"]
    assert abs(first["padding_fraction"] - (1 - tokens / padded)) < 1e-12 and first["padding_fraction"] > 0
    assert (
        abs(first["flops_per_s"] * dt - run.flops.step_flops([len(e.input_ids) for e in examples], targets))
        < 1e-3 * first["flops_per_s"] * dt
    )
    assert abs(first["mfu"] - first["flops_per_s"] / run.peak_flops) < 1e-12 and 0 < first["mfu"] < 1
    assert first["peak_memory_gb"] > 0.1  # the process's resident peak: torch alone is more than this
    assert 0.1 < first["memory_gb"] <= first["peak_memory_gb"]  # the resident set after the step


def test_the_progress_bar_shows_eta_throughput_and_memory_now_and_at_peak(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_records(16))
    cfg = load_config(
        None, tiny_overrides(tiny_dir, data, tmp_path / "run", **{"train.max_steps": 3, "train.progress": True})
    )
    run_training(cfg)
    bar = [line for line in re.split(r"[\r\n]", capsys.readouterr().err) if line.startswith("train:")][-1]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "3/3 [" in bar and re.search(r"<\d\d:\d\d", bar)  # steps done, elapsed<remaining
    assert f"tok_s={last['tokens_per_s']:.0f}" in bar
    assert f"mem={last['memory_gb']:.1f}/{last['peak_memory_gb']:.1f}G" in bar
