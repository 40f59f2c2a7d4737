"""The GPU check (bench/gpu_check.sh runs it): every CUDA path fulltune has, in one call of ≤ 8 minutes.

    python bench/gpu_check.py carry gpu_carry       (here, on CPU) SST-2 and the default model's config
                                                    and tokenizer (no weights: 4.1 MB) into DIR
    python bench/gpu_check.py wheels .whl           (here) the wheels the GPU image lacks, for its
                                                    Python 3.12 (datasets, dill, multiprocess, torchao: 4.2 MB)
    python bench/gpu_check.py run OUT [--dry-run]   every step below; logs and one JSON under OUT,
                                                    models and runs in a scratch folder

Steps, each with its own time limit, each recorded ok / FAIL / skipped (with the reason) in
OUT/gpu_check.json and OUT/report.md, the runs' output in OUT/gpu_check.log:
  one         the quickstart's recipe, 10 steps of a random-init SmolLM2-135M-shaped model, one process
  torchrun1   the same under `torchrun --nproc-per-node=1` (FSDP2 over NCCL): the same losses
  resume      one process's step-5 checkpoint resumed under torchrun, and torchrun's in one process
  packing     packed rows, two to the batch, against each sequence alone (the attention kernel's mask);
              with flash-attn installed, flash_attention_2 too (the two rows run as one row)
  lean        train.memory=lean on a random-init Llama-3.2-1B-shaped model at seq 1024: peak vs estimate
  cpu_offload optim.cpu_offload over 3 steps, then resumed                               (CUDA only)
  act_offload model.activation_offload: the same losses as without                      (CUDA only)
  syncs       torch.cuda.set_sync_debug_mode("warn") over steps 2-4: host syncs per step (CUDA only)
  generate    fulltune generate on the trained model
  mfu         the MFU probe's peak against a CUDA-event-timed 8192³ bf16 GEMM

`--dry-run` (tests/test_gpu_check.py, on CPU in CI): the same steps on a tiny model on the CPU, the
CUDA-only ones skipped with their reason, so the script cannot rot between GPU loans.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
COMMON = ["train.progress=false", "train.tensorboard=false", "train.report=false", "eval.probes=[]",
          "eval.task_file=", "data.val_fraction=0", "train.overwrite=true"]  # fmt: skip
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # fmt: skip
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "max_position_embeddings": 8192, "tie_word_embeddings": True}  # fmt: skip


def carry(dest: Path) -> None:
    from fulltune.assets import ensure_model, ensure_sst2

    (dest / "data").mkdir(parents=True, exist_ok=True)
    shutil.copytree(ensure_sst2(), dest / "data" / "sst2", dirs_exist_ok=True)
    (dest / "config").mkdir(exist_ok=True)
    for f in ensure_model().iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dest / "config" / f.name)
    print(f"carry: {dest} ({sum(f.stat().st_size for f in dest.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


# What the GPU image (torch 2.11, transformers 5.17, Python 3.12) lacks, at the versions tested here.
WHEELS = ["datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "torchao==0.18.0"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def wheels(dest: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *WHEELS],
                   check=True)  # fmt: skip
    print(f"wheels: {dest} ({sum(f.stat().st_size for f in dest.glob('*.whl')) / 1e6:.1f} MB)")


def make_model(carried: Path, dest: Path, shape: dict) -> Path:
    """A seeded random-init model of the carried config's family with `shape`, and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(carried / "config")
    config.update(shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    AutoTokenizer.from_pretrained(carried / "config").save_pretrained(dest)
    return dest


# Not run in the dry run: CUDA-only paths, and lean (its 4-bit step compiles for a minute on 2 CPU cores;
# tests/test_lean.py covers lean on CPU). Their configs are still loaded and checked there.
NOT_IN_DRY_RUN = {"cpu_offload": "CUDA only", "cpu_offload_resumed": "CUDA only", "act_offload": "CUDA only",
                  "syncs": "CUDA only", "lean": "its 4-bit step compiles for ~1 min on 2 cores"}  # fmt: skip


class Skipped(Exception):
    """A step the dry run does not run: its config was loaded and checked instead."""


@dataclass
class Check:
    out: Path
    scratch: Path
    dry: bool
    deadline: float
    env: dict
    results: list = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return not self.dry

    def step(self, name: str, fn, limit_s: float) -> None:
        """Run one step under its limit (and the whole check's); its result, whatever happens, recorded."""
        left = self.deadline - time.time()
        started = time.time()
        if left < 20:
            record = {"status": "skipped", "detail": "out of the check's time"}
        else:
            try:
                record = {"status": "ok", **(fn(min(limit_s, left)) or {})}
            except Skipped as why:
                record = {"status": "skipped", "detail": str(why)}
            except Exception as exc:  # noqa: BLE001 - a failed step is a result, and the next step still runs
                record = {"status": "FAIL", "detail": f"{type(exc).__name__}: {str(exc)[-600:]}"}
        record = {"step": name, "seconds": round(time.time() - started, 1), **record}
        self.results.append(record)
        print(f"[gpu_check] {name}: {record['status']} ({record['seconds']} s) {record.get('detail', '')}", flush=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1))

    def train(self, name: str, overrides: list[str], limit_s: float, torchrun: bool = False) -> Path:
        """`fulltune train` as its own process (torchrun with one rank if asked), output in the log."""
        run = self.scratch / name
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"] if torchrun else []
        device = "train.device=cpu" if self.dry else "train.device=cuda"
        args = [QUICKSTART, *COMMON, device, f"train.output_dir={run}", *overrides]
        if self.dry and name in NOT_IN_DRY_RUN:
            from fulltune.config import load_config

            load_config(args[0], args[1:])  # a key that rotted is an error here too
            raise Skipped(f"dry run: {NOT_IN_DRY_RUN[name]}; its config loads")
        self.run([sys.executable, *launcher, "-m", "fulltune", "train", *args], limit_s, name)
        return run

    def run(self, cmd: list[str], limit_s: float, name: str) -> str:
        with open(self.out / "gpu_check.log", "a") as log:
            log.write(f"\n### {name}: {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=limit_s)  # fmt: skip
            log.write(proc.stdout)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}")
        return proc.stdout


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def same_losses(a: dict, b: dict, steps, rel: float = 1e-3) -> str:
    gaps = [abs(a[s] - b[s]) / abs(a[s]) for s in steps]
    assert len(gaps) and max(gaps) <= rel, f"loss gaps {[f'{g:.1e}' for g in gaps]} > {rel}"
    return f"steps {min(steps)}-{max(steps)}: largest relative loss gap {max(gaps):.1e}"


