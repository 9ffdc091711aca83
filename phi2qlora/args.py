"""The one argument path of every script: `--config recipe.yaml` and `--flag value`
overrides, checked as recipes are (unknown key or flag with the closest real one, wrong
type, a value a run can't use, with file:line), then parsed by TRL's `TrlParser` into the
script's dataclasses. Heavy imports stay out of module level, so `--help` is as fast as
the dataclasses allow."""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

from phi2qlora.errors import InputError
from phi2qlora.files import check_model_source
from phi2qlora.recipes import check_recipe, check_values


@dataclass
class RunArguments:
    """The options both training scripts' ScriptArguments add to TRL's config."""

    preview_max_share: float = field(
        default=0.02, metadata={"help": "skip a scheduled preview if previews would pass this share of the "
                                        "training time (0: never skip); the first and last always run"}
    )
    keep_effective_batch: bool = field(
        default=True, metadata={"help": "under accelerate launch, split the recipe's batch over the processes"}
    )
    resume: bool = field(
        default=True, metadata={"help": "continue from the latest complete checkpoint in output_dir, if any"}
    )
    fast_training: Literal["auto", "true", "false", "compile"] = field(
        default="auto", metadata={"help": "train through phi2qlora/fast_training.py's Phi-2 layers (true), the generic "
                                          "PEFT + bitsandbytes layers (false), the fast layers with LayerNorm and the "
                                          "residual sum under torch.compile (compile: 3-4% slower than true on an H100 "
                                          "in the same call, no less GPU time a token in T4 mode: PERFORMANCE.md, "
                                          "#31-#35), "
                                          "or auto: the fast layers on a verified GPU; a run prints which"}
    )


@dataclass
class SFTScriptArguments(RunArguments):
    """sft_qlora.py's options beside TRL's SFTConfig and ModelConfig."""

    train_file: str = field(default="data/train.jsonl", metadata={"help": "data_prep.py's train.jsonl"})
    eval_file: str | None = field(default="data/eval.jsonl", metadata={"help": "held-out conversations; '' for none"})
    max_train_examples: int | None = field(default=32000, metadata={"help": "use at most this many train examples"})
    preview_steps: int = field(default=100, metadata={"help": "generate previews every N optimizer steps (0: never)"})
    preview_prompts_file: str | None = field(
        default=None, metadata={"help": ".jsonl of {'prompt': ...} or .txt, one per line; default: built-in prompts"}
    )
    preview_max_new_tokens: int = field(default=128, metadata={"help": "length cap of each preview answer"})
    fast_previews: bool = field(
        default=True, metadata={"help": "decode previews with rollouts.py: ~18x faster on an H100, but holds a "
                                        "16-bit copy of the model (5.2 GiB for Phi-2) while they run; false: "
                                        "plain generate"}
    )


@dataclass
class GRPOScriptArguments(RunArguments):
    """grpo_train.py's options beside TRL's GRPOConfig and ModelConfig."""

    sft_adapter: str = field(default="outputs/phi2-oasst1-qlora", metadata={"help": "sft_qlora.py's output dir"})
    prompts_file: str = field(default="data/grpo_prompts.jsonl", metadata={"help": "data_prep.py's GRPO prompts"})
    max_prompts: int | None = field(default=None, metadata={"help": "use at most this many prompts"})
    max_prompt_tokens: int = field(
        default=192, metadata={"help": "drop longer prompts (GRPOConfig has no prompt length limit)"}
    )
    preview_steps: int = field(default=50, metadata={"help": "generate previews every N optimizer steps (0: never)"})
    preview_prompts_file: str | None = field(default=None, metadata={"help": "default: word-limited prompts"})
    preview_max_new_tokens: int = field(default=160, metadata={"help": "length cap of each preview answer"})
    fast_rollouts: bool = field(
        default=True, metadata={"help": "sample rollouts with rollouts.py (the current weights merged, a "
                                        "CUDA-graph decoder); false: TRL's plain generate"}
    )


