"""Data parallelism under `accelerate launch`, shown on the CPU with two processes (gloo):
the scripts run unchanged, the processes end with identical adapters, the effective batch
stays the recipe's, only the main process writes, and the checkpoints resume on a
different number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from phi2qlora.training import latest_complete_checkpoint

# `--multi_gpu` is accelerate's torchrun launcher; on a machine without GPUs the Trainer then
# needs `--use_cpu true` to set up gloo (accelerate's own `--cpu` starts one process only).
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
PROBE = str(ROOT / "tests" / "ddp_probe.py")


def launch(*args, processes=2, stop_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if stop_at:
        env["PROBE_STOP_AT"] = str(stop_at)
    command = [*LAUNCH, "--main_process_port", str(free_port())] if processes == 2 else [sys.executable]
    result = subprocess.run([*command, PROBE, *args, "--use_cpu", "true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_weights(out: Path):
    ranks = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for key in ranks[0]:
        torch.testing.assert_close(ranks[1][key], ranks[0][key], atol=0, rtol=0)
    return ranks[0]


def test_sft_on_two_processes(tiny_model_dir, sample_data_dir, tmp_path):
    """On the fast Phi-2 layers (phi2qlora/fast_training.py): two processes train as one
    process does at the same global batch (the same losses, step by step), and a run
    interrupted on 2 processes, resumed on 1, interrupted again and finished on 2 ends with
    one process's straight run's adapter. LoRA dropout off: each process count draws its own
    masks. Tolerances: losses 1e-4 relative (gloo's gradient average adds in another order);
    adapter weights 1e-4 absolute, 1% of one AdamW step at the tiny recipe's learning rate
    (1e-2), which turns those last-bit differences in near-zero gradients into visible ones."""

    def sft(out, processes=2, stop_at=None):
        return launch("sft", "--config", str(ROOT / "recipes" / "sft_tiny.yaml"), "--model_name_or_path",
                      str(tiny_model_dir), "--train_file", str(sample_data_dir / "train.jsonl"), "--eval_file", "",
                      "--output_dir", str(out), "--max_steps", "8", "--save_steps", "2",
                      "--preview_steps", "2", "--preview_max_new_tokens", "8", "--eval_strategy", "no",
                      "--logging_steps", "1", "--report_to", "none", "--lora_dropout", "0.0",
                      "--fast_training", "true", processes=processes, stop_at=stop_at)

    out = tmp_path / "sft"
    log = sft(out, stop_at=4)
    # The recipe's effective batch (8 x 1) is split, not doubled: 4 per process.
    assert "[batch] effective batch 8 = 4 per micro-batch x 1 accumulated x 2 processes" in log
    assert log.count("[batch]") == 1 and log.count("## Preview at step 2") == 1  # the main process only
    assert log.count("[train] fast Phi-2 layers") == 1
    trained = assert_same_weights(out)
    assert latest_complete_checkpoint(out).endswith("checkpoint-4")
    saved = load_file(out / "adapter_model.safetensors")
    for key, value in saved.items():  # the saved adapter is what the processes hold
        (name,) = [n for n in trained if n.replace(".default", "") == key]
        torch.testing.assert_close(trained[name], value.float())
    two = json.loads((out / "rank0_losses.json").read_text())

    # The checkpoint resumes on one process, and on two again.
    log = sft(out, processes=1, stop_at=6)
    assert "resuming from" in log and "checkpoint-4" in log and "global step 6" in log
    log = sft(out)
    assert "checkpoint-6" in log and "global step 8" in log
    resumed = assert_same_weights(out)

    straight = tmp_path / "straight"
    sft(straight, processes=1)
    one = json.loads((straight / "rank0_losses.json").read_text())
    assert len(one) == 8 and len(two) == 4
    assert [two[s] for s in two] == pytest.approx([one[s] for s in two], rel=1e-4)
    for key, value in load_file(straight / "rank0.safetensors").items():
        torch.testing.assert_close(resumed[key], value, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("fast_training", ["false", "true"])
def test_grpo_on_two_processes(tiny_model_dir, sample_data_dir, tmp_path, fast_training):
    sft = tmp_path / "sft"
    launch("sft", "--config", str(ROOT / "recipes" / "sft_tiny.yaml"), "--model_name_or_path", str(tiny_model_dir),
           "--train_file", str(sample_data_dir / "train.jsonl"), "--eval_file", "", "--output_dir", str(sft),
           "--max_steps", "2", "--save_strategy", "no", "--preview_steps", "0", "--eval_strategy", "no",
           "--report_to", "none", processes=1)
    out = tmp_path / "grpo"
    log = launch("grpo", "--config", str(ROOT / "recipes" / "grpo_tiny.yaml"), "--model_name_or_path",
                 str(tiny_model_dir), "--sft_adapter", str(sft), "--prompts_file",
                 str(sample_data_dir / "grpo_prompts.jsonl"), "--output_dir", str(out), "--max_steps", "2",
                 "--save_strategy", "no", "--preview_steps", "0", "--report_to", "none",
                 "--fast_training", fast_training)
    assert log.count("[batch]") == 1 and "x 2 processes" in log
    assert log.count("[train] fast Phi-2 layers" if fast_training == "true" else "[train] generic path") == 1
    assert_same_weights(out)
