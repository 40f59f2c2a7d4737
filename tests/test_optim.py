import math

import pytest
import torch
from conftest import make_model

from fulltune.config import OptimConfig, ScheduleConfig
from fulltune.optim.param_groups import build_optimizer, depth_from_top, param_groups
from fulltune.optim.schedules import lr_multiplier, schedule_fn


def test_cosine_schedule_values():
    T, W = 100, 10
    assert lr_multiplier(0, total_steps=T, warmup=W, name="cosine", min_ratio=0.1) == pytest.approx(0.1)  # (0+1)/10
    assert lr_multiplier(W - 1, total_steps=T, warmup=W, name="cosine", min_ratio=0.1) == pytest.approx(
        1.0
    )  # end of warmup
    assert lr_multiplier(W, total_steps=T, warmup=W, name="cosine", min_ratio=0.1) == pytest.approx(1.0)
    assert lr_multiplier(55, total_steps=T, warmup=W, name="cosine", min_ratio=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5
    )  # middle of decay
    assert lr_multiplier(T, total_steps=T, warmup=W, name="cosine", min_ratio=0.1) == pytest.approx(0.1)  # end: min_lr
    assert lr_multiplier(T - 1, total_steps=T, warmup=W, name="cosine", min_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 89 / 90))
    )


def test_constant_and_linear():
    assert [lr_multiplier(s, total_steps=20, warmup=4, name="constant", min_ratio=0.0) for s in (0, 3, 4, 19, 20)] == [
        0.25,
        1.0,
        1.0,
        1.0,
        1.0,
    ]
    assert lr_multiplier(12, total_steps=20, warmup=4, name="linear", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_multiplier(20, total_steps=20, warmup=4, name="linear", min_ratio=0.2) == pytest.approx(0.2)


def test_schedule_fn_uses_absolute_min_lr_and_ratio_warmup():
    fn = schedule_fn(ScheduleConfig(name="cosine", warmup_steps=-1, warmup_ratio=0.1, min_lr=1e-5), 1e-4, 50)
    assert fn(0) == pytest.approx(1 / 5) and fn(4) == pytest.approx(1.0)
    assert fn(50) * 1e-4 == pytest.approx(1e-5)


def test_discriminative_rates_per_layer():
    model = make_model(64, layers=4, tie=False)
    cfg = OptimConfig(lr=1e-3, layer_lr_decay=2.6, weight_decay=0.1)
    groups = param_groups(model, cfg)
    rate = {}
    for g in groups:
        for p in g["params"]:
            rate[id(p)] = g["lr"]
    layers = model.model.layers
    for i, layer in enumerate(layers):
        l_from_top = len(layers) - 1 - i
        for p in layer.parameters():
            assert rate[id(p)] == pytest.approx(1e-3 * 2.6**-l_from_top)
    assert rate[id(model.model.embed_tokens.weight)] == pytest.approx(1e-3 * 2.6**-4)  # lowest
    assert rate[id(model.lm_head.weight)] == pytest.approx(1e-3)  # top
    assert rate[id(model.model.norm.weight)] == pytest.approx(1e-3)
    # No decay on norm weights; decay on matrices.
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(model.model.norm.weight)] == 0.0 and wd[id(layers[0].input_layernorm.weight)] == 0.0
    assert wd[id(layers[0].mlp.up_proj.weight)] == 0.1


def test_tied_embedding_gets_the_embedding_rate_once():
    model = make_model(64, layers=2, tie=True)
    depth = depth_from_top(model)
    assert depth[id(model.lm_head.weight)] == (2, "embed")
    groups = param_groups(model, OptimConfig(layer_lr_decay=2.0))
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_xi_one_equals_single_group_adamw():
    torch.manual_seed(0)
    a, b = make_model(64, layers=2), make_model(64, layers=2)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, OptimConfig(lr=1e-2, layer_lr_decay=1.0))
    assert len(opt_a.param_groups) == 1
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    x = torch.randint(0, 64, (2, 8))
    for model, opt in ((a, opt_a), (b, opt_b)):
        for _ in range(2):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
