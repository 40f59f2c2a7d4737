"""The GPU paths' fixes that a CPU can show (the issue "The GPU path"): pure bf16 casts the weights,
not the buffers (RoPE's inv_freq stays fp32); GPU random states restore onto fewer visible GPUs; a
rank finds its GPU where a scheduler shows each process only its own."""

import re

import pytest
import torch
from conftest import make_model

from fulltune import checkpoint
from fulltune.distributed import gpu_index
from fulltune.errors import UserError
from fulltune.model import cast_weights


def _rotary(model, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    rope = model.model.rotary_emb
    x = torch.zeros(1, 1, 8, dtype=next(model.parameters()).dtype)
    return rope(x, torch.tensor([[position]]))


def test_the_bf16_cast_leaves_rope_in_fp32_and_far_positions_right():
    fp32 = make_model(64, layers=1, seed=0)
    bf16 = cast_weights(make_model(64, layers=1, seed=0), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    buffers = dict(bf16.named_buffers())
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())
    assert all(torch.equal(buffers[n], b) for n, b in fp32.named_buffers())
    cos32, sin32 = _rotary(fp32, 2000)
    cos16, sin16 = _rotary(bf16, 2000)
    assert cos16.dtype == torch.bfloat16  # cast at the end, from angles computed in fp32
    assert (cos16.float() - cos32).abs().max() < 2**-8 and (sin16.float() - sin32).abs().max() < 2**-8
    # what `model.to(torch.bfloat16)` did: the frequencies rounded, the angles far off at position 2,000
    whole = make_model(64, layers=1, seed=0).to(torch.bfloat16)
    cos_whole, _ = _rotary(whole, 2000)
    assert (cos_whole.float() - cos32).abs().max() > 0.1


def test_cuda_random_states_restore_onto_fewer_visible_gpus(monkeypatch, capsys):
    """A checkpoint written where 2 GPUs were visible resumes where 1 is: no IndexError, GPU 0's state
    restored, one line said (torch.cuda.set_rng_state_all would index past the visible devices)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    saved = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    checkpoint._set_cuda_rng(saved, visible=1)
    assert restored == [(0, saved[0])]
    assert "holds 2 GPUs' random states and 1 are visible: restored 1" in capsys.readouterr().out
    restored.clear()
    checkpoint._set_cuda_rng(saved, visible=2)
    assert [d for d, _ in restored] == [0, 1] and capsys.readouterr().out == ""


def test_each_rank_finds_its_gpu_where_a_scheduler_shows_it_only_its_own():
    assert [gpu_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # torchrun on one node: cuda:LOCAL_RANK
    assert gpu_index(3, 1) == 0  # one GPU visible to each process (e.g. Slurm's per-task binding)
    with pytest.raises(UserError, match=r"^local rank 4 has no GPU: 2 visible on this node"):
        gpu_index(4, 2)


def test_a_gpu_that_only_emulates_bf16_gets_fp32(monkeypatch, capsys):
    """torch.cuda.is_bf16_supported() counts emulation (V100, T4): auto must pick fp32 there, and pure
    bf16 be refused in one line unless forced."""
    from fulltune.runtime import has_bf16_units, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    cuda = torch.device("cuda")
    assert not has_bf16_units("cuda") and resolve_precision("auto", cuda) == "fp32"
    with pytest.raises(UserError, match=r"^train.precision: bf16 refused: this GPU has no bf16 units"):
        resolve_precision("bf16", cuda)
    assert resolve_precision("bf16", cuda, force=True) == "bf16"
    assert resolve_precision("bf16-mixed", cuda) == "bf16-mixed" and "warning" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # A100 and later
    assert resolve_precision("auto", cuda) == "bf16-mixed"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["optim.grad_clip=1.0"], "optim.grad_clip: 1.0 with optim.cpu_offload, which copies each gradient"),
        (["optim.grad_clip=0", "train.grad_accum_steps=2"], "train.grad_accum_steps: 2 with optim.cpu_offload"),
        (["optim.grad_clip=0", "anchor.method=l2sp", "anchor.lam=0.1"], "anchor / optim.decay_toward: with optim"),
    ],
)
def test_what_the_cpu_offload_cannot_reach_is_refused(extra, message):
    """torchao's CPUOffloadOptimizer copies each gradient to the CPU as backward completes it, frees the
    GPU's and steps the copy: a clip, an accumulation or a pull toward θ0 after backward would be lost."""
    from fulltune.config import load_config

    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, ["optim.cpu_offload=true", *extra])
    load_config(None, ["optim.cpu_offload=true", "optim.grad_clip=0"])  # alone it is a valid config


