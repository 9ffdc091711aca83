"""The fast Phi-2 training layers (phi2qlora/fast_training.py) against the generic PEFT +
bitsandbytes layers, on the tiny Phi model in real 4-bit NF4 on the CPU, in fp32.

Tolerances (fp32, the same operations in another order): logits 1e-5 absolute, the loss 1e-6
relative, each trainable tensor's gradient 1e-5 relative to its largest entry. On the CPU the
dropout masks (LoRA dropout and Phi-2's resid_pdrop) are drawn in the generic path's order
and are the same masks, so dropout on is held to the same tolerances."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_compiler, sft_args, stop_at
from test_dpo import dpo_args, pairs_dir  # noqa: F401 (a fixture)
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file

import dpo_train
import grpo_train
import sft_qlora
from phi2qlora import fast_training as ft
from phi2qlora.chat import CHAT_TOKENS
from phi2qlora.model import fix_lm_head_bias, load_adapter, load_base_model, load_chat_tokenizer
from phi2qlora.model import upcast_trainable_params
from phi2qlora.training import latest_complete_checkpoint

TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
TEXTS = ["<|user|>\nHello there, how are you today?<|end|>\n<|assistant|>\nFine, thanks. And you?<|end|>",
         "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>",
         "<|user|>\nExplain gravity, please.<|end|>\n<|assistant|>\nMass attracts mass, more so when close.<|end|>"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_chat_tokenizer(str(tiny_model_dir))


def peft_model(tiny_model_dir, tokenizer, *, lora_dropout=0.0, resid_pdrop=0.0, dtype=torch.float32, **lora):
    """The tiny model as SFTTrainer prepares it: NF4, k-bit preparation, LoRA on the six
    projections and the chat tokens' rows, fp32 adapter weights; LoRA B drawn at random, so
    the adapters change the output from the first step."""
    model = load_base_model(str(tiny_model_dir), tokenizer, dtype)
    for layer in model.model.layers:
        layer.resid_dropout.p = resid_pdrop
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS]
    config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=lora_dropout,
                        target_modules=lora.pop("target_modules", TARGETS),
                        trainable_token_indices={"embed_tokens": ids, "lm_head": ids[-1:]}, **lora)
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * 0.05)
    fix_lm_head_bias(model)
    upcast_trainable_params(model)
    return model


def batch(tokenizer, side="right"):
    tokenizer.padding_side = side
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    assert (enc["attention_mask"] == 0).any()  # mixed lengths: padding is exercised
    return enc, enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)


@pytest.fixture()
def fast_calls(monkeypatch):
    """How many layer forwards took the fast path: a comparison must not be generic against generic."""
    calls = []
    fast_forward = ft.FastPhiLayer._fast_forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return fast_forward(self, *args, **kwargs)

    monkeypatch.setattr(ft.FastPhiLayer, "_fast_forward", counted)
    return calls


def forward_backward(model, enc, labels, *, fast: bool, checkpointing: bool, seed: int = 3, compile: bool = False):
    ft.install(model, compile=compile) if fast else ft.uninstall(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(**enc, labels=labels, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def assert_same(generic, fast, mask):
    logits, loss, grads = generic
    f_logits, f_loss, f_grads = fast
    torch.testing.assert_close(f_logits[mask], logits[mask], atol=1e-5, rtol=0)
    assert f_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert grads.keys() == f_grads.keys()
    for name, grad in grads.items():
        scale = grad.abs().max().clamp(min=1e-12)
        assert ((f_grads[name] - grad).abs().max() / scale).item() < 1e-5, name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_logits_loss_and_every_gradient_equal_the_generic_path(tiny_model_dir, tokenizer, fast_calls,
                                                               checkpointing, dropout):
    model = peft_model(tiny_model_dir, tokenizer, lora_dropout=0.1 if dropout else 0.0,
                       resid_pdrop=0.1 if dropout else 0.0)
    enc, labels = batch(tokenizer)
    generic = forward_backward(model, enc, labels, fast=False, checkpointing=checkpointing)
    assert not fast_calls
    fast = forward_backward(model, enc, labels, fast=True, checkpointing=checkpointing)
    layers = len(model.base_model.model.model.layers)
    assert len(fast_calls) == layers * (2 if checkpointing else 1)  # the recompute runs the fast layer too
    assert_same(generic, fast, enc["attention_mask"].bool())
    names = {n.split(".default")[0].rsplit(".", 2)[-2] for n in generic[2] if "lora_" in n}
    assert names == set(TARGETS)  # every target's A and B compared
    assert any("embed_tokens" in n for n in generic[2]) and any("lm_head" in n for n in generic[2])
    if dropout:  # the masks were real: another seed draws others
        other = forward_backward(model, enc, labels, fast=True, checkpointing=checkpointing, seed=4)
        assert abs(other[1].item() - fast[1].item()) > 1e-4


@needs_compiler()
def test_compiled_ops_equal_the_generic_path_and_other_lengths_reuse_their_graphs(tiny_model_dir, tokenizer,
                                                                                   fast_calls, monkeypatch):
    """`--fast_training compile`: Inductor's LayerNorm and residual sum give the generic
    path's logits, loss and gradients (dropout on, checkpointing); a batch of other lengths
    runs on the graphs already built, as grouped batches of changing lengths will."""
    from torch._dynamo.utils import counters

    from torch._inductor import config as inductor_config

    monkeypatch.setattr(ft, "_COMPILED_OPS", ft._LazyCompiledOps())  # this test's own graphs
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(inductor_config, "compile_threads", 4)
    model = peft_model(tiny_model_dir, tokenizer, lora_dropout=0.1, resid_pdrop=0.1)
    enc, labels = batch(tokenizer)
    generic = forward_backward(model, enc, labels, fast=False, checkpointing=True)
    graphs = counters["stats"]["unique_graphs"]
    compiled = forward_backward(model, enc, labels, fast=True, checkpointing=True, compile=True)
    assert fast_calls and counters["stats"]["unique_graphs"] > graphs  # the compiled ops ran
    assert_same(generic, compiled, enc["attention_mask"].bool())
    assert inductor_config.compile_threads == 1  # compiled in this process: no pool of workers left running
    graphs = counters["stats"]["unique_graphs"]
    shorter = {name: tensor[1:, :-3] for name, tensor in enc.items()}
    forward_backward(model, shorter, labels[1:, :-3], fast=True, checkpointing=True, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("lora", [{"alpha_pattern": {"fc1": 4}},
                                  {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 4}}],
                         ids=["scales-differ", "ranks-differ"])
def test_adapters_of_mixed_ranks_and_scales_equal_the_generic_path(tiny_model_dir, tokenizer, fast_calls, lora):
    """PEFT's rank_pattern and alpha_pattern: each term's own rank and scale."""
    model = peft_model(tiny_model_dir, tokenizer, **lora)
    enc, labels = batch(tokenizer)
    generic = forward_backward(model, enc, labels, fast=False, checkpointing=False)
    fast = forward_backward(model, enc, labels, fast=True, checkpointing=False)
    assert fast_calls
    assert_same(generic, fast, enc["attention_mask"].bool())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_on_cuda_in_16_bits_the_fast_layer_stays_close(tiny_model_dir, tokenizer, fast_calls, dtype):
    """Under autocast, as the Trainer runs it: the products in 16 bits, the residual stream in
    fp32. The paths round differently (one product for q|k|v|fc1, LoRA added in 16 bits), so
    the tolerances are those of 16-bit arithmetic: loss 1e-2 relative, logits and each
    gradient 3e-2 relative in norm."""
    model = peft_model(tiny_model_dir, tokenizer, dtype=dtype)
    enc, labels = batch(tokenizer)
    enc, labels = enc.to("cuda"), labels.to("cuda")
    with torch.autocast("cuda", dtype=dtype):
        generic = forward_backward(model, enc, labels, fast=False, checkpointing=True)
        fast = forward_backward(model, enc, labels, fast=True, checkpointing=True)
    assert fast_calls
    mask = enc["attention_mask"].bool()
    for (logits, loss, grads), name in ((generic, "generic"), (fast, "fast")):
        assert torch.isfinite(logits[mask]).all() and torch.isfinite(loss), name
    assert fast[1].item() == pytest.approx(generic[1].item(), rel=1e-2)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()

    assert rel(fast[0][mask], generic[0][mask]) < 3e-2
    for name, grad in generic[2].items():
        assert rel(fast[2][name], grad) < 3e-2, name


def test_left_padding_keeps_its_mask(tiny_model_dir, tokenizer, fast_calls):
    """GRPO's batches: left-padded prompts, then completions. The mask is kept (no causal shortcut)."""
    model = peft_model(tiny_model_dir, tokenizer)
    enc, labels = batch(tokenizer, side="left")
    generic = forward_backward(model, enc, labels, fast=False, checkpointing=False)
    fast = forward_backward(model, enc, labels, fast=True, checkpointing=False)
    assert fast_calls
    assert_same(generic, fast, enc["attention_mask"].bool())