def median_record(run: Path, key: str) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = sorted(r[key] for r in rows if key in r and r["step"] > 2)
    return values[len(values) // 2] if values else float("nan")


def memory_line(run: Path) -> dict:
    mem = json.loads((run / "results.json").read_text()).get("memory") or {}
    return {k: mem.get(k) for k in ("predicted_peak_gb", "measured_peak_gb", "error_pct")}


def steps(c: Check, small: Path, large: Path | None) -> None:
    """Every step, in order; what one finds does not stop the next."""
    n = 4 if c.dry else 10  # steps of the quickstart runs; a checkpoint halfway, resumed
    base = [f"model.path={small}", f"train.max_steps={n}", f"train.save_interval={n // 2}", "train.keep_checkpoints=2"]
    runs: dict[str, Path] = {}

    def one(limit):
        runs["one"] = c.train("one", base, limit)
        return {"tok_per_s": median_record(runs["one"], "tokens_per_s"), "mfu": median_record(runs["one"], "mfu"),
                **memory_line(runs["one"])}  # fmt: skip

    def torchrun1(limit):
        runs["torchrun1"] = c.train("torchrun1", base, limit, torchrun=True)
        return {"detail": same_losses(losses(runs["one"]), losses(runs["torchrun1"]), range(1, n + 1))}

    def resume(limit):
        ckpt = f"checkpoints/step-{n // 2:07d}"
        a = c.train("one_to_torchrun", [*base, f"train.resume={runs['one'] / ckpt}"], limit / 2, torchrun=True)
        b = c.train("torchrun_to_one", [*base, f"train.resume={runs['torchrun1'] / ckpt}"], limit / 2)
        return {
            "detail": "; ".join(same_losses(losses(runs["one"]), losses(r), range(n // 2 + 1, n + 1)) for r in (a, b))
        }

    def packing(limit):
        import torch
        from transformers import AutoModelForCausalLM

        from fulltune.data.packing import check_isolation

        device = "cpu" if c.dry else "cuda"
        model = AutoModelForCausalLM.from_pretrained(small, attn_implementation="sdpa").to(device)
        gap = check_isolation(model, device, model.config.vocab_size)
        detail = f"sdpa, two packed rows to the batch: largest logit gap {gap:.2e}"
        if not c.dry and importlib.util.find_spec("flash_attn"):  # the two rows run as one (packing.as_one_row)
            flash = AutoModelForCausalLM.from_pretrained(small, attn_implementation="flash_attention_2").to(device)
            cast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
            detail += (
                f"; flash_attention_2 as one row: {check_isolation(flash, device, flash.config.vocab_size, cast):.2e}"
            )
        return {"detail": detail + ("" if c.dry or importlib.util.find_spec("flash_attn") else "; no flash-attn here")}

    def lean(limit):
        seq = 128 if c.dry else 1024
        run = c.train("lean", [f"model.path={large or small}", "train.memory=lean", "train.max_steps=4",
                               f"data.max_seq_len={seq}", "train.save_interval=0"], limit)  # fmt: skip
        return {"model": "tiny" if large is None else "Llama-3.2-1B-shaped", "seq": seq, **memory_line(run)}

    def cpu_offload(limit):
        extra = [*base[:1], "optim.cpu_offload=true", "optim.grad_clip=0", "train.max_steps=4", "train.save_interval=2"]
        first = c.train("cpu_offload", extra, limit / 2)
        again = c.train(
            "cpu_offload_resumed", [*extra, f"train.resume={first / 'checkpoints/step-0000002'}"], limit / 2
        )
        return {"detail": same_losses(losses(first), losses(again), range(3, 5))}

    def act_offload(limit):
        run = c.train("act_offload", [*base[:1], "model.activation_offload=true", "train.max_steps=3"], limit)
        return {"detail": same_losses(losses(runs["one"]), losses(run), range(1, 4))}

    def syncs(limit):
        args = [*COMMON, "train.device=cuda", f"model.path={small}", "train.max_steps=4", "train.memory_steps=1",
                f"train.output_dir={c.scratch / 'syncs'}", "train.save_interval=0"]  # fmt: skip
        if c.dry:
            from fulltune.config import load_config

            load_config(QUICKSTART, args)
            raise Skipped(f"dry run: {NOT_IN_DRY_RUN['syncs']}; its config loads")
        out = c.run([sys.executable, __file__, "syncs", QUICKSTART, *args], limit, "syncs")
        counts = json.loads(next(line for line in out.splitlines() if line.startswith('{"per_step"')))
        return {"syncs_per_step": counts["per_step"], "detail": "; ".join(counts["first"][:3])}

    def generate(limit):
        out = c.run([sys.executable, "-m", "fulltune", "generate", str(runs["one"] / "final"), "--prompt",
                     "Say hello.", "--max-new-tokens", "8"], limit, "generate")  # fmt: skip
        return {"detail": out.strip().splitlines()[-1][:120] if out.strip() else ""}

    def mfu(limit):
        return mfu_probe(c.dry)

    for name, fn, limit in (("one", one, 120), ("torchrun1", torchrun1, 90), ("resume", resume, 120),
                            ("packing", packing, 30), ("lean", lean, 150), ("cpu_offload", cpu_offload, 90),
                            ("act_offload", act_offload, 60), ("syncs", syncs, 60), ("generate", generate, 45),
                            ("mfu", mfu, 30)):  # fmt: skip
        c.step(name, fn, limit)


def mfu_probe(dry: bool) -> dict:
    """The run's peak probe (throughput.matmul_peak) against a plain timing of the same GEMM."""
    import torch

    from fulltune.throughput import matmul_peak

    device, dtype, n = (
        (torch.device("cpu"), torch.float32, 256) if dry else (torch.device("cuda"), torch.bfloat16, 8192)
    )
    probe = matmul_peak(device, dtype, rows=n, hidden=n, inner=n, seconds=2.0)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if dry:
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        seconds = (time.perf_counter() - t0) / 10
    else:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / 10
    reference = 2.0 * n**3 / seconds
    return {"probe_tflops": probe / 1e12, "reference_tflops": reference / 1e12, "ratio": probe / reference}


def syncs_main(argv: list[str]) -> None:
    """`fulltune train ARGV` with CUDA's sync debug mode on; prints how many syncs each step after the
    first made, and the first few places, as one JSON line."""
    import warnings

    import torch

    import fulltune.train as T
    from fulltune.cli import main

    torch.cuda.set_sync_debug_mode("warn")
    per_step, first, original = [], [], T.train_step

    def counted(*args, **kwargs):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = original(*args, **kwargs)
        syncs = [w for w in seen if "synchroniz" in str(w.message)]
        per_step.append(len(syncs))
        first.extend(f"{Path(w.filename).name}:{w.lineno}" for w in syncs[:3] if len(per_step) > 1)
        return result

    T.train_step = counted
    try:
        main(["train", *argv])
    finally:
        print(json.dumps({"per_step": per_step[1:], "first": first}), flush=True)


def report(c: Check) -> str:
    rows = ["| step | status | s | what it found |", "| --- | --- | ---: | --- |"]
    for r in c.results:
        found = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                 if k not in ("step", "status", "seconds")}  # fmt: skip
        rows.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {json.dumps(found, ensure_ascii=False)} |")
    return "\n".join(rows) + "\n"


def environment(dry: bool) -> str:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, GPU {gpu}, dry run {dry}"


def run(out: Path, dry: bool, budget_s: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # models and runs: none of it comes back
    carried = Path(os.environ.get("FULLTUNE_HOME") or scratch / "carry")
    if not (carried / "config").is_dir():
        carry(carried)
    path = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, FULLTUNE_HOME=str(carried), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    os.environ.update(FULLTUNE_HOME=str(carried), HF_HUB_OFFLINE="1")
    c = Check(out=out, scratch=scratch, dry=dry, deadline=time.time() + budget_s, env=env)
    print(f"[gpu_check] {environment(dry)}", flush=True)
    (out / "gpu_check.log").write_text(environment(dry) + "\n")
    small = make_model(carried, scratch / "small", TINY if dry else {})
    large = None if dry else make_model(carried, scratch / "large", LLAMA_1B)
    try:
        steps(c, small, large)
    finally:
        (out / "report.md").write_text(f"{environment(dry)}\n\n{report(c)}")
        shutil.rmtree(scratch, ignore_errors=True)
    print(report(c), flush=True)
    return 1 if any(r["status"] == "FAIL" for r in c.results) else 0


if __name__ == "__main__":
    if sys.argv[1] == "syncs":
        syncs_main(sys.argv[2:])
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("verb", choices=("carry", "wheels", "run"))
    ap.add_argument("where", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="on CPU, a tiny model; CUDA-only steps skipped")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no step after this many seconds")
    args = ap.parse_args()
    if args.verb == "carry":
        carry(args.where)
    elif args.verb == "wheels":
        wheels(args.where)
    else:
        sys.exit(run(args.where, args.dry_run, args.budget_s))
