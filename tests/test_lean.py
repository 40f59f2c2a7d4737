"""Below the memory wall: every optimiser trains and resumes exactly, its state bytes are the
estimator's, the step in backward equals the ordinary step, pure bf16 with stochastic rounding moves
weights that plain bf16 cannot, and every combination that cannot work is refused in one line."""

import json
import re

import pytest
import torch
from conftest import QUICKSTART, tiny_overrides
from safetensors.torch import load_file
from test_train import NOCAST, _examples

from fulltune import distributed as D
from fulltune.cli import main
from fulltune.config import OPTIMIZER_NAMES, OptimConfig, load_config
from fulltune.data.loader import IGNORE, collate
from fulltune.loss import loss_sum
from fulltune.memory.estimate import TrainSetup, estimate, optimizer_state_bytes
from fulltune.memory.measure import state_bytes
from fulltune.memory.spec import spec_from_config
from fulltune.optim.param_groups import build_optimizer, lrs_by_name
from fulltune.train import run_training, train_step

OPTIMIZERS = list(OPTIMIZER_NAMES)
PROJECTED = ("galore", "apollo", "apollo_mini")
LR = {
    "adamw": 1e-2,
    "sgd": 0.5,
    "adafactor": 1e-2,
    "adamw8bit": 1e-2,
    "adamw4bit": 1e-2,
    "muon": 1e-2,
    "adam_mini": 1e-2,
    "galore": 1e-2,
    "apollo": 1e-2,
    "apollo_mini": 1e-2,
}