def test_adapter_switches_and_disabled_adapters_follow(tiny_model_dir, tokenizer, fast_calls):
    """TRL's reference passes: a second adapter made active, or adapters disabled (the base)."""
    model = peft_model(tiny_model_dir, tokenizer)
    model.add_adapter("ref", model.peft_config["default"])
    enc, _ = batch(tokenizer)
    mask = enc["attention_mask"].bool()

    def logits():
        with torch.no_grad():
            return model(**enc, use_cache=False).logits[mask]

    results = {}
    for fast in (False, True):
        (ft.install if fast else ft.uninstall)(model)
        model.eval()
        model.set_adapter("default")
        policy = logits()
        model.set_adapter("ref")
        ref = logits()
        model.set_adapter("default")
        with model.disable_adapter():
            base = logits()
        results[fast] = (policy, ref, base)
    assert fast_calls
    for generic, fast in zip(results[False], results[True]):
        torch.testing.assert_close(fast, generic, atol=1e-5, rtol=0)
    assert (results[True][0] - results[True][1]).abs().max() > 1e-3  # "ref" (B = 0) is another model


def test_generate_with_the_fast_layers_installed_gives_the_same_tokens(tiny_model_dir, tokenizer, fast_calls):
    """Plain `generate` (previews' fallback, GRPO's --fast_rollouts false): the prompt's
    forward fills the empty KV cache on the fast layers, the decode steps run the generic
    ones over it."""
    model = peft_model(tiny_model_dir, tokenizer).eval()
    tokenizer.padding_side = "left"
    enc = tokenizer([t.split("<|assistant|>")[0] + "<|assistant|>\n" for t in TEXTS], return_tensors="pt",
                    padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    out = {}
    for fast in (False, True):
        (ft.install if fast else ft.uninstall)(model)
        with torch.no_grad():
            out[fast] = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert fast_calls  # the prefill ran on the fast layers
    assert torch.equal(out[True], out[False])


def test_a_subset_of_targets_runs_fast(tiny_model_dir, tokenizer, fast_calls):
    model = peft_model(tiny_model_dir, tokenizer, target_modules=["q_proj", "v_proj", "fc2"])
    assert ft.fast_training_reason(model) is None
    enc, labels = batch(tokenizer)
    generic = forward_backward(model, enc, labels, fast=False, checkpointing=False)
    fast = forward_backward(model, enc, labels, fast=True, checkpointing=False)
    assert fast_calls
    assert_same(generic, fast, enc["attention_mask"].bool())


@pytest.mark.parametrize("change, reason", [
    (dict(use_dora=True), "DoRA adapters"),
    (dict(lora_bias=True), "LoRA bias"),
    (dict(attention_dropout=0.1), "attention dropout"),
    (dict(attn_implementation="eager"), "attention implementation 'eager'"),
])
def test_what_the_fast_layer_cant_do_runs_generic_and_says_why(tiny_model_dir, tokenizer, change, reason, capsys):
    change = dict(change)
    model_change = {k: change.pop(k) for k in ("attention_dropout", "attn_implementation") if k in change}
    model = peft_model(tiny_model_dir, tokenizer, **change)
    if "attention_dropout" in model_change:
        model.config.attention_dropout = model_change["attention_dropout"]
    if "attn_implementation" in model_change:
        model.base_model.model.set_attn_implementation(model_change["attn_implementation"])
    assert not ft.use_fast_training(model, "true")
    assert not ft.is_installed(model)
    line = capsys.readouterr().out
    assert line.startswith("[train] generic path: the fast layer can't train") and reason in line, line


def test_another_architecture_runs_generic(tokenizer, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    assert not ft.use_fast_training(model, "true")
    assert "model type 'llama'" in capsys.readouterr().out


def test_the_switch_says_which_path_trains(tiny_model_dir, tokenizer, capsys):
    model = peft_model(tiny_model_dir, tokenizer)
    assert not ft.use_fast_training(model, "auto")  # the CPU: generic unless forced
    assert not ft.use_fast_training(model, "false")
    assert ft.use_fast_training(model, True)  # a recipe's YAML `true` is a boolean
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[train] generic path (--fast_training auto")
    assert out[1] == "[train] generic path (--fast_training false)"
    assert out[2].startswith("[train] fast Phi-2 layers") and "2 decoder layers" in out[2]
    assert ft.is_installed(model)


# ---------------------------------------------------------------------------------------
# Whole runs: the tiny recipes on both paths
# ---------------------------------------------------------------------------------------
SFT_STEPS = ["--max_steps", "6", "--logging_steps", "1", "--preview_steps", "3", "--preview_max_new_tokens", "8",
             "--eval_strategy", "no", "--save_steps", "3", "--lora_dropout", "0.1"]


def sft_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def sft_runs(tiny_model_dir, sample_data_dir, tmp_path_factory):
    runs = {}
    for mode in ("false", "true"):
        out = tmp_path_factory.mktemp(f"sft-{mode}")
        runs[mode] = (sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, out, *SFT_STEPS,
                                               "--fast_training", mode)), out)
    return runs


def test_tiny_sft_recipe_trains_the_same_on_both_paths(sft_runs, capsys):
    generic, fast = sft_losses(sft_runs["false"][0]), sft_losses(sft_runs["true"][0])
    assert len(generic) == 6 and fast == pytest.approx(generic, rel=1e-5)
    assert ft.is_installed(sft_runs["true"][0].model) and not ft.is_installed(sft_runs["false"][0].model)
    a = load_file(sft_runs["false"][1] / "adapter_model.safetensors")
    b = load_file(sft_runs["true"][1] / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # 6 AdamW steps of lr 1e-2 amplify rounding a little
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-3)


def test_adapter_trained_fast_loads_in_plain_peft(sft_runs, tiny_model_dir, tokenizer):
    trainer, out = sft_runs["true"]
    enc, _ = batch(tokenizer)
    reloaded = load_adapter(load_base_model(str(tiny_model_dir), tokenizer, torch.float32), str(out)).eval()
    assert not ft.is_installed(reloaded)
    with torch.no_grad():
        expected = trainer.model.eval()(**enc, use_cache=False).logits
        got = reloaded(**enc, use_cache=False).logits
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_fast_sft_resumes_as_if_uninterrupted(sft_runs, tiny_model_dir, sample_data_dir, tmp_path):
    straight = sft_runs["true"][0]
    args = [*SFT_STEPS, "--fast_training", "true"]
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path, *args), callbacks=[stop_at(3)])
    assert latest_complete_checkpoint(tmp_path).endswith("checkpoint-3")
    resumed = sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path, *args))
    later = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 3}
    assert later.keys() == {4, 5, 6}
    for step, loss in ((h["step"], h["loss"]) for h in straight.state.log_history if "loss" in h and h["step"] > 3):
        assert later[step] == pytest.approx(loss, abs=1e-6)


