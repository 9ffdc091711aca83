"""Mistakes people make end in one line: what was wrong and what to do, exit status 2,
nothing written and the inputs untouched. Each kind is run as a user runs it (the CLI in a
subprocess) where the exit status and the absence of a traceback are the point, and
in-process where only the message is."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE, sft_args

import data_prep
import memory_plan
import sft_qlora
from phi2qlora.args import GRPOScriptArguments, SFTScriptArguments, parse_script_args
from phi2qlora.errors import InputError
from phi2qlora.files import write_atomic
from phi2qlora.training import RUN_FILE

# Root ignores file permissions; without CAP_DAC_OVERRIDE it meets them as any user does.
AS_A_USER = (["setpriv", "--bounding-set=-dac_override,-dac_read_search",
              "--inh-caps=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else [])


def cli(*args, wrapper=()):
    return subprocess.run([*wrapper, sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def one_line_error(result, pattern: str) -> str:
    """The run failed with exit 2 and a single `prog: error: ...` line matching `pattern`."""
    import re

    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


@pytest.fixture
def read_only_dir(tmp_path):
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("as root, a read-only folder needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


def test_an_output_the_os_refuses(read_only_dir, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Say hi in under 5 words.", "completion": "Hi there."}\n')
    cases = [
        (["data_prep.py", "--dataset_name", SAMPLE, "--output_dir", read_only_dir / "data"], AS_A_USER,
         r"--output_dir .*read-only/data: cannot write in .*read-only \(permission denied"),
        (["data_prep.py", "--dataset_name", SAMPLE, "--output_dir", a_file / "data"], (),
         r"a-file is a file; choose another --output_dir"),
        (["rewards.py", pairs, "--out", read_only_dir / "scored.jsonl"], AS_A_USER,
         r"--out .*scored\.jsonl: cannot write in .*read-only"),
        (["rewards.py", pairs, "--out", a_file / "scored.jsonl"], (),
         r"--out .*a-file/scored\.jsonl: cannot be created, .*a-file is a file"),
        (["make_tiny_model.py", "--output_dir", read_only_dir / "tiny", "--pretrain_steps", "0"], AS_A_USER,
         r"cannot write in .*read-only"),
    ]
    for argv, wrapper, pattern in cases:
        one_line_error(cli(*argv, wrapper=wrapper), pattern)
    assert not any(read_only_dir.iterdir()) and a_file.read_text() == "keep me\n"


def test_write_atomic_turns_the_os_refusal_into_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match=r"f/out\.json: cannot write it: .*f is a file, not a folder"):
        write_atomic(tmp_path / "f" / "out.json", "{}")
    (tmp_path / "d.json").mkdir()  # a folder where the file goes: the rename fails
    with pytest.raises(InputError, match=r"d\.json: cannot write it \(.*\); choose another output path"):
        write_atomic(tmp_path / "d.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "f"]  # no temporary file left behind


@pytest.mark.parametrize("script, argv, pattern", [
    ("data_prep.py", ["--some_flag", "1"], r"unknown option --some_flag"),
    ("data_prep.py", ["--eval_fractoin", "0.1"], r"unknown option --eval_fractoin; did you mean --eval_fraction\?"),
    ("app.py", ["--sharee"], r"unknown option --sharee; did you mean --share\?"),
    ("memory_plan.py", ["--learning_rat", "1"], r"unknown option --learning_rat; did you mean --learning_rate\?"),
    ("rewards.py", [], r"which pairs\? python rewards\.py pairs\.jsonl"),
])
def test_an_unknown_or_missing_flag(script, argv, pattern):
    one_line_error(cli(script, *argv), pattern)


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("content, pattern", [
    (b"max_steps: 5\ncomment: caf\xe9\n", r"bad\.yaml:2: not UTF-8 text \(byte 26\)"),
    (bytes(range(256)), r"bad\.yaml:2: not UTF-8 text \(byte 129\)"),  # a binary file
    (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", r"bad\.yaml: nested too deeply to read"),
    (b"lr_scheduler_type: bogus\n", r"bad\.yaml:1: 'lr_scheduler_type' must be one of linear, cosine,.* got 'bogus'"),
    (b"max_steps: 3\nlearning_rate: .nan\n", r"bad\.yaml:2: 'learning_rate' must be a positive number, got nan"),
    (b"max_steps: -5\n", r"bad\.yaml:1: 'max_steps' must be a positive whole number, or -1"),
])
def test_a_recipe_that_cannot_be_used(tmp_path, content, pattern):
    with pytest.raises(InputError, match=pattern):
        sft_qlora.parse_args(["--config", write(tmp_path / "bad.yaml", content)])


@pytest.mark.parametrize("flags, pattern", [
    (["--learning_rate", "nan"], r"--learning_rate must be a positive number, got nan"),
    (["--max_steps", "-5"], r"--max_steps must be a positive whole number, or -1 to train num_train_epochs, got -5"),
    (["--logging_steps", "inf"], r"--logging_steps must be a positive number"),
    (["--lora_dropout", "1"], r"--lora_dropout must be from 0 up to, not including, 1"),
    (["--per_device_train_batch_size=0"], r"--per_device_train_batch_size must be at least 1, got 0"),
    (["--lr_scheduler_type", "bogus"], r"--lr_scheduler_type.*invalid choice: 'bogus'"),
    (["--model_name_or_path", "/no/such/folder"], r"--model_name_or_path /no/such/folder: no such model folder"),
    (["--model_name_or_path", "./outputs/never-made"], r"no such model folder"),
    (["--accelerator_config", "missing.json"], r"FileNotFoundError: .*missing\.json.*\(check the values in"),
])
def test_values_out_of_range_are_named_before_any_model_loads(flags, pattern):
    with pytest.raises(InputError, match=pattern):
        sft_qlora.parse_args(["--config", str(ROOT / "recipes" / "sft_tiny.yaml"), *flags])


def test_grpo_values_that_would_crash_its_config(tmp_path):
    import grpo_train

    for flags, pattern in ((["--num_generations", "0"], r"--num_generations must be at least 2"),
                           (["--temperature", "0"], r"--temperature must be a positive number"),
                           (["--beta", "-1"], r"--beta must be a number, 0 or more")):
        with pytest.raises(InputError, match=pattern):
            grpo_train.parse_args(["--config", str(ROOT / "recipes" / "grpo_tiny.yaml"), *flags])


def test_a_model_folder_without_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: no model in that folder \(config\.json missing\)"):
        sft_qlora.parse_args(["--config", str(ROOT / "recipes" / "sft_tiny.yaml"),
                              "--model_name_or_path", str(tmp_path / "empty")])


def test_a_model_that_points_nowhere_ends_in_one_line_and_writes_nothing(tmp_path, sample_data_dir):
    out = tmp_path / "run"
    result = cli("sft_qlora.py", "--config", ROOT / "recipes" / "sft_tiny.yaml", "--model_name_or_path",
                 tmp_path / "nothere", "--train_file", sample_data_dir / "train.jsonl", "--output_dir", out)
    one_line_error(result, r"nothere: no such model folder")
    assert not out.exists()


def test_a_corrected_command_may_take_over_the_output_dir_of_a_failed_start(tiny_model_dir, sample_data_dir,
                                                                           tmp_path):
    """A Hub id that can't be loaded offline fails after the output dir was claimed; the
    fixed command must not be told the folder "holds another run"."""
    out = tmp_path / "run"
    fast = ["--max_steps", "1", "--preview_steps", "0", "--eval_strategy", "no", "--save_strategy", "no"]
    with pytest.raises(InputError, match=r"could not load 'nobody/no-such-model' \(offline"):
        sft_qlora.main(*sft_args("nobody/no-such-model", sample_data_dir, out, *fast))
    assert json.loads((out / RUN_FILE).read_text())["model"] == "nobody/no-such-model"
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, out, *fast))
    assert json.loads((out / RUN_FILE).read_text())["model"] == str(tiny_model_dir)
    assert (out / "adapter_model.safetensors").is_file()


def test_memory_plan_reads_a_bad_recipe_as_training_does(tmp_path):
    with pytest.raises(InputError, match=r"bad\.yaml:1: not UTF-8 text"):
        memory_plan.main(["--config", write(tmp_path / "bad.yaml", b"\xff\xfe")])


def test_flag_fuzzing_every_entry_point_gives_an_input_error_or_a_config():
    """Fields of every entry point's arguments, given values people mistype: parsing
    succeeds or raises InputError; no other exception (a ZeroDivisionError from GRPO's
    config, an OverflowError for inf steps, a FileNotFoundError for accelerator_config were
    found this way, over every field and value). CI tries 120 seeded pairs a script;
    FUZZ_EXAMPLES=0 tries them all (about 10 minutes):

        FUZZ_EXAMPLES=0 python -m pytest -q tests/test_mistakes.py -k fuzzing
    """
    import contextlib
    import dataclasses
    import io
    import random

    from trl import GRPOConfig, ModelConfig, SFTConfig

    import app
    import evaluate
    import export_model
    import grpo_train

    values = ["nan", "inf", "-1", "0", "1e30", "2.5", "abc", "", "None", "[1]", "ü", "1" * 30]
    scripts = {
        "sft": (lambda a: sft_qlora.parse_args(["--config", str(ROOT / "recipes/sft_tiny.yaml"), *a]),
                (SFTScriptArguments, SFTConfig, ModelConfig)),
        "grpo": (lambda a: grpo_train.parse_args(["--config", str(ROOT / "recipes/grpo_tiny.yaml"), *a]),
                 (GRPOScriptArguments, GRPOConfig, ModelConfig)),
        "evaluate": (evaluate.parse_args, (evaluate.EvalArguments,)),
        "export": (export_model.parse_args, (export_model.ExportArguments,)),
        "data_prep": (lambda a: parse_script_args(data_prep.ScriptArguments, a), (data_prep.ScriptArguments,)),
        "app": (app.parse_args, (app.AppArguments,)),
    }
    crashes = []
    per_script = int(os.environ.get("FUZZ_EXAMPLES", "120"))
    for name, (parse, types) in scripts.items():
        pairs = [(f, v) for f in sorted({f.name for t in types for f in dataclasses.fields(t)}) for v in values]
        if per_script:
            pairs = random.Random(name).sample(pairs, min(per_script, len(pairs)))
        for field, value in pairs:
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    parse([f"--{field}", value])
            except (InputError, SystemExit):
                pass
            except Exception as e:  # noqa: BLE001 - the point is to catch anything else
                crashes.append(f"{name} --{field} {value!r}: {type(e).__name__}: {str(e)[:80]}")
    assert not crashes, "\n".join(crashes[:20])


# ---------------------------------------------------------------------------------------
# Damaged files: the file, what is wrong with it, what to do; never a library's traceback.
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    from tiny_adapters import untrained_adapter

    return untrained_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "sft")


def damaged_copies(adapter, tmp_path) -> dict:
    """The adapter cut to half, to nothing, and with garbage for its settings."""
    copies = {}
    for name, damage in (("half", lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])),
                         ("empty", lambda f: f.write_bytes(b"")),
                         ("garbled", None)):
        copy = shutil.copytree(adapter, tmp_path / name)
        if damage:
            damage(copy / "adapter_model.safetensors")
        else:
            (copy / "adapter_config.json").write_text('{"r": 4, "lora_alpha": \x00garbage')
        copies[name] = copy
    return copies


DAMAGE = {
    "half": r"adapter_model\.safetensors: cut short \([\d,]+ bytes where its header says [\d,]+\); copy the adapter "
            r"folder again, or train it again",
    "empty": r"adapter_model\.safetensors: cut short \(0 bytes: not even a safetensors header\); copy the adapter",
    "garbled": r"adapter_config\.json:1: not valid JSON \(.* at column \d+\); copy the adapter folder again",
}


def test_export_on_a_damaged_adapter_is_one_line(tiny_model_dir, tiny_adapter, tmp_path):
    """export_model.py on an adapter cut short ended in a safetensors traceback."""
    import export_model

    for name, copy in damaged_copies(tiny_adapter, tmp_path).items():
        argv = ["--model_name_or_path", tiny_model_dir, "--adapter", copy, "--output_dir", tmp_path / f"out-{name}"]
        if name == "half":  # as a user runs it: one line, exit 2
            one_line_error(cli("export_model.py", *argv), DAMAGE[name])
        with pytest.raises(InputError, match=DAMAGE[name]):
            export_model.main(export_model.parse_args(list(map(str, argv))))
        assert not (tmp_path / f"out-{name}").exists()


def test_every_reader_of_an_adapter_names_the_damage(tiny_model_dir, tiny_adapter, sample_data_dir, tmp_path,
                                                    monkeypatch):
    """grpo_train.py --sft_adapter, evaluate.py, app.py and load_adapter itself: the same
    line, before a model loads."""
    import app
    import evaluate
    import grpo_train
    from phi2qlora.model import load_adapter

    no_model(monkeypatch, grpo_train, evaluate, app)
    for name, copy in damaged_copies(tiny_adapter, tmp_path).items():
        readers = [
            lambda: grpo_train.main(*grpo_train.parse_args([
                "--config", str(ROOT / "recipes" / "grpo_tiny.yaml"), "--model_name_or_path", str(tiny_model_dir),
                "--sft_adapter", str(copy), "--output_dir", str(tmp_path / "grpo"), "--report_to", "none"])),
            lambda: evaluate.requested_models(evaluate.parse_args(["--model_name_or_path", str(tiny_model_dir),
                                                                   "--sft_adapter", str(copy), "--models", "sft"])),
            lambda: app.adapter_folders(app.parse_args(["--base", str(tiny_model_dir), "--sft", str(copy)])),
            lambda: load_adapter(SimpleModel(), str(copy)),
        ]
        for read in readers:
            with pytest.raises(InputError, match=DAMAGE[name]):
                read()
    assert not (tmp_path / "grpo").exists()


def no_model(monkeypatch, *scripts):
    """Loading a model from these scripts fails the test: the checks come first."""
    for script in scripts:
        monkeypatch.setattr(script, "load_base_model", lambda *a, **k: pytest.fail("a model was loaded"))


class SimpleModel:
    """Stands in for a loaded base: load_adapter checks the files before it looks at it."""

    config = type("Config", (), {"name_or_path": "tiny"})()


def test_a_damaged_model_or_tokenizer_folder_is_named(tiny_model_dir, tmp_path):
    """Weights cut short, a garbled tokenizer.json: found when the folder is named, before
    transformers or tokenizers read them."""
    weights = shutil.copytree(tiny_model_dir, tmp_path / "weights")
    (weights / "model.safetensors").write_bytes((weights / "model.safetensors").read_bytes()[:1000])
    tokenizer = shutil.copytree(tiny_model_dir, tmp_path / "tokenizer")
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    weights_cut = r"weights/model\.safetensors: cut short \(1,000 bytes.*the model folder is damaged: copy or download"
    one_line_error(cli("sft_qlora.py", "--config", ROOT / "recipes" / "sft_tiny.yaml", "--model_name_or_path", weights,
                       "--output_dir", tmp_path / "out"), weights_cut)
    with pytest.raises(InputError, match=r"tokenizer/tokenizer\.json:1: not valid JSON .*the model folder is damaged"):
        sft_qlora.parse_args(["--config", str(ROOT / "recipes" / "sft_tiny.yaml"), "--model_name_or_path",
                              str(tokenizer), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_damaged_gguf_is_named_with_what_is_wrong(tiny_model_dir, tmp_path):
    """llama.cpp says only "Failed to load model from file"; the header says more."""
    from phi2qlora.gguf import convert, converter_dir

    try:
        converter_dir()
    except InputError as e:
        pytest.skip(str(e))  # CI fetches it (.ci/run)
    whole = convert(tiny_model_dir, tmp_path / "whole.gguf").read_bytes()
    cases = {"half.gguf": (whole[: len(whole) // 2], rf"cut short \({len(whole) // 2:,} of {len(whole):,} bytes\)"),
             "header.gguf": (whole[:100], r"cut short inside its header \(100 bytes\)"),
             "empty.gguf": (b"", r"empty \(0 bytes\)"),
             "other.gguf": (b"PK\x03\x04" + whole[4:], r"not a GGUF file \(it does not start with GGUF\)")}
    for name, (data, what) in cases.items():
        (tmp_path / name).write_bytes(data)
        one_line_error(cli("app.py", "--gguf", tmp_path / name),
                       rf"{name}: {what}; copy it again, or write it again with export_model\.py --gguf")


# ---------------------------------------------------------------------------------------
# An adapter of another base: named, with the base it was trained on, before PEFT's traceback.
# ---------------------------------------------------------------------------------------
def test_an_adapter_of_another_base_is_named_with_its_base(tiny_model_dir, sample_data_dir, tmp_path, monkeypatch):
    import torch

    import app
    import evaluate
    import export_model
    from phi2qlora.model import load_adapter, load_base_model, load_chat_tokenizer
    from tiny_adapters import untrained_adapter

    wider = untrained_adapter(tiny_model_dir, tmp_path / "wider", hidden_size=64, trained_on="someone/narrow-phi")
    width = (r"trained on someone/narrow-phi, which is not the base .*tiny-phi.* \(its rows of model\.embed_tokens "
             r"are 64 wide where the base's are 128\)")
    # The CLI: one line, exit 2, before the model loads.
    result = cli("grpo_train.py", "--config", ROOT / "recipes" / "grpo_tiny.yaml", "--model_name_or_path",
                 tiny_model_dir, "--sft_adapter", wider, "--output_dir", tmp_path / "grpo")
    one_line_error(result, rf"--sft_adapter .*wider: {width}; pass --model_name_or_path someone/narrow-phi, the base "
                           "it was trained on")
    # Every other script that loads one, before its model loads.
    base = load_base_model(str(tiny_model_dir), load_chat_tokenizer(str(tiny_model_dir)), torch.float32)
    no_model(monkeypatch, evaluate, export_model, app)
    checks = [
        lambda: evaluate.requested_models(evaluate.parse_args(["--model_name_or_path", str(tiny_model_dir),
                                                               "--grpo_adapter", str(wider), "--models", "base,grpo"])),
        lambda: export_model.main(export_model.parse_args(["--model_name_or_path", str(tiny_model_dir),
                                                           "--adapter", str(wider), "--output_dir", str(tmp_path / "x")])),
        lambda: app.adapter_folders(app.parse_args(["--base", str(tiny_model_dir), "--sft", str(wider)])),
        lambda: load_adapter(base, str(wider)),  # the one place adapters load: a Hub base is checked here
    ]
    for check in checks:
        with pytest.raises(InputError, match=width):
            check()
    # Another vocabulary: rows the base does not have.
    other_vocab = untrained_adapter(tiny_model_dir, tmp_path / "vocab", token_ids=[1500, 1501], trained_on="big-phi")
    with pytest.raises(InputError, match=r"trained on big-phi, .*its trained token rows of model\.embed_tokens go up "
                                         r"to id 1,501, where the base has 1,024 rows: another vocabulary"):
        load_adapter(base, str(other_vocab))
    assert not (tmp_path / "grpo").exists() and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------
# Training data with nothing to learn: refused before the model loads, with a count.
# ---------------------------------------------------------------------------------------
def conversations_file(path, *turns):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": user},
                                                     {"role": "assistant", "content": reply}]}) + "\n"
                            for user, reply in turns))
    return path


def test_training_data_that_leaves_nothing_to_learn(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Every reply empty (the run used to exit 0 having learnt to end the turn), every reply
    past max_length once truncated (TRL dropped them all, then a sampler traceback): refused
    with the counts. Only some: dropped, and said how many and why."""
    monkeypatch.setattr(sft_qlora, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    long_question = "Tell me everything about rivers, lakes and seas. " * 8
    empty = conversations_file(tmp_path / "empty.jsonl", ("Hi", ""), ("Why?", "  \n"), ("What?", ""))
    too_long = conversations_file(tmp_path / "long.jsonl", (long_question, "Water."), (long_question, "Rain."))
    mixed = conversations_file(tmp_path / "mixed.jsonl", ("Hi", "Hello there."), ("Why?", ""),
                               (long_question, "Water."), ("Name a colour.", "Blue."))

    def sft(train_file, out):
        return sft_qlora.main(*sft_args(tiny_model_dir, tmp_path, tmp_path / out, "--train_file", str(train_file),
                                        "--eval_file", "", "--max_length", "32", "--preview_steps", "0"))

    with pytest.raises(InputError, match=r"empty\.jsonl: nothing to learn in its 3 conversations \(3 every assistant "
                                         r"reply is empty \(the row would teach only to end the turn at once\)\); give"):
        sft(empty, "a")
    with pytest.raises(InputError, match=r"long\.jsonl: nothing to learn in its 2 conversations \(2 no assistant token "
                                         r"within max_length 32 \(the turns before it fill that\)\)"):
        sft(too_long, "b")
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):
        sft(mixed, "c")  # two rows remain: training would start
    out = capsys.readouterr().out
    assert ("mixed.jsonl: dropped 2 of 4 conversations with nothing to learn: 1 every assistant reply is empty (the "
            "row would teach only to end the turn at once); 1 no assistant token within max_length 32") in out
    assert "[sft] 2 train / 0 eval conversations" in out