def _model(vocab=256, hidden=32, seed=0):
    """vocab 256 × hidden 32: the embedding (8,192 values) is large enough for torchao to quantise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).float()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_lowers_the_loss_and_moves_every_parameter(name):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(name=name, lr=LR[name]))
    batch = [collate(_examples(4, vocab=256), pad_id=2)]
    losses = [train_step(model, opt, batch, NOCAST, grad_clip=0.0).loss for _ in range(5)]
    assert losses[-1] < losses[0] - 0.05, losses
    assert [n for n, p in model.named_parameters() if torch.equal(p, before[n])] == []


@pytest.mark.parametrize(
    "name,precision",
    [(n, "fp32") for n in OPTIMIZERS] + [(n, "bf16") for n in OPTIMIZERS if n != "adam_mini"],
)
def test_measured_state_bytes_equal_the_estimate(name, precision):
    model = _model(hidden=128)  # 128×128 and 64×128 matrices are quantised too; norms (128) are not
    if precision == "bf16":
        model.to(torch.bfloat16)
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-3, momentum=0.9 if name == "sgd" else 0.0), precision)
    train_step(model, opt, [collate(_examples(2, vocab=256), pad_id=2)], NOCAST, grad_clip=0.0)
    measured = state_bytes(model, opt)["optimizer"]
    spec = spec_from_config(model.config, "test")
    assert measured == optimizer_state_bytes(spec, "sgd-momentum" if name == "sgd" else name, precision)
    if name != "sgd":
        assert measured > 0


@pytest.mark.parametrize(
    "name",
    OPTIMIZERS
    + ["adamw4bit-in-backward", "adamw-bf16", "muon-in-backward", "sgd-bf16", "adafactor-bf16", "muon-bf16"]
    + ["apollo-in-backward", "galore-in-backward", "apollo-bf16", "galore-bf16", "adamw4bit-bf16", "apollo_mini-floor"],
)
def test_resume_equals_straight_run_bit_for_bit(tiny_dir, chat_file, tmp_path, name):
    base, _, variant = name.partition("-")
    extra = {"optim.name": base, "optim.lr": LR[base], "optim.grad_clip": 0.0, "train.save_interval": 2}
    if base in PROJECTED:  # the projection renewed at steps 0 and 3: the resume at 2 must carry it across
        extra.update({"optim.update_proj_gap": 3, "optim.rank": 4})
    if variant == "in-backward":
        extra["train.optimizer_in_backward"] = True
    if variant == "bf16":  # forced: an AVX2-only CPU refuses pure bf16 otherwise (the step is what is tested)
        extra.update({"train.precision": "bf16", "train.force_precision": True})
    if variant == "floor":  # the preset's optimiser settings, stepped in backward, in fp32 (bit-exact on CPU)
        extra.update({"train.memory": "floor", "train.precision": "fp32"})
    run_training(
        load_config(None, tiny_overrides(tiny_dir, chat_file, tmp_path / "a", **extra, **{"train.max_steps": 4}))
    )
    run_training(
        load_config(None, tiny_overrides(tiny_dir, chat_file, tmp_path / "b", **extra, **{"train.max_steps": 2}))
    )
    run_training(
        load_config(
            None,
            tiny_overrides(
                tiny_dir,
                chat_file,
                tmp_path / "b",
                **extra,
                **{"train.max_steps": 4, "train.resume": "auto", "train.allow_schedule_change": True},
            ),
        )
    )  # steps 1-2: the same lr either way
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(tmp_path / "b" / "checkpoints" / "step-0000002" / "model.safetensors"))
    common = a.keys() & first.keys()
    assert common and not all(torch.equal(a[k], first[k]) for k in common)  # steps 3-4 changed the weights
    losses = [
        [
            json.loads(line)["loss"]
            for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line
        ]
        for r in "ab"
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4


@pytest.mark.parametrize("name", ["sgd", "adamw", "muon"])
def test_step_in_backward_equals_the_ordinary_step(name):
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(name=name, lr=LR[name], momentum=0.9 if name == "sgd" else 0.0, weight_decay=0.1, grad_clip=0.0)
    ordinary, fused = build_optimizer(a, cfg), build_optimizer(b, cfg, in_backward=True)
    for step in range(3):
        batch = [collate(_examples(4, vocab=256, seed=step), pad_id=2)]
        ra, rb = (
            train_step(a, ordinary, batch, NOCAST, grad_clip=0.0),
            train_step(b, fused, batch, NOCAST, grad_clip=0.0),
        )
        (loss_a, norm_a), (loss_b, norm_b) = (ra.loss, ra.grad_norm), (rb.loss, rb.grad_norm)
        assert loss_a == pytest.approx(loss_b, rel=1e-6) and norm_a == pytest.approx(norm_b, rel=1e-6)
        assert all(p.grad is None for p in b.parameters())  # freed inside backward
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, _model().model.layers[0].mlp.up_proj.weight)


def test_the_step_in_backward_clips_exactly_as_the_ordinary_step():
    """With optim.grad_clip the step in backward is the ordinary clipped step, every step: a first pass
    measures the norm (no update), the second applies min(1, c / ‖g‖). Attention dropout is on: the
    first pass must leave the random state as it found it, or the second draws other masks."""
    clip = 0.05  # below every step's norm here: every step is clipped
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, grad_clip=clip)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        for layer in m.model.layers:
            layer.self_attn.attention_dropout = 0.1
    ordinary, fused = build_optimizer(a, cfg), build_optimizer(b, cfg, in_backward=True)
    passes = []
    b.register_forward_hook(lambda *args: passes.append(1))
    for step in range(3):
        batch = [collate(_examples(4, vocab=256, seed=step), pad_id=2)]
        torch.manual_seed(step)
        ra = train_step(a, ordinary, batch, NOCAST, grad_clip=clip)
        torch.manual_seed(step)
        rb = train_step(b, fused, batch, NOCAST, grad_clip=clip)
        assert ra.grad_norm > 10 * clip and rb.grad_norm == pytest.approx(ra.grad_norm, rel=1e-5)
        assert rb.loss == pytest.approx(ra.loss, rel=1e-6)
    assert len(passes) == 6  # two forwards a step
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, _model().model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor", "muon"])
def test_stochastic_rounding_moves_bf16_weights_that_plain_bf16_cannot(name):
    """W = 1 in bf16 (resolution 2^-7 there): each step moves W by ~1e-5, far below it. Plain bf16
    leaves W unchanged; the rounded step moves it, on average, as far as fp32 does."""
    from fulltune.optim.optimizers import make_optimizer

    def train(dtype, optimizer_of):
        w = torch.nn.Parameter(torch.ones(64, 128, dtype=dtype))
        opt = optimizer_of([{"params": [w], "weight_decay": 0.0, "hidden_matrix": name == "muon"}])
        for _ in range(100):
            w.grad = torch.ones_like(w)
            opt.step()
        return w.detach().float()

    # Muon's update of this rank-1 gradient is 0.011 per entry (orthogonalised) × 0.2·√128 × lr: at lr
    # 1e-3 that is 2.5e-5 a step, as far below bf16's resolution as the others' 1e-5
    cfg = OptimConfig(name=name, lr=1e-3 if name == "muon" else 1e-5)
    torch.manual_seed(0)
    rounded = train(torch.bfloat16, lambda groups: make_optimizer(groups, cfg, "bf16"))
    exact = train(torch.float32, lambda groups: make_optimizer(groups, cfg, "fp32"))
    if name == "adamw":  # torchao's _AdamW rounds inside; torch's AdamW in bf16 is the plain one
        plain = train(torch.bfloat16, lambda groups: torch.optim.AdamW(groups, lr=1e-5))
    else:  # the same optimiser on the bf16 tensor, without the rounding around it
        plain = train(torch.bfloat16, lambda groups: make_optimizer(groups, cfg, "fp32"))
    moved = 1 - exact.mean().item()
    assert 5e-4 < moved < 0.02, moved  # fp32 moved W well below bf16's resolution (2^-8 = 0.0039 at 1)
    assert torch.equal(plain, torch.ones_like(plain))  # every update rounded away
    assert 1 - rounded.mean().item() == pytest.approx(moved, rel=0.1)  # unbiased: on average as far as fp32


def test_in_backward_estimate_keeps_one_gradient():
    spec = spec_from_config(_model(hidden=128).config, "test")
    normal = estimate(spec, TrainSetup(micro_batch=2, seq_len=32, device="cpu", precision="fp32"))
    fused = estimate(
        spec, TrainSetup(micro_batch=2, seq_len=32, device="cpu", precision="fp32", optimizer_in_backward=True)
    )
    assert fused.get("gradients") == 4 * 256 * 128  # the embedding's gradient alone
    assert normal.get("gradients") == 4 * spec.n_params


# --- refusals: one line, exit 2, before any model loads --------------------------------------------------------------


def _refused(capsys, tmp_path, tiny_dir, chat_file, *extra) -> str:
    out = tmp_path / "o"
    code = main(["train", QUICKSTART, *tiny_overrides(tiny_dir, chat_file, out), "eval.task_file=", *extra])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("fulltune: error: ") == 1, err
    assert not out.exists()  # refused before the run directory (and the model) were touched
    return err


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            ["train.optimizer_in_backward=true", "train.grad_accum_steps=2", "optim.grad_clip=0"],
            "train.grad_accum_steps: 2 with train.optimizer_in_backward",
        ),
        (
            ["optim.cpu_offload=true", "optim.grad_clip=0"],
            "optim.cpu_offload: offloads GPU memory to the CPU; this run is on the CPU",
        ),
        (["model.activation_offload=true"], "model.activation_offload: offloads GPU memory to the CPU"),
        (["optim.name=adam"], "optim.name: 'adam' is not one of adamw, sgd, adafactor, adamw8bit, adamw4bit, muon"),
        (["optim.name=adam_mini", "train.precision=bf16"], "train.precision: adam_mini's package steps every tensor"),
        (
            ["optim.name=adam_mini", "train.optimizer_in_backward=true", "optim.grad_clip=0"],
            "train.optimizer_in_backward: adam_mini's package steps every tensor at once",
        ),
        (["train.precision=fp16"], "train.precision: 'fp16' is not one of auto, fp32, bf16-mixed, bf16"),
        (
            ["train.precision=bf16", "optim.name=sgd", "optim.cpu_offload=true"],
            "optim.cpu_offload: torchao's CPU offload wraps one optimiser class, and sgd in train.precision bf16",
        ),
    ],
)
def test_impossible_combinations_are_refused(capsys, tmp_path, tiny_dir, chat_file, extra, message):
    assert message in _refused(capsys, tmp_path, tiny_dir, chat_file, *extra)


def test_pure_bf16_on_a_cpu_without_bf16_units(capsys, monkeypatch, tmp_path, tiny_dir, chat_file):
    monkeypatch.setattr("fulltune.runtime.cpu_has_bf16_units", lambda: False)
    err = _refused(capsys, tmp_path, tiny_dir, chat_file, "train.precision=bf16")
    assert "train.precision: bf16 refused: this CPU has no bf16 units" in err
    run = run_training(
        load_config(
            None,
            tiny_overrides(
                tiny_dir,
                chat_file,
                tmp_path / "f",
                **{"train.precision": "bf16", "train.force_precision": True, "train.max_steps": 1},
            ),
        )
    )
    assert "[train] warning: train.precision bf16: this CPU has no bf16 units" in capsys.readouterr().out
    assert run.precision == "bf16" and {p.dtype for p in run.model.parameters()} == {torch.bfloat16}
    auto = load_config(None, tiny_overrides(tiny_dir, chat_file, tmp_path / "g", **{"train.precision": "auto"}))
    from fulltune.runtime import resolve_precision

    assert resolve_precision(auto.train.precision, torch.device("cpu")) == "fp32"


def test_auto_picks_fp32_where_onednn_is_capped_below_bf16(monkeypatch):
    from fulltune.runtime import cpu_has_bf16_units, resolve_precision

    monkeypatch.setattr("pathlib.Path.read_text", lambda self, *a, **k: "flags : fpu avx2 avx512f avx512_bf16 amx_bf16")
    assert resolve_precision("auto", torch.device("cpu")) == "bf16-mixed"  # the CPU's units
    for cap in ("AVX2", "avx512_core"):  # the emulated AVX2 machine of the benchmarks; AVX512 without bf16
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert not cpu_has_bf16_units() and resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert resolve_precision("auto", torch.device("cpu")) == "bf16-mixed"


def test_missing_torchao_is_one_line(capsys, monkeypatch, tmp_path, tiny_dir, chat_file):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # import fails as if not installed
    code = main(
        [
            "train",
            QUICKSTART,
            *tiny_overrides(tiny_dir, chat_file, tmp_path / "o"),
            "eval.task_file=",
            "optim.name=adamw8bit",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("fulltune: error: ") == 1 and "Traceback" not in err
    assert "pip install torchao==0.18.0" in err
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_lean_preset_sets_its_keys_and_overrides_win(capsys, monkeypatch, tmp_path, tiny_dir, chat_file):
    monkeypatch.setattr("fulltune.runtime.cpu_has_bf16_units", lambda: False)
    cfg = load_config(QUICKSTART, ["train.memory=lean", "train.device=cpu"])
    assert (
        cfg.train.precision,
        cfg.optim.name,
        cfg.train.optimizer_in_backward,
        cfg.optim.grad_clip,
        cfg.model.activation_checkpointing,
    ) == ("fp32", "adamw4bit", True, 1.0, True)  # the config's clip stays: in backward, a measuring pass first
    mine = load_config(QUICKSTART, ["train.memory=lean", "train.device=cpu", "optim.name=adamw8bit"])
    assert mine.optim.name == "adamw8bit" and mine.train.optimizer_in_backward
    accum = load_config(QUICKSTART, ["train.memory=lean", "train.device=cpu", "train.grad_accum_steps=2"])
    assert not accum.train.optimizer_in_backward and accum.optim.grad_clip == 1.0
    monkeypatch.setattr("fulltune.runtime.cpu_has_bf16_units", lambda: True)
    assert load_config(QUICKSTART, ["train.memory=lean", "train.device=cpu"]).train.precision == "bf16"
    run_training(
        load_config(
            None,
            tiny_overrides(tiny_dir, chat_file, tmp_path / "l", **{"train.memory": "lean", "train.max_steps": 2})
            + ["train.precision=fp32"],
        )
    )
    out = capsys.readouterr().out
    assert (
        "[train] memory lean: train.precision=fp32, optim.name=adamw4bit, model.activation_checkpointing=True, "
        "train.optimizer_in_backward=True"
    ) in out and "optim.grad_clip=0.0" not in out
    state = json.loads((tmp_path / "l" / "results.json").read_text())["state_memory"]
    assert state["measured_per_rank_gb"][0]["grads"] == 0.0  # no gradient outlives its update


def test_floor_preset_trains_every_weight_at_about_two_bytes_a_parameter(
    capsys, monkeypatch, tmp_path, tiny_dir, chat_file
):
    """train.memory=floor: APOLLO-Mini on every matrix (the tied embedding too), the step in backward,
    bf16 weights where the CPU has bf16 units; it prints what it set, every weight moves, no gradient
    outlives its update, and the measured state is the estimate's (a few values per matrix row)."""
    monkeypatch.setattr("fulltune.runtime.cpu_has_bf16_units", lambda: True)
    cfg = load_config(QUICKSTART, ["train.memory=floor", "train.device=cpu"])
    assert (cfg.train.precision, cfg.optim.name, cfg.optim.project_embeddings, cfg.train.optimizer_in_backward) == (
        "bf16",
        "apollo_mini",
        True,
        True,
    )
    assert cfg.model.activation_checkpointing and cfg.optim.grad_clip == 1.0
    model = _model(hidden=128)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(name="apollo_mini", lr=1e-2, project_embeddings=True))
    assert all(g["hidden_matrix"] == (g["params"][0].ndim == 2) for g in opt.inner.param_groups)
    for _ in range(2):
        train_step(model, opt, [collate(_examples(2, vocab=256), pad_id=2)], NOCAST, grad_clip=0.0)
    assert [n for n, p in model.named_parameters() if torch.equal(p, before[n])] == []
    spec = spec_from_config(model.config, "test")
    measured = state_bytes(model, opt)["optimizer"]
    assert measured == optimizer_state_bytes(spec, "apollo_mini", "fp32", 16, project_embeddings=True)
    assert measured < 0.2 * optimizer_state_bytes(spec, "apollo_mini", "fp32")  # the embedding's AdamW was most of it
    run_training(
        load_config(
            None,
            tiny_overrides(tiny_dir, chat_file, tmp_path / "f", **{"train.memory": "floor", "train.max_steps": 2}),
        )
    )
    out = capsys.readouterr().out
    assert "[train] memory floor: train.precision=fp32, optim.name=apollo_mini, " in out  # the test's fp32 wins
    assert "optim.project_embeddings=True" in out
    state = json.loads((tmp_path / "f" / "results.json").read_text())["state_memory"]
    assert state["measured_per_rank_gb"][0]["grads"] == 0.0


