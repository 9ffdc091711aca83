"""Recipes: YAML files of `field: value` lines over the scripts' dataclasses (TRL's
configs and each script's arguments), read and checked before anything loads. TRL passes
YAML values to the dataclasses unchecked, so `per_device_train_batch_size: 2.5` would
otherwise fail far into the run, or not at all; here an unknown key, a wrong type or a
value a run can't use is one line naming the file, the line and the key."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from pathlib import Path

from phi2qlora.errors import InputError

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


def check_recipe(path: str, dataclass_types) -> dict:
    """Read a recipe and check every key against the dataclasses' fields and their types;
    errors name the file, the line and the key."""
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
    if origin is typing.Literal:  # YAML reads `true` as a boolean: it fits a "true" choice
        return value in args or (isinstance(value, bool) and str(value).lower() in args)
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
    for a in typing.get_args(annotation):
        if isinstance(a, type) and issubclass(a, enum.Enum):
            return [m.value for m in a]
    return None


def _describe(annotation) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
             type(None): "null", dict: "a mapping"}
    if (choices := _enum_in(annotation)) is not None:
        return "one of " + ", ".join(map(str, choices))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    if typing.get_origin(annotation) in (list, tuple, set):
        return "a list"
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))
