"""DPO after SFT: move the SFT model towards the replies people ranked higher.

Continues from the SFT adapter (Phi-2 in 4-bit NF4 + LoRA, the adapter loaded trainable)
with TRL's DPOTrainer on data_prep.py's preference pairs: for each user turn of oasst1
with ranked replies, the best-ranked reply (chosen) against the worst-ranked (rejected);
with `data_prep.py --pairs concise`, also pairs that prefer the shorter of two closely
ranked replies under a word limit the prompt states.

    python data_prep.py                                    # also data/pairs_train.jsonl, pairs_eval.jsonl
    python dpo_train.py                                    # = --config recipes/dpo_phi2_t4.yaml
    python dpo_train.py --config recipes/dpo_tiny.yaml     # offline, CPU, after ./demo_offline.sh

The reference is the SFT model itself, never a second copy of Phi-2: TRL copies the loaded
adapter into a frozen `ref` adapter and scores the reference with it, or, with
`--precompute_ref_log_probs true`, scores every pair once before training. Rerun the same
command after an interruption to resume.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer, ModelConfig

from phi2qlora.args import DPOScriptArguments, parse_recipe
from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.fast_training import use_fast_training
from phi2qlora.files import check_limit, jsonl_lines, read_prompt_rows
from phi2qlora.model import (
    check_adapter_fits,
    load_adapter,
    load_base_model,
    load_chat_tokenizer,
    model_kwargs,
    pick_dtype,
    restore_sft_weights,
    trainable_weights,
)
from phi2qlora.pairs import read_pair_rows, tokenize_pair
from phi2qlora.training import (
    claim_output_dir,
    input_paths,
    plot_history,
    run_identity,
    save_trained_adapter,
    train_guarded,
)
from preview_callback import PreviewCallback

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "dpo_phi2_t4.yaml"
SHOWN_LINES = 5  # line numbers named when pairs are dropped


def load_pairs(path: str, tokenizer, max_prompt_tokens: int, max_length: int | None, limit: int | None = None):
    """data_prep.py's pairs as a `datasets.Dataset` of prompt / chosen / rejected (TRL's
    conversational preference format), every row checked before any model loads. A pair
    whose prompt is longer than `max_prompt_tokens` is dropped and said so, with its line:
    TRL would silently drop one whose prompt fills max_length, and cut the replies of one
    that nearly does."""
    from datasets import Dataset

    check_limit(limit, "--max_train_examples")
    rows, too_long, cut = [], [], 0
    for n, row in read_pair_rows(path):
        ids = tokenize_pair(tokenizer, row)
        if len(ids["prompt_ids"]) > max_prompt_tokens:
            too_long.append(n)
            continue
        longest = len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
        cut += max_length is not None and longest > max_length
        rows.append({k: [{"role": t["role"], "content": t["content"]} for t in row[k]]  # one schema for Arrow
                     for k in ("prompt", "chosen", "rejected")})
        if limit is not None and len(rows) == limit:
            break  # data_prep already shuffled the rows
    if too_long:
        lines = ", ".join(map(str, too_long[:SHOWN_LINES])) + (", ..." if len(too_long) > SHOWN_LINES else "")
        print(f"[dpo] {path}: {len(too_long)} pairs dropped, their prompt is longer than --max_prompt_tokens "
              f"{max_prompt_tokens} (lines {lines}); raise it (and max_length) to keep them")
    if not rows:
        raise InputError(f"{path}: no pair has a prompt within --max_prompt_tokens {max_prompt_tokens} tokens "
                         f"({len(too_long)} longer); raise --max_prompt_tokens and --max_length")
    if cut:
        print(f"[dpo] {path}: {cut} of {len(rows)} pairs have a reply cut at max_length {max_length} tokens")
    return Dataset.from_list(rows)


def has_rows(path: str) -> bool:
    lines = jsonl_lines(path, "pairs file", if_missing="run data_prep.py first (see README)")
    try:
        return next(lines, None) is not None
    finally:
        lines.close()


class SFTReferenceDPOTrainer(DPOTrainer):
    """DPOTrainer whose reference is exactly the SFT adapter, also when the reference
    log-probs are precomputed: trl 1.16 precomputes them at the end of `__init__`, after
    it has rounded the adapter to bf16 and copied it into `ref` without the chat-token rows
    (restore_sft_weights), so the weights are put back first."""

    def __init__(self, *args, sft_weights: dict, **kwargs):
        self.sft_weights = sft_weights
        super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.state.global_step == 0:  # in __init__; later (evaluate() on a new dataset) `ref` is already right
            restore_sft_weights(self.model, self.sft_weights)
        return super()._precompute_ref_logps(dataset, name, batch_size)


def check_settings(script_args: DPOScriptArguments, training_args: DPOConfig) -> None:
    if training_args.beta <= 0:
        raise InputError(f"--beta must be above 0 for DPO (got {training_args.beta}): at 0 the loss is log 2 "
                         "whatever the model does, and nothing trains")
    if training_args.max_length is not None and script_args.max_prompt_tokens >= training_args.max_length:
        raise InputError(f"--max_prompt_tokens ({script_args.max_prompt_tokens}) must be below --max_length "
                         f"({training_args.max_length}), which holds the prompt and the reply")


def main(script_args: DPOScriptArguments, training_args: DPOConfig, model_args: ModelConfig, callbacks=()):
    dtype = pick_dtype(model_args.dtype)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    reference = "precomputed log-probs" if training_args.precompute_ref_log_probs else "the `ref` adapter"
    print(f"[dpo] {model_args.model_name_or_path} + {script_args.sft_adapter} on {device}, "
          f"compute dtype {str(dtype).split('.')[-1]}, beta {training_args.beta}, reference: SFT via {reference}")

    check_settings(script_args, training_args)
    check_adapter_fits(script_args.sft_adapter, model_args.model_name_or_path, "--sft_adapter", "--model_name_or_path",
                       model_args.model_revision, "run sft_qlora.py first (see README), or give its output directory")
    # Data and prompts first: a bad file fails in seconds, before a model is loaded.
    tokenizer = load_chat_tokenizer(script_args.sft_adapter)  # saved by SFT, chat tokens included
    train_dataset = load_pairs(script_args.train_file, tokenizer, script_args.max_prompt_tokens,
                               training_args.max_length, script_args.max_train_examples)
    eval_dataset = None
    if script_args.eval_file and not has_rows(script_args.eval_file):  # data_prep --eval_fraction 0 writes it empty
        print(f"[dpo] {script_args.eval_file}: no held-out pairs; training without evaluation")
    elif script_args.eval_file:
        eval_dataset = load_pairs(script_args.eval_file, tokenizer, script_args.max_prompt_tokens,
                                  training_args.max_length)
    previews = ([r["prompt"] for r in read_prompt_rows(script_args.preview_prompts_file)]
                if script_args.preview_prompts_file else None)
    if eval_dataset is None and (training_args.eval_strategy != "no" or training_args.eval_on_start):
        training_args = dataclasses.replace(training_args, eval_strategy="no", eval_on_start=False)
    run = run_identity("dpo_train.py", model_args, dtype, script_args.sft_adapter)
    resume_from = claim_output_dir(training_args.output_dir, run, script_args.resume,
                                   training_args.resume_from_checkpoint, input_paths(script_args, model_args))
    print(f"[dpo] {len(train_dataset)} train / {len(eval_dataset) if eval_dataset else 0} eval pairs; "
          + (f"resuming from {resume_from}" if resume_from else "starting from the SFT adapter"))

    model = load_base_model(model_args.model_name_or_path, tokenizer, dtype, **model_kwargs(model_args))
    model = load_adapter(model, script_args.sft_adapter, trainable=True)
    sft_weights = trainable_weights(model)
    trainer = SFTReferenceDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        sft_weights=sft_weights,
    )
    # The policy and `ref` = the SFT adapter, in fp32 (what upcast_trainable_params would give
    # AMP: DPOTrainer rounds them to bf16, and fp16 training then fails at the first clip).
    restore_sft_weights(trainer.model, sft_weights)
    use_fast_training(trainer.model, script_args.fast_training, log=print if trainer.is_world_process_zero() else None)
    if preview := PreviewCallback.for_run(tokenizer, training_args.output_dir, previews, script_args,
                                          fast=script_args.fast_previews):
        trainer.add_callback(preview)

    train_guarded(trainer, resume_from, {
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "max_length": training_args.max_length,
        "gradient_checkpointing": training_args.gradient_checkpointing})
    if trainer.is_world_process_zero():
        save_trained_adapter(trainer.model, tokenizer, training_args.output_dir)
        plot_history(trainer.state.log_history,
                     {"train loss": "loss", "eval loss": "eval_loss",
                      "train reward accuracy": "rewards/accuracies", "eval reward accuracy": "eval_rewards/accuracies"},
                     Path(training_args.output_dir) / "loss.png", "DPO loss and reward accuracy")
        print(f"[dpo] adapter, previews and loss.png in {training_args.output_dir}")
    return trainer


def parse_args(argv: list[str] | None = None):
    return parse_recipe((DPOScriptArguments, DPOConfig, ModelConfig), sys.argv[1:] if argv is None else argv,
                        DEFAULT_RECIPE)


if __name__ == "__main__":
    exit_on_input_error(lambda: main(*parse_args()))
