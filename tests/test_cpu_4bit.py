"""The 4-bit layers keep their trainable layout through eval-mode forwards on any CPU.

bitsandbytes 0.50.2 repacks a `Linear4bit` for its AVX512-BF16 inference kernel at the
first eval-mode forward without grad, on a CPU that has the instruction; training after
that breaks (keep_4bit_trainable says how). What each test can see:

- `test_training_after_a_generation_matches_training_without` runs the real kernels. On a
  CPU with AVX512-BF16 it fails without the guard (the second training forward raises in
  `matmul_4bit`); on a CPU without the instruction bitsandbytes never repacks, so there it
  passes with or without the guard and checks only that generating changes nothing.
- The `pretend` variant and `test_the_guard_keeps_the_layout_and_the_packed_kernel_is_opt_in`
  make bitsandbytes believe the CPU has AVX512-BF16 (the flag it reads when a layer is
  built), so the repack happens on any CPU. The packed weights then reach bitsandbytes'
  generic `gemv_4bit`, which is not the AVX512 kernel: they show the repack and the guard,
  not the real kernel's error or speed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import sft_args
from peft import get_peft_model

import sft_qlora
from phi2qlora.chat import format_chat, format_prompt
from phi2qlora.model import fix_lm_head_bias, keep_4bit_trainable, load_base_model, load_chat_tokenizer


@pytest.fixture
def pretend_avx512_bf16(monkeypatch):
    """bitsandbytes reads `has_avx512bf16()` into each Linear4bit when it is built."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def packed_layers(model) -> int:
    import bitsandbytes as bnb

    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def lora_model(tiny_model_dir, sample_data_dir, tmp_path):
    """The SFT recipe's model (NF4 base, LoRA on all six targets, chat-token rows), dropout off
    so two forwards of the same batch must agree."""
    _, _, model_args = sft_args(tiny_model_dir, sample_data_dir, tmp_path, "--lora_dropout", "0")
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    base = load_base_model(str(tiny_model_dir), tokenizer, torch.float32)
    model = get_peft_model(base, sft_qlora.lora_config(model_args, tokenizer))
    fix_lm_head_bias(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch.manual_seed(0)
    with torch.no_grad():  # as after some training: B = 0 at the start gives A no gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, tokenizer


def loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("cpu", ["real", "pretend"])
def test_training_after_a_generation_matches_training_without(cpu, request, tiny_model_dir, sample_data_dir,
                                                              tmp_path):
    if cpu == "pretend":
        request.getfixturevalue("pretend_avx512_bf16")
    model, tokenizer = lora_model(tiny_model_dir, sample_data_dir, tmp_path)
    batch = tokenizer([format_chat([{"role": "user", "content": "Hi there."},
                                           {"role": "assistant", "content": "Hello! How can I help?"}])],
                      return_tensors="pt")
    loss, grads = loss_and_grads(model, batch)
    assert len(grads) > 12 and all(g.abs().sum() > 0 for g in grads.values())  # LoRA A, B of 6 targets, rows

    model.eval()  # what a preview does between optimizer steps
    with torch.no_grad():
        prompt = tokenizer([format_prompt("Say something.")], return_tensors="pt")
        model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert packed_layers(model) == 0

    loss_after, grads_after = loss_and_grads(model, batch)
    torch.testing.assert_close(loss_after, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_after[name], grad, rtol=0, atol=0, msg=name)


def test_the_guard_keeps_the_layout_and_the_packed_kernel_is_opt_in(pretend_avx512_bf16, tiny_model_dir):
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    prompt = tokenizer([format_prompt("Say something.")], return_tensors="pt")
    for packed_kernel, expected in ((False, 0), (True, None)):
        model = load_base_model(str(tiny_model_dir), tokenizer, torch.float32,
                                       cpu_packed_kernel=packed_kernel).eval()
        layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
        assert len(layers) == 12  # 2 layers x q, k, v, dense, fc1, fc2
        with torch.no_grad():
            model(**prompt)
        # Guarded: nothing repacked. Opted in: every layer repacked, so this test sees the repack.
        assert packed_layers(model) == (len(layers) if expected is None else expected)
    assert keep_4bit_trainable(torch.nn.Linear(2, 2)) == 0  # nothing 4-bit: nothing to do

