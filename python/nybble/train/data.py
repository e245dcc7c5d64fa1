"""Fine-tuning data: jsonl of ``{"text": ...}`` or ``{"prompt": ..., "response": ...}``
records, tokenized with the model's tokenizer, padded into batches. For prompt / response
records the loss is on the response tokens only (labels -100 on the prompt and padding)."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """A malformed data file; the message names the file and line."""


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a jsonl file (a regular file: a FIFO or device is refused up front,
    ``CorruptFileError``). A line that is not valid UTF-8 / JSON, nested too deeply for the
    parser, or not a record is a :class:`DataError` naming the file and line."""
    from .._files import open_regular

    path = Path(path)
    records = []
    with open_regular(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: not valid JSON (nested too deeply)") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if "text" in rec:
                if not isinstance(rec["text"], str):
                    raise DataError(f"{path}:{lineno}: \"text\" must be a string")
            elif "prompt" in rec and "response" in rec:
                if not isinstance(rec["prompt"], str) or not isinstance(rec["response"], str):
                    raise DataError(f"{path}:{lineno}: \"prompt\" and \"response\" must be strings")
            else:
                raise DataError(f"{path}:{lineno}: a record needs \"text\", or \"prompt\" and \"response\" "
                                f"(got keys {sorted(rec)})")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _special(tokenizer, *names) -> int | None:
    for n in names:
        v = getattr(tokenizer, n, None)
        if v is not None:
            return int(v)
    return None


def bos_id(tokenizer) -> int | None:
    """The token every example starts with: BOS, else CLS (a BERT tokenizer), else none."""
    return _special(tokenizer, "bos_token_id", "cls_token_id")


def eos_id(tokenizer) -> int | None:
    """The token every example ends with: EOS, else SEP, else none."""
    return _special(tokenizer, "eos_token_id", "sep_token_id")


def tokenize(records: list[dict], tokenizer, max_length: int = 512) -> list[Example]:
    """Token ids (BOS + text + EOS) and labels; prompt tokens get label -100.

    Over-long examples keep their EOS: ``text`` is cut at the end; for prompt / response the
    response keeps priority and the prompt loses its oldest tokens, so the example still
    has tokens to learn from. Examples left with nothing to learn are dropped; if all are,
    that is an error."""
    bos, eos = bos_id(tokenizer), eos_id(tokenizer)
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    budget = max_length - len(head) - len(tail)
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for tokens besides BOS / EOS")
    out = []
    cut_text = cut_prompt = cut_response = 0
    for rec in records:
        if "text" in rec:
            body = tokenizer(rec["text"], add_special_tokens=False)["input_ids"]
            cut_text += len(body) > budget
            body = body[:budget]
            ids = head + body + tail
            labels = [IGNORE_INDEX] * len(head) + body + tail
        else:
            prompt = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
            response = tokenizer(rec["response"], add_special_tokens=False)["input_ids"]
            cut_response += len(response) > budget
            response = response[:budget]
            room = budget - len(response)
            cut_prompt += room < len(prompt)
            prompt = prompt[len(prompt) - room:] if room < len(prompt) else prompt
            if room == 0:
                prompt = []
            ids = head + prompt + response + tail
            labels = [IGNORE_INDEX] * (len(head) + len(prompt)) + response + tail
        if any(label != IGNORE_INDEX for label in labels):
            out.append(Example(ids, labels))
    if records and not out:
        raise ValueError("no example has tokens to train on (empty texts / responses)")
    if cut_text or cut_prompt or cut_response:
        warnings.warn(f"max_length {max_length}: {cut_text} texts cut at the end, {cut_prompt} prompts lost their "
                      f"oldest tokens, {cut_response} responses cut at the end", stacklevel=2)
    return out


def pad_id(tokenizer) -> int:
    v = _special(tokenizer, "pad_token_id", "eos_token_id", "sep_token_id")
    return 0 if v is None else v


def collate(batch: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads to the longest sequence: input_ids, attention_mask, labels (-100 on pads)."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
