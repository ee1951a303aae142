"""Training data: alpaca, ShareGPT and OpenAI-messages records for SFT; prompt/chosen/rejected for DPO.

Every record becomes a list of chat messages ({"role", "content"}). Files are JSONL
(one record per line) or JSON (a list of records); every error names the file and the
line (JSONL) or item (JSON) and what is wrong with it:

    data.jsonl:7: "conversations"[2]: "from" must be one of human, gpt, system (got 'bot')
"""
from __future__ import annotations

import json
from pathlib import Path

# The chat format given to a base model that has none (GPT-2, a nanoGPT import): plain-text role
# markers, so no token is added to the vocabulary (and none to the embedding), and the assistant's
# turn ends with the tokenizer's own end-of-text token, which llama.cpp stops at. Renders as
#   <|user|>\nWhat is ice?\n<|assistant|>\nFrozen water.<|endoftext|>
# and is prefix-preserving (see encode_conversation).
PLAIN_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|' + m['role'] + '|>\n' + m['content'] -}}"
    "{%- if m['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- '\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad training data; the message starts with file:line."""


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) pairs; `where` is "file:line" or "file[item]"."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    out: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records")
        items = [(f"{path.name}[{i}]", r) for i, r in enumerate(data)]
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"{path.name}:{n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    for where, rec in items:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: each record must be a JSON object, got {type(rec).__name__}")
        out.append((where, rec))
    if not out:
        raise DataError(f"{path}: no records")
    return out


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {field} must be a string, got {type(value).__name__}")
    return value


def _messages(items, where: str, field: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise DataError(f"{where}: {field!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(items):
        at = f"{field!r}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: {at} must be an object")
        if field == "conversations":
            role = SHAREGPT_ROLES.get(m.get("from"))
            if role is None:
                raise DataError(f"{where}: {at}: \"from\" must be one of human, gpt, system (got {m.get('from')!r})")
            content = _text(m.get("value"), where, f"{at}.value")
        else:
            role = m.get("role")
            if role not in ROLES:
                raise DataError(f"{where}: {at}: \"role\" must be one of {', '.join(ROLES)} (got {role!r})")
            content = _text(m.get("content"), where, f"{at}.content")
        out.append({"role": role, "content": content})
    return out


def sft_messages(where: str, rec: dict) -> list[dict]:
    """One SFT record (any of the three formats) as messages ending with the assistant's reply."""
    if "messages" in rec:
        msgs = _messages(rec["messages"], where, "messages")
    elif "conversations" in rec:
        msgs = _messages(rec["conversations"], where, "conversations")
    elif "instruction" in rec or "output" in rec:
        instruction = _text(rec.get("instruction"), where, '"instruction"')
        extra = rec.get("input") or ""
        output = _text(rec.get("output"), where, '"output"')
        user = f"{instruction}\n\n{_text(extra, where, chr(34) + 'input' + chr(34))}" if extra else instruction
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": _text(rec["system"], where, '"system"')})
    else:
        raise DataError(f"{where}: unknown format: expected \"messages\" (OpenAI), \"conversations\" (ShareGPT) "
                        f"or \"instruction\"/\"output\" (alpaca); got keys {sorted(rec)[:6]}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message to learn from")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (got {msgs[-1]['role']})")
    if not any(m["content"].strip() for m in msgs if m["role"] == "assistant"):
        raise DataError(f"{where}: the assistant messages are empty")
    return msgs


def load_sft(path: str | Path) -> list[list[dict]]:
    return [sft_messages(where, rec) for where, rec in read_records(path)]


def preference(where: str, rec: dict) -> dict:
    """{"prompt": messages, "chosen": [assistant message], "rejected": [assistant message]}."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
    if missing:
        raise DataError(f"{where}: preference records need \"prompt\", \"chosen\" and \"rejected\" (missing {missing})")
    prompt = rec["prompt"]
    prompt = [{"role": "user", "content": _text(prompt, where, '"prompt"')}] if isinstance(prompt, str) \
        else _messages(prompt, where, "prompt")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message")
    out = {"prompt": prompt}
    for key in ("chosen", "rejected"):
        value = rec[key]
        msgs = [{"role": "assistant", "content": _text(value, where, f'"{key}"')}] if isinstance(value, str) \
            else _messages(value, where, key)
        if [m["role"] for m in msgs] != ["assistant"]:
            raise DataError(f"{where}: {key!r} must be one assistant message (or a string)")
        out[key] = msgs
    if out["chosen"][0]["content"] == out["rejected"][0]["content"]:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" are identical")
    return out


def load_preferences(path: str | Path) -> list[dict]:
    return [preference(where, rec) for where, rec in read_records(path)]


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, assistant_mask, truncated) with the model's chat template.

    The assistant spans are found by rendering the conversation up to each assistant
    turn (with and without that turn) and mapping those character ranges onto the
    tokens of the whole rendering, so the mask is right for any template that renders
    earlier turns the same way (prefix-preserving), including the end-of-turn token
    the model must learn to emit."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError("the chat template renders earlier turns differently once later ones are added; "
                            "assistant-only loss needs a prefix-preserving template")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [int(any(a <= start < b for a, b in spans)) for start, _end in enc["offset_mapping"]]
    truncated = len(ids) > max_length
    return ids[:max_length], mask[:max_length], truncated


def load_prompts(path: str | Path) -> list[list[dict]]:
    """GRPO prompts as message lists: a .txt file gives one user prompt per non-empty line; JSONL/JSON
    records give "prompt" (a string, or messages ending with the user's) or "messages" (the same)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        out = [[{"role": "user", "content": ln}] for ln in lines if ln]
        if not out:
            raise DataError(f"{path}: no prompts")
        return out
    out = []
    for where, rec in read_records(path):
        key = "prompt" if "prompt" in rec else "messages" if "messages" in rec else None
        if key is None:
            raise DataError(f"{where}: a prompt record needs \"prompt\" (text or messages) or \"messages\"; "
                            f"got keys {sorted(rec)[:6]}")
        value = rec[key]
        msgs = [{"role": "user", "content": _text(value, where, f'"{key}"')}] if isinstance(value, str) \
            else _messages(value, where, key)
        if msgs[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt must end with a user message (got {msgs[-1]['role']})")
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: the prompt is empty")
        out.append(msgs)
    return out
