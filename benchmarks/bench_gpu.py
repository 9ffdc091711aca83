"""Speed and memory at Phi-2 scale, side by side, in one run (PERFORMANCE.md has the results).

Builds the randomly initialised Phi-2-shaped model (`make_phi2_shaped.py`) and seeded
synthetic data (oasst-like lengths: lognormal, median ~190 tokens, cut at 256), then runs
each job in its own process, so every peak is clean and a crash or OOM loses one job:

  sft      real (non-pad) tokens/s and peak memory: plain TRL with its defaults, the
           project's recipe through `sft_qlora.main`, and the optimisations tried;
  rollout  new tokens/s of plain `generate` at the GRPO shapes (32 x 128, 4-bit + LoRA,
           sampling in train mode with dropout off, as GRPOTrainer does it);
  grpo     wall time of one full GRPO step through `grpo_train.main` (T4 recipe);
  preview  the preview callback's seconds per preview and its share of training time at
           the recipe's cadence (measured inside the recipe's SFT job).
  export   export_model.py on the SFT adapter: merged, saved, checked (T4 mode: fp16);
  app      app.py's columns on the GPU: NF4 base, adapters taking turns, answers streamed;
  dpo      optimizer steps of `dpo_train.main` (T4 recipe) on synthetic pairs, with the
           SFT adapter's `ref` copy as reference or the reference precomputed.

Timing: a callback marks each optimizer step's end on the GPU's stream (a CUDA event,
read after the window: no wait between steps); the first `--warmup` steps are dropped;
tokens/s is the measured steps' tokens over their time (the per-step median and spread are
reported too). Tokens are the real (non-pad) ones of each training forward, summed on the
device and over processes, so

    accelerate launch --num_processes 2 benchmarks/bench_gpu.py --jobs "g16 ckpt,t4 sft recipe"

reports the tokens/s of both GPUs on rank 0 (SFT jobs only, run in-process one after another).

    python benchmarks/bench_gpu.py --jobs run2          # a set of jobs: bf16 (Ampere+), memory free
    python benchmarks/bench_gpu.py --t4 --jobs t4       # fp16, capped at 15 GiB, 30 steps each
    python benchmarks/bench_gpu.py --t4 --jobs dpo      # DPO's T4 recipe, both references, 30 steps each
    python benchmarks/bench_gpu.py --list               # the sets, the jobs and what each one changes

Prints a table at the end and writes `results.json` (and profiles) to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLE = ROOT / "data" / "sample" / "oasst1_sample.jsonl"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
T4_GIB = 15.0

# The seed recipe's values, spelled out, so these jobs mean the same whatever the recipe file says now:
# the generic layers too, since `--fast_training auto` picks the fast ones on a GPU (jobs on the
# fast layers add FAST_LAYERS after these; the last value given wins).
GENERIC_LAYERS = ["--fast_training", "false"]
SEED = ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "true",
        "--lora_dropout", "0.05", "--packing", "false", "--optim", "adamw_torch", "--load_in_4bit", "true",
        "--train_sampling_strategy", "random", *GENERIC_LAYERS]
FAST = [*SEED, "--lora_dropout", "0.0", "--packing", "true", "--optim", "adamw_torch_fused"]
# Run 2: batches of similar lengths instead of TRL's packing (which, with sdpa, flattens the
# whole micro-batch into one row and pays attention over all of it).
GROUPED = [*SEED, "--lora_dropout", "0.0", "--optim", "adamw_torch_fused", "--train_sampling_strategy", "group_by_length"]
# Run 3: the plan of PERFORMANCE.md's patch, 8 x 2 without checkpointing (dropout 0.05, grouped, fused AdamW).
PATCHED = [*SEED, "--optim", "adamw_torch_fused", "--train_sampling_strategy", "group_by_length",
           "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--gradient_checkpointing", "false"]


def grouped(batch: int, ckpt: bool, *more: str) -> list[str]:
    return [*GROUPED, "--per_device_train_batch_size", str(batch), "--gradient_checkpointing", str(ckpt).lower(), *more]


def sft_job(name, args=(), *, plain=False, gelu="new", why="", **extra):
    return dict(name=name, kind="sft", plain=plain, args=list(args), gelu=gelu, why=why, **extra)


# Each job changes one thing from the one above it (the "why" is the prediction's reason).
JOBS = {
    "run1": [
        sft_job("trl-defaults", plain=True, profile=True,
                why="plain SFTTrainer: batch 8, checkpointing, sdpa, NF4 + LoRA r16, loss on all tokens"),
        sft_job("recipe-seed", SEED, preview=True, why="sft_phi2_t4.yaml as the seed had it: batch 16, checkpointing"),
        sft_job("+gelu-tanh", SEED, gelu="tanh",
                why="Phi-2's gelu_new is ~8 elementwise kernels and saves ~7 tensors of 10,240 a token; "
                    "F.gelu(tanh) is one kernel, the same function"),
        sft_job("+dropout0", [*SEED, "--lora_dropout", "0.0"], gelu="tanh",
                why="LoRA dropout copies each adapter input (6 copies a layer); 0 makes it an identity"),
        sft_job("+packing", [*SEED, "--lora_dropout", "0.0", "--packing", "true"], gelu="tanh",
                why="padding-free rows of 256 (block-diagonal attention from position_ids): no pad tokens"),
        sft_job("+no-ckpt", [*SEED, "--lora_dropout", "0.0", "--packing", "true", "--gradient_checkpointing", "false"],
                gelu="tanh", why="no recomputed forward: a third fewer kernels and FLOPs, more memory"),
        sft_job("+fused-adamw", [*FAST, "--gradient_checkpointing", "false"], gelu="tanh", profile=True,
                why="one fused optimizer kernel instead of foreach lists"),
        sft_job("b32 ckpt", [*FAST, "--per_device_train_batch_size", "32"], gelu="tanh",
                why="twice the tokens a step amortise the per-step host cost; checkpointing keeps memory low"),
        sft_job("b64 ckpt", [*FAST, "--per_device_train_batch_size", "64"], gelu="tanh",
                why="four times the tokens a step, still checkpointed"),
        sft_job("b32 no-ckpt", [*FAST, "--per_device_train_batch_size", "32", "--gradient_checkpointing", "false"],
                gelu="tanh", why="memory free: a large step, no recompute"),
        sft_job("bf16-base b16", [*FAST, "--gradient_checkpointing", "false", "--load_in_4bit", "false"],
                gelu="tanh", why="16-bit base: no dequantisation (3 a linear layer a step), 5.6 GB of weights"),
        sft_job("bf16-base b32", [*FAST, "--per_device_train_batch_size", "32", "--gradient_checkpointing", "false",
                                  "--load_in_4bit", "false"], gelu="tanh", why="memory free, 16-bit base"),
    ],
    "run2": [
        sft_job("trl-defaults 2", plain=True, why="again, more steps, no profiler"),
        sft_job("g16 ckpt", grouped(16, True), gelu="tanh", profile=True,
                why="lengths grouped: ~1.05 padded tokens a real one instead of ~1.4; dropout 0, fused AdamW"),
        sft_job("g16 ckpt drop.05", grouped(16, True, "--lora_dropout", "0.05"), gelu="tanh",
                why="the dropout's cost alone, with more steps than run 1"),
        sft_job("g32 ckpt", grouped(32, True), gelu="tanh", why="twice the tokens a step"),
        sft_job("g64 ckpt", grouped(64, True), gelu="tanh", why="four times the tokens a step"),
        sft_job("g8 no-ckpt", grouped(8, False), gelu="tanh", why="no recompute, half the rows"),
        sft_job("g16 no-ckpt", grouped(16, False), gelu="tanh", why="no recompute"),
        sft_job("g16 no-ckpt d.05", grouped(16, False, "--lora_dropout", "0.05"), gelu="tanh",
                why="what the dropout copies cost in memory without checkpointing"),
        sft_job("g32 no-ckpt", grouped(32, False), gelu="tanh", why="memory free"),
        sft_job("bf16 g32 no-ckpt", grouped(32, False, "--load_in_4bit", "false"), gelu="tanh",
                why="memory free, 16-bit base: no dequantisation"),
        sft_job("bf16 g16 ckpt", grouped(16, True, "--load_in_4bit", "false"), gelu="tanh",
                why="16-bit base within a T4's memory"),
        dict(name="rollout", kind="rollout", batch=32, new_tokens=128, repeats=2,
             why="plain generate, 4-bit + LoRA, batch 32 x 128 new tokens"),
        dict(name="grpo-step", kind="grpo", steps=3, warmup=1, args=GENERIC_LAYERS,
             why="one GRPO step, T4 recipe through grpo_train.main"),
    ],
    # Rollouts: plain generate against rollouts.py (merged weights, CUDA-graph decoder).
    "rollouts": [
        dict(name="rollout", kind="rollout", batch=32, new_tokens=128, repeats=3,
             why="plain generate, 4-bit + LoRA, batch 32 x 128 new tokens"),
        dict(name="rollout fast", kind="rollout", fast=True, batch=32, new_tokens=128, repeats=5,
             why="rollouts.generate: the current weights merged to 16-bit, one CUDA graph a token"),
        dict(name="grpo-step plain", kind="grpo", steps=3, warmup=1,
             args=["--fast_rollouts", "false", *GENERIC_LAYERS], why="the T4 recipe with TRL's generate"),
        dict(name="grpo-step fast", kind="grpo", steps=6, warmup=1, args=GENERIC_LAYERS,
             why="the T4 recipe with fast rollouts"),
    ],
    # Run 3, memory free: the recipe as it stands, and cuDNN's attention switched off (run 2's
    # profile: ~2 ms of host time per cuDNN attention call, and a new plan for each new length).
    "run3": [
        sft_job("recipe g8x2", PATCHED, gelu="tanh", why="8 x 2 without checkpointing, gelu patch applied"),
        sft_job("recipe g8x2 -cudnn", PATCHED, gelu="tanh", no_cudnn=True, profile=True,
                why="the same, sdpa without cuDNN (flash / memory-efficient kernels)"),
        sft_job("g64 ckpt -cudnn", grouped(64, True), gelu="tanh", no_cudnn=True, why="best within 14 GiB in run 2"),
        sft_job("g16 no-ckpt -cudnn", grouped(16, False), gelu="tanh", no_cudnn=True, why="effective batch 16, one step"),
        sft_job("bf16 g32 no-ckpt -cudnn", grouped(32, False, "--load_in_4bit", "false"), gelu="tanh", no_cudnn=True,
                why="best with memory free in run 2"),
    ],
    # The T4 recipes as they stand, in fp16 under the 15 GiB cap (run with --t4).
    "t4": [
        sft_job("t4 sft recipe", [], preview=True, steps=30, warmup=5, recipe_as_is=True,
                why="recipes/sft_phi2_t4.yaml as it stands, fp16, 15 GiB cap"),
        sft_job("t4 sft 8x2 patched", [*PATCHED[-6:], *GENERIC_LAYERS], preview=True, steps=30, warmup=5,
                recipe_as_is=True, gelu="tanh",
                why="the recipe at 8 x 2 without checkpointing, gelu patch applied (run 3 ran this as 't4 sft recipe')"),
        dict(name="t4 grpo recipe", kind="grpo", steps=30, warmup=1, why="recipes/grpo_phi2_t4.yaml, fp16, 15 GiB cap"),
        dict(name="t4 rollout fast", kind="rollout", fast=True, batch=32, new_tokens=160, repeats=3,
             why="fast rollouts at the GRPO recipe's shape, fp16, 15 GiB cap"),
        dict(name="t4 export", kind="export", check_tokens=32,
             why="export_model.py: NF4 base in fp16, adapter merged, saved in fp16, checked against the trained model"),
        dict(name="t4 app", kind="app", new_tokens=64,
             why="app.py's columns on a GPU: NF4 base, two adapters taking turns, answers streamed in fp16"),
    ],
}
# The fast Phi-2 training layers (phi2qlora/fast_training.py) against plain TRL and the generic
# path, in one run; "match" jobs log every step's loss without dropout, compared in the table.
FAST_LAYERS = ["--fast_training", "true"]
MATCH = ["--lora_dropout", "0.0", "--logging_steps", "1"]
CEILINGS = dict(name="ceilings", kind="ceilings", why="this GPU's matrix FLOP/s and copy bytes/s, for the T4 projection")
JOBS["fast"] = [
    CEILINGS,
    sft_job("trl-defaults 3", plain=True, why="plain SFTTrainer, batch 8, checkpointing: the baseline of this run"),
    sft_job("g64 ckpt generic", grouped(64, True), gelu="tanh", profile=True,
            why="the generic path's best within 14 GiB (run 3's #13)"),
    sft_job("g64 ckpt fast", grouped(64, True, *FAST_LAYERS), gelu="tanh", profile=True,
            why="the fast layers: a few dozen kernels a layer instead of hundreds, no fp32 casts between "
                "products: ~2x the generic path (its GPU time ~47 us a token against ~73)"),
    sft_job("g64 ckpt compile", grouped(64, True, "--fast_training", "compile"), gelu="tanh", warmup=6, profile=True,
            why="LayerNorm and the residual sum under torch.compile (dynamic shapes), where Inductor fuses the "
                "fp32 stream's casts: ~15 ms less GPU a step, ~10 ms more host; 6 steps of warm-up leave the "
                "compiling out of the timed ones"),
    sft_job("g64 ckpt compile all", grouped(64, True, "--fast_training", "compile"), gelu="tanh", warmup=6,
            compiled_ops=("norm", "heads", "attend", "act", "residual"),
            why="all five ops between the products compiled (the mode until 2026-12-07): bmm, sdpa and gelu "
                "gain nothing, each compiled call costs host time"),
    sft_job("g64 fast no-ckpt", grouped(64, False, *FAST_LAYERS), gelu="tanh",
            why="memory free: no recompute, a third fewer FLOPs"),
    sft_job("g80 fast no-ckpt", grouped(80, False, *FAST_LAYERS), gelu="tanh",
            why="memory free on an H100: a quarter more rows a step, so the short-length steps carry more "
                "tokens (~64 GiB at 80 x 256)"),
    sft_job("bf16 g64 fast no-ckpt", grouped(64, False, "--load_in_4bit", "false", *FAST_LAYERS), gelu="tanh",
            why="memory free, 16-bit base: no dequantisation"),
    dict(name="grpo-step fast", kind="grpo", steps=6, warmup=1, args=GENERIC_LAYERS,
         why="the T4 recipe with fast rollouts, generic layers"),
    dict(name="grpo-step fast layers", kind="grpo", steps=6, warmup=1, args=FAST_LAYERS,
         why="the same with the fast layers: the policy's forward and backward ~2x faster"),
    sft_job("match generic", grouped(16, True, *MATCH), gelu="tanh", steps=20, warmup=0, no_dropout=True,
            why="20 optimizer steps' losses, no dropout, generic layers"),
    sft_job("match fast", grouped(16, True, *MATCH, *FAST_LAYERS), gelu="tanh", steps=20, warmup=0, no_dropout=True,
            compare_to="match generic", why="the same steps on the fast layers"),
]
JOBS["t4 fast"] = [
    CEILINGS,
    sft_job("t4 sft recipe generic", ["--fast_training", "false"], preview=True, steps=30, warmup=5,
            recipe_as_is=True, profile=True, why="recipes/sft_phi2_t4.yaml, generic layers, fp16, 15 GiB cap"),
    sft_job("t4 sft recipe fast", FAST_LAYERS, preview=True, steps=30, warmup=5, recipe_as_is=True, profile=True,
            why="the same on the fast layers"),
    sft_job("t4 sft recipe compile", ["--fast_training", "compile"], steps=30, warmup=6, recipe_as_is=True,
            profile=True,
            why="the same with LayerNorm and the residual sum compiled: a T4-length run pays the compile once"),
    sft_job("t4 sft 16x1 generic", ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
                                    "--gradient_checkpointing", "true", "--fast_training", "false"],
            preview=True, steps=30, warmup=5, recipe_as_is=True, profile=True,
            why="the T4 recipe's plan before the fast layers, 16 x 1 with checkpointing, generic layers"),
    sft_job("t4 sft 8x2 fast", [*PATCHED[-6:], *FAST_LAYERS], steps=20, warmup=5, recipe_as_is=True, profile=True,
            gelu="tanh", why="the fast layers at 8 x 2 without checkpointing: no recomputed forward, a third fewer "
                             "FLOPs (a T4 is arithmetic-bound), if the memory fits 15 GiB"),
    sft_job("t4 sft 8x2 generic", [*PATCHED[-6:], "--fast_training", "false"], steps=20, warmup=5,
            recipe_as_is=True, profile=True, gelu="tanh", why="the generic layers at 8 x 2 without checkpointing"),
    dict(name="t4 grpo recipe fast", kind="grpo", steps=30, warmup=1, args=FAST_LAYERS,
         why="recipes/grpo_phi2_t4.yaml on the fast layers, fp16, 15 GiB cap"),
    sft_job("t4 match generic", grouped(16, True, *MATCH, "--fast_training", "false"), gelu="tanh", steps=20,
            warmup=0, no_dropout=True, why="20 steps' losses in fp16, no dropout, generic layers"),
    sft_job("t4 match fast", grouped(16, True, *MATCH, *FAST_LAYERS), gelu="tanh", steps=20, warmup=0,
            no_dropout=True, compare_to="t4 match generic", why="the same steps on the fast layers, fp16"),
]
# GRPO's step in bf16 on the fast layers, where its time goes, and the micro-batch: 8
# completions a forward (the T4 recipe until 2026-12-06) left an H100 waiting on the host; the
# recipe now takes all 32 in one forward and backward.
MICRO8 = ["--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "4"]
MICRO16 = ["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "2"]
JOBS["grpo"] = [
    dict(name="grpo fast layers", kind="grpo", steps=8, warmup=2, args=FAST_LAYERS,
         why="the T4 recipe (32 x 1 completions, ckpt) on the fast layers and fast rollouts, bf16"),
    dict(name="grpo phases", kind="grpo", steps=4, warmup=2, args=FAST_LAYERS, phases=True,
         why="the same, its time by phase"),
    dict(name="grpo mb8", kind="grpo", steps=8, warmup=2, args=[*FAST_LAYERS, *MICRO8],
         why="8 x 4 completions (the recipe until 2026-12-06): four forward/backward calls a step"),
    dict(name="grpo mb8 phases", kind="grpo", steps=4, warmup=2, args=[*FAST_LAYERS, *MICRO8], phases=True,
         why="8 x 4, its time by phase"),
    dict(name="grpo mb16", kind="grpo", steps=8, warmup=2, args=[*FAST_LAYERS, *MICRO16],
         why="16 x 2 completions: two forward/backward calls"),
    dict(name="grpo no-ckpt", kind="grpo", steps=8, warmup=2,
         args=[*FAST_LAYERS, "--gradient_checkpointing", "false"],
         why="32 x 1 without the recomputed forward, if memory allows"),
    dict(name="t4 grpo mb8 fast", kind="grpo", steps=10, warmup=2, args=[*FAST_LAYERS, *MICRO8],
         why="8 x 4 in T4 mode (--t4), against the recipe's 32 x 1"),
]
ALL_JOBS = {j["name"]: j for group in JOBS.values() for j in group}


# ---------------------------------------------------------------------------------------
# Synthetic data, seeded: oasst-like lengths, words from the bundled sample.
# ---------------------------------------------------------------------------------------
def sample_words() -> list[str]:
    words = []
    with open(SAMPLE, encoding="utf-8") as f:
        for line in f:
            words += re.findall(r"[A-Za-z']+|[.,?!]", json.loads(line)["text"])
    return words


def tokens_per_word(tokenizer, words, rng) -> float:
    probe = [rng.choice(words) for _ in range(2000)]
    return len(tokenizer(" ".join(probe), add_special_tokens=False)["input_ids"]) / len(probe)


def synth_conversations(tokenizer, n: int, seed: int = 0, median: float = 190, sigma: float = 0.5) -> list[dict]:
    """One user and one assistant turn, total tokens lognormal (median `median`); a quarter
    of them in the question. Lengths over 256 are left long: the trainer truncates them."""
    rng, words = random.Random(seed), sample_words()
    ratio = tokens_per_word(tokenizer, words, rng)

    def text(tokens):
        return " ".join(rng.choice(words) for _ in range(max(1, round(tokens / ratio))))

    rows = []
    for _ in range(n):
        total = rng.lognormvariate(math.log(median), sigma)
        rows.append({"messages": [{"role": "user", "content": text(0.25 * total - 4)},
                                  {"role": "assistant", "content": text(0.75 * total - 4)}]})
    return rows


def synth_prompts(n: int, seed: int = 1) -> list[dict]:
    rng, words = random.Random(seed), sample_words()
    limits = [None, 20, 50, 100]
    return [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) + "?",
             "word_limit": rng.choice(limits)} for _ in range(n)]


def write_jsonl(path: Path, rows) -> Path:
    from phi2qlora.files import write_jsonl_atomic

    write_jsonl_atomic(path, rows)
    return path


def model_variant(model_dir: Path, hidden_act: str, **config) -> Path:
    """The same weights with another activation (and any other `config` values) in
    config.json (files linked, not copied)."""
    if hidden_act == "gelu_new" and not config:
        return model_dir
    out = model_dir.parent / "-".join([model_dir.name, hidden_act, *(f"{k}{v}" for k, v in sorted(config.items()))])
    out.mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    values = json.loads((model_dir / "config.json").read_text())
    values.update(hidden_act=hidden_act, **config)
    (out / "config.json").write_text(json.dumps(values, indent=2))
    return out


# ---------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------
def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_timer(warmup: int, measure: int | None = None, profile_steps: int = 0, profile_out: Path | None = None,
               count_tokens: bool = True, check_token_count: bool = False, cprofile_out: Path | None = None):
    """A TrainerCallback timing each optimizer step end to end, with the real (non-pad) tokens
    its training forwards carried. After the measured steps it can profile a few more.

    On a GPU each step's end is an event on the stream, read after the window, not a wait:
    waiting would idle the GPU while the host prepares the next step, a cost a run without
    the timer does not pay (with such waits the fast layers' step on an H200 left the GPU
    idle 87 ms of 575, much of it between steps). For the same reason the tokens are summed
    on the device by a hook on the model's training forwards, not by the Trainer
    (`include_num_input_tokens_seen` reads them on the host at each micro-step).
    `check_token_count` turns the Trainer's count on too, to compare (`trainer_tokens`).
    `cprofile_out`: the timed steps' Python under cProfile (its overhead slows them), the
    functions with the most time to that file: where the host's time goes when the GPU waits.
    GRPO's batches hold no `input_ids`: there `count_tokens=False` and the timer keeps times
    alone."""
    import torch
    from transformers import TrainerCallback

    def now():
        if not torch.cuda.is_available():
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(a, b) -> float:
        return b - a if isinstance(a, float) else a.elapsed_time(b) / 1e3

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.trainer_tokens, self.profile = [], [], [], None
            self.marks, self.seen, self.hook = [], None, None
            self.graphs_before_window, self.python = 0, None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if check_token_count:  # the Trainer's count, summed over processes (a GPU sync a micro-step)
                args.include_num_input_tokens_seen = "non_padding"
            self.seen = torch.zeros((), dtype=torch.int64, device=args.device)
            if count_tokens and model is not None:
                self.hook = model.register_forward_pre_hook(self.count, with_kwargs=True)
            sync()
            self.marks = [self.mark(state)]

        def count(self, module, args, kwargs):
            if not (module.training and torch.is_grad_enabled()):
                return
            if (mask := kwargs.get("attention_mask")) is not None:
                self.seen += mask.sum()
            elif (ids := kwargs.get("input_ids")) is not None:  # padding-free (packed) rows: every token is real
                self.seen += ids.numel()

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            in_window = step > warmup and (measure is None or step <= warmup + measure)
            window_ends = measure is not None and step == warmup + measure
            if in_window and self.profile is None:
                self.marks.append(self.mark(state))
            if self.python is not None and window_ends:
                write_cprofile(self.python, cprofile_out)
                self.python = None
            if profile_steps and window_ends:
                self.read_marks()
                self.profile, self.profile_seen = start_profiler(), self.summed(self.seen).item()
            elif self.profile is not None and step == warmup + measure + profile_steps:
                sync()
                self.profile.stop()
                try:
                    write_profile(self.profile, profile_steps, profile_out, tokens=self.summed(self.seen).item()
                                  - self.profile_seen)
                except Exception as e:  # noqa: BLE001 - a profile is a bonus; keep the timings
                    print(f"[bench] profile summary failed: {e!r}", flush=True)
                self.profile = False
            if step == warmup:  # the window starts here
                self.marks = [self.mark(state)]
                self.graphs_before_window = compile_stats()[0]
                if cprofile_out is not None:
                    import cProfile

                    self.python = cProfile.Profile()  # Python 3.12+: every thread's calls (the backward's too)
                    self.python.enable()

        def mark(self, state):
            """Now: on the GPU's stream (or the clock), the tokens counted, the Trainer's count."""
            return now(), self.seen.clone(), state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kwargs):
            self.read_marks()
            if self.hook is not None:
                self.hook.remove()

        def summed(self, tensor):
            """`tensor` summed over processes (each one counts its own forwards)."""
            import torch.distributed as dist

            tensor = tensor.clone()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(tensor)
            return tensor

        def read_marks(self):
            sync()
            marks, self.marks = self.marks, self.marks[-1:]
            if len(marks) < 2:
                return
            seen = self.summed(torch.stack([m[1] for m in marks])).tolist()
            for (a, _, trainer_a), (b, _, trainer_b), s_a, s_b in zip(marks, marks[1:], seen, seen[1:]):
                self.times.append(seconds(a, b))
                if count_tokens:
                    self.tokens.append(s_b - s_a)
                if check_token_count:
                    self.trainer_tokens.append(trainer_b - trainer_a)

    return StepTimer()


def write_cprofile(python, out: Path) -> None:
    import io
    import pstats

    python.disable()
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(python, stream=text).sort_stats(key).print_stats(40)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.getvalue())


def start_profiler():
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


def write_profile(prof, steps: int, out: Path | None, tokens: int | None = None) -> dict:
    """Kernels a step, GPU-busy time a step (all, and by kind), the real tokens a profiled
    step carried, and the top CPU and GPU entries."""
    from torch.autograd import DeviceType

    averages = prof.key_averages()

    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    by_kind = {"products": 0.0, "other": 0.0}
    for e in kernels:
        by_kind[kernel_kind(e.key)] += device_us(e) / steps / 1e3
    summary = {
        "steps": steps,
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "gpu_busy_ms_per_step": sum(device_us(e) for e in kernels) / steps / 1e3,
        "gpu_ms_by_kind": by_kind,
        "tokens_per_step": tokens / steps if tokens else None,
        "aten_ops_per_step": sum(e.count for e in averages if e.key.startswith("aten::")) / steps,
        "top_gpu": [(e.key[:90], e.count // steps, round(device_us(e) / steps / 1e3, 2))
                    for e in sorted(kernels, key=device_us, reverse=True)[:15]],
        "top_cpu": [(e.key[:90], e.count // steps, round(e.self_cpu_time_total / steps / 1e3, 2))
                    for e in sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]],
    }
    try:
        events = prof.events()
        idle = idle_by_host_op([(e.time_range.start, e.time_range.end) for e in events
                                if e.device_type == DeviceType.CUDA],
                               [(e.time_range.start, e.time_range.end, e.name) for e in events
                                if e.device_type == DeviceType.CPU and e.cpu_parent is None])
        summary["gpu_idle_ms_per_step"] = idle.pop("(all)") / steps / 1e3
        summary["gpu_idle_by_host_op"] = [(name, round(us / steps / 1e3, 2)) for name, us in list(idle.items())[:10]]
    except Exception as e:  # noqa: BLE001 - the gaps are a bonus
        print(f"[bench] idle analysis failed: {e!r}", flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
    return summary


def idle_by_host_op(kernels: list[tuple[float, float]], host_ops: list[tuple[float, float, str]],
                    min_gap_us: float = 50.0) -> dict[str, float]:
    """Where the host set the pace: the GPU's idle gaps between kernels (at least `min_gap_us`),
    each charged to the outermost host ops it overlapped, by their overlap (the rest to
    Python between ops). Microseconds by op name, largest first, the total under "(all)"."""
    from bisect import bisect_left
    from collections import defaultdict
    from itertools import accumulate

    gaps, end = [], None
    for start, stop in sorted(kernels):
        if end is not None and start - end >= min_gap_us:
            gaps.append((end, start))
        end = stop if end is None else max(end, stop)
    by_name = defaultdict(float)
    ops = sorted(host_ops)
    starts = [op[0] for op in ops]
    reach = list(accumulate((op[1] for op in ops), max))  # the latest end of any op up to here
    for gap_start, gap_end in gaps:
        covered = 0.0
        i = bisect_left(starts, gap_end) - 1  # ops that begin before the gap ends, latest first,
        while i >= 0 and reach[i] > gap_start:  # until none up to here reaches into the gap
            start, stop, name = ops[i]
            i -= 1
            overlap = min(stop, gap_end) - max(start, gap_start)
            if overlap > 0:
                name = name.replace("autograd::engine::evaluate_function: ", "backward: ").split("#")[0]
                by_name[name] += overlap
                covered += overlap
        by_name["(Python between ops)"] += max(0.0, (gap_end - gap_start) - covered)
    ranked = dict(sorted(by_name.items(), key=lambda item: -item[1]))
    return {"(all)": sum(stop - start for start, stop in gaps), **ranked}


# Kernels whose time goes to arithmetic (matrix products, attention): the T4 projection scales
# them by FLOP/s; every other kernel (elementwise, casts, copies, reductions, dequantisation)
# by memory bandwidth.
PRODUCT_KERNELS = ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "matmul", "fmha", "flash", "attention",
                   "sdpa", "wgmma")
# A T4 as the projection sees it: fp16 tensor-core products sustained at ~25 TFLOP/s (of 65
# peak), memory at ~320 GB/s (the datasheet), the estimates the issue and PERFORMANCE.md use.
T4_FLOPS, T4_BYTES_S = 25e12, 320e9


def kernel_kind(name: str) -> str:
    return "products" if any(k in name.lower() for k in PRODUCT_KERNELS) else "other"


def t4_projection(result: dict, ceilings: dict) -> dict:
    """A T4's step time for a job profiled on this GPU: its product kernels' time scaled by
    this GPU's measured matrix rate over a T4's, the rest by the bandwidths' ratio. Host time
    is left out: a T4 is GPU-bound (~4 s a step for the T4 recipe)."""
    kinds, tokens = result.get("gpu_ms_by_kind"), result.get("profile_tokens_per_step")
    if not kinds or not ceilings or not tokens:
        return {}
    step_ms = (kinds["products"] * ceilings["matmul_flops"] / T4_FLOPS
               + kinds["other"] * ceilings["copy_bytes_s"] / T4_BYTES_S)
    return {"t4_step_s": step_ms / 1e3, "t4_tok_s": tokens / (step_ms / 1e3),
            "gpu_us_per_token": (kinds["products"] + kinds["other"]) * 1e3 / tokens,
            "products_share": kinds["products"] / (kinds["products"] + kinds["other"])}


def run_ceilings(job: dict, ctx: dict) -> dict:
    """This GPU's two ceilings in the run's dtype (METHOD: measure them, don't take the
    datasheet's): a large matrix product's FLOP/s and a large device copy's bytes/s (read +
    written), each the median of 20 timed repeats after warm-up."""
    import torch

    dtype = torch.float16 if ctx["t4"] else torch.bfloat16
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    src = torch.randn(2**28, device="cuda", dtype=dtype)  # 512 MiB
    dst = torch.empty_like(src)

    def median_s(fn):
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    return {"matmul_flops": 2 * n**3 / median_s(lambda: a @ b),
            "copy_bytes_s": 2 * src.numel() * src.element_size() / median_s(lambda: dst.copy_(src)),
            "dtype": str(dtype).removeprefix("torch.")}


def compare_losses(results: list[dict], jobs: list[dict]) -> None:
    """For each job with `compare_to`: its logged losses against the other job's, step by step."""
    by_name = {r["name"]: r for r in results}
    for job in jobs:
        other, mine = by_name.get(job.get("compare_to")), by_name.get(job["name"])
        if not (other and mine and other.get("losses") and mine.get("losses")):
            continue
        pairs = list(zip(mine["losses"], other["losses"]))
        mine["loss_match"] = {"vs": other["name"], "steps": len(pairs),
                              "max_abs": max(abs(a - b) for a, b in pairs),
                              "max_rel": max(abs(a - b) / abs(b) for a, b in pairs)}


