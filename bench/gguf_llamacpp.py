"""llama.cpp itself runs fulltune's GGUF: the fine-tuned quickstart exported at f16 and q8_0, loaded by
llama-cpp-python, answers the quickstart's 200 held-out reviews greedily beside transformers on final/.

For each review (its system and user turns): the prompt text from the tokenizer's chat template must
equal the prompt llama.cpp renders from the template stored in the GGUF, and llama.cpp's tokens of it
must equal the HF tokenizer's. Then both models answer greedily from the same tokens (at most 6 new
tokens, up to the end-of-turn token): the answers must be equal at f16; at q8_0 the top-1 agreement at
the answer's first position and the share of equal answers are stated. The logits at that position
are compared too (largest |difference|, fp32 transformers against llama.cpp).

`--families`: a tiny random-init model of each family in the family table (SmolLM2's tokenizer
standing in, as in tests/test_export.py), exported at f32 and run by llama.cpp on 8 prompts: its
next-token logits against transformers' (largest |difference|, top-1 agreement), so llama.cpp not
only reads each family's file but computes the same model from it.

A bench, run on request, not in CI: llama-cpp-python compiles llama.cpp from source (no wheel on PyPI
for Linux), 4 min 11 s on the 2-core EPYC (docs/usage.md). CI checks what the gguf reader sees
(tests/test_export.py).

    .venv/bin/pip install llama-cpp-python==0.3.36            # the converter's release
    .venv/bin/fulltune train configs/quickstart.yaml          # runs/quickstart/final
    .venv/bin/python bench/gguf_llamacpp.py [--run runs/quickstart] [--items 200] [--families]

Results: bench/results/gguf_llamacpp.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, bench_env, save_results

MAX_NEW = 6


def prompts(n: int) -> list[tuple[list[dict], str]]:
    """The quickstart's test reviews: the turns before the answer, and the gold answer."""
    from fulltune.assets import resolve_data_path

    lines = Path(resolve_data_path("builtin:sst2-short/test")).read_text().splitlines()
    rows = [json.loads(line) for line in lines[:n]]
    return [(r["messages"][:-1], r["messages"][-1]["content"]) for r in rows]


def export(run: Path, kind: str) -> tuple[Path, float]:
    out = run / f"{run.name}-{kind}.gguf"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "fulltune", "export", str(run), "--gguf", "--type", kind, "--out", str(out)]
    subprocess.run(cmd, check=True, env=bench_env(), cwd=ROOT)
    return out, time.perf_counter() - t0


def hf_answers(final: Path, items) -> tuple[list[list[int]], list[list[int]], list[np.ndarray], list[str]]:
    """Prompt ids, greedy answer ids and the answer position's logits from transformers (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in items]
    ids, answers, logits = [], [], []
    with torch.no_grad():
        for text in texts:
            x = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
            logits.append(model(x).logits[0, -1].float().numpy())
            out = model.generate(x, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id)
            ids.append(x[0].tolist())
            answers.append(out[0, x.shape[1] :].tolist())
    return ids, answers, logits, texts


def llama_answers(llm, ids: list[int], eos: int) -> tuple[list[int], np.ndarray]:
    """Greedy on llama.cpp's own logits, token by token, up to the end-of-turn token."""
    llm.reset()
    llm.eval(ids)
    first = llm.scores[llm.n_tokens - 1].copy()
    out, logits = [], first
    for _ in range(MAX_NEW):
        nxt = int(np.argmax(logits))
        out.append(nxt)
        if nxt == eos:
            break
        llm.eval([nxt])
        logits = llm.scores[llm.n_tokens - 1]
    return out, first


