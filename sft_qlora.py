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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from trl import ModelConfig, SFTConfig, SFTTrainer

from common import (
    END,
    InputError,
    chat_token_ids,
    exit_on_input_error,
    fix_lm_head_bias,
    latest_complete_checkpoint,
    load_base_model,
    model_kwargs,
    load_chat_tokenizer,
    parse_recipe,
    pick_dtype,
    plot_history,
    upcast_trainable_params,
)
from preview_callback import PreviewCallback, read_prompts

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "sft_phi2_t4.yaml"


@dataclass
class ScriptArguments:
    train_file: str = field(default="data/train.jsonl", metadata={"help": "data_prep.py's train.jsonl"})
    eval_file: str | None = field(default="data/eval.jsonl", metadata={"help": "held-out conversations; '' for none"})
    max_train_examples: int | None = field(default=32000, metadata={"help": "use at most this many train examples"})
    preview_steps: int = field(default=100, metadata={"help": "generate previews every N optimizer steps (0: never)"})
    preview_prompts_file: str | None = field(
        default=None, metadata={"help": ".jsonl of {'prompt': ...} or .txt, one per line; default: built-in prompts"}
    )
    preview_max_new_tokens: int = field(default=128, metadata={"help": "length cap of each preview answer"})
    resume: bool = field(
        default=True, metadata={"help": "continue from the latest complete checkpoint in output_dir, if any"}
    )


def load_conversations(path: str, limit: int | None = None):
    """data_prep.py's JSONL as a `datasets.Dataset` of `messages` (TRL renders them with
    the tokenizer's chat template, which marks the assistant's tokens for the loss)."""
    from datasets import load_dataset

    if not Path(path).is_file():
        raise InputError(f"{path}: data file not found; run data_prep.py first (see README)")
    dataset = load_dataset("json", data_files=path, split="train")
    if "messages" not in dataset.column_names:
        raise InputError(f"{path}: rows need a 'messages' list (role/content), as data_prep.py writes them")
    dataset = dataset.select_columns(["messages"])
    if limit is not None and len(dataset) > limit:
        dataset = dataset.select(range(limit))  # data_prep already shuffled the rows
    return dataset


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


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig, callbacks=()):
    dtype = pick_dtype(model_args.dtype)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"[sft] {model_args.model_name_or_path} on {device}, compute dtype {str(dtype).split('.')[-1]}")

    # Data and prompts first: a bad file fails in seconds, before a model is loaded.
    train_dataset = load_conversations(script_args.train_file, script_args.max_train_examples)
    eval_dataset = load_conversations(script_args.eval_file) if script_args.eval_file else None
    prompts = read_prompts(script_args.preview_prompts_file) if script_args.preview_prompts_file else None
    if eval_dataset is None and training_args.eval_strategy != "no":
        training_args = dataclasses.replace(training_args, eval_strategy="no")
    resume_from = latest_complete_checkpoint(training_args.output_dir) if script_args.resume else None
    print(f"[sft] {len(train_dataset)} train / {len(eval_dataset) if eval_dataset else 0} eval conversations; "
          + (f"resuming from {resume_from}" if resume_from else "starting fresh"))

    tokenizer = load_chat_tokenizer(model_args.model_name_or_path, model_args.model_revision)
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
    if script_args.preview_steps > 0:
        trainer.add_callback(PreviewCallback(tokenizer, training_args.output_dir, prompts, every=script_args.preview_steps,
                                             max_new_tokens=script_args.preview_max_new_tokens))
    fix_lm_head_bias(trainer.model)
    upcast_trainable_params(trainer.model)
    if trainer.is_world_process_zero():
        trainer.model.print_trainable_parameters()

    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(training_args.output_dir)  # adapter (safetensors) + tokenizer with the chat tokens
    if trainer.is_world_process_zero():
        plot_history(trainer.state.log_history, {"train loss": "loss", "eval loss": "eval_loss"},
                     Path(training_args.output_dir) / "loss.png", "SFT loss")
        print(f"[sft] adapter, previews and loss.png in {training_args.output_dir}")
    return trainer


def parse_args(argv: list[str] | None = None):
    return parse_recipe((ScriptArguments, SFTConfig, ModelConfig), sys.argv[1:] if argv is None else argv,
                        DEFAULT_RECIPE)


if __name__ == "__main__":
    exit_on_input_error(lambda: main(*parse_args()))