def summarize(times: list[float], tokens: list[int] | None = None, trainer_tokens: list[int] | None = None) -> dict:
    if not times:
        return {}
    out = {"steps_timed": len(times), "step_s": statistics.median(times), "step_s_min": min(times),
           "step_s_max": max(times), "times": [round(t, 4) for t in times], "tokens": tokens}
    if trainer_tokens:
        out["trainer_tokens"] = trainer_tokens
    if tokens and sum(tokens):
        per_step = [k / t for k, t in zip(tokens, times)]
        out.update(tok_s=sum(tokens) / sum(times), tok_s_median=statistics.median(per_step),
                   tok_s_min=min(per_step), tok_s_max=max(per_step), tokens_per_step=sum(tokens) / len(tokens))
    return out


def layers_name(model) -> str:
    """Which decoder layers trained: the table says it, so a job can't measure the other path
    unnoticed (`--fast_training auto` picks the fast layers on a GPU)."""
    from phi2qlora.fast_training import is_installed

    return "fast" if is_installed(model) else "generic"


def memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def finite_logs(log_history) -> dict:
    values = [h[k] for h in log_history for k in ("loss", "grad_norm") if k in h]
    losses = [h["loss"] for h in log_history if "loss" in h]
    return {"finite": all(math.isfinite(v) for v in values), "losses": losses}


