"""rollouts.py against plain `generate` on the tiny 4-bit Phi with a trained adapter:
the same tokens from the same policy, the policy of *this* step (after its weights change),
the base with adapters disabled, Gumbel-max sampling's distribution, and GRPO using it."""

from __future__ import annotations

import pytest
import torch
from tiny_adapters import sft_adapter

from phi2qlora import rollouts as fr
from phi2qlora.chat import format_prompt
from phi2qlora.model import load_adapter, load_base_model, load_chat_tokenizer

PROMPTS = ["What is a black hole?", "Explain why the sky is blue in under 50 words.", "Hi",
           "Give me three tips for a job interview. Keep it within 40 words."]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir, sample_data_dir):
    return sft_adapter(tmp_path_factory, tiny_model_dir, sample_data_dir)


@pytest.fixture()
def policy(tiny_model_dir, adapter_dir):
    tokenizer = load_chat_tokenizer(str(adapter_dir))
    tokenizer.padding_side = "left"
    model = load_adapter(load_base_model(str(tiny_model_dir), tokenizer, torch.float32), str(adapter_dir),
                         trainable=True)
    model.eval()
    enc = tokenizer([format_prompt(p) for p in PROMPTS], return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()  # prompts of different lengths: left padding is exercised
    return model, tokenizer, enc


def plain(model, tokenizer, enc, n):
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    return torch.nn.functional.pad(new, (0, n - new.shape[1]), value=tokenizer.pad_token_id)  # all rows ended early


def fast(model, tokenizer, enc, n, temperature=0.0):
    return fr.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=n, temperature=temperature,
                       eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                       dtype=torch.float32)


@pytest.mark.parametrize("attend_step", [fr.ATTEND_STEP, 1])
def test_greedy_tokens_equal_plain_generate(policy, attend_step, monkeypatch):
    """At 1, attention reads exactly the filled cache columns: a new length (a graph on a GPU) each token."""
    monkeypatch.setattr(fr, "ATTEND_STEP", attend_step)
    model, tokenizer, enc = policy
    expected = plain(model, tokenizer, enc, 40)
    assert torch.equal(fast(model, tokenizer, enc, 40), expected)
    assert len(set(map(tuple, expected.tolist()))) == len(PROMPTS)  # distinct answers: a real comparison


def test_prefill_logits_equal_the_models(policy):
    model, tokenizer, enc = policy
    w = fr.merged_weights(model, torch.float32)
    batch, length = enc["input_ids"].shape
    cache = [torch.zeros(batch, 2, w["heads"], length, w["head_dim"]) for _ in w["layers"]]
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    columns = torch.arange(length)
    allowed = enc["attention_mask"].bool()[:, None, :] & (columns[None, None, :] <= columns[None, :, None])
    allowed |= torch.eye(length, dtype=torch.bool)[None]
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    hidden = fr.forward(w, cache, enc["input_ids"], positions, columns, mask)
    ours = torch.nn.functional.linear(hidden, *w["lm_head"])
    with torch.no_grad():
        theirs = model(**enc).logits[:, -1]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_tokens_come_from_the_current_weights(policy):
    """An optimizer step changes the adapter; the next call samples from the new policy."""
    model, tokenizer, enc = policy
    before = fast(model, tokenizer, enc, 30)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(3.0)
            elif "trainable_tokens_delta" in name:
                param.add_(0.5 * torch.randn_like(param))
    after = fast(model, tokenizer, enc, 30)
    assert not torch.equal(after, before)
    assert torch.equal(after, plain(model, tokenizer, enc, 30))


def test_adapters_disabled_give_the_base(policy):
    model, tokenizer, enc = policy
    with model.disable_adapter():
        base = plain(model, tokenizer, enc, 30)
        assert torch.equal(fast(model, tokenizer, enc, 30), base)
    assert not torch.equal(fast(model, tokenizer, enc, 30), base)


def test_rows_stop_at_their_end_token(policy):
    model, tokenizer, enc = policy
    # Seeded, and each prompt sampled eight times: unseeded, whether any of four rows ended
    # within 60 tokens hung on what the tests before had drawn from the global generator;
    # four times each, on the sample's data of 2026-12-06, none of 16 did (3 of 32 here).
    torch.manual_seed(0)
    enc = {k: v.repeat(8, 1) for k, v in enc.items()}
    new = fast(model, tokenizer, enc, 60, temperature=1.0)
    rows = fr.completion_lists(new, [tokenizer.eos_token_id])
    for row, full in zip(rows, new.tolist()):
        assert tokenizer.eos_token_id not in row[:-1]
        if row[-1] == tokenizer.eos_token_id:
            assert all(t == tokenizer.pad_token_id for t in full[len(row):])
        else:
            assert len(row) == 60
    assert any(r[-1] == tokenizer.eos_token_id for r in rows)  # the trained adapter ends some answers


def test_gumbel_max_samples_softmax_with_temperature():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0]).repeat(40_000, 1)
    for temperature in (0.7, 1.3):
        picks = fr.pick_tokens(logits, temperature)
        freq = torch.bincount(picks, minlength=5).float() / len(picks)
        assert torch.allclose(freq, torch.softmax(logits[0] / temperature, -1), atol=0.01), freq
    assert torch.equal(fr.pick_tokens(logits[:3], 0.0), torch.zeros(3, dtype=torch.long))


def test_sampling_settings_it_cannot_reproduce_are_named(policy):
    model, _, _ = policy
    assert fr.unsupported_reason(model, {"temperature": 0.9, "top_p": 1.0, "top_k": 0, "min_p": None,
                                         "repetition_penalty": 1.0}) is None
    assert fr.unsupported_reason(model, {"top_p": 0.9}) == "top_p 0.9"
    assert fr.unsupported_reason(model, {"repetition_penalty": 1.1}) == "repetition_penalty 1.1"


@pytest.mark.parametrize("option,reason", [("use_dora", "DoRA adapters"), ("lora_bias", "LoRA bias")])
def test_adapters_it_cannot_merge_are_named(tiny_model_dir, option, reason):
    from peft import LoraConfig, get_peft_model

    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    model = load_base_model(str(tiny_model_dir), tokenizer, torch.float32, load_in_4bit=False)
    plain_lora = get_peft_model(model, LoraConfig(target_modules=["q_proj", "fc1"]))
    assert fr.unsupported_reason(plain_lora, {}) is None
    model = load_base_model(str(tiny_model_dir), tokenizer, torch.float32, load_in_4bit=False)
    assert fr.unsupported_reason(get_peft_model(model, LoraConfig(target_modules=["q_proj", "fc1"], **{option: True})),
                                 {}) == reason


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(policy):
    model, tokenizer, enc = policy
    enc = {k: v.cuda() for k, v in enc.items()}
    args = dict(max_new_tokens=40, temperature=0.0, eos_token_ids=[tokenizer.eos_token_id],
                pad_token_id=tokenizer.pad_token_id, dtype=torch.float32)
    eager = fr.generate(model, enc["input_ids"], enc["attention_mask"], use_graph=False, **args)
    graphed = fr.generate(model, enc["input_ids"], enc["attention_mask"], use_graph=True, **args)
    assert torch.equal(graphed, eager)
