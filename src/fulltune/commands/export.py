"""`fulltune export MODEL_OR_RUN --gguf [--type f16|bf16|q8_0|f32] [--out FILE.gguf]`: one GGUF file for
llama.cpp, Ollama and LM Studio, with the tokenizer and the chat template, and an Ollama Modelfile
(NAME-TYPE.Modelfile) beside it.

The conversion is llama.cpp's own (`convert_hf_to_gguf.py`, its `conversion/` package and its
`gguf-py` writer), taken from the llama-cpp-python source release pinned in assets.WHEELS (checked by
sha256, cached under $FULLTUNE_HOME/llama.cpp/), or from a llama.cpp checkout named by
FULLTUNE_LLAMA_CPP. It runs in its own process; its log is kept beside the output, and a failure is
one line with its last error. Every family llama.cpp's converter knows exports; one it does not is
said in that line. The converter needs sentencepiece: pip install 'fulltune[gguf]'.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from fulltune.errors import UserError

TYPES = ("f16", "bf16", "q8_0", "f32")
CONVERTER = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def register(sub) -> None:
    e = sub.add_parser("export", help="write a model as one GGUF file for llama.cpp / Ollama, with a Modelfile")
    e.add_argument(
        "model", metavar="MODEL_OR_RUN", help="an HF model directory, a run directory (its final/), or default"
    )
    e.add_argument("--gguf", action="store_true", help="GGUF, the one format (the default; say it for clarity)")
    e.add_argument("--type", choices=TYPES, default="f16", help="the tensors' type: f16 (default), bf16, q8_0, f32")
    e.add_argument("--out", help="the .gguf file (default: beside the model, NAME-TYPE.gguf)")
    e.set_defaults(run=run)


def converter_dir() -> Path:
    """llama.cpp's converter: FULLTUNE_LLAMA_CPP's checkout, else the pinned release's, extracted once."""
    if os.environ.get("FULLTUNE_LLAMA_CPP"):
        root = Path(os.environ["FULLTUNE_LLAMA_CPP"]).expanduser()
        if not (root / CONVERTER[0]).is_file():
            raise UserError(f"FULLTUNE_LLAMA_CPP: {root} has no {CONVERTER[0]} (a llama.cpp checkout has it)")
        return root
    from fulltune.assets import WHEELS, fetch_wheel, home

    version = WHEELS["llama-cpp-python"][0]
    root = home() / "llama.cpp" / version
    if (root / CONVERTER[0]).is_file():
        return root
    sdist = fetch_wheel("llama-cpp-python")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = root.with_name(f".{version}.tmp")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(tuple(prefix + c for c in CONVERTER))]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(tmp, members=members, filter="data")
    os.replace(tmp, root)
    return root


def _model_dir(spec: str) -> Path:
    from fulltune.model import resolve_model_path

    path = resolve_model_path(spec)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        return path / "final"  # a run directory
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not an HF model directory (no config.json) nor a run directory with a final/")
    return path


def run(args) -> int:
    if importlib.util.find_spec("sentencepiece") is None:
        raise UserError("--gguf needs sentencepiece for llama.cpp's converter: pip install 'fulltune[gguf]'")
    model = _model_dir(args.model)
    name = model.parent.name if model.name == "final" else model.name  # a run's final/: the run's name
    out = Path(args.out).expanduser() if args.out else model.parent / f"{name}-{args.type}.gguf"
    if out.suffix != ".gguf":
        raise UserError(f"--out: {out} should end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    root = converter_dir()
    warning = llama_cpp_mismatch(json.loads((model / "config.json").read_text()))
    if warning:
        print(f"[export] warning: {warning}", flush=True)
    tmp, log = out.with_name(f".{out.name}.tmp"), out.with_suffix(".log")
    cmd = [sys.executable, str(root / CONVERTER[0]), str(model), "--outfile", str(tmp), "--outtype", args.type]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    print(f"[export] llama.cpp's converter ({root}) → {out} ({args.type}); its log: {log}", flush=True)
    with open(log, "w") as fh:
        done = subprocess.run(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["no output"]
        raise UserError(f"llama.cpp's converter failed on {model} ({last[0].strip()[:300]}); see {log}")
    os.replace(tmp, out)
    modelfile = write_modelfile(out, model)
    print(f"[export] wrote {out} ({out.stat().st_size / 1e6:.0f} MB) and {modelfile}", flush=True)
    return 0


def llama_cpp_mismatch(config: dict) -> str | None:
    """What llama.cpp would compute differently from transformers for this config.json, which its
    converter writes without a word (measured: bench/gguf_llamacpp.py --families). Gemma-3: llama.cpp
    scales the queries by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for the 62-layer 27B) and does not
    read query_pre_attn_scalar; transformers scales by query_pre_attn_scalar^-1/2."""
    text = config.get("text_config") or config
    if text.get("model_type", config.get("model_type")) not in ("gemma3", "gemma3_text"):
        return None
    head_dim, scalar = text.get("head_dim", 256), text.get("query_pre_attn_scalar", 256)
    layers, hidden, heads = text.get("num_hidden_layers"), text.get("hidden_size"), text.get("num_attention_heads")
    expected = hidden / heads if layers == 62 and hidden and heads else head_dim
    if scalar == expected:
        return None
    return (
        f"query_pre_attn_scalar is {scalar}, but llama.cpp scales Gemma-3's queries as if it were {expected:g} "
        "(it does not read that key): the GGUF will not compute this model's answers"
    )


def write_modelfile(gguf: Path, model: Path) -> Path:
    """Ollama's Modelfile beside the GGUF: the file, and the end-of-turn token as a stop word (Ollama
    takes the chat template from the GGUF's own metadata)."""
    import json

    stop = None
    config = model / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        stop = eos.get("content") if isinstance(eos, dict) else eos
    path = gguf.with_suffix(".Modelfile")
    lines = [f"# ollama create NAME -f {path}", f"FROM ./{gguf.name}"]
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    path.write_text("\n".join(lines) + "\n")
    return path