def activation_name(model) -> str:
    for module in model.modules():
        if hasattr(module, "activation_fn") and hasattr(module, "fc1"):
            return type(module.activation_fn).__name__
    return "?"


# ---------------------------------------------------------------------------------------
# Jobs. Each returns a dict of figures; `ctx` holds the paths and the run's settings.
# ---------------------------------------------------------------------------------------
def dtype_name(ctx) -> str:
    return "float16" if ctx["t4"] else ctx.get("dtype", "auto")


def run_sft(job: dict, ctx: dict) -> dict:
    steps, warmup = job.get("steps", ctx["steps"]), job.get("warmup", ctx["warmup"])
    profile = ctx["profile_steps"] if job.get("profile") else 0
    measure = steps
    out_dir = Path(ctx["work"]) / slug(job["name"])
    python_out = Path(ctx["out"]) / f"cprofile_{slug(job['name'])}.txt" if ctx.get("cprofile") else None
    timer = step_timer(warmup, measure, profile, Path(ctx["out"]) / f"profile_{slug(job['name'])}.json",
                       check_token_count=ctx.get("check_token_count", False), cprofile_out=python_out)
    total = warmup + measure + profile
    # Loss-match jobs run without dropout (Phi-2's resid_pdrop too): the paths draw their CUDA
    # masks differently, so only dropout-free losses can be held to a tolerance.
    model_dir = model_variant(Path(ctx["model_dir"]), "gelu_pytorch_tanh" if job["gelu"] == "tanh" else "gelu_new",
                              **({"resid_pdrop": 0.0} if job.get("no_dropout") else {}))
    if local_rank() == 0:
        shutil.rmtree(out_dir, ignore_errors=True)  # no resume, no previews left from an earlier run
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    start = time.perf_counter()
    graphs, compile_s = compile_stats()
    if job["plain"]:
        trainer = plain_trl_sft(model_dir, ctx, total, out_dir, timer)
    else:
        with compiled_ops(job.get("compiled_ops")):
            trainer = recipe_sft(model_dir, ctx, job, total, out_dir, timer)
    if (now := compile_stats())[0] > graphs:  # torch.compile ran: its time, and whether new lengths recompiled
        from torch._dynamo.utils import counters

        extra = dict(graphs_compiled=now[0] - graphs, compile_s=round(now[1] - compile_s, 1),
                     graphs_compiled_timed=now[0] - timer.graphs_before_window,
                     dynamo_counters={k: dict(v) for k, v in counters.items()
                                      if k in ("frames", "graph_break", "recompiles")})
    else:
        extra = {}
    result = {**extra, **summarize(timer.times, timer.tokens, timer.trainer_tokens), **memory(),
              **finite_logs(trainer.state.log_history),
              "wall_s": time.perf_counter() - start, "activation": activation_name(trainer.model),
              "batch": trainer.args.per_device_train_batch_size, "grad_ckpt": trainer.args.gradient_checkpointing,
              "packing": bool(getattr(trainer.args, "packing", False)), "processes": trainer.args.world_size,
              "layers": layers_name(trainer.model)}
    if job.get("preview"):
        result.update(preview_share(trainer, out_dir, result.get("step_s"), ctx["sft_recipe"]))
    if profile and (Path(ctx["out"]) / f"profile_{slug(job['name'])}.json").is_file():
        prof = json.loads((Path(ctx["out"]) / f"profile_{slug(job['name'])}.json").read_text())
        result.update(kernels_per_step=prof["kernels_per_step"], gpu_busy_ms_per_step=prof["gpu_busy_ms_per_step"],
                      gpu_ms_by_kind=prof["gpu_ms_by_kind"], profile_tokens_per_step=prof["tokens_per_step"],
                      **{k: prof[k] for k in ("gpu_idle_ms_per_step", "gpu_idle_by_host_op") if k in prof})
    return result


