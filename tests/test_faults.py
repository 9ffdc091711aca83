"""Faults a T4 run meets: preemption (SIGTERM), Ctrl-C, kill -9 at any moment (also in the
middle of writing a checkpoint), non-finite values, out of memory, and bad configuration.
The interruptions are real: subprocesses on the tiny model, signalled and killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, sft_args
from safetensors.torch import load_file
from transformers import TrainerCallback

import grpo_train
import sft_qlora
from phi2qlora.errors import InputError, RunFault
from phi2qlora.training import CHECKPOINT_FILES, COMPLETE_MARK, RUN_FILE, TrainingGuard, latest_complete_checkpoint

FAST = ["--preview_steps", "0", "--eval_strategy", "no", "--logging_steps", "1", "--report_to", "none"]


def sft_command(model_dir, data_dir, out, *extra, wrapper=()):
    return [sys.executable, "-u", *wrapper, str(ROOT / "sft_qlora.py"), "--config", str(ROOT / "recipes" / "sft_tiny.yaml"),
            "--model_name_or_path", str(model_dir), "--train_file", str(Path(data_dir) / "train.jsonl"),
            "--eval_file", "", "--output_dir", str(out), "--save_steps", "2", *FAST, *extra]


class Run:
    """A training subprocess whose output is collected to a file, so a test can wait for
    a line or a file, signal or kill it, and read everything it printed."""

    def __init__(self, command, log: Path):
        self.log = log
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 240):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"did not exit:\n{self.output()[-3000:]}") from None


def complete(out: Path, step: int) -> bool:
    return (out / f"checkpoint-{step}" / COMPLETE_MARK).is_file()


def test_a_run_survives_sigterm_kill9_mid_save_and_ctrl_c(tiny_model_dir, sample_data_dir, tmp_path):
    """One run, interrupted four ways, ends with the same adapter as an uninterrupted run."""
    out, total = tmp_path / "run", 20
    cmd = lambda *extra, **kw: sft_command(tiny_model_dir, sample_data_dir, out, "--max_steps", str(total),
                                           *extra, **kw)

    # 1. Preemption: SIGTERM -> checkpoint at the next step boundary, exit 143.
    run = Run(cmd(), tmp_path / "1.log")
    run.wait_for(lambda: complete(out, 2), "checkpoint-2")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run.output()[-2000:]
    stopped = latest_complete_checkpoint(out)
    assert f"[stop] SIGTERM: stopped at step {stopped.split('-')[-1]}, saved {stopped}" in run.output()
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter for an unfinished run

    # 2. kill -9 while trainer_state.json, the Trainer's last file, is half written.
    run = Run(cmd(wrapper=[str(ROOT / "tests" / "hang_in_save.py")]), tmp_path / "2.log")
    run.wait_for(lambda: "HALF-WRITTEN" in run.output(), "the half-written checkpoint")
    run.proc.kill()
    run.finish()
    half = Path(run.output().split("HALF-WRITTEN ")[1].split()[0]).parent
    assert all((half / f).is_file() for f in CHECKPOINT_FILES)  # every file there ...
    with pytest.raises(json.JSONDecodeError):
        json.loads((half / "trainer_state.json").read_text())  # ... one of them cut short
    assert latest_complete_checkpoint(out) == stopped

    # 3. Ctrl-C: resumes from the last complete checkpoint, says so, stops cleanly (130).
    run = Run(cmd(), tmp_path / "3.log")
    next_save = (int(stopped.split("-")[-1]) // 2 + 1) * 2  # saves come every 2 steps
    run.wait_for(lambda: complete(out, next_save), f"checkpoint-{next_save}")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 128 + signal.SIGINT, run.output()[-2000:]
    assert f"skipping {half}: incomplete" in run.output() and f"resuming from {stopped}" in run.output()
    assert "[stop] SIGINT" in run.output() and "Traceback" not in run.output()

    # 4. kill -9 at an arbitrary moment of training, then a run that finishes.
    run = Run(cmd(), tmp_path / "4.log")
    run.wait_for(lambda: "resuming from" in run.output(), "the resume")
    time.sleep(1.5)
    run.proc.kill()
    run.finish()
    run = Run(cmd(), tmp_path / "5.log")
    assert run.finish() == 0, run.output()[-3000:]

    # The same adapter as one uninterrupted run of the same recipe (CPU, seed 42).
    straight = tmp_path / "straight"
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, straight, "--max_steps", str(total),
                             "--save_strategy", "no", "--eval_file", "", *FAST))
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


class PoisonFrom(TrainerCallback):
    """From `step` on, the first layer's output is multiplied by inf: what an fp16 overflow does."""

    def __init__(self, step):
        self.step, self.hook = step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step and self.hook is None:
            layer = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
            self.hook = layer.register_forward_hook(lambda m, i, o: (o[0] * float("inf"), *o[1:])
                                                    if isinstance(o, tuple) else o * float("inf"))


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_model_dir, sample_data_dir, tmp_path):
    args = sft_args(tiny_model_dir, sample_data_dir, tmp_path, "--max_steps", "10", "--save_steps", "2", *FAST)
    with pytest.raises(RunFault, match=r"step 3: .*NaN or inf.*fp16 overflow.*learning rate") as fault:
        sft_qlora.main(*args, callbacks=[PoisonFrom(3)])
    assert fault.value.exit_status == 1
    assert "checkpoint-2" in str(fault.value)
    assert latest_complete_checkpoint(tmp_path).endswith("checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    saved = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.gpu
def test_on_a_gpu_a_weight_check_read_a_step_late_still_saves_nothing_after_the_fault(tiny_model_dir,
                                                                                      sample_data_dir, tmp_path):
    """On CUDA the guard reads a step's weight check at the next step's end (no GPU sync a
    step); step 3 neither saves nor logs, so its check is read at step 4, before step 4 saves."""
    import torch

    assert torch.cuda.is_available()
    args = sft_args(tiny_model_dir, sample_data_dir, tmp_path, "--max_steps", "10", "--save_steps", "2", *FAST,
                    "--logging_steps", "10")
    with pytest.raises(RunFault, match=r"step 3: .*NaN or inf"):
        sft_qlora.main(*args, callbacks=[PoisonFrom(3)])
    assert latest_complete_checkpoint(tmp_path).endswith("checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.gpu
def test_on_a_gpu_the_last_step_of_an_epoch_is_checked_before_the_epoch_save(tiny_model_dir, sample_data_dir,
                                                                             tmp_path):
    """save_strategy "epoch": an epoch of 4 steps whose last step turns the weights to inf.
    The Trainer saves an epoch after that step's end, where the GPU check is still unread;
    the epoch's end reads it first, so nothing is saved after the fault."""
    import torch

    assert torch.cuda.is_available()
    args = sft_args(tiny_model_dir, sample_data_dir, tmp_path, "--max_steps", "-1", "--num_train_epochs", "2",
                    "--max_train_examples", "8", "--per_device_train_batch_size", "2", "--save_strategy", "epoch",
                    *FAST, "--logging_steps", "10")
    with pytest.raises(RunFault, match=r"step 4: .*NaN or inf"):
        sft_qlora.main(*args, callbacks=[PoisonFrom(4)])
    assert latest_complete_checkpoint(tmp_path) is None
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "adapter_model.safetensors").exists()


def test_a_weight_check_left_unread_is_read_at_the_epoch_end_before_its_save(tmp_path):
    """With save_strategy "epoch" the Trainer decides the save after the last step's end, where
    a GPU check may still be unread: the epoch's end reads it, before the save."""
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    guard = TrainingGuard()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    guard._unread_check = (3, torch.tensor(True), None)
    guard.on_epoch_end(args, TrainerState(global_step=3), TrainerControl())
    assert guard._unread_check is None
    guard._unread_check = (5, torch.tensor(False), None)
    with pytest.raises(RunFault, match=r"step 5: a trainable weight became NaN or inf"):
        guard.on_epoch_end(args, TrainerState(global_step=5), TrainerControl())


def test_the_trainer_does_not_hide_a_non_finite_loss(tiny_model_dir, sample_data_dir, tmp_path):
    """The Trainer's `logging_nan_inf_filter` would log the mean of the earlier losses in place
    of a NaN one, which the guard then never sees (and it reads every micro-step's loss on
    the host): train_guarded turns it off."""
    seen = []

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append(args.logging_nan_inf_filter)

    args = sft_args(tiny_model_dir, sample_data_dir, tmp_path, "--max_steps", "1", "--save_strategy", "no", *FAST)
    assert args[1].logging_nan_inf_filter  # the Trainer's default
    sft_qlora.main(*args, callbacks=[Record()])
    assert seen == [False]


def test_a_nan_logged_loss_is_caught(tmp_path):
    """The loss check alone (a NaN loss need not reach the weights: fp16's scaler skips
    such steps, and training would go on doing nothing)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    guard = TrainingGuard()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState(global_step=7)
    guard.on_log(args, state, TrainerControl(), logs={"loss": 1.0, "grad_norm": 0.5})
    with pytest.raises(RunFault, match=r"step 7: the logged loss is nan"):
        guard.on_log(args, state, TrainerControl(), logs={"loss": float("nan")})


class RunOutOfMemory(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_values_to_lower(tiny_model_dir, sample_data_dir, tmp_path):
    args = sft_args(tiny_model_dir, sample_data_dir, tmp_path, "--max_steps", "4", *FAST)
    with pytest.raises(RunFault, match=r"out of GPU memory at step 1\. Lower, in this order: "
                                              r"per_device_train_batch_size \(now 8\), max_length \(now 256\)"):
        sft_qlora.main(*args, callbacks=[RunOutOfMemory()])


# --- bad configuration: a clear message, before any model is loaded --------------------
def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def recipe(tmp_path, *lines, base="sft_tiny.yaml") -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text((ROOT / "recipes" / base).read_text() + "\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("line, message", [
    ("learning_rat: 0.1", r"recipe\.yaml:\d+: unknown key 'learning_rat'; did you mean 'learning_rate'\?"),
    ("per_device_train_batch_size: 2.5", r"recipe\.yaml:\d+: 'per_device_train_batch_size' must be a whole number, got 2\.5"),
    ("gradient_checkpointing: maybe", r"'gradient_checkpointing' must be true or false"),
    ("lora_target_modules: q_proj", r"'lora_target_modules' must be a list or null"),
    ("lr_scheduler_type: cosin", r"recipe\.yaml:\d+: 'lr_scheduler_type' must be one of linear, cosine, .*got 'cosin'"),
    ("  oops: [", r"recipe\.yaml:\d+: not valid YAML"),
])
def test_bad_recipes_are_named_with_their_line(tmp_path, line, message):
    with pytest.raises(InputError, match=message):
        sft_qlora.parse_args(["--config", recipe(tmp_path, line)])


def test_bad_flags_and_missing_recipe(tmp_path):
    with pytest.raises(InputError, match=r"--learning_rate.*invalid float value: 'fast'"):
        sft_qlora.parse_args(["--learning_rate", "fast"])
    with pytest.raises(InputError, match="nope.yaml: recipe not found"):
        sft_qlora.parse_args(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(InputError, match="unknown key 'sft_adapter'"):  # GRPO's recipe given to SFT
        sft_qlora.parse_args(["--config", str(ROOT / "recipes" / "grpo_tiny.yaml")])


def test_the_cli_prints_one_line_and_exits_2_before_loading_a_model(tmp_path, sample_data_dir):
    # The model folder holds no weights: reaching the model would give a different error.
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "config.json").write_text("{}")
    cases = [
        ([str(ROOT / "sft_qlora.py"), "--config", recipe(tmp_path, "max_steps: ten")], "'max_steps' must be a whole number"),
        ([str(ROOT / "sft_qlora.py"), "--config", str(ROOT / "recipes" / "sft_tiny.yaml"), "--model_name_or_path",
          str(tmp_path / "no-model"), "--train_file", str(sample_data_dir / "grpo_prompts.jsonl")],
         "grpo_prompts.jsonl:1: field 'messages' must be a non-empty list"),
        ([str(ROOT / "grpo_train.py"), "--config", str(ROOT / "recipes" / "grpo_tiny.yaml"), "--model_name_or_path",
          str(tmp_path / "no-model"), "--sft_adapter", str(tmp_path / "no-adapter")], "no-adapter: no adapter there"),
    ]
    for argv, message in cases:
        result = run_cli(*argv)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_an_output_dir_that_holds_another_run_is_refused(tiny_model_dir, sample_data_dir, tmp_path):
    out = tmp_path / "sft"
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, out, "--max_steps", "2", "--save_steps", "2", *FAST))
    assert json.loads((out / RUN_FILE).read_text())["script"] == "sft_qlora.py"

    with pytest.raises(InputError, match=r"holds another run \(lora_r: 16 there, 8 now\)"):
        sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, out, "--max_steps", "4", "--lora_r", "8", *FAST))
    with pytest.raises(InputError, match=r"--resume is false; to start over, remove the directory"):
        sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, out, "--max_steps", "4", "--resume", "false", *FAST))
    with pytest.raises(InputError, match=r"holds another run \(.*script: 'sft_qlora.py' there, 'grpo_train.py' now"):
        grpo_train.main(*grpo_train.parse_args([
            "--config", str(ROOT / "recipes" / "grpo_tiny.yaml"), "--model_name_or_path", str(tiny_model_dir),
            "--sft_adapter", str(out), "--prompts_file", str(sample_data_dir / "grpo_prompts.jsonl"),
            "--output_dir", str(out), "--report_to", "none"]))
    stranger = tmp_path / "stranger"
    (stranger / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(InputError, match=r"holds checkpoints or an adapter of another run"):
        sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, stranger, "--max_steps", "2", *FAST))


def test_grpo_refuses_to_resume_on_a_retrained_sft_adapter(tiny_model_dir, sample_data_dir, tmp_path):
    """Same folder, new SFT weights: the GRPO checkpoints there started from another model."""
    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, sft, "--max_steps", "1", "--save_strategy", "no", *FAST))
    args = ["--config", str(ROOT / "recipes" / "grpo_tiny.yaml"), "--model_name_or_path", str(tiny_model_dir),
            "--sft_adapter", str(sft), "--prompts_file", str(sample_data_dir / "grpo_prompts.jsonl"),
            "--output_dir", str(grpo), "--report_to", "none", "--max_steps", "1", "--preview_steps", "0"]
    grpo_train.main(*grpo_train.parse_args(args))
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path / "sft2", "--max_steps", "2",
                             "--save_strategy", "no", *FAST))
    (sft / "adapter_model.safetensors").write_bytes((tmp_path / "sft2" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(InputError, match=r"holds another run \(sft_adapter_sha256: "):
        grpo_train.main(*grpo_train.parse_args(args))
