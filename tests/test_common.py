"""common.py: the chat format, the dtype choice, chat-token rows, checkpoints, files."""

from __future__ import annotations

import pytest
import torch

import common

CONVERSATION = [
    {"role": "user", "content": "Hi! ¿Qué tal? 你好"},
    {"role": "assistant", "content": "Fine.\n```python\nprint(1)\n```"},
    {"role": "user", "content": "And in 5 words?"},
    {"role": "assistant", "content": "Fine, thanks for asking, friend."},
]


def test_format_chat_matches_the_tokenizer_template(tiny_model_dir):
    tokenizer = common.load_chat_tokenizer(str(tiny_model_dir))
    for messages, gen in [(CONVERSATION, False), (CONVERSATION[:1], True), (CONVERSATION[:3], True)]:
        assert common.format_chat(messages, gen) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)
    assert common.format_prompt("Hi") == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="unknown role"):
        common.format_chat([{"role": "system", "content": "x"}])


def test_chat_tokens_fit_spare_rows_and_start_sensibly(tiny_model_dir):
    tokenizer = common.load_chat_tokenizer(str(tiny_model_dir))
    model = common.load_base_model(str(tiny_model_dir), tokenizer, torch.float32, load_in_4bit=False)
    ids = common.chat_token_ids(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(set(ids.values())) == 4 and max(ids.values()) < rows
    assert tokenizer.eos_token == common.END and tokenizer.pad_token == common.PAD != tokenizer.eos_token
    assert model.generation_config.eos_token_id == ids[common.END]
    head = model.get_output_embeddings()
    doc_end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert torch.equal(head.weight[ids[common.END]], head.weight[doc_end])
    assert head.bias[ids[common.END]] == head.bias[doc_end]
    # The chat text tokenizes into the special tokens, whole.
    text = common.format_chat(CONVERSATION[:2])
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded[0] == ids[common.USER] and encoded.count(ids[common.END]) == 2
    assert tokenizer.decode(encoded) == text


@pytest.mark.parametrize("cuda, capability, expected", [
    (False, None, torch.float32),
    (True, (7, 5), torch.float16),   # T4: bf16 only emulated
    (True, (8, 0), torch.bfloat16),  # A100
    (True, (9, 0), torch.bfloat16),  # H100
])
def test_pick_dtype(monkeypatch, cuda, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert common.pick_dtype("auto") is expected
    assert common.pick_dtype("float16") is torch.float16


def test_latest_complete_checkpoint_skips_half_written_ones(tmp_path, capsys):
    assert common.latest_complete_checkpoint(tmp_path / "none") is None
    everything = (*common.CHECKPOINT_FILES, common.COMPLETE_MARK)
    for step, files in [(10, everything), (20, everything), (30, common.CHECKPOINT_FILES[:2]),
                        (40, common.CHECKPOINT_FILES)]:  # 40: every file, but killed before the mark
        (tmp_path / f"checkpoint-{step}").mkdir()
        for f in files:
            (tmp_path / f"checkpoint-{step}" / f).write_text("x")
    (tmp_path / "checkpoint-tmp").mkdir()
    assert common.latest_complete_checkpoint(tmp_path, verbose=True).endswith("checkpoint-20")
    printed = capsys.readouterr().out
    assert "skipping" in printed and "checkpoint-30" in printed and "checkpoint-40" in printed
    assert "checkpoint-10" not in printed


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "out.jsonl"
    common.write_jsonl_atomic(path, [{"a": 1}])
    with pytest.raises(TypeError):
        common.write_jsonl_atomic(path, [{"a": 2}, {"b": object()}])
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~common._umask()


def test_count_words():
    assert common.count_words("Hello, world! It's 3.5 km.") == 7
    assert common.count_words("") == common.count_words(None) == 0
    assert common.count_words("¿Qué tal? 你好") == 3


def test_prompt_rows_from_jsonl_and_text(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "One"}\n\n{"prompt": "Two", "word_limit": 5}\n')
    (tmp_path / "p.txt").write_text("One\n\nTwo\n")
    assert common.read_prompt_rows(tmp_path / "p.jsonl") == [
        {"prompt": "One", "word_limit": None}, {"prompt": "Two", "word_limit": 5}]
    assert [r["prompt"] for r in common.read_prompt_rows(tmp_path / "p.txt")] == ["One", "Two"]


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "One"}\n{"prompt": 3}\n', r"bad\.jsonl:2: field 'prompt' must be a non-empty string"),
    ('{"prompt": "One"\n', r"bad\.jsonl:1: not valid JSON"),
    ('["One"]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
    ('{"prompt": "One", "word_limit": 0}\n', r"bad\.jsonl:1: field 'word_limit' must be a positive integer"),
    ('{"prompt": "One", "word_limit": true}\n', r"bad\.jsonl:1: field 'word_limit'"),
    ('\n\n', r"bad\.jsonl: no prompts"),
])
def test_prompt_rows_name_the_bad_line(tmp_path, text, message):
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(common.InputError, match=message):
        common.read_prompt_rows(tmp_path / "bad.jsonl")


def test_prompt_rows_missing_or_not_utf8(tmp_path):
    with pytest.raises(common.InputError, match="not found"):
        common.read_prompt_rows(tmp_path / "missing.jsonl")
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(common.InputError, match="not UTF-8"):
        common.read_prompt_rows(tmp_path / "latin.jsonl")


def test_fused_gelu_is_phi2s_gelu_in_one_kernel(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh

    tokenizer = common.load_chat_tokenizer(str(tiny_model_dir))
    fused = common.load_base_model(str(tiny_model_dir), tokenizer, torch.float32, load_in_4bit=False).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    common.init_chat_token_rows(plain, tokenizer)
    assert plain.config.hidden_act == "gelu_new" and fused.config.hidden_act == common.PHI2_HIDDEN_ACT
    assert all(isinstance(layer.mlp.activation_fn, GELUTanh) for layer in fused.model.layers)
    batch = tokenizer(["Why is the sky blue?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, plain(**batch).logits, atol=1e-5, rtol=1e-5)