@dataclass
class DPOScriptArguments(SFTScriptArguments):
    """dpo_train.py's options beside TRL's DPOConfig and ModelConfig: SFT's data and preview
    options, read as pairs (max_train_examples caps the pairs), and the SFT adapter."""

    train_file: str = field(default="data/pairs_train.jsonl", metadata={"help": "data_prep.py's pairs_train.jsonl"})
    eval_file: str | None = field(default="data/pairs_eval.jsonl", metadata={"help": "held-out pairs; '' for none"})
    sft_adapter: str = field(default="outputs/phi2-oasst1-qlora", metadata={"help": "sft_qlora.py's output dir"})
    max_prompt_tokens: int = field(
        default=256, metadata={"help": "drop pairs with a longer prompt (the chat so far); below max_length, which "
                                       "cuts prompt + reply"}
    )


def parse_config(dataclass_types, argv: list[str], default_recipe=None) -> tuple:
    """Parse `--config recipe.yaml` (default: `default_recipe`; none if that is None too)
    and the flags over it into `dataclass_types`, everything checked first."""
    argv, recipe = _checked(dataclass_types, argv, default_recipe)
    return _parse(_parser(dataclass_types), argv, recipe)


def parse_recipe(dataclass_types, argv: list[str], default_recipe) -> tuple:
    """parse_config for a training script: mixed precision then follows the compute dtype
    (`model.pick_dtype`): fp16 AMP on a T4, bf16 on Ampere+, none on the CPU; and under
    `accelerate launch` the batch is split over the processes. The configs check their
    fields when built, so these go in as flags of a second parse, not as edits afterwards."""
    import torch
    from trl import ModelConfig

    from phi2qlora.model import pick_dtype

    argv, recipe = _checked(dataclass_types, argv, default_recipe)
    parser = _parser(dataclass_types)
    first = _parse(parser, [*argv, "--fp16", "False", "--bf16", "False"], recipe)
    model_args = next(a for a in first if isinstance(a, ModelConfig))
    check_model_source(model_args.model_name_or_path)
    dtype = pick_dtype(model_args.dtype)
    return _parse(parser, [*argv, "--fp16", str(dtype == torch.float16), "--bf16", str(dtype == torch.bfloat16),
                           *split_batch_over_processes(first)], recipe)


def parse_script_args(dataclass_type, argv: list[str]):
    """The arguments of a script with one dataclass (data_prep.py, evaluate.py,
    export_model.py, app.py), from flags and an optional `--config my.yaml`."""
    (args,) = parse_config((dataclass_type,), argv)
    return args


def recipe_path(argv: list[str], default_recipe=None) -> str | None:
    """The recipe `--config` names, else `default_recipe` (None: no recipe)."""
    if "--config" not in argv:
        return None if default_recipe is None else str(default_recipe)
    if argv.index("--config") + 1 >= len(argv):
        raise InputError("--config needs a recipe: a YAML file of `option: value` lines, "
                         "e.g. --config recipes/sft_tiny.yaml")
    return argv[argv.index("--config") + 1]


def _checked(dataclass_types, argv: list[str], default_recipe) -> tuple[list[str], str | None]:
    """The argv with the default recipe filled in, and the recipe, once every check passed."""
    recipe = recipe_path(argv, default_recipe)
    argv = list(argv) if recipe is None or "--config" in argv else ["--config", recipe, *argv]
    values = check_recipe(recipe, dataclass_types) if recipe else {}
    check_values(values, argv, recipe)
    check_flags(argv, dataclass_types)
    return with_dtype_names(argv, values, recipe, dataclass_types), recipe


DTYPE_FIELDS = ("dtype", "train_dtype")  # every script's dtype options: one vocabulary (model.dtype_name)


def with_dtype_names(argv: list[str], recipe_values: dict, recipe: str | None, dataclass_types) -> list[str]:
    """The argv with each dtype option in torch's name (fp16 -> float16), a recipe's too, so
    TRL's ModelConfig (choices: auto, bfloat16, float16, float32) takes the short names as
    evaluate.py and app.py do; a name no script knows is one line, the same everywhere.
    `auto` is offered where the field takes it (its default or its choices)."""
    from phi2qlora.model import dtype_name
    from phi2qlora.recipes import recipe_line

    fields = {f.name: f for cls in dataclass_types for f in dataclasses.fields(cls) if f.name in DTYPE_FIELDS}
    auto = {name: f.default == "auto" or "auto" in f.metadata.get("choices", ()) for name, f in fields.items()}
    argv, given = list(argv), set()
    for i, arg in enumerate(argv):
        name, eq, value = arg[2:].replace("-", "_").partition("=") if arg.startswith("--") else ("", "", "")
        if name not in fields or (not eq and i + 1 >= len(argv)):
            continue
        given.add(name)
        if eq:
            argv[i] = f"--{name}={dtype_name(value, f'--{name}', auto[name])}"
        else:
            argv[i + 1] = dtype_name(argv[i + 1], f"--{name}", auto[name])
    for name in fields:
        if name in recipe_values and name not in given:
            where = f"{recipe}:{recipe_line(recipe, name) or '?'}: '{name}'"
            argv += [f"--{name}", dtype_name(recipe_values[name], where, auto[name])]
    return argv