# --- the planner recommends only what trains, as overrides the config accepts ----------------------------------------


@pytest.mark.parametrize(
    "model,gpu",
    [
        ("llama3.1-8b", "rtx4090"),
        ("llama-7b", "a100-80gb"),
        ("qwen2.5-7b", "l4"),
        ("gemma2-2b", "a10g"),
        ("llama3.2-3b", "a100-40gb"),
    ],
)
def test_plan_overrides_are_a_config_fulltune_trains(model, gpu, tiny_dir, chat_file, tmp_path):
    from fulltune.memory.plan import plan
    from fulltune.memory.spec import load_spec

    p = plan(load_spec(model), gpu, 1, TrainSetup(micro_batch=1, seq_len=1024))
    assert p.branch in ("full", "full-savers") and p.summary.count("fulltune train CONFIG") == 1
    overrides = [f"{k}={v}" for k, v in p.overrides.items()]
    cfg = load_config(QUICKSTART, overrides)  # every recommendation passes the config's own checks
    assert all(
        str(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1])).lower() == str(v).lower()
        or float(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1])) == float(v)
        for k, v in p.overrides.items()
    )


def test_plan_defaults_to_what_auto_trains(capsys):
    assert main(["plan", "smollm2-1.7b", "--gpu", "a100-40gb", "--seq", "4096"]) == 0
    out = capsys.readouterr().out
    assert "full fine-tuning (bf16-mixed, adamw) on 1 GPU: 40.6 GB per GPU > 40 GB" in out  # not bf16-master's 38.4
    assert "fulltune train CONFIG model.activation_checkpointing=true" in out


