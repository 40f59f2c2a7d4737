"""How many of θ0's top tokens the drift monitor needs (evals/drift.py): exact KL vs the top-k estimate.

On SmolLM2-135M-Instruct (the embedded default) against changed models: Gaussian noise on two
decoder layers' weights at two strengths (relative to each weight's std), and, where given, a
fine-tuned run's final weights. Sequences: the first 30 held-out quickstart reviews
(builtin:sst2-short/test, target positions = the answer, and every position) and the first 20
LAMBADA passages (builtin:lambada, every position is a target). For k in KS: the estimate / exact
KL, storage bytes per position, build and evaluation seconds; the estimate with θ0's log-probs
stored in bf16 instead of fp32; and a follow-up not built (top k + k draws from θ0's tail). Prints
markdown tables (docs/drift.md). --timing: only the seconds, the fastest of 3 runs.

    .venv/bin/python bench/drift_k.py [--finetuned /tmp/drift_ft/final] [--precision fp32|bf16-mixed] [--timing]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, cpu_name  # noqa: E402

from fulltune.assets import resolve_data_path  # noqa: E402
from fulltune.config import ModelConfig  # noqa: E402
from fulltune.data.formats import encode_record  # noqa: E402
from fulltune.evals import drift  # noqa: E402
from fulltune.model import decoder_layers, load_theta0  # noqa: E402
from fulltune.runtime import autocast_factory  # noqa: E402

KS = (1, 4, 16, 64, 256, 1024, 4096)
BATCH = 8
MAX_LEN = 256


def sequences(tokenizer) -> dict[str, tuple[list, str]]:
    """name → (examples, positions)."""

    def first(spec: str, n: int, fmt: str) -> list:
        lines = Path(resolve_data_path(spec)).read_text().splitlines()[:n]
        out = [encode_record(tokenizer, json.loads(x), fmt, loss_on="completion", where=spec) for x in lines]
        for e in out:
            e.input_ids, e.target_mask = e.input_ids[:MAX_LEN], e.target_mask[:MAX_LEN]
        return out

    task = first("builtin:sst2-short/test", 30, "messages")
    general = first("builtin:lambada", 20, "text")
    return {"task (answer)": (task, "target"), "task (all)": (task, "all"), "lambada": (general, "target")}


def noisy(model, layers: tuple[int, ...], strength: float, seed: int = 0):
    """A copy of `model` with N(0, (strength·std(W))²) added to every weight of `layers`."""
    import copy

    changed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in layers:
            for p in decoder_layers(changed)[i].parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g) * strength * p.std())
    return changed


@torch.no_grad()
def logits_at(model, examples, positions: str, autocast) -> torch.Tensor:
    """fp32 logits [P, V] at the scored positions (the forward `build_reference` and `kl_per_token` run)."""
    model.eval()
    at = [drift.scored_positions(e, positions) for e in examples]
    return torch.cat([x.float() for _, x in drift._batches(model, examples, at, autocast=autocast, batch_size=BATCH)])


def exact_kl(logits0: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean full-vocabulary KL(θ0 ‖ θ) per position, float64 sums."""
    total = 0.0
    for a, b in zip(logits0.split(drift.CHUNK_ROWS), logits.split(drift.CHUNK_ROWS)):
        p0 = torch.log_softmax(a, -1)
        total += float((p0.exp() * (p0 - torch.log_softmax(b, -1))).double().sum())
    return total / logits0.shape[0]