def _parser(dataclass_types):
    from trl import TrlParser

    # argparse would print a 200-line usage first
    return one_line_errors(TrlParser(dataclass_types), "in the recipe or on the command line; --help lists every option")


def _parse(parser, argv: list[str], recipe: str | None) -> tuple:
    try:
        with warnings.catch_warnings():
            # transformers 5.25 renames `gradient_checkpointing` (which TRL's configs set and
            # the recipes use) to `activation_checkpointing`, and says so twice a run; the old
            # name still works there and is the only one older transformers know.
            warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
            return parser.parse_args_and_config(argv)
    except InputError:
        raise
    except Exception as e:  # the configs' own checks (__post_init__): ValueError mostly, a few others
        raise InputError(config_error(recipe, e)) from None


def config_error(recipe: str | None, e: Exception) -> str:
    """A config's own check failing, as one line: its first line, the exception's name unless
    it is the usual ValueError, and where to look."""
    kind = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
    first = (str(e).strip().splitlines() or [""])[0][:300]
    where = f"{recipe} or the command line" if recipe else "the command line"
    return f"{kind}{first} (check the values in {where})"


def check_flags(argv: list[str], dataclass_types) -> None:
    """Every `--flag` names a field (HfArgumentParser's message is a ValueError listing the
    leftovers); `--no_x` turns off a boolean field x, as HfArgumentParser allows."""
    fields = {f.name: f for cls in dataclass_types for f in dataclasses.fields(cls)}
    for arg in argv:
        if not arg.startswith("--") or arg in ("--config", "--help"):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name in fields or (name.startswith("no_") and name[3:] in fields):
            continue
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        raise InputError(f"unknown option --{name}{hint} (--help lists every option)")


# Values the configs accept but a run can't use: found before any model loads, not as a


def one_line_errors(parser, hint: str = "--help lists every option"):
    """Make an argparse parser's errors an InputError (one line, exit 2) instead of its usage
    block and message."""

    def error(message):
        raise InputError(f"{message} ({hint})")

    parser.error = error
    return parser


def split_batch_over_processes(parsed) -> list[str]:
    """Under `accelerate launch --num_processes N`, the flags that keep the recipe's
    effective batch (micro-batch x accumulation x processes): the accumulation is divided
    by N where it can be, else the micro-batch. `--keep_effective_batch false` keeps the
    per-process values, and the batch grows N times."""
    import torch
    from transformers import TrainingArguments

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1 and torch.cuda.device_count() > 1:  # the Trainer would use nn.DataParallel, which TRL refuses
        raise InputError(f"{torch.cuda.device_count()} GPUs are visible to one process: use them all with "
                         f"`accelerate launch --num_processes {torch.cuda.device_count()} <script> ...`, or one with "
                         "CUDA_VISIBLE_DEVICES=0")
    script_args = parsed[0]
    args = next(a for a in parsed if isinstance(a, TrainingArguments))
    micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    if processes > 1 and getattr(script_args, "keep_effective_batch", False):
        if accumulation % processes == 0:
            accumulation //= processes
        elif micro % processes == 0:
            micro //= processes
        else:
            raise InputError(f"can't keep the effective batch ({micro} x {accumulation}) over {processes} processes: "
                             "neither per_device_train_batch_size nor gradient_accumulation_steps divides by it; "
                             "change one, or pass --keep_effective_batch false")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[batch] effective batch {micro * accumulation * processes} = {micro} per micro-batch x "
              f"{accumulation} accumulated x {processes} process{'es' if processes > 1 else ''}", flush=True)
    return ["--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", str(accumulation)]
