"""Datasets for training: toy tasks, local JSONL, hub datasets; chat formatting and loss masks.

Records come in three shapes, whatever the source:

- ``{"messages": [{"role", "content"}, ...]}``: a chat; every assistant turn is trained on;
- ``{"prompt": ..., "response": ...}``: one exchange; the response is trained on;
- ``{"text": ...}``: plain text; every token is trained on.

Tokenized examples hold ``input_ids`` and ``labels`` of equal length, labels ``-100`` where no loss
is taken (prompt, template markup, padding). Labels are *not* shifted: a loss compares
``logits[:, :-1]`` with ``labels[:, 1:]`` (see `shift_labels`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from runner.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE = -100
FILE_SOURCES = ("jsonl", "hub")  # beside these, the data sources registered through the hook (toy)


def sources() -> list[str]:
    from runner import registry

    return [*registry.names("data_source"), *FILE_SOURCES]


# --------------------------------------------------------------------------------------------
# Validation (before any work)


def check_data_spec(data: Any, key: str = "data") -> list[str]:
    """Problems with a data block beyond its field ranges (those are checked by `runner.config`)."""
    from runner import registry

    problems = []
    source = data.source
    if source not in sources():
        return [registry.not_allowed(f"{key}.source", source, sources())]
    if source not in FILE_SOURCES:
        problems += registry.get("data_source", source).check(data, key)
    elif source == "jsonl":
        if not data.path:
            problems.append(f"{key}.path: missing; give the JSONL file to train on")
        elif not Path(data.path).expanduser().is_file():
            problems.append(f"{key}.path: file {data.path!r} not found")
        else:
            problems += _check_jsonl(Path(data.path).expanduser(), data, key)
    elif source == "hub":
        problems += _check_hub(data, key)
    return problems


def _check_hub(data: Any, key: str) -> list[str]:
    """The dataset resolves (from the local cache when offline) without downloading its data."""
    if not data.name:
        return [f"{key}.name: missing; give the hub dataset id (e.g. tatsu-lab/alpaca)"]
    import datasets

    try:
        datasets.load_dataset_builder(data.name, data.subset)
    except Exception as exc:  # datasets raises many types for missing or offline datasets
        offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "false", "")
        hint = " (HF_DATASETS_OFFLINE is set and no cached copy was found)" if offline else ""
        return [f"{key}.name: cannot load hub dataset {data.name!r}{hint}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}; use a cached dataset or data.source=jsonl"]
    return []


def _check_jsonl(path: Path, data: Any, key: str) -> list[str]:
    """The file reads, holds records, and every line parses into one of the record shapes (checked on
    the whole file: it is cheap)."""
    problems, records = [], 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                records += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    problems.append(f"{key}.path: {path}:{lineno} is not valid JSON ({exc.msg})")
                else:
                    problem = _shape_problem(record, data)
                    if problem:
                        problems.append(f"{key}.path: {path}:{lineno} {problem}")
                if len(problems) >= 3:
                    problems.append(f"{key}.path: stopping after 3 bad lines")
                    break
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{key}.path: cannot read {path} ({type(exc).__name__}: {exc})"]
    if records == 0:
        return [f"{key}.path: {path} is empty (no records; a JSONL file has one JSON object per line)"]
    return problems


def check_trainable(data: Any, tokenizer, key: str = "data", chunk: int = 256) -> list[str]:
    """[] when some example keeps a trainable token within data.max_length, else why not.

    Tokenizes the records a chunk at a time and stops at the first trainable one, so a valid file
    costs one chunk; only a file with none is tokenized in full.
    """
    records = load_records(data)
    chat = use_chat_template(data, tokenizer)
    for start in range(0, len(records), chunk):
        for ids, labels in tokenize_records(records[start: start + chunk], tokenizer, chat=chat):
            if _trainable(labels, data.max_length):
                return []
    return [f"{key}: no example has a trainable token: none of the {len(records)} keeps a response token within "
            f"data.max_length={data.max_length} (the responses are empty or the prompts fill the length)"]


def _trainable(labels: list[int], max_length: int) -> bool:
    """Whether an example keeps a target once cut to max_length (nothing predicts the first token)."""
    return any(x != IGNORE for x in labels[1:max_length])


def _shape_problem(record: Any, data: Any) -> str | None:
    if not isinstance(record, dict):
        return "is not a JSON object"
    f = data.fields
    if f.messages in record:
        msgs = record[f.messages]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            return f"field {f.messages!r} must be a list of {{role, content}} objects"
        if not any(m["role"] == "assistant" for m in msgs):
            return f"field {f.messages!r} has no assistant turn to train on"
        return None
    if f.prompt in record and f.response in record:
        return None
    if f.text in record:
        return None
    return (f"has none of the fields {f.messages!r}, {f.prompt!r}+{f.response!r} or {f.text!r} "
            f"(found: {', '.join(sorted(record))}); map yours with data.fields.*")


# --------------------------------------------------------------------------------------------
# Loading records


def load_records(data: Any) -> list[dict]:
    """Raw records in one of the three shapes, capped at `data.num_examples`."""
    if data.source not in FILE_SOURCES:
        from runner import registry

        return registry.get("data_source", data.source).load(data)
    if data.source == "jsonl":
        with Path(data.path).expanduser().open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = _load_hub(data)
    rows = [_normalize(r, data) for r in rows]
    return rows[: data.num_examples] if data.num_examples else rows


def _load_hub(data: Any) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(data.name, data.subset, split=data.split)
    except Exception as exc:  # datasets raises many types for missing/offline datasets
        raise ConfigError(
            f"data.name: could not load hub dataset {data.name!r} (subset={data.subset}, split={data.split}): "
            f"{type(exc).__name__}: {exc}. Offline machines need a cached copy or data.source=jsonl."
        ) from None
    return list(ds)


def _normalize(record: dict, data: Any) -> dict:
    problem = _shape_problem(record, data)
    if problem:
        raise ConfigError(f"data: a record {problem}")
    f = data.fields
    system = [{"role": "system", "content": data.system_prompt}] if data.system_prompt else []
    if f.messages in record:
        return {"messages": system + list(record[f.messages])}
    if f.prompt in record and f.response in record:
        return {"prompt": str(record[f.prompt]), "response": str(record[f.response]), "system": data.system_prompt}
    return {"text": str(record[f.text])}


# --------------------------------------------------------------------------------------------
# Tokenizing


def use_chat_template(data: Any, tokenizer) -> bool:
    has = getattr(tokenizer, "chat_template", None) is not None
    if data.chat_template and not has:
        raise ConfigError("data.chat_template: true, but the model's tokenizer has no chat template; "
                          "set data.chat_template=false to train on plain prompt+response text")
    return has if data.chat_template is None else bool(data.chat_template)


def _messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


TOKENIZE_CHUNK = 2048  # records rendered and encoded together; the progress bar moves once per chunk


def tokenize_records(records: list[dict], tokenizer, *, chat: bool) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record. Loss on assistant turns (chat), responses, or all of plain text.

    Chats are rendered with the tokenizer's template; the prompt of each assistant turn is found by
    rendering the conversation up to it and checking that its tokens are a prefix of the whole, so
    masks are exact at the token level for any template. The strings of each chunk of records are
    encoded in two batched calls.
    """
    from runner.progress import progress

    if len(records) <= TOKENIZE_CHUNK:
        return _tokenize_chunk(records, tokenizer, chat=chat)
    out = []
    with progress("tokenize data", total=len(records)) as bar:
        for start in range(0, len(records), TOKENIZE_CHUNK):
            chunk = records[start:start + TOKENIZE_CHUNK]
            out += _tokenize_chunk(chunk, tokenizer, chat=chat)
            bar.advance(len(chunk))
    return out