def compile_stats() -> tuple[int, float]:
    """Graphs torch.compile has built in this process, and its seconds (forward graphs at
    their first call, backward graphs at their first backward)."""
    if "torch._dynamo" not in sys.modules:
        return 0, 0.0
    from torch._dynamo.utils import compilation_time_metrics, counters

    keys = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")
    return counters["stats"]["unique_graphs"], sum(sum(compilation_time_metrics.get(k, [])) for k in keys)


@contextlib.contextmanager
def compiled_ops(names):
    """`--fast_training compile` with these ops under torch.compile (None: the module's own)."""
    from phi2qlora import fast_training as ft

    if names is None:
        yield
        return
    saved, ft._COMPILED_OPS = ft._COMPILED_OPS, ft._LazyCompiledOps(tuple(names))
    try:
        yield
    finally:
        ft._COMPILED_OPS = saved


def plain_trl_sft(model_dir: Path, ctx: dict, steps: int, out_dir: Path, timer):
    """SFTTrainer as its docs show it: defaults but for the length (256) and the 4-bit base."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from phi2qlora.model import load_chat_tokenizer, pick_dtype, upcast_trainable_params

    dtype = pick_dtype(dtype_name(ctx))
    tokenizer = load_chat_tokenizer(str(model_dir))  # the same chat-rendered texts as the recipe
    device = f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa", device_map={"": device},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=dtype))
    rows = [json.loads(line) for line in open(ctx["train_file"], encoding="utf-8")]
    config = dict(output_dir=str(out_dir), max_length=256, max_steps=steps, report_to="none", save_strategy="no",
                  bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not torch.cuda.is_available(),
                  logging_steps=5)
    args = SFTConfig(**{**config, **ctx.get("plain_overrides", {})})
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS,
                                                task_type="CAUSAL_LM"), callbacks=[timer])
    if dtype == torch.float16:
        upcast_trainable_params(trainer.model)  # plain TRL 1.16 casts them to bf16: fp16 AMP then fails
    trainer.train()
    return trainer


def recipe_sft(model_dir: Path, ctx: dict, job: dict, steps: int, out_dir: Path, timer):
    """The project's path: `sft_qlora.main` with the recipe file and the job's overrides."""
    import sft_qlora

    argv = ["--model_name_or_path", str(model_dir), "--train_file", ctx["train_file"], "--output_dir", str(out_dir),
            "--max_steps", str(steps), "--report_to", "none", "--dtype", dtype_name(ctx), "--max_train_examples", str(ctx["train_examples"]), "--resume", "false"]
    if job.get("recipe_as_is"):  # everything else as the recipe says: evals, previews, checkpoints
        argv += ["--eval_file", ctx["eval_file"]]
    else:
        argv += ["--eval_file", "", "--save_strategy", "no", "--logging_steps", "5",
                 "--preview_steps", "100000" if job.get("preview") else "0"]
    argv += job["args"] + ctx.get("recipe_overrides", [])  # the latter: a smaller scale, for the tests
    return sft_qlora.main(*sft_qlora.parse_args(["--config", ctx["sft_recipe"], *argv]), callbacks=[timer])


def preview_share(trainer, out_dir: Path, step_s: float | None, recipe: str) -> dict:
    """Seconds a preview takes, and its share of training time at the recipe's cadence."""
    from preview_callback import PreviewCallback

    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, PreviewCallback)]
    with open(out_dir / "previews.jsonl", encoding="utf-8") as f:
        previews = len({json.loads(line)["step"] for line in f})
    # The first preview of a process also builds cuDNN's attention plan and warms the
    # allocator; a run of thousands of steps pays that once. The share is the later ones'.
    durations = callback.durations
    per_preview = statistics.median(durations[1:]) if len(durations) > 1 else callback.seconds / max(previews, 1)
    every = recipe_value(recipe, "preview_steps")
    share = per_preview / (per_preview + every * step_s) if step_s else None
    return {"preview_s": per_preview, "preview_first_s": durations[0] if durations else None, "previews": previews,
            "preview_every": every, "preview_share": share}


