"""Adapters for test_evaluate.py and test_export.py: one short tiny SFT run, shared by both
modules (trained once a session, on the conftest fixtures), and copies of it with the
LoRA weights scaled, which stand in for other adapters at no training cost."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

import sft_qlora
from conftest import sft_args


def sft_adapter(tmp_path_factory, model_dir, data_dir) -> Path:
    """20 steps of the tiny SFT recipe: enough to change the model's answers (~20 s)."""
    done = tmp_path_factory.getbasetemp() / "shared-tiny-sft"
    if not (done / "adapter_model.safetensors").is_file():
        out = tmp_path_factory.mktemp("tiny-sft-training")
        sft_qlora.main(*sft_args(model_dir, data_dir, out, "--max_steps", "20", "--preview_steps", "0",
                                 "--eval_strategy", "no", "--save_strategy", "no"))
        os.rename(out, done)  # complete or absent, so a second module never reuses half a run
    return done


def scaled_adapter(adapter_dir, out, factor: float) -> Path:
    """A copy of an adapter with every lora_B multiplied by `factor`: a different model."""
    shutil.copytree(adapter_dir, out, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    weights = load_file(Path(out) / "adapter_model.safetensors")
    save_file({k: v * factor if "lora_B" in k else v for k, v in weights.items()},
              Path(out) / "adapter_model.safetensors")
    return Path(out)


def untrained_adapter(model_dir, out, *, hidden_size: int | None = None, token_ids=None,
                      trained_on: str | None = None) -> Path:
    """An adapter as sft_qlora.py saves one (LoRA on the projections, trainable chat-token
    rows, the tokenizer beside it), made on the tiny model without training, in a second:
    what the checks of adapter files need. `hidden_size`: made on a tiny Phi of another
    width instead; `token_ids`: the embedding rows it trains; `trained_on`: the base its
    adapter_config.json names."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, PhiForCausalLM

    from phi2qlora.chat import chat_token_ids
    from phi2qlora.model import load_chat_tokenizer

    tokenizer = load_chat_tokenizer(str(model_dir))
    config = AutoConfig.from_pretrained(model_dir)
    if hidden_size:
        config.hidden_size, config.intermediate_size = hidden_size, 4 * hidden_size
    config.vocab_size = max(config.vocab_size, 1 + max(token_ids or [0]))
    ids = token_ids or list(chat_token_ids(tokenizer).values())
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
                      trainable_token_indices={"embed_tokens": ids})
    get_peft_model(PhiForCausalLM(config), lora).save_pretrained(out)
    tokenizer.save_pretrained(out)
    settings = json.loads((Path(out) / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = trained_on or str(model_dir)
    (Path(out) / "adapter_config.json").write_text(json.dumps(settings))
    return Path(out)
