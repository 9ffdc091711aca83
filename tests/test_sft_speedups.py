"""Faster must not mean different: each speed-up PERFORMANCE.md recommends, checked on the
tiny model on the CPU against the plain path on the same data and seed."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import sft_qlora
from conftest import ROOT, sft_args

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_gpu import model_variant  # noqa: E402

STEPS = ["--max_steps", "4", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "64",
         "--preview_steps", "0", "--eval_strategy", "no", "--save_strategy", "no", "--lora_dropout", "0.0"]


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("speedups")
    shutil.copytree(tiny_model_dir, root / "tiny")
    return root / "tiny", model_variant(root / "tiny", "gelu_pytorch_tanh")


def losses(model_dir, data_dir, out, *extra):
    trainer = sft_qlora.main(*sft_args(model_dir, data_dir, out, *STEPS, *extra))
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def plain_losses(models, sample_data_dir, tmp_path_factory):
    return losses(models[0], sample_data_dir, tmp_path_factory.mktemp("plain"))


def test_fused_gelu_is_phi2s_gelu(models):
    """gelu_pytorch_tanh (one kernel) computes Phi-2's gelu_new (eight): same logits."""
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 40))
    new, tanh = (AutoModelForCausalLM.from_pretrained(m).eval() for m in models)
    assert type(new.model.layers[0].mlp.activation_fn) is not type(tanh.model.layers[0].mlp.activation_fn)
    with torch.no_grad():
        torch.testing.assert_close(tanh(ids).logits, new(ids).logits, atol=1e-5, rtol=1e-5)


def test_fused_gelu_gives_the_same_loss_curve(models, sample_data_dir, tmp_path, plain_losses):
    # Four different losses: a curve to compare. (Whether it falls in four steps of two
    # conversations hangs on which two each step draws, not on the activation.)
    assert len(plain_losses) == 4 and len(set(plain_losses)) == 4 and all(0 < x < 20 for x in plain_losses)
    fused = losses(models[1], sample_data_dir, tmp_path)
    assert fused == pytest.approx(plain_losses, rel=1e-4, abs=1e-4)


def test_no_checkpointing_gives_the_same_loss_curve(models, sample_data_dir, tmp_path, plain_losses):
    """The recipe's 8 x 2 without checkpointing against 16 x 1 with it: the same 16
    conversations a step, the same loss (up to float summation order)."""
    recompute = losses(models[0], sample_data_dir, tmp_path / "a", "--gradient_checkpointing", "false")
    assert recompute == pytest.approx(plain_losses, rel=1e-5, abs=1e-5)
    accumulated = losses(models[0], sample_data_dir, tmp_path / "b", "--gradient_checkpointing", "false",
                         "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2")
    assert accumulated == pytest.approx(plain_losses, rel=2e-3, abs=2e-3)


def test_packed_rows_attend_within_their_own_sequence(models):
    """TRL's padding-free rows: with sdpa, no attention mask and no cache (as in training),
    transformers builds the block-diagonal mask from position_ids, so a packed sequence sees
    only itself. (With a cache, as `use_cache=True` makes by default, it does not.)"""
    model = AutoModelForCausalLM.from_pretrained(models[0], attn_implementation="sdpa").eval()
    torch.manual_seed(1)
    first, second = torch.randint(0, 1000, (1, 17)), torch.randint(0, 1000, (1, 23))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(17), torch.arange(23)]).unsqueeze(0)
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second, use_cache=False).logits
        unmasked = model(input_ids=packed, use_cache=False).logits  # one long sequence: the second part sees the first
    torch.testing.assert_close(together[:, 17:], alone, atol=1e-5, rtol=1e-5)
    assert (unmasked[:, 17:] - alone).abs().max() > 1e-2
