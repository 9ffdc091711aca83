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
