"""Supervised fine-tuning of Phi-2 on oasst1 conversations with QLoRA, sized for a T4.

Phi-2 is loaded in 4-bit NF4 (double quantisation) and trained through LoRA on its
attention and MLP projections, plus the embedding rows of the new chat tokens and the
lm_head row of the end-of-turn token. The loss covers the assistant's words and its
end-of-turn token only. TRL's SFTTrainer does the work.

    python data_prep.py                                   # -> data/train.jsonl, data/eval.jsonl
    python sft_qlora.py                                   # = --config recipes/sft_phi2_t4.yaml
    python sft_qlora.py --config recipes/sft_tiny.yaml    # offline, CPU, minutes
    python sft_qlora.py --learning_rate 1e-4              # any field, over the recipe

Rerun the same command after an interruption: it resumes from the latest complete
checkpoint in the output directory.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from trl import ModelConfig, SFTConfig, SFTTrainer

from phi2qlora.args import SFTScriptArguments, parse_recipe
from phi2qlora.chat import END, ROLE_TOKENS, chat_token_ids, reserved_text_in
from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.fast_training import use_fast_training
from phi2qlora.files import check_limit, read_jsonl_rows, read_prompt_rows
from phi2qlora.learnable import keep_learnable, sft_reason
from phi2qlora.model import (
    fix_lm_head_bias,
    load_base_model,
    load_chat_tokenizer,
    model_kwargs,
    pick_dtype,
    upcast_trainable_params,
)
from phi2qlora.training import claim_output_dir, input_paths, plot_history, run_identity, train_guarded
from preview_callback import PreviewCallback

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "sft_phi2_t4.yaml"


def load_conversations(path: str, limit: int | None = None):
    """data_prep.py's JSONL as a `datasets.Dataset` of `messages` (TRL renders them with
    the tokenizer's chat template, which marks the assistant's tokens for the loss). Each
    row is checked here, so a bad line is named before any model is loaded."""
    from datasets import Dataset

    check_limit(limit, "--max_train_examples")
    conversations = []
    for n, row in read_jsonl_rows(path, "data file"):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{path}:{n}: field 'messages' must be a non-empty list of "
                             "{'role', 'content'} turns, as data_prep.py writes them")
        for turn in messages:
            if not isinstance(turn, dict) or turn.get("role") not in ROLE_TOKENS or not isinstance(turn.get("content"), str):
                raise InputError(f"{path}:{n}: each turn needs 'role' ('user' or 'assistant') and a string "
                                 f"'content'; got {str(turn)[:80]}")
            if token := reserved_text_in(turn["content"]):
                raise InputError(f"{path}:{n}: a turn holds {token!r}, which the tokenizer reads as a special token "
                                 "(a turn boundary), not text; remove it (data_prep.py drops such messages)")
        if not any(turn["role"] == "assistant" for turn in messages):
            raise InputError(f"{path}:{n}: no assistant turn, so nothing to learn from")
        conversations.append({"messages": [{"role": t["role"], "content": t["content"]} for t in messages]})
        if limit is not None and len(conversations) == limit:
            break  # data_prep already shuffled the rows
    if not conversations:
        raise InputError(f"{path}: no conversations in the file")
    return Dataset.from_list(conversations)


def learnable_conversations(dataset, path: str, tokenizer, args: SFTConfig):
    """The conversations that leave SFT something to learn once tokenized and truncated as
    SFTTrainer will (phi2qlora.learnable); the others are dropped with a count, and a file
    of none is refused, before the model loads."""
    from datasets import Dataset

    rows = dataset.to_list()
    max_length = None if args.packing else args.max_length  # packing chunks, it does not cut
    reasons = [sft_reason(tokenizer, row["messages"], max_length, args.truncation_mode, args.assistant_only_loss)
               for row in rows]
    return Dataset.from_list(keep_learnable(rows, reasons, path, "conversations", fix=(
        f"give assistant replies with words, within --max_length (now {args.max_length}) tokens")))


def lora_config(model_args: ModelConfig, tokenizer) -> LoraConfig:
    ids = chat_token_ids(tokenizer)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        bias="none",
        # Only the chat tokens' rows train, never the whole 51,200 x 2,560 matrices: their
        # input embeddings, and the output row of END, which the model must learn to emit.
        trainable_token_indices={"embed_tokens": list(ids.values()), "lm_head": [ids[END]]},
    )


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig, callbacks=()):
    dtype = pick_dtype(model_args.dtype)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"[sft] {model_args.model_name_or_path} on {device}, compute dtype {str(dtype).split('.')[-1]}")

    # Data and prompts first: a bad file fails in seconds, before a model is loaded.
    train_dataset = load_conversations(script_args.train_file, script_args.max_train_examples)
    eval_dataset = load_conversations(script_args.eval_file) if script_args.eval_file else None
    prompts = ([r["prompt"] for r in read_prompt_rows(script_args.preview_prompts_file)]
               if script_args.preview_prompts_file else None)
    if eval_dataset is None and (training_args.eval_strategy != "no" or training_args.eval_on_start):
        training_args = dataclasses.replace(training_args, eval_strategy="no", eval_on_start=False)
    # What a resume must not change. The dtype too: NF4 quantised from bf16 weights is not
    # the NF4 base of an fp16 (T4) run, so the adapter would continue on another model.
    run = run_identity("sft_qlora.py", model_args, dtype, lora_r=model_args.lora_r,
                       lora_target_modules=model_args.lora_target_modules)
    resume_from = claim_output_dir(training_args.output_dir, run, script_args.resume,
                                   training_args.resume_from_checkpoint, input_paths(script_args, model_args))
    tokenizer = load_chat_tokenizer(model_args.model_name_or_path, model_args.model_revision)
    train_dataset = learnable_conversations(train_dataset, script_args.train_file, tokenizer, training_args)
    if eval_dataset is not None:
        eval_dataset = learnable_conversations(eval_dataset, script_args.eval_file, tokenizer, training_args)
    print(f"[sft] {len(train_dataset)} train / {len(eval_dataset) if eval_dataset else 0} eval conversations; "
          + (f"resuming from {resume_from}" if resume_from else "starting fresh"))

    model = load_base_model(model_args.model_name_or_path, tokenizer, dtype, **model_kwargs(model_args))
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config(model_args, tokenizer),
        callbacks=list(callbacks),
    )
    if preview := PreviewCallback.for_run(tokenizer, training_args.output_dir, prompts, script_args,
                                          fast=script_args.fast_previews):
        trainer.add_callback(preview)
    fix_lm_head_bias(trainer.model)
    upcast_trainable_params(trainer.model)
    use_fast_training(trainer.model, script_args.fast_training, log=print if trainer.is_world_process_zero() else None)
    if trainer.is_world_process_zero():
        trainer.model.print_trainable_parameters()

    train_guarded(trainer, resume_from, {
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "max_length": training_args.max_length,
        "gradient_checkpointing": training_args.gradient_checkpointing})
    trainer.save_model(training_args.output_dir)  # adapter (safetensors) + tokenizer with the chat tokens
    if trainer.is_world_process_zero():
        plot_history(trainer.state.log_history, {"train loss": "loss", "eval loss": "eval_loss"},
                     Path(training_args.output_dir) / "loss.png", "SFT loss")
        print(f"[sft] adapter, previews and loss.png in {training_args.output_dir}")
    return trainer


def parse_args(argv: list[str] | None = None):
    return parse_recipe((SFTScriptArguments, SFTConfig, ModelConfig), sys.argv[1:] if argv is None else argv,
                        DEFAULT_RECIPE)


if __name__ == "__main__":
    exit_on_input_error(lambda: main(*parse_args()))
