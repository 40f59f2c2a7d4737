"""Pure bf16 casts the weights, not the buffers: RoPE's inv_freq stays fp32, so the rotary angles at
far positions match fp32's within bf16's rounding of cos and sin (before the fix: off by up to ~2)."""

import torch
from conftest import make_model

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