def test_cpu_offload_resyncs_its_weights_and_counts_only_device_state():
    """torchao's CPUOffloadOptimizer asserts a CUDA or XPU device when built, so this CPU test gives
    the two functions an object with its attributes (param_d2h_map, optim_dict, d_opt): the CPU copy
    follows the weights loaded from a checkpoint (else the resumed run continues from θ0), and only the
    on-device optimiser's state is the device's."""
    from types import SimpleNamespace

    from fulltune.optim.optimizers import device_states, weights_loaded

    big, small = torch.nn.Parameter(torch.full((4,), 2.0)), torch.nn.Parameter(torch.ones(2))
    host = torch.zeros(4)  # θ0's copy, taken when the optimiser was built
    d_opt = torch.optim.AdamW([small])
    small.grad = torch.ones(2)
    d_opt.step()
    offload = SimpleNamespace(param_d2h_map={big: host}, optim_dict={big: object()}, d_opt=d_opt)
    weights_loaded(offload)
    assert torch.equal(host, big.detach())
    assert device_states(offload) == list(d_opt.state.values())
    assert device_states(SimpleNamespace(optim_dict={}, d_opt=None)) == []
    assert device_states(d_opt) == list(d_opt.state.values())
    weights_loaded(d_opt)  # any other optimiser: nothing to do


def test_cpu_offload_is_refused_under_fsdp2():
    from fulltune.config import load_config
    from fulltune.run_setup import _refuse_under_fsdp2

    with pytest.raises(UserError, match=r"^optim.cpu_offload: torchao's CPU offload is for one GPU"):
        _refuse_under_fsdp2(load_config(None, ["optim.cpu_offload=true", "optim.grad_clip=0"]))


