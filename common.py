"""What the scripts share: the chat format, word counting, atomic writes, and loading
Phi-2 (or the tiny offline model) in 4-bit with the chat tokens ready to train."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------------------
# Chat format. Phi-2 was never chat-tuned, so the project defines its own turns with new
# special tokens. Phi-2's tokenizer uses ids up to ~50,295 while its embedding has 51,200
# rows, so these tokens land in existing (unused) rows: no resize.
# ---------------------------------------------------------------------------------------
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"  # end of turn; also the tokenizer's EOS, so generate() and GRPO stop on it
PAD = "<|pad|>"  # distinct from EOS, so padding never masks a real end of turn
CHAT_TOKENS = [USER, ASSISTANT, END, PAD]
ROLE_TOKENS = {"user": USER, "assistant": ASSISTANT}
# Text that the tokenizer turns into a special token: inside a message it would end the
# turn early or start a fake one, so such text is refused (data_prep.py drops it).
RESERVED_TEXT = (*CHAT_TOKENS, "<|endoftext|>")


def reserved_text_in(text: str) -> str | None:
    """The first chat or end-of-document token written out in `text`, if any."""
    return next((t for t in RESERVED_TEXT if t in text), None)


# The same format as `format_chat`, for tokenizer.apply_chat_template. The
# {% generation %} markers let TRL's `assistant_only_loss` put the loss on the
# assistant's words and its end-of-turn token, nothing else.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def format_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render messages as CHAT_TEMPLATE does, without needing a tokenizer."""
    parts = []
    for m in messages:
        if m["role"] not in ROLE_TOKENS:
            raise ValueError(f"unknown role: {m['role']!r} (expected 'user' or 'assistant')")
        parts.append(f"{ROLE_TOKENS[m['role']]}\n{m['content']}{END}\n")
    if add_generation_prompt:
        parts.append(f"{ASSISTANT}\n")
    return "".join(parts)


def format_prompt(prompt: str) -> str:
    """A single user turn, ready for the assistant's answer."""
    return format_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)


_WORD = re.compile(r"\w+")


def count_words(text: str | None) -> int:
    """Words as IFEval counts them: runs of word characters (nltk's RegexpTokenizer(r'\\w+'))."""
    return len(_WORD.findall(text or ""))


def with_instruction(prompt: str, instruction: str) -> str:
    """A prompt with an instruction such as "Answer in under 50 words." added: after a space
    when the prompt is one finished sentence, else on its own line. After code or a list it
    reads better there, and after a sentence with no closing mark it must be: rewards.py
    reads "Is it safe or not Use at most 20 words." as a negated limit, "at least 20 words"."""
    sep = " " if "\n" not in prompt and prompt.endswith((".", "!", "?")) else "\n\n"
    return f"{prompt}{sep}{instruction}"


# ---------------------------------------------------------------------------------------
# Files: written whole or not at all.
# ---------------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file or
    none, never half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise InputError(cannot_write(path, e)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a directory where the file goes
            raise InputError(cannot_write(path, e)) from None
        raise


def cannot_write(path: Path, error: OSError) -> str:
    """The OS's refusal to write `path`, as one line with what to do."""
    blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"{path}: cannot write it: {blocker} is a file, not a folder; choose another output path"
    return (f"{path}: cannot write it ({error.strerror or error}); choose another output path, or check that "
            "you may write there and that the disk has room")


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Fail now, before any work, if the OS will refuse to create or write `path` (a file
    or a folder): its nearest existing ancestor must be a folder this user may write to."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if existing != path and not existing.is_dir():
        raise InputError(f"{flag} {path}: cannot be created, {existing} is a file; choose another {flag}")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write in {folder} (permission denied or a read-only disk); "
                         f"choose another {flag}")


