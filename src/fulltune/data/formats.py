"""Records → token ids + a target mask: `text`, `prompt`+`completion`, or chat `messages`.

`target_mask[t] = 1` means token t is predicted (carries loss). By default only completion /
assistant tokens are targets. The chat template is rendered up to each assistant turn with
`add_generation_prompt=True` and including the turn; the difference is the assistant's tokens.
We check that each rendering is a token prefix of the next, so the mask cannot drift. Templates
that re-render earlier turns (Qwen3, Phi-3) have each turn located in the one whole rendering.
"""

from __future__ import annotations

from dataclasses import dataclass

from fulltune.config import DataConfig
from fulltune.data.conversions import convert
from fulltune.data.sources import row_location
from fulltune.errors import UserError

FORMAT_COLUMNS = {  # auto takes the first whose columns are all there
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


@dataclass
class Example:
    input_ids: list[int]
    target_mask: list[int]
    lengths: tuple[int, ...] = ()  # a packed row (data/packing.py): its sequences' lengths, in order


@dataclass
class EncodeStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    longest: int = 0

    def line(self) -> str:
        return (
            f"{self.kept}/{self.records} sequences kept, {self.tokens:,} tokens ({self.target_tokens:,} with loss), "
            f"longest {self.longest}; truncated {self.truncated}, dropped {self.dropped_overlong} overlong, "
            f"{self.dropped_no_target} with no target tokens"
        )


def detect_format(columns: list[str], requested: str, source: str) -> str:
    if requested != "auto":
        missing = [c for c in FORMAT_COLUMNS[requested] if c not in columns]
        if missing:
            raise UserError(
                f"{source}: format {requested} needs column(s) {', '.join(missing)}; found {', '.join(columns)}"
            )
        return requested
    for name, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return name
    raise UserError(
        f"{source}: cannot tell the format from columns {', '.join(columns)} "
        "(expected messages, conversations (ShareGPT), prompt+completion, instruction+output (Alpaca), or text)"
    )


def _tokens(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_text(tokenizer, text: str) -> Example:
    ids = _tokens(tokenizer, text, True) + [tokenizer.eos_token_id]
    return Example(ids, [1] * len(ids))


def encode_prompt_completion(tokenizer, prompt: str, completion: str, loss_on: str) -> Example:
    p = _tokens(tokenizer, prompt, True)
    c = _tokens(tokenizer, completion, False) + [tokenizer.eos_token_id]
    return Example(p + c, [int(loss_on == "all")] * len(p) + [1] * len(c))


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_messages(tokenizer, messages: list[dict], loss_on: str, where: str = "messages") -> Example:
    if tokenizer.chat_template is None:
        raise UserError(f"{where}: the tokenizer has no chat template; use text or prompt+completion data")
    try:
        return _encode_messages(tokenizer, messages, loss_on, where)
    except UserError:
        raise
    except Exception as exc:  # the template itself may refuse a conversation (jinja2 raise_exception)
        import jinja2

        if isinstance(exc, jinja2.TemplateSyntaxError):  # the template is broken, not this record
            raise UserError(template_syntax_error(tokenizer, exc)) from None
        if isinstance(exc, jinja2.TemplateError) and type(exc) is not jinja2.TemplateError:  # not raise_exception
            what = " ".join(str(exc).split())[:200]
            raise UserError(
                f"{where}: the chat template ({template_file(tokenizer)}) fails on this conversation "
                f"({type(exc).__name__}: {what})"
            ) from None
        hint = (
            "; this template has no system turn: put the system text at the start of the first user message "
            "(Gemma-3's template does just that)"
            if messages[0]["role"] == "system" and "system" in str(exc).lower()
            else ""
        )
        raise UserError(f"{where}: the chat template rejected this conversation: {exc}{hint}") from None


def template_file(tokenizer) -> str:
    """The file a tokenizer's chat template came from: MODEL/chat_template.jinja where it exists, else
    MODEL/tokenizer_config.json (its chat_template entry)."""
    from pathlib import Path

    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            return str(folder / name)
    return f"{folder} (chat_template)"


def template_syntax_error(tokenizer, exc) -> str:
    """A Jinja syntax error in the chat template, blamed on the template's file and its own line."""
    return (
        f"{template_file(tokenizer)}: the chat template is not valid Jinja (template line {exc.lineno}: "
        f"{exc.message}); fix it, or copy the template of the model this one was trained from"
    )


def _encode_messages(tokenizer, messages: list[dict], loss_on: str, where: str) -> Example:
    trained = [m.get("weight") != 0 for m in messages if m["role"] == "assistant"]  # OpenAI's weight: 0
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]  # what the template sees
    whole = _render(tokenizer, messages, False)
    ids = _tokens(tokenizer, whole, False)
    mask = [int(loss_on == "all")] * len(ids)
    spans = _spans_by_prefix(tokenizer, messages, ids) or _spans_in_whole(tokenizer, messages, whole, ids, where=where)
    for (start, end), on in zip(spans, trained, strict=True):
        if on:
            mask[start:end] = [1] * (end - start)
    return Example(ids, mask)


def _spans_by_prefix(tokenizer, messages: list[dict], ids: list[int]) -> list[tuple[int, int]] | None:
    """Each assistant turn's tokens as the difference between the conversation rendered up to it (with
    the generation prompt) and including it; None where a rendering is not a prefix of the next."""
    spans = []
    for _, before, upto in _assistant_turns(tokenizer, messages):
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            return None
        spans.append((len(before), len(upto)))
    return spans


def _assistant_turns(tokenizer, messages: list[dict]):
    """(message, tokens of the conversation up to it with the generation prompt, tokens including it)."""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            yield (
                msg,
                _tokens(tokenizer, _render(tokenizer, messages[:i], True), False),
                _tokens(tokenizer, _render(tokenizer, messages[: i + 1], False), False),
            )


def _spans_in_whole(
    tokenizer, messages: list[dict], whole: str, ids: list[int], *, where: str
) -> list[tuple[int, int]]:
    """Templates that render earlier turns differently once the conversation goes on (Qwen3 drops the
    thinking block of turns before the last user message; Phi-3 ends a conversation with EOS): each
    assistant turn is located in the one whole rendering. It starts where the conversation up to it,
    with the generation prompt, ends (that must be a token prefix of the whole), and runs for as many
    tokens as the whole agrees with a stretch of the turn rendered on its own. Exact, or refused."""
    as_text = "".join(map(chr, ids))  # one character per token id: list search as str search
    spans = []
    for msg, prompt, turn in _assistant_turns(tokenizer, messages):
        if ids[: len(prompt)] != prompt or turn[: len(prompt)] != prompt:
            raise UserError(_not_a_prefix(messages, whole, where))
        start, turn = len(prompt), "".join(map(chr, turn[len(prompt) :]))
        lo, hi = 0, min(len(turn), len(ids) - start)  # the longest run of `ids` from start found in `turn`
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if as_text[start : start + mid] in turn else (lo, mid - 1)
        answer = msg["content"].split("</think>")[-1].strip()
        if answer not in tokenizer.decode(ids[start : start + lo], clean_up_tokenization_spaces=False):
            raise UserError(_not_a_prefix(messages, whole, where))
        spans.append((start, start + lo))
    return spans


def _not_a_prefix(messages: list[dict], whole: str, where: str) -> str:
    if messages[0]["role"] == "system" and messages[0]["content"].strip() not in whole:
        return (
            f"{where}: the chat template leaves the system message out of the whole conversation (Mistral's "
            "v0.3 template shows it only with a final user turn), so it would not be trained on; put the system "
            "text at the start of the first user message"
        )
    return (
        f"{where}: the chat template does not render conversations as a prefix of their continuation (cannot "
        "locate assistant tokens); use prompt+completion data"
    )


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: each message needs string 'role' and 'content', got {m!r}"[:300])
        if m["role"] not in ("system", "user", "assistant"):
            raise UserError(f"{where}: unknown role {m['role']!r} (system, user, assistant)")
        if m.get("weight") is not None and (m["role"] != "assistant" or m["weight"] not in (0, 1)):
            raise UserError(
                f"{where}: weight {m['weight']!r} on a {m['role']} turn; weight is 0 or 1, on assistant turns"
            )


def encode_record(tokenizer, record: dict, fmt: str, *, loss_on: str, where: str) -> Example:
    """One record → Example; `where` (file:line) names the record in errors."""
    if fmt == "messages":
        _check_messages(record["messages"], where)
        return encode_messages(tokenizer, record["messages"], loss_on, where)
    if fmt == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise UserError(f"{where}: prompt and completion must be strings")
        return encode_prompt_completion(tokenizer, prompt, completion, loss_on)
    text = record["text"]
    if not isinstance(text, str):
        raise UserError(f"{where}: text must be a string, got {_kind(text)}")
    return encode_text(tokenizer, text)


def _kind(value) -> str:
    return "null (a missing value)" if value is None else type(value).__name__


def _empty_answer(record: dict, fmt: str) -> bool:
    """A record that trains but is probably a mistake: its answer (completion, an assistant turn) is blank."""
    if fmt == "messages":
        return any(m.get("role") == "assistant" and not str(m.get("content") or "").strip() for m in record["messages"])
    if fmt == "prompt_completion":
        return not str(record["completion"] or "").strip()
    return False


def encode_dataset(ds, tokenizer, cfg: DataConfig, source: str) -> tuple[list[Example], EncodeStats]:
    """Tokenise every record; truncate or drop overlong ones and count what happened."""
    fmt = detect_format(list(ds.column_names), cfg.format, source)
    ds, fmt = convert(ds, fmt, source, chat=tokenizer.chat_template is not None)  # ShareGPT, Alpaca
    stats = EncodeStats(records=len(ds))
    examples, empty = [], []
    for index, record in enumerate(ds):
        try:
            ex = encode_record(tokenizer, record, fmt, loss_on=cfg.loss_on, where=f"{source} (record {index})")
        except UserError as exc:
            raise UserError(str(exc).replace(f"{source} (record {index})", row_location(source, index))) from None
        if _empty_answer(record, fmt):
            empty.append(index)
        if len(ex.input_ids) > cfg.max_seq_len:
            if cfg.overlong == "drop":
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
            ex = Example(ex.input_ids[: cfg.max_seq_len], ex.target_mask[: cfg.max_seq_len])
        # Position 0 is never predicted (nothing precedes it).
        if sum(ex.target_mask[1:]) == 0:
            stats.dropped_no_target += 1
            continue
        examples.append(ex)
        stats.tokens += len(ex.input_ids)
        stats.target_tokens += sum(ex.target_mask[1:])
        stats.longest = max(stats.longest, len(ex.input_ids))
    stats.kept = len(examples)
    if empty:
        shown = ", ".join(row_location(source, i) for i in empty[:3]) + (
            f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        )
        print(
            f"[data] warning: {len(empty)} record{'s' * (len(empty) > 1)} with an empty answer ({shown}): they train "
            "the model to answer nothing (a CSV row with a missing column reads as empty)",
            flush=True,
        )
    if not examples:
        raise UserError(f"{source}: no usable sequences ({stats.line()})")
    return examples, stats
