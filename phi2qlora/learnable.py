"""Training data that leaves the loss something to learn, checked before a model loads.

Two kinds of row teach nothing, and TRL 1.16 takes both without a word: a conversation
whose every assistant reply is empty (its loss is the end-of-turn token alone: the model
learns to say nothing), and one whose assistant tokens all fall past `max_length` once
truncated (SFTTrainer drops it while preparing the dataset; when that is every row, the
run ends in a sampler traceback about an empty dataset). Rows like these are dropped
here with a count and the reason, and a file left with none is refused, all before the
model loads.

    rows = keep_learnable(rows, [reason(row) for row in rows], path, "conversations")

`reason(row)` is the trainer's own: None for a row that teaches something, else a short
phrase ("every assistant reply is empty"). `sft_reason` is SFT's."""

from __future__ import annotations

from collections import Counter

from phi2qlora.errors import InputError

EMPTY_REPLIES = "every assistant reply is empty (the row would teach only to end the turn at once)"


def keep_learnable(rows: list, reasons: list, path, what: str = "rows", fix: str = "") -> list:
    """`rows` without those that have a reason (`reasons[i]` is None for a row to keep).
    Drops are printed as one line with their count per reason; a file with nothing left
    is an InputError with the counts. `fix`: what to do, said when nothing is left."""
    dropped = Counter(r for r in reasons if r is not None)
    kept = [row for row, reason in zip(rows, reasons) if reason is None]
    why = "; ".join(f"{n:,} {reason}" for reason, n in dropped.most_common())
    if not kept:
        raise InputError(f"{path}: nothing to learn in its {len(rows):,} {what} ({why})" + (f"; {fix}" if fix else ""))
    if dropped:
        print(f"[data] {path}: dropped {sum(dropped.values()):,} of {len(rows):,} {what} with nothing to learn: {why}")
    return kept


def truncated_away(max_length: int | None) -> str:
    return f"no assistant token within max_length {max_length} (the turns before it fill that)"


def sft_reason(tokenizer, messages: list[dict], max_length: int | None, truncation_mode: str = "keep_start",
               assistant_only_loss: bool = True) -> str | None:
    """Why one conversation teaches nothing to SFTTrainer, or None: its tokens as TRL builds
    them (the chat template, the assistant mask of its {% generation %} markers), truncated
    to `max_length` from the side `truncation_mode` keeps."""
    if all(not m["content"].strip() for m in messages if m["role"] == "assistant"):
        return EMPTY_REPLIES
    if max_length is None or not assistant_only_loss:
        return None  # every token is in the loss, or nothing is cut
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    mask = encoded["assistant_masks"]
    kept = mask[:max_length] if truncation_mode == "keep_start" else mask[-max_length:]
    return None if any(kept) else truncated_away(max_length)
