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
