"""Greedy answers to prompts in the chat format: what the previews print, evaluate.py
scores, export_model.py checks its export with, and the demo shows. Greedy, so the same
weights give the same text."""

from __future__ import annotations

from phi2qlora.chat import END, format_prompt
from phi2qlora.word_limits import count_words


def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 128,
                     batch_size: int = 8, fast: bool = False, streamer=None) -> list[dict]:
    """Greedy answers in the chat format, batched. `fast`: through `rollouts` (the
    same greedy decoding, ~18x faster on an H100; plain `generate` where it can't). Puts back
    what it changes: the model's train mode and the tokenizer's padding side. `streamer`
    (one prompt): a transformers streamer that gets the tokens as they come."""
    import torch
    from transformers import GenerationConfig

    was_training, padding_side = model.training, tokenizer.padding_side
    end_id = tokenizer.convert_tokens_to_ids(END)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,  # also while training uses gradient checkpointing (it is off in eval mode)
        eos_token_id=end_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = next(model.parameters()).device
    model.eval()  # no dropout: identical weights give identical text
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            enc = tokenizer([format_prompt(p) for p in batch], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            with torch.no_grad():
                new_tokens = fast_greedy(model, tokenizer, enc, max_new_tokens, end_id) if fast else None
                if new_tokens is None:
                    fast = False  # for the next batches too
                    new_tokens = model.generate(**enc, generation_config=config,
                                                streamer=streamer)[:, enc["input_ids"].shape[1]:]
            for prompt, ids in zip(batch, new_tokens):
                ids = ids.tolist()
                ended = end_id in ids
                text = tokenizer.decode(ids[: ids.index(end_id)] if ended else ids, skip_special_tokens=True)
                answers.append({"prompt": prompt, "answer": text.strip(), "words": count_words(text),
                                "ended": ended})
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    return answers


def fast_greedy(model, tokenizer, enc, max_new_tokens: int, end_id: int):
    """The fast decoder's greedy tokens, or None where it can't run this model (or out of memory)."""
    from phi2qlora import rollouts

    if rollouts.unsupported_reason(model, {}):
        return None
    return rollouts.generate_or_none(model, enc["input_ids"], enc["attention_mask"],
                                     max_new_tokens=max_new_tokens, temperature=0.0, eos_token_ids=[end_id],
                                     pad_token_id=tokenizer.pad_token_id)
