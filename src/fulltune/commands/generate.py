"""Try the model: `fulltune chat MODEL` (interactive, streamed) and `fulltune generate MODEL`
(--prompt / --file, JSONL out). MODEL is `default`, an HF directory, a .gguf file, a run's `final/`
or a run directory. `--compare M` puts M's answer (e.g. θ0: `default`) next to MODEL's.

Prompts go through the model's own chat template with the generation prompt; a tokenizer without
one gets plain completion, said once. Greedy unless --temperature > 0 (then seeded sampling)."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fulltune.errors import UserError


def register(sub) -> None:
    for name, text in (
        ("chat", "talk to a model in the terminal, with its chat template and streamed tokens"),
        ("generate", "generate answers for prompts (--prompt or --file), JSONL out"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help="default, an HF model directory, a .gguf file, a run's final/ or a run directory")
        p.add_argument(
            "--compare", metavar="MODEL", help="also answer with this model (e.g. default: θ0), side by side"
        )
        p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed")
        p.add_argument("--system", help="a system message before each conversation")
        if name == "generate":
            p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
            p.add_argument("--file", help='JSONL: one {"prompt": ...} or {"messages": [...]} per line')
            p.add_argument("--out", help="JSONL file to write (default: standard output)")
        p.set_defaults(run=run_chat_command if name == "chat" else run_generate_command)


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_args(cls, args) -> Sampling:
        if args.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be ≥ 1")
        if args.temperature < 0 or not 0 < args.top_p <= 1:
            raise UserError("--temperature must be ≥ 0 and --top-p in (0, 1]")
        return cls(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def load_for_generation(spec: str, device: torch.device):
    """(model in eval mode, tokenizer, label) for `spec`; a run directory means its final/."""
    from fulltune.config import ModelConfig
    from fulltune.model import cast_weights, load_theta0
    from fulltune.runtime import has_bf16_units

    path = Path(spec).expanduser()
    if spec != "default" and path.is_dir() and not (path / "config.json").exists() and (path / "final").is_dir():
        path = path / "final"
    model, tokenizer, _ = load_theta0(ModelConfig(path="default" if spec == "default" else str(path)), verbose=False)
    model.requires_grad_(False).eval().to(device)
    if device.type == "cuda" and has_bf16_units("cuda"):  # not on a GPU that only emulates bf16
        cast_weights(model, torch.bfloat16)  # RoPE's inv_freq stays fp32
    return model, tokenizer, spec


def prompt_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """The conversation so far, rendered for the model's answer: its chat template with the generation
    prompt, or (no template) the turns' text joined as a plain completion prompt."""
    if tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    text = "\n".join(m["content"] for m in messages)
    return torch.tensor([tokenizer(text)["input_ids"]])


@torch.no_grad()
def answer(model, tokenizer, messages: list[dict], sampling: Sampling, *, streamer=None) -> str:
    ids = prompt_ids(tokenizer, messages).to(next(model.parameters()).device)
    kwargs = dict(
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        attention_mask=torch.ones_like(ids),
    )
    if sampling.temperature > 0:
        torch.manual_seed(sampling.seed)
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(ids, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _models(args) -> list[tuple]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [load_for_generation(args.model, device)]
    if args.compare:
        models.append(load_for_generation(args.compare, device))
    for _, tokenizer, label in models:
        if tokenizer.chat_template is None:
            print(
                f"[generate] {label}: the tokenizer has no chat template: plain completion of the prompt text",
                file=sys.stderr,
                flush=True,
            )
    return models


def read_prompts(args) -> list[list[dict]]:
    """Each prompt as a conversation (the --system message first, when given)."""
    from fulltune.data.sources import iter_jsonl

    conversations = [[{"role": "user", "content": p}] for p in args.prompt]
    if args.file:
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise UserError(f"--file {path}: not found")
        for lineno, row in iter_jsonl(path):
            if isinstance(row.get("prompt"), str):
                conversations.append([{"role": "user", "content": row["prompt"]}])
            elif isinstance(row.get("messages"), list) and all(
                isinstance(m, dict)
                and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")
                for m in row["messages"]
            ):
                conversations.append(row["messages"])
            else:
                raise UserError(f'{path}:{lineno}: expected a string "prompt" or a "messages" list of role/content')
    if not conversations:
        raise UserError("no prompts: give --prompt TEXT or --file prompts.jsonl")
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [system + c for c in conversations]


def run_generate_command(args) -> None:
    sampling, conversations = Sampling.from_args(args), read_prompts(args)
    models = _models(args)
    with open(args.out, "w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout) as out:
        for messages in conversations:
            row = {"messages": messages, "model": args.model, "output": answer(*models[0][:2], messages, sampling)}
            if len(models) > 1:
                row.update(compare_model=args.compare, compare_output=answer(*models[1][:2], messages, sampling))
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()


def run_chat_command(args, read=input) -> list[list[dict]]:
    """One conversation per model; /reset starts over, /exit (or end of input) leaves. Returns the
    first model's conversations, each as it went."""
    from transformers import TextStreamer

    sampling, models = Sampling.from_args(args), _models(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    histories, said = [list(system) for _ in models], []
    print(
        "[chat] /reset starts a new conversation, /exit leaves"
        + (f"; answers from {args.model}, then {args.compare}" if args.compare else ""),
        flush=True,
    )
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):  # standard input closed (< /dev/null, Ctrl-D) or Ctrl-C at the prompt
            print("\n[chat] end of input; bye", flush=True)
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            said.append(histories[0])
            histories = [list(system) for _ in models]
            continue
        for (model, tokenizer, label), history in zip(models, histories):
            history.append({"role": "user", "content": line})
            print(f"{label}> ", end="", flush=True)
            reply = answer(
                model,
                tokenizer,
                history,
                sampling,
                streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            )
            history.append({"role": "assistant", "content": reply})
    return said + [histories[0]] if len(histories[0]) > len(system) else said