def test_the_step_in_backward_measures_the_norm_without_fp64_copies():
    """The in-backward norm took `grad.double().pow(2).sum()`: two fp64 copies of every gradient (an
    8 GB spike on Llama-3-8B's embedding). Recorded with a dispatch mode: no op makes a fp64 tensor of
    more than one value, and the norm is still the ordinary step's."""
    from test_lean import _model
    from test_train import NOCAST, _examples
    from torch.utils._python_dispatch import TorchDispatchMode

    from fulltune.config import OptimConfig
    from fulltune.data.loader import collate
    from fulltune.optim.param_groups import build_optimizer
    from fulltune.train import train_step

    class LargeDoubles(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list = []  # this run's, not a list shared by every instance

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.numel() > 1:
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(lr=1e-2, grad_clip=0.0)
    batch = [collate(_examples(4, vocab=256), pad_id=2)]
    ordinary = train_step(a, build_optimizer(a, cfg), batch, NOCAST, grad_clip=0.0)
    with LargeDoubles() as mode:
        fused = train_step(b, build_optimizer(b, cfg, in_backward=True), batch, NOCAST, grad_clip=0.0)
    assert mode.seen == []
    assert fused.grad_norm == pytest.approx(ordinary.grad_norm, rel=1e-5)


def test_activation_offload_leaves_the_weights_where_they_are():
    """save_on_cpu copied every saved tensor out and back, the weights included (fp32 and pure bf16
    save the parameters themselves for backward). Offloaded now: everything but the parameters, and
    the gradients are the ones without offloading."""
    from test_lean import _model
    from test_train import _examples

    from fulltune.data.loader import collate
    from fulltune.loss import loss_sum
    from fulltune.runtime import offload_saved_tensors

    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    batch = collate(_examples(4, vocab=256), pad_id=2)
    loss_sum(a, batch).backward()
    offloaded: list = []
    with offload_saved_tensors(pin_memory=False, record=offloaded):
        loss = loss_sum(b, batch)
    loss.backward()
    params = {id(p) for p in b.parameters()}
    kept = [t for moved, t in offloaded if not moved]
    assert kept and all(id(t) in params for t in kept)  # fp32 saves the weights themselves: they stay
    assert any(moved for moved, _ in offloaded)  # the activations go
    assert not any(id(t) in params for moved, t in offloaded if moved)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_scoring_and_packing_decisions_are_taken_by_every_rank_together(monkeypatch):
    """Whether to score in prefix trees and whether packing isolates sequences are measured on each
    rank; if numerics differed between GPUs, ranks would run different forwards and NCCL would hang.
    Here one process stands for a rank whose own check passed while another rank's failed."""
    from fulltune import distributed as D
    from fulltune.data.packing import check_isolation
    from fulltune.evals.classify import tree_is_exact

    model = make_model(64, layers=1, seed=0)
    assert tree_is_exact(make_model(64, layers=1, seed=0), "4d", 16)  # alone: exact
    check_isolation(model, torch.device("cpu"), 64)
    monkeypatch.setattr(D, "any_rank", lambda flag: True)  # another rank saw a failure
    assert not tree_is_exact(model, "4d", 16)
    with pytest.raises(UserError, match=r"^data.packing: LlamaForCausalLM with attention"):
        check_isolation(model, torch.device("cpu"), 64)


def test_flash_attention_refuses_fp32_and_takes_packed_batches_of_any_size():
    from fulltune.config import load_config

    with pytest.raises(UserError, match=re.escape("flash_attention_2 computes in fp16/bf16 only")):
        load_config(None, ["model.attn_implementation=flash_attention_2", "train.precision=fp32"])
    for mb in (1, 4):  # a packed micro-batch of 4 rows runs as one row (packing.as_one_row): no refusal
        load_config(
            None, ["model.attn_implementation=flash_attention_2", "data.packing=true", f"train.micro_batch_size={mb}"]
        )


def _as_flash(model, inputs) -> bool:
    """packing.as_one_row as it decides for flash_attention_2, for any kernel (CPU has no flash-attn:
    SDPA over one row of B·L tokens, its sequences found from the position ids, stands in for varlen)."""
    return "position_ids" in inputs and "attention_mask" not in inputs and inputs["input_ids"].shape[0] > 1


@pytest.mark.parametrize("plain", [True, False])
def test_packed_rows_as_one_row_give_the_batched_logits_loss_and_gradients(monkeypatch, plain):
    """A packed micro-batch of 3 rows run as one row of 3·L tokens (what flash-attention 2 needs to see
    the sequences) gives each target token the logits, and the step the loss and gradients, of the
    3-row batch; the forward did see one row. plain: the pre-hook on the LM head; else the logits
    taken from the whole output (heads outside loss.PLAIN_HEAD_TYPES)."""
    from test_packing import _examples

    import fulltune.loss as L
    from fulltune.data.loader import collate, count_targets
    from fulltune.data.packing import pack

    monkeypatch.setattr(L, "plain_head", lambda model: plain)
    model = make_model(64, layers=2, seed=1)
    rows = pack(_examples(14, seed=2), 40, seed=0)[:3]
    batch = collate(rows, 2)
    assert batch["input_ids"].shape[0] == 3 and any(len(r.lengths) > 1 for r in rows)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)

    def step():
        model.zero_grad()
        logits, targets, rows_of = L.target_logits(model, batch)
        loss = L.loss_sum(model, batch) / count_targets(batch)
        loss.backward()
        return logits.detach(), rows_of, float(loss.detach()), [p.grad.clone() for p in model.parameters()]

    want = step()
    monkeypatch.setattr(L, "as_one_row", _as_flash)
    got = step()
    assert seen[0] == (3, batch["input_ids"].shape[1]) and seen[-1] == (1, 3 * batch["input_ids"].shape[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(got[1], want[1]) and got[2] == pytest.approx(want[2], rel=1e-5)
    for a, b in zip(got[3], want[3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # It can fail: one row whose positions do not restart is one causal sequence, not the batch.
    flat = {"input_ids": batch["input_ids"].reshape(1, -1)}
    with torch.no_grad():
        mixed = model(**flat, use_cache=False).logits.reshape(3, -1, 64)
        alone = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    assert not torch.allclose(mixed[1:], alone[1:], atol=1e-3)


def test_the_packing_check_runs_one_row_where_flash_attention_would(monkeypatch):
    """check_isolation flattens its two rows as training does; with the flattening and a kernel that
    ignores the restarts in the position ids, it refuses."""
    import fulltune.data.packing as P

    model = make_model(64, layers=1, seed=0)
    monkeypatch.setattr(P, "as_one_row", _as_flash)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    assert P.check_isolation(model, torch.device("cpu"), 64) < 1e-4
    assert seen[0] == (1, 32)
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)  # a kernel blind to them
    with pytest.raises(UserError, match="does not keep packed sequences apart"):
        P.check_isolation(model, torch.device("cpu"), 64)


def test_the_packing_check_runs_two_rows_to_the_batch():
    """The isolation check now packs two rows to a batch, as micro_batch_size 2 trains them; sdpa finds
    packed sequences per row (masking_utils), so it passes, and an attention that lets a row's
    sequences see each other fails."""
    from fulltune.data.packing import check_isolation

    model = make_model(64, layers=1, seed=0)
    assert check_isolation(model, torch.device("cpu"), 64) < 1e-4
    model.config._attn_implementation = "eager"  # eager with no mask from the position ids: plain causal
    monkey = model.model.forward

    def causal_only(*args, position_ids=None, **kwargs):
        return monkey(*args, position_ids=None, **kwargs)  # packing ignored: one causal sequence a row

    model.model.forward = causal_only
    with pytest.raises(UserError, match=r"does not keep packed sequences apart"):
        check_isolation(model, torch.device("cpu"), 64)


def test_a_step_reads_the_device_a_fixed_number_of_times(monkeypatch):
    """Each value read back to Python is a host sync on CUDA. The step read its loss parts once per
    micro-batch (`.item()`, `float`) and the anchor's penalty once per parameter: now the loss parts
    are read once a step, the penalty once, whatever the micro-batches and parameters number."""
    import traceback
    from pathlib import Path

    from test_lean import _model
    from test_train import NOCAST, _examples

    from fulltune.anchors import Anchor
    from fulltune.data.loader import collate
    from fulltune.loss import Objective
    from fulltune.train import train_step

    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            caller = traceback.extract_stack()[-2]  # fulltune's own reads (transformers' mask code has its own)
            if "/fulltune/" in caller.filename:
                reads.append(f"{_name} at {Path(caller.filename).name}:{caller.lineno}")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    model = _model()
    theta0 = _model()
    theta0.load_state_dict(model.state_dict())
    objective = Objective("dft", kl_beta=0.1, theta0=theta0.eval().requires_grad_(False))
    anchor = Anchor(model, lam=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    batches = [collate(_examples(2, vocab=256, seed=i), pad_id=2) for i in range(4)]
    n = sum(int((b["labels"] != -100).sum()) for b in batches)
    reads.clear()
    result = train_step(
        model, optimizer, batches, NOCAST, grad_clip=1.0, anchor=anchor, n_targets=n, objective=objective
    )
    assert len(list(model.parameters())) >= 20 and len(batches) == 4
    assert len(reads) <= 3, reads  # the loss parts, the grad norm, the penalty
    assert result.finite and result.dft_loss > 0 and result.kl is not None and anchor.last_penalty == 0.0


def test_tf32_is_on_for_a_cuda_run_and_the_callers_setting_comes_back():
    """fp32 runs left TF32 off: fp32 matmuls ~8x slower than they need be on Ampere and later. The
    switch is process-wide, so the run sets it for its own length and hands the caller's back."""
    from fulltune.config import load_config
    from fulltune.runtime import tf32_matmuls

    assert load_config(None, []).train.tf32 is True
    before = torch.get_float32_matmul_precision()
    for enabled, inside in ((True, "high"), (False, "highest")):
        with tf32_matmuls(enabled, torch.device("cuda")):
            assert torch.get_float32_matmul_precision() == inside
        assert torch.get_float32_matmul_precision() == before
    with tf32_matmuls(True, torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before  # CPU matmuls are left as they are


def test_the_memory_check_stops_measuring_after_memory_steps_on_cuda_too():
    """On CUDA the memory meter never closed: every step synchronised the device twice and counted
    its target tokens on the host. It closes after train.memory_steps on every device now (a meter
    that says it is CUDA's, counting the steps it measured, stands in for the GPU)."""
    import contextlib
    from types import SimpleNamespace

    from fulltune.memory.runmemory import RunMemory
    from fulltune.state import TrainerState

    class Meter:
        device_type, active, sections, measured = "cuda", True, {}, 0

        @contextlib.contextmanager
        def section(self, name):
            self.measured += int(self.active)
            yield

        def stop(self):
            self.active = False

    meter, cfg = Meter(), SimpleNamespace(train=SimpleNamespace(memory_steps=3))
    memory = RunMemory(meter, model=None, cfg=cfg, precision="bf16-mixed", state=TrainerState())
    for _ in range(6):
        with memory.step([]):
            pass
    assert meter.measured == 3 and not meter.active