def _tokenize_chunk(records: list[dict], tokenizer, *, chat: bool) -> list[tuple[list[int], list[int]]]:
    with_special: list[str] = []  # encoded like plain text: the tokenizer adds BOS etc.
    bare: list[str] = []  # chat renders (the template places special tokens itself) and responses
    plans = []
    for record in records:
        if "text" in record:
            plans.append(("text", len(with_special)))
            with_special.append(record["text"])
        elif "prompt" in record and not chat:
            plans.append(("pair", len(with_special), len(bare)))
            with_special.append(record["prompt"])
            bare.append(record["response"])
        else:
            if not chat:
                raise ConfigError("data: chat records (messages) need a chat template; the tokenizer has none "
                                  "or data.chat_template=false")
            msgs = _messages(record)
            turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            plans.append(("chat", len(bare), turns))
            bare.append(_render(tokenizer, msgs, False))
            for i in turns:
                bare.append(_render(tokenizer, msgs[:i], True))
                bare.append(_render(tokenizer, msgs[: i + 1], False) if i < len(msgs) - 1 else bare[plans[-1][1]])
    enc_special = tokenizer(with_special).input_ids if with_special else []
    enc_bare = tokenizer(bare, add_special_tokens=False).input_ids if bare else []
    eos = tokenizer.eos_token_id
    out = []
    for plan in plans:
        if plan[0] == "text":
            ids = enc_special[plan[1]] + [eos]
            out.append((ids, list(ids)))
        elif plan[0] == "pair":
            prompt, response = enc_special[plan[1]], enc_bare[plan[2]] + [eos]
            out.append((prompt + response, [IGNORE] * len(prompt) + response))
        else:
            ids = enc_bare[plan[1]]
            labels = [IGNORE] * len(ids)
            for k in range(len(plan[2])):
                start, upto = enc_bare[plan[1] + 1 + 2 * k], enc_bare[plan[1] + 2 + 2 * k]
                if ids[: len(upto)] != upto or upto[: len(start)] != start:
                    raise ConfigError("data: the tokenizer's chat template renders a conversation prefix differently "
                                      "from the full conversation, so prompt tokens cannot be masked reliably")
                labels[len(start): len(upto)] = ids[len(start): len(upto)]
            out.append((ids, labels))
    return out