def test_low_bit_step_temporaries():
    spec = spec_from_config(_model(hidden=128).config, "test")
    four = estimate(spec, TrainSetup(micro_batch=2, seq_len=32, device="cpu", precision="fp32", optimizer="adamw4bit"))
    assert four.get("optimizer step temporaries") == 20 * 256 * 128  # optim/lowbit_cpu.py measured
    # a tensor above the CPU step's slice is stepped in slices: its temporaries are the slice's (not on a GPU)
    from transformers import LlamaConfig

    from fulltune.memory.estimate import LOW_BIT_STEP_SLICE
    from fulltune.optim.lowbit_cpu import STEP_SLICE

    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    big = spec_from_config(LlamaConfig(vocab_size=STEP_SLICE // 128 + 256, **shape), "test")  # embedding > a slice
    setup = dict(micro_batch=1, seq_len=8, precision="bf16", optimizer="adamw4bit")
    assert LOW_BIT_STEP_SLICE == STEP_SLICE
    assert estimate(big, TrainSetup(device="cpu", **setup)).get("optimizer step temporaries") == 20 * STEP_SLICE
    assert estimate(big, TrainSetup(device="cuda", **setup)).get("optimizer step temporaries") == 20 * big.vocab * 128
    assert estimate(spec, TrainSetup(device="cpu", optimizer="adamw")).get("optimizer step temporaries") == 0
    # pure bf16 SGD / Adafactor / Muon: one tensor in fp32 at a time, around the stochastic rounding
    for name, per in (("sgd-momentum", 14), ("adafactor", 12), ("muon", 16)):
        one = estimate(spec, TrainSetup(device="cpu", precision="bf16", optimizer=name))
        assert one.get("optimizer step temporaries") == per * 256 * 128, name
    assert estimate(spec, TrainSetup(device="cpu", optimizer="sgd")).get("optimizer step temporaries") == 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            {"train.optimizer_in_backward": True, "optim.grad_clip": 0.0},
            "train.optimizer_in_backward: not combined with FSDP2",
        ),
        ({"optim.name": "adamw4bit"}, "optim.name: adamw4bit fails on sharded (DTensor) states"),
        ({"optim.name": "muon"}, "optim.name: muon orthogonalises each whole matrix"),
        ({"optim.name": "adam_mini"}, "optim.name: adam_mini's package finds the other ranks by counting GPUs"),
    ],
)
def test_what_fsdp2_does_not_combine_is_refused_before_loading(
    monkeypatch, tiny_dir, chat_file, tmp_path, extra, message
):
    from fulltune.errors import UserError

    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "sharded", lambda: True)
    monkeypatch.setattr(D, "rank", lambda: 0)
    monkeypatch.setattr(D, "init", lambda device: torch.device("cpu"))
    loaded = []
    monkeypatch.setattr("fulltune.run_setup.read_sources", lambda cfg: loaded.append(1))
    with pytest.raises(UserError, match=re.escape(message)):
        run_training(load_config(None, tiny_overrides(tiny_dir, chat_file, tmp_path / "o", **extra)))
    assert loaded == []  # refused before any data (or model) was read


