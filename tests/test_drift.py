"""evals/drift.py: KL(θ0 ‖ θ) from θ0's top-k, against the exact full-vocabulary KL on a tiny model."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import make_model

from fulltune.data.formats import Example
from fulltune.evals import drift
from fulltune.evals.drift import Theta0Reference, build_reference, kl_per_token

VOCAB = 96
NO_CAST = contextlib.nullcontext


def _examples(n: int = 7, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 14, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = length // 2
        out.append(Example(ids, [0] * prompt + [1] * (length - prompt)))
    return out


@pytest.fixture(scope="module")
def theta0():
    return make_model(VOCAB, layers=2, seed=1).eval()


def _perturbed(model, scale: float = 0.05, seed: int = 3):
    changed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in changed.model.layers[0].parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return changed


@torch.no_grad()
def _exact_kl(model0, model, examples, positions="target") -> float:
    """Mean full-vocabulary KL(p0 ‖ pθ) at the scored positions, one sequence at a time, in float64."""
    total, n = 0.0, 0
    for e in examples:
        at = drift.scored_positions(e, positions)
        ids = torch.tensor([e.input_ids])
        logp0 = torch.log_softmax(model0(ids).logits[0, at].double(), -1)
        logp = torch.log_softmax(model(ids).logits[0, at].double(), -1)
        total += float((logp0.exp() * (logp0 - logp)).sum())
        n += len(at)
    return total / n


def test_kl_of_theta0_itself_is_zero(theta0):
    examples = _examples()
    ref = build_reference(theta0, examples, k=8, autocast=NO_CAST, batch_size=3)
    assert abs(kl_per_token(theta0, ref, NO_CAST, 3)) <= 1e-6
    assert ref.k == 8 and ref.n_positions == sum(len(drift.scored_positions(e)) for e in examples)
    assert ref.top_ids.dtype == torch.int32 and ref.top_logp.dtype == torch.float32
    assert ref.nbytes == ref.n_positions * (8 * 8 + 4 + 4) + 4 * (sum(len(e.input_ids) for e in examples) + 2 * 7)


@pytest.mark.parametrize("positions", ["target", "all"])
def test_k_equal_to_the_vocabulary_gives_the_exact_kl(theta0, positions):
    examples = _examples()
    ref = build_reference(theta0, examples, k=VOCAB, autocast=NO_CAST, batch_size=4, positions=positions)
    assert torch.isneginf(ref.tail_logp).all()  # nothing outside the top k
    changed = _perturbed(theta0)
    exact = _exact_kl(theta0, changed, examples, positions)
    assert exact > 1e-3
    assert kl_per_token(changed, ref, NO_CAST, 2) == pytest.approx(exact, abs=1e-5)


@torch.no_grad()
def _coarsened_kl(model0, model, examples, k: int) -> float:
    """KL of the two distributions grouped into θ0's top-k tokens + everything else, in float64."""
    total, n = 0.0, 0
    for e in examples:
        at = drift.scored_positions(e)
        ids = torch.tensor([e.input_ids])
        p0 = torch.softmax(model0(ids).logits[0, at].double(), -1)
        p = torch.softmax(model(ids).logits[0, at].double(), -1)
        top = p0.topk(k, -1).indices
        q0 = torch.cat([p0.gather(-1, top), 1 - p0.gather(-1, top).sum(-1, keepdim=True)], -1)
        q = torch.cat([p.gather(-1, top), 1 - p.gather(-1, top).sum(-1, keepdim=True)], -1)
        total += float((q0 * (q0.log() - q.log())).sum())
        n += len(at)
    return total / n


def test_small_k_is_the_coarsened_kl_and_a_positive_lower_bound(theta0):
    examples = _examples(seed=2)
    changed = _perturbed(theta0, scale=0.02)
    exact = _exact_kl(theta0, changed, examples)
    estimates = []
    for k in (1, 4, 16):
        ref = build_reference(theta0, examples, k=k, autocast=NO_CAST, batch_size=4)
        estimates.append(kl_per_token(changed, ref, NO_CAST, 4))
        assert estimates[-1] == pytest.approx(_coarsened_kl(theta0, changed, examples, k), abs=1e-6)
    assert all(0 < est <= exact + 1e-9 for est in estimates), (estimates, exact)
    assert estimates == sorted(estimates)  # a finer grouping loses less


def test_all_positions_score_more_than_the_targets(theta0):
    examples = _examples()
    every = build_reference(theta0, examples, k=2, autocast=NO_CAST, batch_size=4, positions="all")
    targets = build_reference(theta0, examples, k=2, autocast=NO_CAST, batch_size=4)
    assert every.n_positions == sum(len(e.input_ids) - 1 for e in examples) > targets.n_positions


