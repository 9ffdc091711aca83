"""phi2qlora/model.py: the dtype choice, the chat tokens' rows, the fused gelu."""

from __future__ import annotations

import pytest
import torch

from phi2qlora.chat import END, PAD, USER, chat_token_ids, format_chat
from phi2qlora.model import PHI2_HIDDEN_ACT, init_chat_token_rows, load_base_model, load_chat_tokenizer, pick_dtype


def test_chat_tokens_fit_spare_rows_and_start_sensibly(tiny_model_dir):
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    model = load_base_model(str(tiny_model_dir), tokenizer, torch.float32, load_in_4bit=False)
    ids = chat_token_ids(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(set(ids.values())) == 4 and max(ids.values()) < rows
    assert tokenizer.eos_token == END and tokenizer.pad_token == PAD != tokenizer.eos_token
    assert model.generation_config.eos_token_id == ids[END]
    head = model.get_output_embeddings()
    doc_end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert torch.equal(head.weight[ids[END]], head.weight[doc_end])
    assert head.bias[ids[END]] == head.bias[doc_end]
    # The chat text tokenizes into the special tokens, whole.
    text = format_chat([{"role": "user", "content": "Hi! ¿Qué tal? 你好"},
                        {"role": "assistant", "content": "Fine.\n```python\nprint(1)\n```"}])
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded[0] == ids[USER] and encoded.count(ids[END]) == 2
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
    assert pick_dtype("auto") is expected
    assert pick_dtype("float16") is torch.float16


def test_fused_gelu_is_phi2s_gelu_in_one_kernel(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh

    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    fused = load_base_model(str(tiny_model_dir), tokenizer, torch.float32, load_in_4bit=False).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    init_chat_token_rows(plain, tokenizer)
    assert plain.config.hidden_act == "gelu_new" and fused.config.hidden_act == PHI2_HIDDEN_ACT
    assert all(isinstance(layer.mlp.activation_fn, GELUTanh) for layer in fused.model.layers)
    batch = tokenizer(["Why is the sky blue?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, plain(**batch).logits, atol=1e-5, rtol=1e-5)
