"""preview_callback.py: when previews fire, what they write, and what they leave behind."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import sft_args
from transformers import TrainerState

import sft_qlora
from phi2qlora.answers import generate_answers
from phi2qlora.chat import DEFAULT_PROMPTS
from phi2qlora.model import load_base_model, load_chat_tokenizer
from phi2qlora.word_limits import count_words
from preview_callback import PreviewCallback


def test_previews_fire_before_every_n_steps_and_after(tiny_model_dir, sample_data_dir, tmp_path):
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path, "--max_steps", "5", "--preview_steps", "2",
                             "--preview_max_new_tokens", "8", "--eval_strategy", "no", "--save_strategy", "no"))
    rows = [json.loads(line) for line in (tmp_path / "previews.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in (0, 2, 4, 5) for _ in DEFAULT_PROMPTS]
    assert [r["prompt"] for r in rows[:4]] == DEFAULT_PROMPTS
    assert all(r["words"] == count_words(r["answer"]) and isinstance(r["ended"], bool) for r in rows)
    md = (tmp_path / "previews.md").read_text()
    for heading in ("Preview at step 0 (before training)", "Preview at step 2", "Preview at step 4",
                    "Preview at step 5"):
        assert md.count(f"## {heading}\n") == 1
    assert md.count("**Prompt:**") == 16


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    return load_base_model(str(tiny_model_dir), tokenizer, torch.float32), tokenizer


def test_generation_restores_flags_and_is_deterministic(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.gradient_checkpointing_enable()
    model.config.use_cache = False  # as the Trainer leaves it under gradient checkpointing
    model.train()
    before = (model.training, tokenizer.padding_side, model.config.use_cache, model.is_gradient_checkpointing)

    first = generate_answers(model, tokenizer, DEFAULT_PROMPTS, max_new_tokens=12, batch_size=3)
    assert (model.training, tokenizer.padding_side, model.config.use_cache, model.is_gradient_checkpointing) == before
    second = generate_answers(model, tokenizer, DEFAULT_PROMPTS, max_new_tokens=12)
    assert first == second  # same weights, same text, whatever the batching
    assert [a["prompt"] for a in first] == DEFAULT_PROMPTS
    assert all(a["answer"] for a in first)


def test_fast_previews_equal_plain_ones(model_and_tokenizer, monkeypatch):
    """The callback's default, the fast decoder's greedy decoding, gives plain generate's text
    (fp32 on the CPU), and it really ran: a base model without adapters here, a PeftModel
    in test_rollouts.py."""
    from phi2qlora import rollouts

    model, tokenizer = model_and_tokenizer
    calls = []
    real = rollouts.generate
    monkeypatch.setattr(rollouts, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = generate_answers(model, tokenizer, DEFAULT_PROMPTS, max_new_tokens=24, batch_size=3, fast=True)
    assert len(calls) == 2  # two batches
    assert fast == generate_answers(model, tokenizer, DEFAULT_PROMPTS, max_new_tokens=24)


def test_fast_previews_fall_back_to_plain_generate_out_of_memory(model_and_tokenizer, monkeypatch):
    from phi2qlora import rollouts

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(rollouts, "generate", no_memory)
    fast = generate_answers(model, tokenizer, DEFAULT_PROMPTS, max_new_tokens=12, fast=True)
    assert fast == generate_answers(model, tokenizer, DEFAULT_PROMPTS, max_new_tokens=12)


def test_only_the_main_process_generates(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    callback = PreviewCallback(tokenizer, tmp_path, ["Hi"], every=1, max_new_tokens=4)
    state = TrainerState(is_world_process_zero=False)
    assert callback.preview(model, state) is None
    assert not list(tmp_path.iterdir())
    state.is_world_process_zero = True
    assert len(callback.preview(model, state)) == 1
    assert callback.preview(model, state) is None  # one preview per step, even if asked twice
    assert (tmp_path / "previews.md").is_file()


def test_previews_are_skipped_past_their_share_of_training_time():
    import time

    callback = PreviewCallback(tokenizer=None, output_dir="unused", every=1, max_share=0.1)
    assert callback.within_share()  # nothing measured yet: the first scheduled preview runs
    callback.started = time.perf_counter() - 100.0  # 100 s of training so far
    callback.seconds, callback.last_seconds = 6.0, 3.0
    assert callback.within_share()  # 6 + 3 <= 10% of 100 s
    callback.seconds = 8.0
    assert not callback.within_share() and callback.skipped == 1  # 8 + 3 > 10 s
    callback.max_share = 0.0
    assert callback.within_share()  # 0: no cap


def test_previews_show_the_limit_as_the_rewards_read_it(tmp_path):
    """A strict limit ("under 50 words") allows 49: previews say whether each answer obeys."""
    callback = PreviewCallback(None, tmp_path, prompts=["p"])
    answer = " ".join(["word"] * 50) + "."
    callback.write(3, [{"prompt": "Explain it in under 50 words.", "answer": answer, "words": 50, "ended": True},
                       {"prompt": "Explain it in at most 50 words.", "answer": answer, "words": 50, "ended": True},
                       {"prompt": "Explain it.", "answer": answer, "words": 50, "ended": False}])
    md = (tmp_path / "previews.md").read_text()
    assert "(50 words, breaks the limit (at most 49 words)):" in md
    assert "(50 words, obeys the limit (at most 50 words)):" in md and "(50 words, cut off):" in md
    rows = [json.loads(line) for line in (tmp_path / "previews.jsonl").read_text().splitlines()]
    assert [r["compliance"] for r in rows] == [0.0, 1.0, None]