def recipe_value(path: Path, key: str):
    import yaml

    return yaml.safe_load(Path(path).read_text())[key]


def run_rollout(job: dict, ctx: dict) -> dict:
    """Plain `generate` as GRPOTrainer calls it: the adapter trainable, train mode with
    dropout off, no gradient checkpointing, sampling; every sequence made to run the full
    length (a random model rarely stops)."""
    import torch
    from transformers import GenerationConfig

    from phi2qlora.chat import format_prompt
    from phi2qlora.model import load_adapter, load_base_model, load_chat_tokenizer, pick_dtype

    job = {**job, **ctx.get("rollout_overrides", {})}
    tokenizer = load_chat_tokenizer(ctx["adapter"])
    model = load_base_model(ctx["model_dir"], tokenizer, pick_dtype(dtype_name(ctx)))
    model = load_adapter(model, ctx["adapter"], trainable=True)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tokenizer.padding_side = "left"
    prompts = [format_prompt(r["prompt"]) for r in synth_prompts(job["batch"])]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)

    dtype = pick_dtype(dtype_name(ctx))

    def plain(new_tokens, temperature=0.9):
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=temperature > 0,
                                  temperature=temperature or None, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, disable_compile=True)
        with torch.no_grad():
            return model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1]:]

    from torch.nn.attention import SDPBackend

    from phi2qlora import rollouts

    def fast(new_tokens, temperature=0.9, use_graph=None):
        # no end token: every row runs the full length, as min_new_tokens makes plain generate do
        return rollouts.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=new_tokens,
                                      temperature=temperature, eos_token_ids=[-1], pad_token_id=tokenizer.pad_token_id,
                                      dtype=dtype, use_graph=use_graph)

    generate = fast if job.get("fast") else plain

    def timed(new_tokens):
        sync()
        start = time.perf_counter()
        out = generate(new_tokens)
        sync()
        return time.perf_counter() - start, out.shape[1]

    # The fast path warms up at the timed shape: cuDNN builds its attention plan for a new cache
    # length once a process (~0.5 s, reported as first_call_s); a training run makes thousands of calls.
    first_call_s = timed(job["new_tokens"] if job.get("fast") else 4)[0]
    times, tokens = [], []
    for _ in range(job["repeats"]):
        seconds, new = timed(job["new_tokens"])
        times.append(seconds)
        tokens.append(new * job["batch"])
    result = {**summarize(times, tokens), **memory(), "batch": job["batch"], "new_tokens": job["new_tokens"],
              "prompt_tokens": enc["input_ids"].shape[1], "first_call_s": round(first_call_s, 3)}
    if job.get("fast"):  # the same policy? greedy answers against plain generate's, graph against eager
        n = job.get("check_tokens", 32)
        reference, ours = plain(n, 0.0), fast(n, 0.0)
        # cuDNN's attention isn't bitwise deterministic, and ~1e-5 flips the random model's
        # near-ties: the graph is checked against eager with the deterministic kernel.
        kernels, rollouts.DECODE_KERNELS = rollouts.DECODE_KERNELS, (SDPBackend.EFFICIENT_ATTENTION,)
        try:
            graphed, eager = fast(n, 0.0), fast(n, 0.0, use_graph=False)
        finally:
            rollouts.DECODE_KERNELS = kernels
        same = (reference == ours).float()
        result.update(greedy_first_token_same=same[:, 0].mean().item(),
                      greedy_rows_same=same.all(dim=1).float().mean().item(),
                      greedy_tokens_same_before_first_difference=float(same.cumprod(1).sum(1).mean().item()),
                      graph_equals_eager=bool(torch.equal(graphed, eager)))
    return result