def test_plan_over_several_gpus_uses_only_what_fsdp2_trains():
    from fulltune.memory.plan import plan
    from fulltune.memory.spec import load_spec

    p = plan(load_spec("llama-70b"), "rtx4090", 4, TrainSetup(micro_batch=1, seq_len=2048))
    assert not {"train.optimizer_in_backward", "optim.name", "optim.cpu_offload"} & set(p.overrides or {})


def test_muon_steps_the_decoder_matrices_and_adamw_the_rest():
    """Muon (torch's, match_rms_adamw) gets exactly the decoder's 2-D weights; the embedding, norms and
    head stay with AdamW; both parts take the run's lr, and each step equals the two torch optimisers'."""
    from fulltune.optim.muon import MuonAdamW

    model, twin = _model(), _model()
    twin.load_state_dict(model.state_dict())
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-2, weight_decay=0.1))
    assert isinstance(opt, MuonAdamW) and set(opt.parts) == {"muon", "adamw"}
    in_muon = {id(p) for g in opt.parts["muon"].param_groups for p in g["params"]}
    layers = {id(p) for layer in model.model.layers for p in layer.parameters() if p.ndim == 2}
    assert in_muon == layers and model.model.embed_tokens.weight.ndim == 2  # the embedding is 2-D, and AdamW's
    assert {g["adjust_lr_fn"] for g in opt.parts["muon"].param_groups} == {"match_rms_adamw"}
    names = dict(twin.named_parameters())
    hidden = [names[n] for n, p in model.named_parameters() if id(p) in in_muon]
    rest = [names[n] for n, p in model.named_parameters() if id(p) not in in_muon]
    ref_muon = torch.optim.Muon(hidden, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    decays = [p for p in rest if p.ndim >= 2]
    ref_adamw = torch.optim.AdamW(
        [{"params": decays, "weight_decay": 0.1}, {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}],
        lr=1e-2,
    )
    for step in range(2):
        batch = [collate(_examples(4, vocab=256, seed=step), pad_id=2)]
        train_step(model, opt, batch, NOCAST, grad_clip=0.0)
        twin.zero_grad()
        n = int((batch[0]["labels"][:, 1:] != IGNORE).sum())
        (loss_sum(twin, batch[0]) / n).backward()  # the step's token-mean CE, as train_step takes it
        ref_muon.step()
        ref_adamw.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_adam_mini_takes_our_rates_and_decay_and_logs_our_labels():
    """The package's per-tensor groups get the ULMFiT rates, no decay on vectors and our group labels."""
    model = _model()
    cfg = OptimConfig(name="adam_mini", lr=1e-2, weight_decay=0.1, layer_lr_decay=0.5)
    opt = build_optimizer(model, cfg)
    ours = build_optimizer(_model(), OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, layer_lr_decay=0.5))
    assert lrs_by_name(opt) == lrs_by_name(ours)  # the same labels and rates, one per layer
    assert len(opt.param_groups) == len(list(model.parameters())) and opt.world_size == 1
    by_tensor = {id(g["params"][0]): g for g in opt.param_groups}
    for name, p in model.named_parameters():
        assert by_tensor[id(p)]["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0), name
    assert by_tensor[id(model.model.embed_tokens.weight)]["lr"] == pytest.approx(1e-2 * 0.5**-2)  # below 2 layers
    # its blocks: one second moment per token of the embedding, per head of q/k, per row of the rest
    train_step(model, opt, [collate(_examples(4, vocab=256), pad_id=2)], NOCAST, grad_clip=0.0)
    v = {n: opt.state[p]["vmean"].numel() for n, p in model.named_parameters()}
    c = model.config
    assert v["model.embed_tokens.weight"] == c.vocab_size
    assert v["model.layers.0.self_attn.q_proj.weight"] == c.num_attention_heads
    assert v["model.layers.0.mlp.up_proj.weight"] == c.intermediate_size
