"""GRPO after SFT: teach the SFT model to be concise and to obey word limits.

Continues from the SFT adapter (Phi-2 in 4-bit NF4 + LoRA, the adapter loaded trainable)
with TRL's GRPOTrainer: for each prompt of data/grpo_prompts.jsonl it samples a group of
answers, scores them with the verifiable rewards of rewards.py (word limit, conciseness,
format) and moves the policy towards the better ones of each group.

    python grpo_train.py                                   # = --config recipes/grpo_phi2_t4.yaml
    python grpo_train.py --config recipes/grpo_tiny.yaml   # offline, CPU
    python rewards.py my_pairs.jsonl                       # check the rewards on your own examples first

The KL term keeps the policy near the SFT model, not vanilla Phi-2: TRL, given a loaded
adapter and beta > 0, copies it into a frozen `ref` adapter and takes the KL against that.
Rerun the same command after an interruption to resume.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from trl import GRPOConfig, GRPOTrainer, ModelConfig
from trl.trainer.utils import pad

from phi2qlora import rollouts
from phi2qlora.args import GRPOScriptArguments, parse_recipe
from phi2qlora.chat import format_prompt
from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.fast_training import use_fast_training
from phi2qlora.files import check_limit, read_prompt_rows
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
from phi2qlora.rewards import REWARD_FUNCS, make_reward_funcs, reward_weights, word_limit_compliance, word_limit_reward
from phi2qlora.training import (
    claim_output_dir,
    input_paths,
    plot_history,
    run_identity,
    save_trained_adapter,
    train_guarded,
)
from phi2qlora.word_limits import count_words
from preview_callback import PreviewCallback

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "grpo_phi2_t4.yaml"
# Word-limited prompts show GRPO's effect best, so the previews lead with them.
PREVIEW_PROMPTS = [
    "Explain why the sky is blue in under 50 words.",
    "What is the difference between weather and climate? Answer in no more than 30 words.",
    "Give me three tips for a job interview. Keep it within 40 words.",
    "What is a black hole?",
]


def load_prompts(path: str, tokenizer, max_tokens: int, limit: int | None = None):
    """data_prep.py's prompt rows as a Dataset: `prompt` in the chat format (TRL feeds
    it to the model as is), `word_limit` passed on to the rewards."""
    from datasets import Dataset

    check_limit(limit, "--max_prompts")
    rows, too_long = [], 0
    for row in read_prompt_rows(path):
        text = format_prompt(row["prompt"])
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_tokens:
            too_long += 1
            continue
        rows.append({"prompt": text, "word_limit": row["word_limit"]})
        if limit is not None and len(rows) == limit:
            break
    if not rows:
        raise InputError(f"{path}: no usable prompts ({too_long} longer than {max_tokens} tokens)")
    print(f"[grpo] {len(rows)} prompts, {sum(r['word_limit'] is not None for r in rows)} with a word limit; "
          f"{too_long} dropped as longer than {max_tokens} tokens")
    return Dataset.from_list(rows)


def with_stats(reward_func):
    """The word-limit reward, also logging what a person watches: mean completion words
    and the share of word-limited prompts obeyed (TRL's `log_metric`)."""

    def word_limit_reward(prompts, completions, log_metric=None, **kwargs):
        if log_metric is not None:
            log_metric("completion_words", sum(count_words(c) for c in completions) / max(len(completions), 1))
            obeyed = [c for c in word_limit_compliance(prompts, completions, kwargs.get("word_limit"))
                      if c is not None]
            if obeyed:
                log_metric("word_limit_compliance", sum(obeyed) / len(obeyed))
        return reward_func(prompts=prompts, completions=completions, **kwargs)

    return word_limit_reward  # TRL logs each reward under its function's name


class FastRolloutGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose rollouts come from `rollouts.generate`: the same sampling from
    the policy as it is at this step, ~18x the new tokens/s of plain `generate` on an
    H100 (PERFORMANCE.md). Falls back to TRL's path for what the fast one doesn't do."""

    fallback_reason: str | None = None

    def _generate_single_turn(self, prompt_ids, images=None, multimodal_fields=None, *args, **kwargs):
        model = self.accelerator.unwrap_model(self.model_wrapped)
        if self.fallback_reason is None:
            self.fallback_reason = ("images" if images is not None or multimodal_fields else
                                    rollouts.unsupported_reason(model, self.generation_kwargs) or "")
            if self.fallback_reason:
                print(f"[grpo] fast rollouts off ({self.fallback_reason}): TRL's generate instead")
        if self.fallback_reason:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
        dtype = torch.float16 if self.args.fp16 else torch.bfloat16 if self.args.bf16 else torch.float32
        prompts = [torch.tensor(ids) for ids in prompt_ids]  # left-padded, as TRL's own path pads them
        input_ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left")
        attention_mask = pad([torch.ones_like(t) for t in prompts], padding_value=0, padding_side="left")
        new_tokens = rollouts.generate_or_none(
            model, input_ids.to(self.accelerator.device), attention_mask.to(self.accelerator.device),
            max_new_tokens=self.max_completion_length, temperature=self.temperature,
            eos_token_ids=self.eos_token_ids, pad_token_id=self._tokenizer.pad_token_id, dtype=dtype)
        if new_tokens is None:
            self.fallback_reason = "out of GPU memory"
            print("[grpo] fast rollouts off (out of GPU memory for the 16-bit weights): TRL's generate instead")
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
        return rollouts.completion_lists(new_tokens, self.eos_token_ids), None


def main(script_args: GRPOScriptArguments, training_args: GRPOConfig, model_args: ModelConfig, callbacks=()):
    dtype = pick_dtype(model_args.dtype)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"[grpo] {model_args.model_name_or_path} + {script_args.sft_adapter} on {device}, "
          f"compute dtype {str(dtype).split('.')[-1]}, beta {training_args.beta}")

    check_adapter_fits(script_args.sft_adapter, model_args.model_name_or_path, "--sft_adapter", "--model_name_or_path",
                       model_args.model_revision, "run sft_qlora.py first (see README), or give its output directory")
    run = run_identity("grpo_train.py", model_args, dtype, script_args.sft_adapter)
    resume_from = claim_output_dir(training_args.output_dir, run, script_args.resume,
                                   training_args.resume_from_checkpoint, input_paths(script_args, model_args))
    tokenizer = load_chat_tokenizer(script_args.sft_adapter)  # saved by SFT, chat tokens included
    train_dataset = load_prompts(script_args.prompts_file, tokenizer, script_args.max_prompt_tokens,
                                 script_args.max_prompts)
    previews = ([r["prompt"] for r in read_prompt_rows(script_args.preview_prompts_file)]
                if script_args.preview_prompts_file else PREVIEW_PROMPTS)
    print("[grpo] " + (f"resuming from {resume_from}" if resume_from else "starting from the SFT adapter"))

    model = load_base_model(model_args.model_name_or_path, tokenizer, dtype, **model_kwargs(model_args))
    model = load_adapter(model, script_args.sft_adapter, trainable=True)
    sft_weights = trainable_weights(model)
    reward_funcs = [with_stats(f) if f.func is word_limit_reward else f
                    for f in make_reward_funcs(tokenizer)]
    if training_args.reward_weights is None:  # the weights evaluate.py totals with, unless the recipe sets its own
        training_args.reward_weights = reward_weights(reward_funcs)
    print("[grpo] reward weights: " + ", ".join(f"{f.__name__} {w:g}" for f, w in
                                                zip(REWARD_FUNCS, training_args.reward_weights)))
    trainer = (FastRolloutGRPOTrainer if script_args.fast_rollouts else GRPOTrainer)(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    restore_sft_weights(trainer.model, sft_weights)
    use_fast_training(trainer.model, script_args.fast_training, log=print if trainer.is_world_process_zero() else None)
    if preview := PreviewCallback.for_run(tokenizer, training_args.output_dir, previews, script_args,
                                          fast=script_args.fast_rollouts):
        trainer.add_callback(preview)

    train_guarded(trainer, resume_from, {
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "max_completion_length": training_args.max_completion_length,
        "num_generations": training_args.num_generations,
        "gradient_checkpointing": training_args.gradient_checkpointing})
    if trainer.is_world_process_zero():
        save_trained_adapter(trainer.model, tokenizer, training_args.output_dir)
        names = [f.__name__ for f in REWARD_FUNCS]
        plot_history(trainer.state.log_history,
                     {"total reward": "reward", **{n: f"rewards/{n}/mean" for n in names},
                      "word-limit compliance": "word_limit_compliance"},
                     Path(training_args.output_dir) / "rewards.png", "GRPO rewards")
        print(f"[grpo] adapter, previews and rewards.png in {training_args.output_dir}")
    return trainer


def parse_args(argv: list[str] | None = None):
    return parse_recipe((GRPOScriptArguments, GRPOConfig, ModelConfig), sys.argv[1:] if argv is None else argv,
                        DEFAULT_RECIPE)


if __name__ == "__main__":
    exit_on_input_error(lambda: main(*parse_args()))