def coarse(logits0: torch.Tensor, k: int, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """θ0's stored (ids, log-probs, tail), as `build_reference` keeps them; bf16: log-probs rounded to bf16."""
    ids, top, tail = drift._top_and_tail(logits0, k)
    if bf16:
        top, tail = top.to(torch.bfloat16).float(), tail.to(torch.bfloat16).float()
    return ids, top, tail


def estimate(logits: torch.Tensor, stored) -> float:
    return float(drift.coarse_kl(logits, *stored).double().mean())


def sampled_tail(logits0: torch.Tensor, k: int, seed: int = 0):
    """Not in evals/drift.py, measured as a possible follow-up: θ0's top k, plus k tokens drawn from θ0's
    tail (with replacement) with their log p0: tail0 · mean(log p0 − log pθ) over the draws is an
    unbiased estimate of the tail's share of the full KL (not a lower bound). 16k + 8 bytes a position."""
    ids, top, tail = drift._top_and_tail(logits0, k)
    g = torch.Generator().manual_seed(seed)
    drawn, drawn_logp = [], []
    for part, index in zip(logits0.split(drift.CHUNK_ROWS), ids.split(drift.CHUNK_ROWS)):
        logp = torch.log_softmax(part, -1)
        draw = torch.multinomial(logp.exp().scatter(-1, index.long(), 0.0), k, replacement=True, generator=g)
        drawn.append(draw)
        drawn_logp.append(logp.gather(-1, draw))
    return ids, top, tail, torch.cat(drawn), torch.cat(drawn_logp)


def sampled_estimate(logits: torch.Tensor, stored) -> float:
    ids, top0, tail0, drawn, drawn_logp0 = stored
    total = 0.0
    for rows in zip(*(t.split(drift.CHUNK_ROWS) for t in (logits, ids, top0, tail0, drawn, drawn_logp0))):
        part, index, top0_, tail0_, draw, logp0_draw = rows
        logp = torch.log_softmax(part, -1)
        head = (top0_.exp() * (top0_ - logp.gather(-1, index.long()))).sum(-1)
        rest = tail0_.exp() * (logp0_draw - logp.gather(-1, draw)).mean(-1)
        total += float((head + rest).double().sum())
    return total / logits.shape[0]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def timings(model0, model, examples, positions: str, autocast) -> list[tuple]:
    """The real `build_reference` and `kl_per_token` at the smallest and largest k, and one plain forward
    (what validation loss costs) for scale: (k, positions, bytes, build s, KL s, KL value)."""
    out = []
    for k in (KS[0], KS[-1]):
        ref, build_s = timed(
            drift.build_reference, model0, examples, k=k, autocast=autocast, batch_size=BATCH, positions=positions
        )
        kl, eval_s = timed(drift.kl_per_token, model, ref, autocast, BATCH)
        out.append((k, ref.n_positions, ref.nbytes, build_s, eval_s, kl))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--finetuned", default="")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed"])
    ap.add_argument("--timing", action="store_true", help="only the seconds: a forward, build and KL at TIMED_KS")
    args = ap.parse_args()
    autocast = autocast_factory(args.precision, torch.device("cpu"))
    model0, tok, _ = load_theta0(ModelConfig(path="default"), verbose=False)
    model0.eval()
    sets = sequences(tok)
    cases = {
        "noise 1% L10+L20": noisy(model0, (10, 20), 0.01),
        "noise 5% L10+L20": noisy(model0, (10, 20), 0.05),
    }
    if args.timing:
        return timing_only(model0, cases["noise 5% L10+L20"], sets, autocast)
    if args.finetuned:
        cases["fine-tuned 8 steps"] = load_theta0(ModelConfig(path=args.finetuned), verbose=False)[0].eval()
    rows, timing = [], []
    for name, (examples, positions) in sets.items():
        logits0, forward_s = timed(logits_at, model0, examples, positions, autocast)
        stored = {k: coarse(logits0, k) for k in KS}
        stored16 = {k: coarse(logits0, k, bf16=True) for k in KS}
        drawn = {k: sampled_tail(logits0, k) for k in KS}
        for case, model in cases.items():
            logits = logits_at(model, examples, positions, autocast)
            exact = exact_kl(logits0, logits)
            for k in KS:
                est, est16 = estimate(logits, stored[k]), estimate(logits, stored16[k])
                sampled = sampled_estimate(logits, drawn[k])
                rows.append((name, case, k, exact, est, est16, estimate(logits0, stored16[k]), sampled))
            ratios = " ".join(f"k={r[2]}:{r[4] / exact:.3f}" for r in rows[-len(KS) :])
            print(f"{name} / {case}: exact {exact:.5g} {ratios}", flush=True)
        first = next(iter(cases.values()))
        for k, n, nbytes, build_s, eval_s, kl in timings(model0, first, examples, positions, autocast):
            derived = next(r[4] for r in rows if r[0] == name and r[2] == k)
            timing.append((name, k, n, nbytes, build_s, eval_s, forward_s, kl / derived))
        print(timing[-2:], flush=True)
    report(rows, timing, args)