def check(gguf: Path, items, hf, tok) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    ids, answers, logits, texts = hf
    t0 = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=512, logits_all=True, n_threads=2, verbose=False)
    load_s = time.perf_counter() - t0
    template = llm.metadata["tokenizer.chat_template"]
    fmt = Jinja2ChatFormatter(template=template, eos_token=tok.eos_token, bos_token=tok.bos_token or "")
    same_prompt = same_tokens = same_answer = top1 = 0
    diffs, right = [], 0
    t0 = time.perf_counter()
    for (messages, gold), x, ans, lg, text in zip(items, ids, answers, logits, texts):
        same_prompt += fmt(messages=messages).prompt == text
        same_tokens += llm.tokenize(text.encode(), add_bos=False, special=True) == x
        out, first = llama_answers(llm, x, tok.eos_token_id)
        same_answer += out == ans
        top1 += int(np.argmax(first)) == int(np.argmax(lg))
        diffs.append(float(np.max(np.abs(first - lg))))
        right += tok.decode(out, skip_special_tokens=True).strip() == gold
    n = len(items)
    return {
        "gguf": gguf.name,
        "mb": round(gguf.stat().st_size / 1e6),
        "load_s": round(load_s, 2),
        "answer_s": round(time.perf_counter() - t0, 1),
        "n": n,
        "same_prompt": same_prompt,
        "same_tokens": same_tokens,
        "same_answer": same_answer,
        "top1_agree": top1,
        "max_abs_logit_diff": round(max(diffs), 4),
        "median_max_abs_logit_diff": round(float(np.median(diffs)), 4),
        "accuracy": round(100 * right / n, 1),
    }


# family: (config class, model class, extra config); shapes as tests/test_export.py's
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def family_row(family: str, work: Path, items) -> dict:
    """A tiny model of `family` exported at f32; llama.cpp's next-token logits against transformers'."""
    import transformers
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from fulltune.model import resolve_model_path

    config_cls, model_cls, extra = FAMILIES[family]
    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=49152, max_position_embeddings=256, **shape, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    model_dir = work / family
    model.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("default"))
    tok.save_pretrained(model_dir)
    out = work / f"{family}-f32.gguf"
    cmd = [sys.executable, "-m", "fulltune", "export", str(model_dir), "--gguf", "--type", "f32", "--out", str(out)]
    subprocess.run(cmd, check=True, env=bench_env(), cwd=ROOT)
    llm = Llama(model_path=str(out), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    diffs, top1 = [], 0
    for messages, _ in items[:8]:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        llm.reset()
        llm.eval(ids)
        got = llm.scores[llm.n_tokens - 1]
        diffs.append(float(np.max(np.abs(got - ref))))
        top1 += int(np.argmax(got)) == int(np.argmax(ref))
    arch = llm.metadata.get("general.architecture")
    return {"family": family, "architecture": arch, "n": len(diffs), "top1_agree": top1, "max_abs_diff": max(diffs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/quickstart", help="a run directory with final/")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--families", action="store_true", help="also each family's tiny model (llama.cpp vs transformers)")
    args = ap.parse_args()
    run = (ROOT / args.run).resolve()
    if not (run / "final" / "config.json").is_file():
        sys.exit(f"{run}/final: no model; run `fulltune train configs/quickstart.yaml` first")
    import llama_cpp
    from transformers import AutoTokenizer

    items = prompts(args.items)
    tok = AutoTokenizer.from_pretrained(run / "final")
    t0 = time.perf_counter()
    hf = hf_answers(run / "final", items)
    hf_s = time.perf_counter() - t0
    hf_right = sum(tok.decode(a, skip_special_tokens=True).strip() == g for a, (_, g) in zip(hf[1], items))
    rows = []
    for kind in ("f16", "q8_0"):
        gguf, export_s = export(run, kind)
        rows.append({"type": kind, "export_s": round(export_s, 1), **check(gguf, items, hf, tok)})
        print(json.dumps(rows[-1]), flush=True)
    families = []
    if args.families:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            for family in FAMILIES:
                families.append(family_row(family, Path(work), items))
                print(json.dumps(families[-1]), flush=True)
    save_results(
        "gguf_llamacpp",
        rows,
        families=families,
        llama_cpp_python=llama_cpp.__version__,
        run=args.run,
        transformers_fp32={"answer_s": round(hf_s, 1), "accuracy": round(100 * hf_right / len(items), 1)},
        command=f"python bench/gguf_llamacpp.py --run {args.run} --items {args.items}",
    )


if __name__ == "__main__":
    main()