def tokenize_record(record: dict, tokenizer, *, chat: bool) -> tuple[list[int], list[int]]:
    return tokenize_records([record], tokenizer, chat=chat)[0]


def build_dataset(data: Any, tokenizer) -> list[dict]:
    """Tokenized examples ready for `collate`; packed into rows of `data.max_length` if asked."""
    chat = use_chat_template(data, tokenizer)
    examples, dropped = [], 0
    max_length = data.max_length  # read once: each read of a DictConfig key costs ~50 us
    for ids, labels in tokenize_records(load_records(data), tokenizer, chat=chat):
        if not _trainable(labels, max_length):
            dropped += 1
            continue
        ids, labels = ids[:max_length], labels[:max_length]
        labels[0] = IGNORE  # nothing predicts the first token (and packing must not link documents)
        examples.append({"input_ids": ids, "labels": labels})
    if dropped:
        log.warning("dropped %d examples with no trainable tokens within data.max_length=%d", dropped, data.max_length)
    if not examples:
        raise ConfigError(check_trainable(data, tokenizer))
    return pack(examples, data.max_length) if data.packing else examples


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples into rows of exactly `max_length` tokens (the tail is dropped).

    Documents in a row attend to each other (no block-diagonal mask); their loss masks are kept,
    and no document's first token is predicted from the previous document.
    """
    rows, ids, labels = [], [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
        while len(ids) >= max_length:
            rows.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
            ids, labels = ids[max_length:], labels[max_length:]
            if labels:
                labels[0] = IGNORE
    if not rows:
        raise ConfigError(f"data.packing: the data holds fewer than data.max_length={max_length} tokens")
    return rows


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch of tensors."""
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def shift_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask) aligned with ``logits[:, :-1]``: position t predicts token t+1."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    return targets.masked_fill(~mask, 0), mask
