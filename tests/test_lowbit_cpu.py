"""optim/lowbit_cpu.py: the vectorised CPU step of the 4-bit AdamW is torchao's update — the same
codes bit for bit, the same scales, the same weights to float rounding — on quantised and small
tensors, in fp32 and in pure bf16 (stochastic rounding: unbiased against fp32)."""

from __future__ import annotations

import pytest
import torch

ao = pytest.importorskip("torchao.optim")

from torchao.optim.quant_utils import quantize_4bit_with_qmap  # noqa: E402
from torchao.optim.subclass_4bit import OptimState4bit, get_qmap_signed, get_qmap_unsigned  # noqa: E402

from fulltune.config import OptimConfig  # noqa: E402
from fulltune.optim.lowbit_cpu import quantize  # noqa: E402
from fulltune.optim.optimizers import optimizer_class  # noqa: E402


@pytest.mark.parametrize("qmap", [get_qmap_signed(), get_qmap_unsigned()], ids=["signed", "unsigned"])
def test_quantize_gives_torchaos_codes_on_every_value_kind(qmap):
    """Random values, the map's own entries, the midpoints between entries (ties go up) and the
    values one float either side of them, out-of-range values: every code equals torchao's."""
    q = torch.tensor(qmap)
    mids = (q[:-1] + q[1:]) * 0.5
    lo = -1.0 if qmap[0] < 0 else 0.0
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [
            torch.rand(100_000, generator=gen) * (1 - lo) + lo,
            q,
            mids,
            torch.nextafter(mids, torch.full_like(mids, 2.0)),
            torch.nextafter(mids, torch.full_like(mids, -2.0)),
            torch.tensor([lo - 0.5, 1.5, 0.0]),
        ]
    )
    ours = quantize(x, qmap)
    assert torch.equal(ours.to(torch.uint8), quantize_4bit_with_qmap(x, q))
    assert ours.min() >= 0 and ours.max() == 15  # both ends of the map are reached


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(96, 128).to(dtype))  # quantised: ≥ 4096 values
    small = torch.nn.Parameter(torch.randn(40).to(dtype))  # plain m and v: torchao's own step
    return [big, small]


def _run(cls, params: list, steps: int, grads: list) -> torch.optim.Optimizer:
    opt = cls(params, lr=1e-2, weight_decay=0.1)
    for s in range(steps):
        for p, g in zip(params, grads[s]):
            p.grad = g.to(p.dtype)
        opt.step()
    return opt


def test_the_cpu_step_is_torchaos_update_and_is_used(monkeypatch):
    from fulltune.optim import lowbit_cpu

    calls = []
    real = lowbit_cpu.adam4bit_step
    monkeypatch.setattr(lowbit_cpu, "adam4bit_step", lambda p, *a, **k: calls.append(p.shape) or real(p, *a, **k))
    cls, kwargs = optimizer_class(OptimConfig(name="adamw4bit", lr=1e-2), "fp32")
    assert cls is not ao.AdamW4bit and issubclass(cls, ao.AdamW4bit) and kwargs["bf16_stochastic_round"] is False
    torch.manual_seed(1)
    grads = [[torch.randn(96, 128), torch.randn(40)] for _ in range(4)]
    ours, ref = _params(torch.float32), _params(torch.float32)
    o, r = _run(cls, ours, 4, grads), _run(ao.AdamW4bit, ref, 4, grads)
    for a, b, start in zip(ours, ref, _params(torch.float32)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert not torch.equal(a, start)  # it moved
    assert calls == [ours[0].shape] * 4  # the quantised tensor, every step; the small one: torchao's
    big_o, big_r = o.state[ours[0]], r.state[ref[0]]
    assert type(big_o["exp_avg"]) is OptimState4bit and big_o["step"].item() == 4
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(big_o[key].codes, big_r[key].codes)
        torch.testing.assert_close(big_o[key].scale, big_r[key].scale, rtol=1e-6, atol=0)
    # the state dict is torchao's: one optimiser loads the other's
    fresh = cls(_params(torch.float32), lr=1e-2)
    fresh.load_state_dict(r.state_dict())
    assert torch.equal(next(iter(fresh.state.values()))["exp_avg"].codes, big_r["exp_avg"].codes)


def test_pure_bf16_rounds_stochastically_around_the_fp32_update():
    """At an lr whose update is far below bf16's resolution, the bf16 weights still move on average
    as the fp32 ones do (stochastic rounding), where round-to-nearest would leave them unchanged."""
    cls, _ = optimizer_class(OptimConfig(name="adamw4bit", lr=1e-5), "bf16")
    torch.manual_seed(2)
    grads = [[torch.ones(96, 128), torch.ones(40)] for _ in range(3)]
    b16, f32 = _params(torch.bfloat16), [torch.nn.Parameter(p.detach().float()) for p in _params(torch.bfloat16)]
    start = f32[0].detach().clone()
    opt = cls(b16, lr=1e-3, weight_decay=0.0, bf16_stochastic_round=True)
    ref = cls(f32, lr=1e-3, weight_decay=0.0)
    for s in range(3):
        for p, q, g in zip(b16, f32, grads[s]):
            p.grad, q.grad = g.to(p.dtype), g.clone()
        opt.step()
        ref.step()
    moved, expected = (b16[0].float() - start).mean().item(), (f32[0] - start).mean().item()
    assert expected < 0 and moved == pytest.approx(expected, rel=0.1)
    assert (b16[0].float() != start).float().mean() > 0.05  # many weights moved, not one in a million


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_tensor_larger_than_a_slice_steps_in_slices_to_the_same_update(monkeypatch, dtype):
    """STEP_SLICE caps the step's fp32 temporaries: a 12,288-value tensor stepped in slices of 4,096
    (and a last one of 4,096) ends with the same weights and the same codes as in one piece, in pure
    bf16 too (the stochastic rounding draws its noise slice after slice, in the same order)."""
    from fulltune.optim import lowbit_cpu

    cls, _ = optimizer_class(OptimConfig(name="adamw4bit", lr=1e-2), "bf16" if dtype is torch.bfloat16 else "fp32")
    torch.manual_seed(3)
    grads = [[torch.randn(96, 128), torch.randn(40)] for _ in range(3)]
    results, sizes = [], []
    kernel = lowbit_cpu.adam4bit_kernel  # eager here: the slicing is what is tested, not inductor
    monkeypatch.setattr(lowbit_cpu, "_compiled", lambda p, *a, **k: sizes.append(p.numel()) or kernel(p, *a, **k))
    for piece in (1 << 24, 4096):
        monkeypatch.setattr(lowbit_cpu, "STEP_SLICE", piece)
        torch.manual_seed(4)  # the same rounding noise for both
        params = _params(dtype)
        opt = _run(cls, params, 3, grads)
        results.append((params[0].detach().clone(), opt.state[params[0]]))
    assert sizes == [12288] * 3 + [4096] * 9  # three steps whole, then three of three slices
    (whole, a), (sliced, b) = results
    assert torch.equal(whole, sliced) and not torch.equal(whole, _params(dtype)[0])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a[key].codes, b[key].codes) and torch.equal(a[key].scale, b[key].scale)