def json_error(e: json.JSONDecodeError) -> str:
    """json's message with its column: "Unterminated string starting at column 9", not "... at at"."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl_atomic(path: str | os.PathLike, rows) -> int:
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    write_atomic(path, "".join(lines))
    return len(lines)


def read_jsonl_rows(path: str | os.PathLike, what: str):
    """Yield `(line number, row)` for each non-blank line of a JSONL file, with errors
    that name the file and line (`datasets`' JSON loader names neither). Lines are decoded
    one at a time, so a bad byte is blamed on its own line; a UTF-8 byte-order mark is
    skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found; run data_prep.py first (see README)")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{n}: not UTF-8 (byte {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                json.dumps(row, ensure_ascii=False).encode("utf-8")  # an unpaired \ud800 escape fails here
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({json_error(e)}); each line must be one JSON object") from None
            except (RecursionError, ValueError, UnicodeEncodeError) as e:  # too deep, a 5,000-digit number
                reason = "an unpaired surrogate escape such as \\ud800" if isinstance(e, UnicodeEncodeError) else str(e)[:80]
                raise InputError(f"{path}:{n}: a value JSON allows but this program can't hold ({reason})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def check_limit(limit: int | None, flag: str) -> None:
    """`limit` caps how many rows to use: None for all, else at least 1."""
    if limit is not None and limit < 1:
        raise InputError(f"{flag} must be at least 1 (or left out to use every row), got {limit}")


def read_prompt_rows(path: str | os.PathLike) -> list[dict]:
    """Prompts as `{"prompt", "word_limit"}` rows: a `.jsonl` file as data_prep.py writes
    them (`word_limit` a positive integer or null, optional), or any other text file with
    one prompt per line (no stated limit)."""
    path = Path(path)
    rows = []
    if path.suffix != ".jsonl":
        if not path.is_file():
            raise InputError(f"{path}: prompt file not found")
        try:
            lines = path.read_text(encoding="utf-8-sig").split("\n")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text; save it as UTF-8") from None
        rows = [{"prompt": line.strip(), "word_limit": None} for line in lines if line.strip()]
    else:
        for n, row in read_jsonl_rows(path, "prompt file"):
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise InputError(f"{path}:{n}: field 'prompt' must be a non-empty string")
            if token := reserved_text_in(row["prompt"]):
                raise InputError(f"{path}:{n}: the prompt holds {token!r}, which the tokenizer reads as a special "
                                 "token (a turn boundary); remove it")
            limit = row.get("word_limit")
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit < 10**9):
                raise InputError(f"{path}:{n}: field 'word_limit' must be a positive integer below 10**9 or null, "
                                 f"got {str(limit)[:20]}")
            rows.append({"prompt": row["prompt"], "word_limit": limit})
    if not rows:
        raise InputError(f"{path}: no prompts in the file")
    return rows


class InputError(Exception):
    """Bad input from the user (a file, a recipe, a flag): the message says where and what
    to do. Scripts print it without a traceback and exit with status 2."""


def exit_on_input_error(main):
    """Run `main()`; turn an InputError into one line on stderr and exit status 2 (a
    RunFault, a run that failed: 1)."""
    import sys

    try:
        return main()
    except InputError as e:
        prog = Path(sys.argv[0]).stem
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(getattr(e, "exit_status", 2)) from None


# ---------------------------------------------------------------------------------------
# Models: the same loading code for Phi-2 on a GPU and the tiny model on a CPU.
# ---------------------------------------------------------------------------------------
def pick_dtype(requested: str | None = "auto"):
    """The compute dtype. `auto`: bf16 where the GPU computes it natively (compute
    capability >= 8.0), fp16 on older GPUs such as the T4 (7.5), which reports bf16 as
    "supported" but only emulates it, slowly; fp32 on the CPU."""
    import torch

    if requested not in (None, "auto"):
        return getattr(torch, requested)
    if not torch.cuda.is_available():
        return torch.float32
    major, _ = torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16


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


def one_line_errors(parser, hint: str = "--help lists every option"):
    """Make an argparse parser's errors an InputError (one line, exit 2) instead of its usage
    block and message."""

    def error(message):
        raise InputError(f"{message} ({hint})")

    parser.error = error
    return parser


def parse_recipe(dataclass_types, argv: list[str], default_recipe) -> tuple:
    """Parse `--config recipe.yaml` (default: `default_recipe`) and command-line overrides
    with TRL's parser. Mixed precision then follows the compute dtype (`pick_dtype`): fp16
    AMP on a T4, bf16 on Ampere+, none on the CPU. The configs check their fields when
    built, so the flags go in as arguments of a second parse, not as edits afterwards.

    The recipe is checked first (unknown keys, wrong types, with its line numbers): TRL
    passes YAML values to the dataclasses unchecked, so `per_device_train_batch_size: 2.5`
    would otherwise fail far into the run, or not at all."""
    import torch
    from trl import ModelConfig, TrlParser

    argv = list(argv)
    if "--config" not in argv:
        argv = ["--config", str(default_recipe), *argv]
    if argv.index("--config") + 1 >= len(argv):
        raise InputError("--config needs a recipe file, e.g. --config recipes/sft_tiny.yaml")
    recipe = argv[argv.index("--config") + 1]
    check_values(check_recipe(recipe, dataclass_types), argv, recipe)
    check_flags(argv, dataclass_types)
    # argparse would print a 200-line usage first
    parser = one_line_errors(TrlParser(dataclass_types),
                             "in the recipe or on the command line; --help lists every option")
    try:
        first = parser.parse_args_and_config([*argv, "--fp16", "False", "--bf16", "False"])
        model_args = next(a for a in first if isinstance(a, ModelConfig))
        check_model_source(model_args.model_name_or_path)
        dtype = pick_dtype(model_args.dtype)
        return parser.parse_args_and_config(
            [*argv, "--fp16", str(dtype == torch.float16), "--bf16", str(dtype == torch.bfloat16),
             *split_batch_over_processes(first)])
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
    import dataclasses
    import difflib

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
# traceback minutes later (a NaN learning rate) or never (max_steps -5 trains whole epochs).
_FINITE = math.isfinite
VALUE_RULES = {
    "learning_rate": (lambda v: _FINITE(v) and v > 0, "a positive number"),
    "max_steps": (lambda v: v == -1 or v >= 1, "a positive whole number, or -1 to train num_train_epochs"),
    "num_train_epochs": (lambda v: _FINITE(v) and v > 0, "a positive number"),
    "per_device_train_batch_size": (lambda v: v >= 1, "at least 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "at least 1"),
    "warmup_steps": (lambda v: _FINITE(v) and v >= 0, "a number of steps, or a share of them below 1, not negative"),
    "weight_decay": (lambda v: _FINITE(v) and v >= 0, "a number, 0 or more"),
    "max_grad_norm": (lambda v: v is None or (_FINITE(v) and v >= 0), "a number, 0 or more"),
    "adam_epsilon": (lambda v: _FINITE(v) and v > 0, "a positive number"),
    "adam_beta1": (lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    "adam_beta2": (lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    "logging_steps": (lambda v: _FINITE(v) and v > 0, "a positive number (of steps, or a share of them below 1)"),
    "eval_steps": (lambda v: v is None or (_FINITE(v) and v > 0), "a positive number (of steps, or a share below 1)"),
    "save_steps": (lambda v: _FINITE(v) and v > 0, "a positive number (of steps, or a share of them below 1)"),
    "seed": (lambda v: 0 <= v < 2**32, "a whole number from 0 to 2**32 - 1"),
    "ddp_timeout": (lambda v: 0 < v < 2**31, "a positive number of seconds below 2**31"),
    "max_length": (lambda v: v is None or v >= 1, "at least 1"),
    "lora_r": (lambda v: v >= 1, "at least 1"),
    "lora_alpha": (lambda v: _FINITE(v) and v > 0, "a positive number"),
    "lora_dropout": (lambda v: 0 <= v < 1, "from 0 up to, not including, 1"),
    "num_generations": (lambda v: v is not None and v >= 2, "at least 2 (GRPO compares answers within a group)"),
    "max_completion_length": (lambda v: v is None or v >= 1, "at least 1"),
    "temperature": (lambda v: _FINITE(v) and v > 0, "a positive number"),
    "beta": (lambda v: _FINITE(v) and v >= 0, "a number, 0 or more"),
    "preview_steps": (lambda v: v >= 0, "0 (never) or more"),
    "preview_max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "preview_max_share": (lambda v: 0 <= v <= 1, "a share from 0 to 1"),
    "max_prompt_tokens": (lambda v: v >= 1, "at least 1"),
}


def check_values(recipe_values: dict, argv: list[str], recipe: str | None) -> None:
    """Apply VALUE_RULES to the values the recipe and the flags give (the flags win), before
    the configs are built: some of their own checks fail with a ZeroDivisionError or an
    OverflowError. The error names the flag, or the recipe's file and line."""
    given = {name: (value, None) for name, value in recipe_values.items()}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, _, value = arg[2:].replace("-", "_").partition("=")
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        given[name] = (_number(value), f"--{name}")
    for name, (ok, need) in VALUE_RULES.items():
        if name not in given:
            continue
        value, flag = given[name]
        try:
            good = ok(value)
        except TypeError:  # not a number: the parser or check_recipe says so
            good = True
        if not good:
            where = flag or f"{recipe}:{recipe_line(recipe, name) or '?'}: '{name}'"
            raise InputError(f"{where} must be {need}, got {value!r}")


def _number(text: str):
    """A flag's value as the parser will read a number field: '5' -> 5, 'nan' -> nan, 'None' -> None."""
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def recipe_line(path: str, key: str) -> int | None:
    """The line of `key` in a recipe check_recipe has already read (so it reads)."""
    _, root = read_recipe(path)
    return next((k.start_mark.line + 1 for k, _ in getattr(root, "value", ()) if k.value == key), None)


def check_model_source(name: str, flag: str = "--model_name_or_path", marks=("config.json",)) -> None:
    """A model given as a local folder must be one (holding one of `marks`); a name that can
    only be a path and is not there is said so now, not as a 70-line traceback about repo ids
    after the data loaded."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / m).is_file() for m in marks):
            raise InputError(f"{flag} {name}: no model in that folder ({marks[0]} missing); give a folder "
                             "a model was saved in (make_tiny_model.py, export_model.py) or a Hub id such as "
                             "microsoft/phi-2")
        return
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or not name.strip():
        raise InputError(f"{flag} {name}: no such model folder; give a local folder with config.json or a Hub "
                         "id such as microsoft/phi-2")


def parse_script_args(dataclass_type, argv: list[str]):
    """The arguments of a script with one dataclass (evaluate.py, export_model.py), from
    flags and an optional `--config my.yaml`, checked as a recipe is."""
    from trl import TrlParser

    argv = list(argv)
    recipe = None
    if "--config" in argv:
        if argv.index("--config") + 1 >= len(argv):
            raise InputError("--config needs a YAML file of `option: value` lines")
        recipe = argv[argv.index("--config") + 1]
    check_flags(argv, (dataclass_type,))
    parser = one_line_errors(TrlParser([dataclass_type]))
    check_values(check_recipe(recipe, (dataclass_type,)) if recipe else {}, argv, recipe)
    try:
        (args,) = parser.parse_args_and_config(argv)
    except Exception as e:  # a config's own check (__post_init__)
        raise InputError(config_error(recipe, e)) from None
    return args


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


def check_recipe(path: str, dataclass_types) -> dict:
    """Read a recipe and check every key against the dataclasses' fields and their types;
    errors name the file, the line and the key."""
    import dataclasses
    import difflib
    import typing

    recipe, root = read_recipe(path)
    if not recipe:
        return {}
    lines = {key.value: key.start_mark.line + 1 for key, _ in root.value}
    fields = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        fields.update({f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)})
    for key, value in recipe.items():
        where = f"{path}:{lines.get(key, '?')}"
        if key == "env":
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; --help lists every option"
            raise InputError(f"{where}: unknown key '{key}'{hint}")
        if not _fits(value, fields[key]):
            raise InputError(f"{where}: '{key}' must be {_describe(fields[key])}, got {value!r}")
    return recipe


def read_recipe(path: str) -> tuple[dict, object]:
    """A recipe's `key: value` mapping and its YAML node tree (for line numbers); every way
    the file can be unreadable is one line naming it."""
    import yaml

    path_ = Path(path)
    if not path_.is_file():
        raise InputError(f"{path}: recipe not found (the recipes are in recipes/)")
    raw = path_.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte {e.start + 1}); a recipe is a YAML text file, "
                         "saved as UTF-8") from None
    try:
        root = yaml.compose(text)
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise InputError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to read; a recipe is flat `key: value` lines") from None
    if recipe is None:
        return {}, root
    if not isinstance(recipe, dict):
        raise InputError(f"{path}: a recipe is a mapping of `key: value` lines, got {type(recipe).__name__}")
    return recipe, root


def _fits(value, annotation) -> bool:
    """Whether a YAML value fits a dataclass field's type (what can't be judged passes)."""
    import enum
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any or isinstance(annotation, (str, typing.TypeVar)):
        return True
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        # `Union[SchedulerType, str]`: TrainingArguments turns the string into the enum, so only
        # its values fit (checked here, where the recipe's line is known).
        choices = _enum_in(annotation)
        if choices is not None and isinstance(value, str):
            return value in choices
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, set):
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation} or value in annotation.__members__
    return True


def _enum_in(annotation) -> list[str] | None:
    """The values of an Enum that is one member of a Union, if there is one."""
    import enum
    import typing

    for a in typing.get_args(annotation):
        if isinstance(a, type) and issubclass(a, enum.Enum):
            return [m.value for m in a]
    return None


def _describe(annotation) -> str:
    import typing

    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
             type(None): "null", dict: "a mapping"}
    if (choices := _enum_in(annotation)) is not None:
        return "one of " + ", ".join(map(str, choices))
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    if typing.get_origin(annotation) in (list, tuple, set):
        return "a list"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def load_chat_tokenizer(name_or_path: str, revision: str = "main"):
    """The base tokenizer with the chat tokens added, END as EOS and PAD as pad."""
    from transformers import AutoTokenizer

    check_model_source(name_or_path, "tokenizer", marks=("tokenizer_config.json", "tokenizer.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except OSError as e:  # not on the Hub, not in the offline cache, a damaged folder
        raise InputError(could_not_load(name_or_path, e)) from None
    tokenizer.add_tokens(CHAT_TOKENS, special_tokens=True)
    tokenizer.eos_token = END
    tokenizer.pad_token = PAD
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def could_not_load(name: str, error: OSError) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    offline = " (offline, HF_HUB_OFFLINE=1: a Hub model must already be in the cache)" \
        if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return f"could not load {name!r}{offline}: {first[:200]}; give a local model folder or a Hub id such as microsoft/phi-2"


def chat_token_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS}


def load_base_model(name_or_path: str, tokenizer, dtype, *, load_in_4bit: bool = True,
                    double_quant: bool = True, attn_implementation: str | None = "sdpa",
                    revision: str = "main", cpu_packed_kernel: bool = False):
    """The base model, in 4-bit NF4 by default, on this process's device, with rows
    initialised for the chat tokens (see `init_chat_token_rows`).

    Its 4-bit layers keep the layout they train in (`keep_4bit_trainable`), whatever runs
    on them. `cpu_packed_kernel=True` is for a model that never trains (app.py's `nf4`
    weights): on a CPU with AVX512-BF16, bitsandbytes then repacks each layer for its
    bf16 inference kernel at the first eval-mode forward."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if torch.cuda.is_available():
        from accelerate import PartialState

        device = f"cuda:{PartialState().local_process_index}"  # one full copy per process
    else:
        device = "cpu"
    quantization_config = None
    if load_in_4bit:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=revision,
            dtype=dtype,
            quantization_config=quantization_config,
            attn_implementation=attn_implementation,  # sdpa: fp16-safe attention on a T4
            device_map={"": device},
        )
    except OSError as e:
        raise InputError(could_not_load(name_or_path, e)) from None
    use_fused_gelu(model)
    if load_in_4bit and not cpu_packed_kernel:
        keep_4bit_trainable(model)
    if torch.cuda.is_available():
        # cuDNN's sdpa kernels cost ~2 ms of host time a call and a new plan for each new
        # sequence length (H100, torch 2.11): without them SFT ran 26% faster (PERFORMANCE.md).
        # A T4 has no cuDNN attention; the flash / memory-efficient kernels remain.
        torch.backends.cuda.enable_cudnn_sdp(False)
    init_chat_token_rows(model, tokenizer)
    return model


def keep_4bit_trainable(model) -> int:
    """Keep every bitsandbytes 4-bit layer in the layout that trains, through any eval-mode
    forward (previews, evaluation during training, GRPO's rollouts and reference passes).

    bitsandbytes 0.50.2, on a CPU with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids and
    newer), repacks a `Linear4bit`'s weight for its CPU inference kernel the first time the
    layer runs in eval mode on an input that needs no grad, and keeps it packed
    (`Linear4bit.forward`, `support_avx512bf16_for_cpu`). A later training forward then takes
    `gemv_4bit`, which has no autograd: with a bias (every Phi-2 projection has one) it raises
    "a view of a leaf Variable that requires grad is being used in an in-place operation" in
    `matmul_4bit`; without one the input gets no gradient, silently. A preview at step 0 did
    exactly that. Turning the flag off before the first forward keeps the trainable layout
    (the packing is lossy to undo: it rounds the scales to bf16). CUDA is unaffected.
    Returns how many layers were set."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


PHI2_HIDDEN_ACT = "gelu_pytorch_tanh"  # what use_fused_gelu gives Phi-2 (memory_plan.py reads it)


def use_fused_gelu(model) -> int:
    """Phi-2's `gelu_new` is a Python formula: ~8 kernels and ~7 saved tensors of the MLP
    width a token in each layer. torch's gelu(approximate="tanh") is the same function in one
    kernel (logits equal to 1e-5, tested): 10% faster SFT, and ~4 MB less a token without
    gradient checkpointing (PERFORMANCE.md). Returns how many layers were changed."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in model.modules():
        if isinstance(getattr(module, "activation_fn", None), NewGELUActivation):
            module.activation_fn = GELUTanh()
            swapped += 1
    if swapped:
        model.config.hidden_act = PHI2_HIDDEN_ACT
    return swapped


def model_kwargs(model_args) -> dict:
    """load_base_model's options from TRL's ModelConfig, as the recipes set them."""
    return dict(load_in_4bit=model_args.load_in_4bit, double_quant=model_args.use_bnb_nested_quant,
                attn_implementation=model_args.attn_implementation, revision=model_args.model_revision)


def init_chat_token_rows(model, tokenizer) -> None:
    """Give the chat tokens sensible rows in the existing embedding and lm_head: no resize.

    Input rows start at the mean embedding (Hewitt's recipe for new tokens); END's output
    row and bias start as a copy of <|endoftext|>'s, so the model ends a turn where it
    would have ended a document. Deterministic in the base weights, so loading an adapter
    later rebuilds exactly the base it was trained on."""
    import torch

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = embed.weight.shape[0]
    ids = chat_token_ids(tokenizer)
    if len(tokenizer) > rows:
        raise InputError(
            f"the tokenizer has {len(tokenizer)} tokens with the chat tokens but the model's embedding "
            f"has only {rows} rows; this project adds tokens only into spare rows (no resize)"
        )
    first_new = min(ids.values())
    doc_end = tokenizer.get_vocab().get("<|endoftext|>")  # Phi-2's end of document
    with torch.no_grad():
        mean = embed.weight[:first_new].float().mean(0).to(embed.weight.dtype)
        embed.weight[list(ids.values())] = mean
        if doc_end is not None:
            head.weight[ids[END]] = head.weight[doc_end]
            if head.bias is not None:
                head.bias[ids[END]] = head.bias[doc_end]
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = ids[END]
        cfg.pad_token_id = ids[PAD]


def fix_lm_head_bias(model) -> int:
    """Give Phi-2's lm_head its bias back under PEFT's trainable-token wrapper (peft 0.21).

    Two places drop it (STACK-NOTES 3): the wrapper's forward computes `F.linear(x, W)`
    with no bias, and the wrapper has no `bias` attribute, which TRL's fused loss reads
    (`lm_head.weight`, `lm_head.bias`; `weight` already gives the merged rows). Each wrapper
    is probed with a zero input, whose output must be the bias; only where it is missing is
    a hook added, so a fixed PEFT is left alone. Returns how many wrappers were fixed."""
    import torch

    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:
        return 0

    def add_bias(layer, args, output):
        if layer.disable_adapters or layer.merged or not layer.active_adapters:
            return output  # the base layer ran, bias included
        return output + layer.base_layer.bias.to(output.dtype)

    fixed = 0
    for wrapper in model.modules():
        if not isinstance(wrapper, TrainableTokensWrapper):
            continue
        base, layer = wrapper.original_module, wrapper.token_adapter
        if not isinstance(base, torch.nn.Linear) or base.bias is None or "bias" in wrapper.__dict__:
            continue
        object.__setattr__(wrapper, "bias", base.bias)  # an attribute, not a second registered parameter
        with torch.no_grad():
            probe = layer(torch.zeros(1, base.in_features, device=base.weight.device, dtype=base.weight.dtype))[0]
        if torch.count_nonzero(base.bias) and not torch.count_nonzero(probe):
            layer.register_forward_hook(add_bias)
            fixed += 1
    return fixed


def upcast_trainable_params(model) -> None:
    """TRL casts a quantised model's trainable parameters to bf16 when the trainer is built
    (STACK-NOTES 2); with fp16 mixed precision, the T4's only choice, the first gradient
    unscale then fails. Adapter weights in fp32 are what AMP expects under fp16 and bf16."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def load_adapter(model, adapter_dir: str, trainable: bool = False, adapter_name: str = "default"):
    """A saved adapter (LoRA + trainable chat-token rows) on top of `load_base_model`'s
    model, or added beside the adapters of a PeftModel under another name (switch with
    `set_adapter(name)`; `with model.disable_adapter():` gives the base). `trainable`
    must be said: PEFT loads adapters frozen by default."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise InputError(f"{adapter_dir}: no adapter there (adapter_config.json missing); "
                         "give the output directory of sft_qlora.py or grpo_train.py")
    if isinstance(model, PeftModel):
        model.load_adapter(adapter_dir, adapter_name=adapter_name, is_trainable=trainable)
        peft_model = model
    else:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name,
                                               is_trainable=trainable)
    fix_lm_head_bias(peft_model)
    return peft_model