def test_save_load_round_trip_and_damaged_files(theta0, tmp_path):
    examples = _examples()
    ref = build_reference(theta0, examples, k=5, autocast=NO_CAST, batch_size=4)
    path = tmp_path / "drift-task.safetensors"
    key = {"model": "tiny", "sizes": (1, 2)}
    ref.save(path, key)
    back = Theta0Reference.load(path, key)
    assert back is not None and (back.k, back.positions) == (5, "target")
    for name in drift.TENSORS:
        assert torch.equal(getattr(back, name), getattr(ref, name)), name
    changed = _perturbed(theta0)
    assert kl_per_token(changed, back, NO_CAST, 4) == kl_per_token(changed, ref, NO_CAST, 4)
    assert Theta0Reference.load(path, {"model": "other"}) is None
    assert Theta0Reference.load(tmp_path / "missing.safetensors", key) is None
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) - 50])
    assert Theta0Reference.load(tmp_path / "short.safetensors", key) is None
    flipped = bytearray(data)
    flipped[-20] ^= 0x40  # a log-probability's byte: safetensors' own header still parses
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    assert Theta0Reference.load(tmp_path / "flipped.safetensors", key) is None


def test_training_mode_and_grad_mode_are_restored(theta0):
    model = copy.deepcopy(theta0)
    examples = _examples(3)
    for training in (True, False):
        model.train(training)
        ref = build_reference(model, examples, k=3, autocast=NO_CAST, batch_size=2)
        assert model.training is training and torch.is_grad_enabled()
        kl_per_token(model, ref, NO_CAST, 2)
        assert model.training is training and torch.is_grad_enabled()
    with torch.no_grad():
        kl_per_token(model, ref, NO_CAST, 2)
        assert not torch.is_grad_enabled()


def test_scoring_runs_under_the_given_autocast(theta0):
    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(1)
        yield

    ref = build_reference(theta0, _examples(5), k=3, autocast=autocast, batch_size=2)
    assert len(entered) == 3
    kl_per_token(theta0, ref, autocast, 5)
    assert len(entered) == 4


def test_named_sets_and_load_or_build(theta0, tmp_path, capsys):
    sets = {"task": _examples(4, seed=5), "general": _examples(3, seed=6)}
    build = {"k": 4, "autocast": NO_CAST, "batch_size": 2}
    refs = {}
    for name, examples in sets.items():
        refs[name], reused = drift.load_or_build(
            drift.reference_path(tmp_path, name), theta0, examples, key={"m": 1}, reuse=False, **build
        )
        assert not reused
    report = drift.kl_report(_perturbed(theta0), refs, NO_CAST, 2)
    assert set(report) == {"kl_task", "kl_general"} and all(v > 0 for v in report.values())
    path = drift.reference_path(tmp_path, "task")
    again, reused = drift.load_or_build(path, theta0, sets["task"], key={"m": 1}, reuse=True, **build)
    assert reused and torch.equal(again.top_logp, refs["task"].top_logp)
    path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    again, reused = drift.load_or_build(path, theta0, sets["task"], key={"m": 1}, reuse=True, **build)
    assert not reused and torch.equal(again.top_ids, refs["task"].top_ids)
    assert capsys.readouterr().out.count("\n") == 1
    assert (
        Theta0Reference.load(path, drift.reference_key({"m": 1}, sets["task"], k=4, positions="target")) is not None
    )  # rebuilt and saved again


def _rank_main(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = make_model(VOCAB, layers=2, seed=1).eval()
        ref = build_reference(model, _examples(5), k=6, autocast=NO_CAST, batch_size=2)  # 3 batches: a null one
        kl = kl_per_token(_perturbed(model), ref, NO_CAST, 2)
        if rank == 0:
            ref.save(out, {"kl": kl})
    finally:
        dist.destroy_process_group()


def test_two_ranks_build_the_same_reference_and_kl(theta0, tmp_path):
    """Each rank scores its share of the batches (one of them a null micro-batch); the gathered
    reference and the summed KL are the one-process ones."""
    import json

    import torch.multiprocessing as mp
    from safetensors import safe_open

    out = tmp_path / "ranks.safetensors"
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    ref = build_reference(theta0, _examples(5), k=6, autocast=NO_CAST, batch_size=2)
    with safe_open(str(out), "pt") as fh:
        kl = json.loads(fh.metadata()["fulltune_drift"])["key"]["kl"]
    two = Theta0Reference.load(out, {"kl": kl})
    for name in drift.TENSORS:
        assert torch.equal(getattr(two, name), getattr(ref, name)), name
    assert kl == pytest.approx(kl_per_token(_perturbed(theta0), ref, NO_CAST, 2), abs=1e-7)