class PhaseClock:
    """Seconds of each timed GRPO step spent in its phases, GPU synchronised at each edge
    (which costs a little: jobs that ask for phases are timed beside ones that don't):
    rollouts (`_generate`: sampling, and decoding the completions), log-probs without
    gradient (the `ref` pass), the policy's forward with gradient and its backward
    (`Accelerator.backward`, the recompute of checkpointing included). The rest of a step is
    the optimizer, the rewards, TRL's bookkeeping and the host."""

    def __init__(self, warmup: int):
        from collections import defaultdict

        self.warmup, self.seconds, self.on, self.undo = warmup, defaultdict(float), False, []

    def wrap(self, owner, name: str, phase) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.on:
                return original(*args, **kwargs)
            label = phase if isinstance(phase, str) else phase()
            sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync()
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, name, timed)
        self.undo.append((owner, name, original))

    def install(self) -> None:
        import torch
        from accelerate import Accelerator
        from trl import GRPOTrainer

        self.wrap(GRPOTrainer, "_generate", "rollouts")
        self.wrap(GRPOTrainer, "_get_per_token_logps_and_entropies",
                  lambda: "policy forward" if torch.is_grad_enabled() else "no-grad log-probs")
        self.wrap(Accelerator, "backward", "backward")

    def remove(self) -> None:
        for owner, name, original in reversed(self.undo):
            setattr(owner, name, original)

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class StartAfterWarmup(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.on = state.global_step >= clock.warmup

        return StartAfterWarmup()

    def per_step(self, steps: int) -> dict:
        return {f"phase_{k.replace(' ', '_').replace('-', '_')}_s": v / max(steps, 1) for k, v in self.seconds.items()}


def run_grpo(job: dict, ctx: dict) -> dict:
    import grpo_train

    timer = step_timer(job["warmup"], None, count_tokens=False)
    clock = PhaseClock(job["warmup"]) if job.get("phases") else None
    if clock:
        clock.install()
    argv = ["--config", ctx["grpo_recipe"], "--model_name_or_path", ctx["model_dir"], "--sft_adapter", ctx["adapter"],
            "--prompts_file", ctx["prompts_file"], "--output_dir", str(Path(ctx["work"]) / slug(job["name"])),
            "--max_steps", str(job.get("steps_override") or job["steps"]), "--report_to", "none",
            "--save_strategy", "no", "--preview_steps", "0", "--dtype", dtype_name(ctx), "--resume", "false",
            *job.get("args", []), *ctx.get("grpo_overrides", [])]
    start = time.perf_counter()
    try:
        callbacks = [timer, clock.callback()] if clock else [timer]
        trainer = grpo_train.main(*grpo_train.parse_args(argv), callbacks=callbacks)
    finally:
        if clock:
            clock.remove()
    phases = clock.per_step(len(timer.times)) if clock else {}
    return {**summarize(timer.times), **phases, **memory(), **finite_logs(trainer.state.log_history),
            "wall_s": time.perf_counter() - start, "steps": trainer.state.global_step,
            "layers": layers_name(trainer.model),
            "completions_per_step": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps}


def run_export(job: dict, ctx: dict) -> dict:
    """export_model.py as a T4 user runs it after training: the NF4 base rebuilt in the
    training dtype, dequantised, the adapter merged, saved in fp16, then checked against
    base + adapter as trained (greedy answers and logits on the preview prompts)."""
    import export_model

    out = Path(ctx["work"]) / slug(job["name"])
    argv = ["--model_name_or_path", ctx["model_dir"], "--adapter", ctx["adapter"], "--output_dir", str(out),
            "--train_dtype", dtype_name(ctx), "--check_max_new_tokens", str(job.get("check_tokens", 32)),
            "--overwrite", "true"]
    start = time.perf_counter()
    check = export_model.main(export_model.parse_args(argv))[str(out)]["check"]
    return {**memory(), "wall_s": time.perf_counter() - start, "finite": math.isfinite(check["max_logit_diff"]),
            **{f"export_{k}": v for k, v in check.items()}}


def run_app(job: dict, ctx: dict) -> dict:
    """app.py's columns as the page serves them on a GPU: the base in NF4 with two adapters
    taking turns on it, each answer streamed (TextIteratorStreamer) in the run's dtype.
    Per column: seconds for the answer, whether the streamed text grew into the final one,
    whether the final one is generate_answers' own, and whether the logits are finite."""
    import torch

    import app
    from phi2qlora.answers import generate_answers
    from phi2qlora.chat import format_prompt

    args = app.parse_args(["--base", ctx["model_dir"], "--sft", ctx["adapter"], "--grpo", ctx["adapter"],
                           "--dtype", dtype_name(ctx)])
    start = time.perf_counter()
    columns = app.load_columns(args)
    load_s = time.perf_counter() - start
    prompt, new_tokens, per_column = "Explain why the sky is blue.", job.get("new_tokens", 64), {}
    for column in columns:
        sync()
        t = time.perf_counter()
        rows = list(column.stream(prompt, new_tokens))
        sync()
        seconds, final = time.perf_counter() - t, rows[-1]
        with column.active() as model:
            expected = generate_answers(model, column.tokenizer, [prompt], new_tokens)[0]
            enc = column.tokenizer([format_prompt(prompt)], return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                finite = bool(torch.isfinite(model(**enc.to(model.device)).logits).all())
        per_column[column.key] = {
            "seconds": round(seconds, 3), "updates": len(rows), "finite": finite,
            "grew": all(final["answer"].startswith(r["answer"]) for r in rows[:-1]),
            "same_as_generate": final["answer"] == expected["answer"]}
    return {**memory(), "load_s": load_s, "columns": per_column,
            "finite": all(c["finite"] for c in per_column.values()),
            "streams_ok": all(c["grew"] and c["same_as_generate"] for c in per_column.values())}


RUNNERS = {"sft": run_sft, "rollout": run_rollout, "grpo": run_grpo, "export": run_export, "app": run_app,
           "ceilings": run_ceilings}
# A job needs about this much on an H100; skipped with less.
MIN_SECONDS = {"sft": 45, "rollout": 60, "grpo": 120, "export": 60, "app": 45, "ceilings": 15}


# ---------------------------------------------------------------------------------------
# DPO (issue 29): its job kind and its set, in one block.
# ---------------------------------------------------------------------------------------
DPO_RECIPE = ROOT / "recipes" / "dpo_phi2_t4.yaml"


def synth_pairs(tokenizer, n: int, seed: int = 3, prompt_median: float = 60, reply_median: float = 280,
                sigma: float = 0.5) -> list[dict]:
    """Preference pairs in TRL's conversational format, seeded: a one-turn prompt and two
    replies of independent lognormal lengths (tokens). With a 280-token median most micro-
    batches of 4 pairs hold a reply that reaches the recipe's 512-token cap, as oasst1's
    long best replies do, so the step is timed at the recipe's full length."""
    rng, words = random.Random(seed), sample_words()
    ratio = tokens_per_word(tokenizer, words, rng)

    def text(median):
        return " ".join(rng.choice(words) for _ in range(max(1, round(rng.lognormvariate(math.log(median), sigma)
                                                                      / ratio))))

    return [{"prompt": [{"role": "user", "content": text(prompt_median)}],
             "chosen": [{"role": "assistant", "content": text(reply_median)}],
             "rejected": [{"role": "assistant", "content": text(reply_median)}]} for _ in range(n)]


def run_dpo(job: dict, ctx: dict) -> dict:
    """`dpo_train.main` with the T4 recipe from the SFT adapter, for `steps` optimizer steps
    on exactly as many synthetic pairs as they use (the precompute scores every pair it is
    given), no previews, no checkpoints, every loss logged. `setup_s`: from the call to the first step (the
    models, the data and, with precompute_ref_log_probs, the reference pass)."""
    import dpo_train
    from phi2qlora.model import load_chat_tokenizer
    from transformers import TrainerCallback

    recipe = ctx.get("dpo_recipe", str(DPO_RECIPE))
    steps = job.get("steps_override") or job["steps"]
    argv = ["--config", recipe, "--model_name_or_path", ctx["model_dir"], "--sft_adapter", ctx["adapter"],
            "--eval_file", "", "--output_dir", str(Path(ctx["work"]) / slug(job["name"])), "--max_steps", str(steps),
            "--report_to", "none", "--save_strategy", "no", "--preview_steps", "0", "--logging_steps", "1",
            "--dtype", dtype_name(ctx), "--resume", "false", *job.get("args", []), *ctx.get("dpo_overrides", [])]
    script_args, training_args, model_args = dpo_train.parse_args(argv)
    pairs = steps * training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    train_file = write_jsonl(Path(ctx["work"]) / f"pairs_{pairs}.jsonl",
                             synth_pairs(load_chat_tokenizer(ctx["adapter"]), pairs))
    script_args.train_file, script_args.max_train_examples = str(train_file), pairs
    started = {}

    class FirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            started["s"] = time.perf_counter()

    timer = step_timer(job["warmup"], None, check_token_count=ctx.get("check_token_count", False))
    start = time.perf_counter()
    trainer = dpo_train.main(script_args, training_args, model_args, callbacks=[FirstStep(), timer])
    return {**summarize(timer.times, timer.tokens, timer.trainer_tokens), **memory(),
            **finite_logs(trainer.state.log_history),
            "wall_s": time.perf_counter() - start, "setup_s": started["s"] - start,
            "steps": trainer.state.global_step, "pairs_per_step": pairs // steps,
            "reference": "precomputed" if training_args.precompute_ref_log_probs else "ref adapter",
            "max_length": training_args.max_length, "layers": layers_name(trainer.model)}


def dpo_note(r: dict) -> str:
    return (f"{r['steps']} steps, {r['pairs_per_step']} pairs/step, reference {r['reference']}, "
            f"setup {r['setup_s']:.0f} s" + ("" if r.get("finite", True) else " NaN!"))


RUNNERS["dpo"] = run_dpo
MIN_SECONDS["dpo"] = 150
JOBS["dpo"] = [
    dict(name="t4 dpo recipe", kind="dpo", steps=30, warmup=3,
         why="recipes/dpo_phi2_t4.yaml as it stands (the `ref` adapter scores the reference each step), fp16"),
    dict(name="t4 dpo precompute", kind="dpo", steps=30, warmup=3, args=["--precompute_ref_log_probs", "true"],
         why="the same with the reference scored once for every pair before training"),
]
JOBS["dpo"] += [dict(job, name=job["name"] + " fast", args=[*job.get("args", []), "--fast_training", "true"],
                     why=job["why"] + ", on the fast layers") for job in list(JOBS["dpo"])]
ALL_JOBS.update({j["name"]: j for j in JOBS["dpo"]})


# ---------------------------------------------------------------------------------------
# Orchestration: prepare once, one process per job, a table at the end.
# ---------------------------------------------------------------------------------------
def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def prepare(args) -> dict:
    """The model (built if missing), the data files and a first SFT adapter for GRPO and rollouts."""
    from phi2qlora.model import load_chat_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        if args.tiny:
            raise SystemExit(f"{model_dir}: no model there (the --tiny run needs an existing model)")
        import make_phi2_shaped

        make_phi2_shaped.build(model_dir)
    tokenizer = load_chat_tokenizer(str(model_dir))
    n = args.train_examples
    extra = json.loads(args.ctx_json) if args.ctx_json else {}
    # median_tokens 2000: every row is cut at 256, so each step carries the same tokens (fair
    # when runs with different data shards are compared, as one GPU against two).
    median = extra.get("median_tokens", 190)
    ctx = {
        "model_dir": str(model_dir), "work": str(work), "out": str(args.out), "t4": args.t4, "dtype": args.dtype,
        "steps": args.steps, "warmup": args.warmup, "profile_steps": args.profile_steps, "train_examples": n,
        "train_file": str(write_jsonl(work / "train.jsonl", synth_conversations(tokenizer, n, seed=0, median=median))),
        "eval_file": str(write_jsonl(work / "eval.jsonl", synth_conversations(tokenizer, 64, seed=2))),
        "prompts_file": str(write_jsonl(work / "prompts.jsonl", synth_prompts(400))),
        "sft_recipe": str(args.sft_recipe), "grpo_recipe": str(args.grpo_recipe),
        "adapter": str(work / "adapter"), "cprofile": args.cprofile,
    }
    ctx.update(extra)
    return ctx


def ensure_adapter(ctx: dict) -> dict | None:
    """GRPO and the rollouts start from an SFT adapter: two recipe steps make one."""
    if (Path(ctx["adapter"]) / "adapter_config.json").is_file():
        return None
    job = sft_job("adapter", SEED, steps=1, warmup=1)
    return dict(job, output_dir=ctx["adapter"])


def run_job_here(job: dict, ctx: dict) -> dict:
    """Run one job in this process (T4 cap first), catching its failure as a result."""
    import torch

    if job.get("no_cudnn") and torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
    if ctx["t4"] and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(local_rank()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, T4_GIB * 2**30 / total), local_rank())
    start = time.perf_counter()
    try:
        if job.get("output_dir"):  # the adapter for GRPO: a short recipe run saved where asked
            job = dict(job)
            ctx = dict(ctx, work=str(Path(job["output_dir"]).parent))
            result = run_sft(dict(job, name=Path(job["output_dir"]).name), ctx)
        else:
            result = RUNNERS[job["kind"]](job, ctx)
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 - a failed job is a result (OOM included), the others go on
        import traceback

        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}", **memory()}
    result.update(name=job["name"], kind=job["kind"], why=job.get("why", ""), job_s=time.perf_counter() - start)
    if torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name(local_rank())
    return result