# ---------------------------------------------------------------------------------------
# Runs: checkpoints and curves.
# ---------------------------------------------------------------------------------------
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
COMPLETE_MARK = "checkpoint_complete"  # written by TrainingGuard after the Trainer has saved everything
RUN_FILE = "run.json"  # what ran in an output directory, so a resume can't mix two runs


def latest_complete_checkpoint(output_dir: str | os.PathLike, verbose: bool = False) -> str | None:
    """The highest-numbered `checkpoint-N` that was saved whole: it holds every file a
    resume needs and TrainingGuard's mark, written after them. The Trainer writes in place
    and transformers' get_last_checkpoint takes the highest number even if a kill -9 cut
    its writing short."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for d in root.glob("checkpoint-*"):
        step = d.name.split("-")[-1]
        if not (d.is_dir() and step.isdigit()):
            continue
        missing = [f for f in (*CHECKPOINT_FILES, COMPLETE_MARK) if not (d / f).is_file()]
        if missing:
            if verbose:
                print(f"[resume] skipping {d}: incomplete (no {', '.join(missing)}; interrupted while saving?)")
            continue
        found.append((int(step), d))
    return str(max(found)[1]) if found else None


def claim_output_dir(output_dir: str | os.PathLike, run: dict, resume: bool) -> str | None:
    """Check that `output_dir` is free or holds this same run, before any model is loaded,
    and return the checkpoint to resume from (None: start fresh). `run` names what must not
    change across a resume (script, model, adapter shape); it is written to run.json."""
    root = Path(output_dir)
    check_writable(root, "--output_dir")
    saved = json.loads((root / RUN_FILE).read_text(encoding="utf-8")) if (root / RUN_FILE).is_file() else None
    has_run = any(root.glob("checkpoint-*")) or (root / "adapter_config.json").is_file()
    if saved is None and has_run:
        raise InputError(f"{root} holds checkpoints or an adapter of another run (no {RUN_FILE}); "
                         "choose another --output_dir or remove that directory")
    # A run that failed before its first checkpoint left only run.json: the corrected
    # command may take the directory over.
    if saved is not None and saved != run and has_run:
        changed = ", ".join(f"{k}: {saved.get(k)!r} there, {run.get(k)!r} now"
                            for k in sorted(set(saved) | set(run)) if saved.get(k) != run.get(k))
        raise InputError(f"{root} holds another run ({changed}); choose another --output_dir or remove it")
    if has_run and not resume:
        raise InputError(f"{root} holds checkpoints of this run and --resume is false; to start over, "
                         f"remove the directory first (rm -r {root}) or choose another --output_dir")
    resume_from = latest_complete_checkpoint(root, verbose=True) if resume else None
    if _is_main_process():
        write_atomic(root / RUN_FILE, json.dumps(run, indent=1) + "\n")
    return resume_from


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


class RunFault(InputError):
    """Training went wrong in a way the recipe can fix (a NaN, out of memory): printed as
    one message, like bad input, with exit status 1."""

    exit_status = 1


def train_guarded(trainer, resume_from: str | None, memory_knobs: dict) -> None:
    """`trainer.train()` for a run that may be interrupted or go wrong:

    - Ctrl-C / SIGTERM (preemption): the current optimizer step finishes, a checkpoint is
      saved, and the script exits with 130 / 143; a second Ctrl-C quits at once.
    - a non-finite loss, gradient or weight stops the run with the step and likely causes;
      nothing is saved after the fault, so the last checkpoint stays good.
    - CUDA out of memory ends with the recipe values to lower (`memory_knobs`).
    """
    import torch

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != trainer.args.world_size:  # else each process would train alone, racing on the files
        raise InputError(f"launched as {launched} processes but they did not connect (the Trainer sees "
                         f"{trainer.args.world_size}); without GPUs, pass --use_cpu true to use gloo")
    guard = TrainingGuard()
    trainer.add_callback(guard)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError:
        knobs = ", ".join(f"{k} (now {v})" for k, v in memory_knobs.items())
        raise RunFault(f"out of GPU memory at step {trainer.state.global_step}. Lower, in this order: {knobs}. "
                       "Halving per_device_train_batch_size and doubling gradient_accumulation_steps keeps "
                       "the effective batch. Checkpoints written so far are intact: rerun to resume.") from None
    finally:
        guard.restore_signal_handlers()
    if guard.signal is not None:
        import signal

        name = signal.Signals(guard.signal).name
        where = latest_complete_checkpoint(trainer.args.output_dir)
        print(f"[stop] {name}: stopped at step {trainer.state.global_step}, saved {where}. "
              "Run the same command again to resume.", flush=True)
        raise SystemExit(128 + guard.signal)


class TrainingGuard:
    """train_guarded's Trainer callback: signals, non-finite values, and the mark of a
    complete checkpoint. Duck-typed rather than a `TrainerCallback` subclass: importing
    transformers' callback module costs seconds, and data_prep.py imports this module."""

    def __getattr__(self, name):  # the Trainer calls every on_* event; the others do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def __init__(self):
        self.signal = None
        self._previous = {}

    # -- signals ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signal is not None:  # asked twice: stop now, without a checkpoint
            self.restore_signal_handlers()
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[stop] got {__import__('signal').Signals(signum).name}: saving a checkpoint after this step "
              "(Ctrl-C again to quit at once, without one)", flush=True)

    def restore_signal_handlers(self):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._check_weights(model, args, state)
        if self._any_process_signalled():
            control.should_save = True
            control.should_training_stop = True
        return control

    def _any_process_signalled(self) -> bool:
        """Every process must stop at the same step, or the others wait forever at the
        next gradient sync; a signal can reach one process only."""
        import torch
        import torch.distributed as dist

        stop = self.signal is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([float(stop)], device=device)
            dist.all_reduce(flag)
            stop = bool(flag.item())
            if stop and self.signal is None:
                self.signal = __import__("signal").SIGTERM  # another process was told
        return stop

    # -- numerical faults -------------------------------------------------------------
    def _check_weights(self, model, args, state):
        import torch

        if model is None:
            return
        trainable = [p.detach() for p in model.parameters() if p.requires_grad]
        if trainable and not torch.isfinite(torch.stack(torch._foreach_norm(trainable))).all():
            self._fault(args, state, "a trainable weight became NaN or inf in the last optimizer step")

    def on_log(self, args, state, control, logs=None, **kwargs):
        import math

        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if key == "grad_norm" and args.fp16:
                continue  # fp16's loss scaler skips overflowing steps itself, by design
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self._fault(args, state, f"the logged {key} is {value}")

    def _fault(self, args, state, what: str):
        last = latest_complete_checkpoint(args.output_dir)
        raise RunFault(
            f"step {state.global_step}: {what}. Likely causes: fp16 overflow (on a T4: Phi-2's activations can "
            "exceed fp16's range; lower learning_rate, keep max_grad_norm, use sdpa attention) or a learning "
            f"rate too high for this batch. Nothing was saved after the fault; the last good checkpoint is "
            f"{last or 'none'}: lower learning_rate and rerun to resume from it.")

    # -- complete checkpoints ---------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_atomic(folder / COMPLETE_MARK, f"step {state.global_step}\n")


def plot_history(log_history: list[dict], series: dict[str, str], path: str | os.PathLike, title: str) -> bool:
    """Plot `{label: log key}` against the step from a Trainer's log history. Returns False
    (and writes nothing) when none of the keys was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for label, key in series.items():
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        if points:
            curves[label] = points
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True