def test_tiny_grpo_recipe_trains_the_same_on_both_paths(sft_runs, tiny_model_dir, sample_data_dir, tmp_path):
    from test_grpo import grpo_args

    logs = {}
    for mode in ("false", "true"):
        trainer = grpo_train.main(*grpo_args(tiny_model_dir, sample_data_dir, sft_runs["false"][1], tmp_path / mode,
                                             "--max_steps", "3", "--save_strategy", "no", "--preview_steps", "0",
                                             "--fast_training", mode))
        logs[mode] = [(h["loss"], h["reward"], h["kl"]) for h in trainer.state.log_history if "reward" in h]
        assert ft.is_installed(trainer.model) == (mode == "true")
    assert len(logs["true"]) == 3
    for generic, fast in zip(logs["false"], logs["true"]):
        assert fast == pytest.approx(generic, rel=1e-4, abs=1e-6)


def test_tiny_dpo_recipe_trains_the_same_on_both_paths(pairs_dir, tiny_model_dir, sft_runs, tmp_path):
    """DPO's chosen and rejected rows, padded as TRL pads them, on both paths."""
    logs = {}
    for mode in ("false", "true"):
        trainer = dpo_train.main(*dpo_args(tiny_model_dir, pairs_dir, sft_runs["false"][1], tmp_path / mode,
                                           "--max_steps", "3", "--save_strategy", "no", "--logging_steps", "1",
                                           "--fast_training", mode))
        logs[mode] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert ft.is_installed(trainer.model) == (mode == "true")
    assert len(logs["true"]) == 3 and logs["true"][0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the SFT reference
    assert logs["true"] == pytest.approx(logs["false"], rel=1e-4)