# ---------------------------------------------------------------------------------------
# One vocabulary for the dtype, in every script.
# ---------------------------------------------------------------------------------------
def test_every_script_takes_the_same_dtype_names(tmp_path):
    import torch

    import app
    import evaluate
    import export_model
    from phi2qlora.model import pick_dtype

    for short, name in (("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32"), ("float16", "float16")):
        if short != "bf16" or torch.cuda.is_available():  # transformers refuses bf16 training on a CPU
            assert sft_qlora.parse_args(["--config", str(ROOT / "recipes" / "sft_tiny.yaml"),
                                         "--dtype", short])[2].dtype == name
        assert evaluate.parse_args(["--dtype", short]).dtype == name
        assert app.parse_args([f"--dtype={short}"]).dtype == name
        assert export_model.parse_args(["--dtype", short, "--train_dtype", short]).train_dtype == name
        assert pick_dtype(short) == getattr(torch, name)  # from Python too, where no parser ran
    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes" / "sft_tiny.yaml").read_text().replace("dtype: auto", "dtype: fp32"))
    assert sft_qlora.parse_args(["--config", str(recipe)])[2].dtype == "float32"
    # A name no script knows: the same line from each.
    line = r"--dtype fp8: expected auto, float16 \(or fp16\), bfloat16 \(or bf16\) or float32 \(or fp32\)"
    for script in ("evaluate.py", "app.py"):  # where --dtype fp16 was a traceback
        one_line_error(cli(script, "--dtype", "fp8"), line)
    with pytest.raises(InputError, match=line):
        sft_qlora.parse_args(["--config", str(ROOT / "recipes" / "sft_tiny.yaml"), "--dtype", "fp8"])
    recipe.write_text((ROOT / "recipes" / "sft_tiny.yaml").read_text().replace("dtype: auto", "dtype: fp8"))
    with pytest.raises(InputError, match=r"r\.yaml:\d+: 'dtype' fp8: expected auto, float16"):
        sft_qlora.parse_args(["--config", str(recipe)])


# ---------------------------------------------------------------------------------------
# app.py on a port in use.
# ---------------------------------------------------------------------------------------
def test_app_on_a_busy_port_names_it_and_a_free_one(tmp_path):
    """Checked before any model loads; Gradio's own refusal (a port taken meanwhile) reads
    the same."""
    import socket

    import gradio as gr

    import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pattern = (rf"--port {port}: already in use on 127\.0\.0\.1 \(another app\.py or another server\); pass "
                   rf"--port \d+ \(free now\), or --port 0 for the first free one from 7860")
        one_line_error(cli("app.py", "--port", port, "--sft", tmp_path / "not-trained-yet"), pattern)
        with gr.Blocks() as page:
            gr.Markdown("a page")
        with pytest.raises(InputError, match=pattern):
            app.launch(page, app.parse_args(["--port", str(port)]))