def run_job_isolated(job: dict, ctx: dict, timeout: float) -> dict:
    """One job in a fresh Python process: a clean peak, and an OOM or crash loses only it."""
    result_file = Path(ctx["work"]) / f"result_{slug(job['name'])}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--_child", json.dumps({"job": job, "ctx": ctx, "result": str(result_file)})]
    try:
        subprocess.run(cmd, timeout=max(timeout, 1), check=False)
    except subprocess.TimeoutExpired:
        return {"name": job["name"], "kind": job["kind"], "ok": False, "error": f"timed out after {timeout:.0f} s"}
    if not result_file.is_file():
        return {"name": job["name"], "kind": job["kind"], "ok": False, "error": "the job's process died (see log)"}
    return json.loads(result_file.read_text())


def child_main(payload: str) -> None:
    spec = json.loads(payload)
    result = run_job_here(spec["job"], spec["ctx"])
    from phi2qlora.files import write_atomic

    write_atomic(spec["result"], json.dumps(result))


def table(results: list[dict]) -> str:
    head = f"{'job':<18} {'tok/s':>8} {'(min-max)':>15} {'step s':>7} {'tok/step':>8} {'peak GiB':>8} " \
           f"{'rsv GiB':>7}  notes"
    lines = [head, "-" * len(head)]
    for r in results:
        if not r.get("ok"):
            lines.append(f"{r['name']:<18} FAILED: {r.get('error', '')[:100]}")
            continue
        spread = f"{r['tok_s_min']:.0f}-{r['tok_s_max']:.0f}" if "tok_s_min" in r else ""
        notes = []
        if r.get("layers"):
            notes.append(f"{r['layers']} layers")
        if r["kind"] == "sft":
            notes.append(f"b{r['batch']}{' ckpt' if r['grad_ckpt'] else ''}{' pack' if r['packing'] else ''} "
                         f"{r['activation']}" + ("" if r.get("finite", True) else " NaN!"))
        if r.get("graphs_compiled"):
            notes.append(f"compiled {r['graphs_compiled']} graphs in {r['compile_s']:.0f} s, "
                         f"{r['graphs_compiled_timed']} in the timed steps")
        if r.get("preview_s") is not None:
            first = f" (first {r['preview_first_s']:.1f} s)" if r.get("preview_first_s") else ""
            notes.append(f"preview {r['preview_s']:.2f} s{first} = {100 * (r['preview_share'] or 0):.1f}% "
                         f"at every {r['preview_every']}")
        if r.get("kernels_per_step"):
            notes.append(f"{r['kernels_per_step']:.0f} kernels/step, GPU busy {r['gpu_busy_ms_per_step']:.0f} ms")
            if r.get("gpu_idle_by_host_op"):
                notes.append(f"GPU idle {r['gpu_idle_ms_per_step']:.0f} ms (" + ", ".join(
                    f"{name} {ms:.0f}" for name, ms in r["gpu_idle_by_host_op"][:4]) + ")")
        if r.get("t4_tok_s"):
            notes.append(f"{r['gpu_us_per_token']:.0f} us GPU a token -> T4 projection {r['t4_tok_s']:.0f} tok/s")
        if r.get("loss_match"):
            m = r["loss_match"]
            notes.append(f"losses vs {m['vs']}: {m['steps']} steps, max diff {m['max_abs']:.2g} "
                         f"({100 * m['max_rel']:.2g}%)")
        if r["kind"] == "ceilings":
            notes.append(f"{r['dtype']} products {r['matmul_flops'] / 1e12:.0f} TFLOP/s, "
                         f"copy {r['copy_bytes_s'] / 1e9:.0f} GB/s")
        if r.get("greedy_rows_same") is not None:
            notes.append(f"greedy vs plain: first token {100 * r['greedy_first_token_same']:.0f}% same, "
                         f"{r['greedy_tokens_same_before_first_difference']:.1f} tokens before a difference; "
                         f"graph {'=' if r['graph_equals_eager'] else '!='} eager")
        if r["kind"] == "export":
            notes.append(f"{r['export_same_greedy_answers']}/{r['export_prompts']} greedy answers as trained, logits "
                         f"within {r['export_max_logit_diff']:.2g}" + ("" if r["finite"] else " NaN!"))
        if r["kind"] == "app":
            notes.append(", ".join(f"{key} {c['seconds']:.1f} s" + ("" if c["grew"] and c["same_as_generate"]
                                                                   else " MISMATCH")
                                   for key, c in r["columns"].items()) + ("" if r["finite"] else " NaN!"))
        if r["kind"] == "dpo":
            notes.append(dpo_note(r))
        if r["kind"] == "grpo":
            notes.append(f"{r.get('steps')} steps, {r.get('completions_per_step')} completions/step"
                         + ("" if r.get("finite", True) else " NaN!"))
            if phases := {k[6:-2].replace("_", " "): v for k, v in r.items() if k.startswith("phase_")}:
                notes.append(", ".join(f"{name} {v:.2f} s" for name, v in phases.items()))
        lines.append(f"{r['name']:<18} {r.get('tok_s', 0):>8.0f} {spread:>15} {r.get('step_s', 0):>7.2f} "
                     f"{r.get('tokens_per_step', 0):>8.0f} {r.get('peak_alloc_gib', 0):>8.2f} "
                     f"{r.get('peak_reserved_gib', 0):>7.2f}  {'; '.join(notes)}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", default="run2", help="a set (run1, run2, t4) or job names, comma-separated")
    p.add_argument("--model_dir", default="/tmp/phi2-shaped", help="built here if missing")
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/bench"), help="results.json and profiles")
    p.add_argument("--work", default="/tmp/bench-work", help="data, adapters, run outputs")
    p.add_argument("--t4", action="store_true", help=f"fp16 and at most {T4_GIB:.0f} GiB, as on a T4")
    p.add_argument("--dtype", default="auto", help="compute dtype when not --t4 (auto: bf16 on Ampere+)")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps a SFT job")
    p.add_argument("--warmup", type=int, default=3, help="steps dropped before timing")
    p.add_argument("--profile_steps", type=int, default=2, help="steps profiled after the timed ones (jobs that ask)")
    p.add_argument("--cprofile", action="store_true",
                   help="the SFT jobs' timed steps under cProfile: cprofile_<job>.txt (slows them: times not comparable)")
    p.add_argument("--train_examples", type=int, default=2500)
    p.add_argument("--grpo_steps", type=int, default=None, help="override the GRPO jobs' step counts")
    p.add_argument("--time_budget", type=float, default=560, help="seconds; jobs that would start later are skipped")
    p.add_argument("--sft_recipe", default=str(ROOT / "recipes" / "sft_phi2_t4.yaml"))
    p.add_argument("--grpo_recipe", default=str(ROOT / "recipes" / "grpo_phi2_t4.yaml"))
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on an existing tiny model")
    p.add_argument("--ctx_json", default=None, help=argparse.SUPPRESS)  # extra settings, for the tests
    p.add_argument("--list", action="store_true", help="list the jobs and exit")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_jobs(spec: str) -> list[dict]:
    jobs = []
    for name in spec.split(","):
        name = name.strip()
        if name in JOBS:
            jobs += JOBS[name]
        elif name in ALL_JOBS:
            jobs.append(ALL_JOBS[name])
        else:
            raise SystemExit(f"unknown job {name!r}; --list shows them")
    return jobs


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args._child:
        return child_main(args._child)
    if args.list:
        for group, jobs in JOBS.items():
            print(f"[{group}]")
            for j in jobs:
                print(f"  {j['name']:<18} {j.get('why', '')}")
        return []
    jobs = select_jobs(args.jobs)
    started = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    distributed = world_size() > 1
    if distributed:
        from accelerate import PartialState

        jobs = [j for j in jobs if j["kind"] == "sft"]  # tokens/s summed over GPUs; rollouts and GRPO: one GPU

        state = PartialState()
        with state.main_process_first():
            ctx = prepare(args)
    else:
        ctx = prepare(args)
    print(f"[bench] prepared in {time.perf_counter() - started:.0f} s: {ctx['model_dir']}, {len(jobs)} jobs", flush=True)

    needs_adapter = any(j["kind"] in ("rollout", "grpo", "export", "app", "dpo") for j in jobs)
    adapter_job = ensure_adapter(ctx) if needs_adapter and not distributed else None
    results = []
    for job in ([adapter_job] if adapter_job else []) + jobs:
        if job["kind"] == "grpo" and args.grpo_steps:
            job = dict(job, steps_override=args.grpo_steps)
        left = args.time_budget - (time.perf_counter() - started)
        if left < MIN_SECONDS[job["kind"]]:
            results.append({"name": job["name"], "kind": job["kind"], "ok": False, "error": "skipped: time budget"})
            continue
        print(f"[bench] {job['name']}: {job.get('why', '')}", flush=True)
        result = run_job_here(job, ctx) if distributed else run_job_isolated(job, ctx, left)
        if job is adapter_job:
            if not result.get("ok"):
                print(f"[bench] no adapter: {result.get('error')}", flush=True)
            continue
        results.append(result)
        compare_losses(results, jobs)
        ceilings = next((r for r in results if r["kind"] == "ceilings" and r.get("ok")), {})
        for r in results:
            r.update(t4_projection(r, ceilings))
        if not distributed or int(os.environ.get("RANK", 0)) == 0:
            from phi2qlora.files import write_atomic

            write_atomic(Path(args.out) / "results.json", json.dumps(
                {"args": vars(args), "elapsed_s": time.perf_counter() - started, "results": results}, indent=1))
            print(f"[bench] {job['name']}: " + json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                                           for k, v in result.items() if k != "losses"}), flush=True)
    if not distributed or int(os.environ.get("RANK", 0)) == 0:
        print(f"\n[bench] {'T4 mode: fp16, ' + str(T4_GIB) + ' GiB cap' if args.t4 else 'memory free'}; "
              f"{time.perf_counter() - started:.0f} s in all\n" + table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