TIMED_KS = (1, 256, 1024, 4096)


def timing_only(model0, model, sets, autocast, repeats: int = 3) -> None:
    """Seconds, the fastest of `repeats` (the CPU is shared; the load average is printed): one plain
    forward over the sequences (what validation loss costs), then `build_reference` and `kl_per_token`
    at each of TIMED_KS."""

    def best(fn, *args, **kwargs):
        runs = [timed(fn, *args, **kwargs) for _ in range(repeats)]
        return runs[0][0], min(t for _, t in runs)

    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    print("| sequences | positions | one forward s | " + " | ".join(f"k={k} build / KL s" for k in TIMED_KS) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in TIMED_KS) + " |")
    for name, (examples, positions) in sets.items():
        logits, forward_s = best(logits_at, model0, examples, positions, autocast)
        cells = []
        for k in TIMED_KS:
            ref, build_s = best(
                drift.build_reference, model0, examples, k=k, autocast=autocast, batch_size=BATCH, positions=positions
            )
            _, eval_s = best(drift.kl_per_token, model, ref, autocast, BATCH)
            cells.append(f"{build_s:.1f} / {eval_s:.1f}")
        print(f"| {name} | {logits.shape[0]} | {forward_s:.1f} | " + " | ".join(cells) + " |", flush=True)
    print(f"load average after: {Path('/proc/loadavg').read_text().split()[:3]}")


def ratio_table(rows, cell, exact: bool = False) -> None:
    """One markdown row per (sequences, model) case, one `cell(row)` per k (and the exact KL first)."""
    print("| sequences | model | " + ("exact KL | " if exact else "") + " | ".join(f"k={k}" for k in KS) + " |")
    print("| --- | --- | " + ("---: | " if exact else "") + " | ".join("---:" for _ in KS) + " |")
    for name, case in dict.fromkeys((r[0], r[1]) for r in rows):
        mine = [r for r in rows if (r[0], r[1]) == (name, case)]
        first = f"{mine[0][3]:.4g} | " if exact else ""
        print(f"| {name} | {case} | {first}" + " | ".join(cell(r) for r in mine) + " |")


def report(rows, timing, args) -> None:
    print(
        f"\nCPU: {cpu_name()} ({', '.join(cpu_flags())}); torch {torch.__version__}; python {platform.python_version()}"
    )
    print(f"threads {torch.get_num_threads()}; precision {args.precision}; command: {' '.join(sys.argv)}\n")
    ratio_table(rows, lambda r: f"{r[4] / r[3]:.3f}", exact=True)
    print("\nθ0's log-probs stored in bf16: estimate / fp32-stored estimate (KL of θ0 itself with bf16 storage)\n")
    ratio_table(rows, lambda r: f"{r[5] / r[4]:.3f} ({r[6]:.1e})")
    print("\nFollow-up, not built: top k + k draws from θ0's tail (16k + 8 bytes a position): estimate / exact KL\n")
    ratio_table(rows, lambda r: f"{r[7] / r[3]:.3f}")
    print("\n| sequences | positions | k | bytes/position | reference MB | build s | KL eval s | one forward s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, k, n, nbytes, build_s, eval_s, forward_s, ratio in timing:
        assert abs(ratio - 1) < 1e-3, (name, k, ratio)  # kl_per_token gives what this bench derives
        cells = (name, n, k, 8 * k + 4, f"{nbytes / 1e6:.2f}", f"{build_s:.1f}", f"{eval_s:.1f}", f"{forward_s:.1f}")
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
