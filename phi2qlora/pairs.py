"""Preference pairs for DPO: reading data_prep.py's pairs files (TRL's conversational
preference format) with the file and line of anything wrong, tokenising them as TRL's
DPOTrainer does, and scoring how often a model prefers the people's choice.

A row: {"prompt": [{"role": "user", "content": ...}, ...], "chosen": [{"role": "assistant",
"content": ...}], "rejected": [...]}, optionally "kind" ("ranked", "concise") and
"word_limit". The prompt is the chat so far and ends with the user's turn."""

from __future__ import annotations

import os

from phi2qlora.chat import ROLE_TOKENS, reserved_text_in
from phi2qlora.errors import InputError
from phi2qlora.files import read_jsonl_rows

FORMAT = ('{"prompt": [{"role": "user", "content": ...}, ...], "chosen": [{"role": "assistant", "content": ...}], '
          '"rejected": [{"role": "assistant", "content": ...}]}, as data_prep.py writes them')


def read_pair_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """`(line number, row)` for every pair, each checked; the first bad line stops the read
    with its file, line and what is wrong. An empty file is an error too: DPO has nothing
    to learn from it."""
    rows = []
    for n, row in read_jsonl_rows(path, "pairs file"):
        problem = pair_problem(row)
        if problem:
            raise InputError(f"{path}:{n}: {problem}; each line must be {FORMAT}")
        rows.append((n, row))
    if not rows:
        raise InputError(f"{path}: no pairs in the file. data_prep.py writes pairs only from user turns with two or "
                         "more replies ranked against each other (oasst1's `rank`); data without ranks gives none")
    return rows


def pair_problem(row: dict) -> str | None:
    """What is wrong with one pair, or None."""
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        return "field 'prompt' must be a non-empty list of turns"
    for turn in prompt:
        if not isinstance(turn, dict) or turn.get("role") not in ROLE_TOKENS or not isinstance(turn.get("content"), str):
            return f"each prompt turn needs 'role' ('user' or 'assistant') and a string 'content'; got {str(turn)[:60]}"
    if prompt[-1]["role"] != "user":
        return "the prompt must end with the user's turn (the replies answer it)"
    replies = {}
    for field in ("chosen", "rejected"):
        value = row.get(field)
        if (not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict)
                or value[0].get("role") != "assistant" or not isinstance(value[0].get("content"), str)
                or not value[0]["content"].strip()):
            return f"field '{field}' must be a list of one assistant turn with non-empty text"
        replies[field] = value[0]["content"]
    if replies["chosen"] == replies["rejected"]:
        return "'chosen' and 'rejected' hold the same text, so there is no preference to learn"
    for text in [t["content"] for t in prompt] + list(replies.values()):
        if token := reserved_text_in(text):
            return f"a turn holds {token!r}, which the tokenizer reads as a special token (a turn boundary); remove it"
    return None


def tokenize_pair(tokenizer, row: dict) -> dict:
    """`prompt_ids`, `chosen_ids`, `rejected_ids` as TRL 1.16's DPOTrainer makes them: the
    prompt through the chat template with the assistant's opening, the completions as what
    prompt + completion adds to it (the reply, `<|end|>` and the newline after it)."""

    def ids(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt = ids(row["prompt"], add_generation_prompt=True)
    chosen, rejected = ids(row["prompt"] + row["chosen"]), ids(row["prompt"] + row["rejected"])
    start = min(common_prefix(prompt, chosen), common_prefix(prompt, rejected))
    return {"prompt_ids": prompt[:start], "chosen_ids": chosen[start:], "rejected_ids": rejected[start:]}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def completion_logps(model, tokenizer, rows: list[dict], max_length: int | None = None, batch_size: int = 4):
    """Each pair's chosen and rejected completion under `model`, as two lists of (summed
    log-probability, completion tokens), with sequences cut to `max_length` tokens as
    DPOTrainer cuts them, so the margin is the one DPO trains. The model runs as it is
    (its active adapter, eval or train mode); no gradients."""
    chosen, rejected = [], []
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch_size):
        tokenized = [tokenize_pair(tokenizer, r) for r in rows[start : start + batch_size]]
        sequences = [(t["prompt_ids"], t[k]) for k in ("chosen_ids", "rejected_ids") for t in tokenized]
        scored = sequence_logps(model, sequences, tokenizer.pad_token_id, max_length, device)
        chosen += scored[: len(tokenized)]
        rejected += scored[len(tokenized):]
    return chosen, rejected


def sequence_logps(model, sequences: list[tuple[list[int], list[int]]], pad_id: int, max_length: int | None,
                   device) -> list[tuple[float, int]]:
    """(summed log-prob, tokens) of each (prompt, completion)'s completion, in one padded batch."""
    import torch

    cut = slice(None, max_length)
    ids = [(p + c)[cut] for p, c in sequences]
    masks = [([0] * len(p) + [1] * len(c))[cut] for p, c in sequences]
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=device)
    attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
    completion = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
    scored = []
    for i in range(len(ids)):  # one row at a time: an fp32 log-softmax of the whole batch is large
        logps = logits[i, :-1].float().log_softmax(-1).gather(-1, input_ids[i, 1:, None]).squeeze(-1)
        scored.append((float((logps * completion[i, 1:]).sum()), int(completion[i, 1:].sum())))
    return scored


def preference_accuracy(chosen: list[tuple[float, int]], rejected: list[tuple[float, int]],
                        per_token: bool = False) -> float | None:
    """The share of pairs whose chosen completion the model finds more likely than the
    rejected one (a tie is no preference): by summed log-probs, the margin DPO trains, or
    `per_token`, by the mean log-prob of a completion token, blind to length. Summed
    log-probs favour the shorter reply, which oasst1's volunteers mostly ranked lower."""
    if not chosen:
        return None

    def score(logp_tokens):
        logp, tokens = logp_tokens
        return logp / max(tokens, 1) if per_token else logp

    return sum(score(c) > score(r) for c, r in zip(chosen, rejected)) / len(chosen)
