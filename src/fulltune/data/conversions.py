"""The data files users have, read as fulltune's own formats before anything else sees them.

- ShareGPT (`conversations`: a list of {"from", "value"}, roles human / gpt / system) becomes
  `messages` (user / assistant / system), a turn's `weight` kept.
- Alpaca (`instruction`, `output`, `input` optional) becomes one user turn (the instruction, then
  the input after a blank line) and the assistant's answer where the tokenizer has a chat template;
  without one, prompt+completion in Alpaca's own prompt (`ALPACA_PROMPT`, as Alpaca-LoRA and Unsloth
  write it), the loss on the response.
- OpenAI's fine-tuning chat JSONL is `messages` already; its `weight: 0` on an assistant turn (that
  turn carries no loss) is honoured where the turns are encoded (formats._encode_messages).

A record that does not fit its format is one `fulltune: error:` line naming FILE:LINE.
"""

from __future__ import annotations

from fulltune.data.sources import row_location
from fulltune.errors import UserError

CONVERTED = ("sharegpt", "alpaca")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ALPACA_PROMPT = {
    "input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
}


def sharegpt(record: dict) -> dict:
    """One ShareGPT record as {"messages": [...]}."""
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise UserError("conversations must be a non-empty list of {from, value} turns")
    messages = []
    for turn in turns:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise UserError(f"each ShareGPT turn needs string 'from' and 'value', got {turn!r}"[:300])
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise UserError(f"ShareGPT role {turn['from']!r} is not one of human, gpt, system")
        message = {"role": role, "content": turn["value"]}
        if turn.get("weight") is not None:
            message["weight"] = turn["weight"]
        messages.append(message)
    return {"messages": messages}


def alpaca(record: dict, chat: bool) -> dict:
    """One Alpaca record as {"messages"} (chat) or {"prompt", "completion"}."""
    instruction, given, output = record["instruction"], record.get("input"), record["output"]
    given = "" if given is None else given
    for key, value in (("instruction", instruction), ("input", given), ("output", output)):
        if not isinstance(value, str):
            raise UserError(f"Alpaca's {key} must be a string, got {type(value).__name__}")
    if chat:
        user = instruction + (f"\n\n{given}" if given.strip() else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}
    prompt = ALPACA_PROMPT["input" if given.strip() else "no_input"].format(instruction=instruction, input=given)
    return {"prompt": prompt, "completion": output}


def convert(ds, fmt: str, source: str, *, chat: bool = True):
    """(records, format): ShareGPT and Alpaca data converted (a datasets.Dataset of messages or
    prompt+completion records); any other format as it is."""
    if fmt not in CONVERTED:
        return ds, fmt
    import datasets

    rows = []
    for index, record in enumerate(ds):
        try:
            rows.append(sharegpt(record) if fmt == "sharegpt" else alpaca(record, chat))
        except UserError as exc:
            raise UserError(f"{row_location(source, index)}: {exc}") from None
    new = "messages" if fmt == "sharegpt" or chat else "prompt_completion"
    return datasets.Dataset.from_list(rows), new
