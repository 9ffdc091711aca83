"""evaluate.py on the tiny Phi model in 4-bit on the CPU: one base, the adapters switched
on it, and a report whose every figure can be recomputed from the answers it holds."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from tiny_adapters import scaled_adapter, sft_adapter

import evaluate
from phi2qlora.answers import generate_answers
from phi2qlora.errors import InputError
from phi2qlora.files import read_prompt_rows
from phi2qlora.model import load_adapter, load_base_model, load_chat_tokenizer
from phi2qlora.rewards import REPETITION_FREE, REWARD_WEIGHTS, repetition, score, word_limit_compliance
from phi2qlora.word_limits import count_words

PROMPTS, BATCH, NEW_TOKENS = 6, 4, 24  # two batches, the second one short


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, sample_data_dir, tmp_path_factory):
    sft = sft_adapter(tmp_path_factory, tiny_model_dir, sample_data_dir)
    grpo = scaled_adapter(sft, tmp_path_factory.mktemp("eval-adapters") / "grpo", 3.0)  # another model
    return sft, grpo


def eval_args(model_dir, data_dir, adapters, out, *extra):
    sft, grpo = adapters
    return evaluate.parse_args([
        "--model_name_or_path", str(model_dir), "--sft_adapter", str(sft), "--grpo_adapter", str(grpo),
        "--prompts_file", str(data_dir / "grpo_prompts.jsonl"), "--max_prompts", str(PROMPTS),
        "--batch_size", str(BATCH), "--max_new_tokens", str(NEW_TOKENS), "--sample_prompts", "3",
        "--output_dir", str(out), *extra,
    ])


@pytest.fixture(scope="module")
def evaluated(tiny_model_dir, sample_data_dir, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return evaluate.main(eval_args(tiny_model_dir, sample_data_dir, adapters, out)), out


def prompt_rows(data_dir):
    return read_prompt_rows(data_dir / "grpo_prompts.jsonl")[:PROMPTS]


def test_report_files_and_metrics_follow_from_the_answers(evaluated, sample_data_dir):
    report, out = evaluated
    assert json.loads((out / "report.json").read_text()) == report
    assert list(report["metrics"]) == list(report["answers"]) == ["base", "sft", "grpo"]
    rows = prompt_rows(sample_data_dir)
    prompts, limits = [r["prompt"] for r in rows], [r["word_limit"] for r in rows]
    assert any(limits) and not all(limits)  # both kinds of prompt are measured

    for name, answers in report["answers"].items():
        m = report["metrics"][name]
        assert [a["prompt"] for a in answers] == prompts and [a["word_limit"] for a in answers] == limits
        texts, ended = [a["answer"] for a in answers], [a["ended"] for a in answers]
        words = [count_words(t) for t in texts]
        assert [a["words"] for a in answers] == words
        assert m["answers"] == PROMPTS
        assert m["mean_words"] == pytest.approx(sum(words) / len(words))
        assert m["median_words"] == statistics.median(words)
        assert m["end_of_turn_rate"] == pytest.approx(sum(ended) / len(ended))
        assert m["empty_rate"] == pytest.approx(sum(w == 0 for w in words) / len(words))
        assert m["repetition_rate"] == pytest.approx(
            sum(repetition(t) > REPETITION_FREE for t in texts) / len(texts))

        compliance = word_limit_compliance(prompts, texts, word_limit=limits)
        obeyed = [c for c in compliance if c is not None]
        assert m["limited_prompts"] == len(obeyed) and m["word_limit_compliance"] == pytest.approx(sum(obeyed) / len(obeyed))
        for text, limit, c in zip(texts, limits, compliance):
            if limit:  # data_prep's limits are all "at most N words"
                assert c == float(0 < count_words(text) <= limit)

        scores = score(prompts, texts, ended=ended, word_limit=limits)
        for reward, values in scores.items():
            assert m[reward] == pytest.approx(sum(values) / len(values))
            assert [a["rewards"][reward] for a in answers] == values
        total = sum(w * sum(scores[r]) / len(texts) for r, w in REWARD_WEIGHTS.items())
        assert m["reward"] == pytest.approx(total)

    markdown = (out / "report.md").read_text()
    assert "| model | word-limit compliance |" in markdown
    assert all(f"| {name} | " in markdown for name in report["answers"])
    assert markdown.count("### Prompt ") == 3
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG" and (out / "report.png").stat().st_size > 5000
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_each_answer_is_that_model_alone(evaluated, tiny_model_dir, adapters, sample_data_dir):
    """Switching adapters on one base gives what each model gives loaded on its own."""
    report, _ = evaluated
    prompts = [r["prompt"] for r in prompt_rows(sample_data_dir)]
    tokenizer = load_chat_tokenizer(str(adapters[0]))
    expected = {}
    for name, adapter_dir in [("base", None), ("sft", adapters[0]), ("grpo", adapters[1])]:
        model = load_base_model(str(tiny_model_dir), tokenizer, torch.float32)
        if adapter_dir:
            model = load_adapter(model, str(adapter_dir))
        expected[name] = [a["answer"] for a in generate_answers(model, tokenizer, prompts, NEW_TOKENS, BATCH)]
        assert [a["answer"] for a in report["answers"][name]] == expected[name], name
    assert expected["sft"] != expected["base"] and expected["grpo"] != expected["sft"]  # three different models


def test_same_answers_on_a_rerun_with_a_subset(evaluated, tiny_model_dir, sample_data_dir, adapters, tmp_path):
    first, _ = evaluated
    again = evaluate.main(eval_args(tiny_model_dir, sample_data_dir, adapters, tmp_path, "--models", "grpo,base"))
    assert list(again["answers"]) == ["grpo", "base"]
    for name in ("grpo", "base"):
        assert again["answers"][name] == first["answers"][name]
        drop_time = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
        assert drop_time(again["metrics"][name]) == drop_time(first["metrics"][name])


@pytest.mark.parametrize("extra, message", [
    (["--models", "base,rlhf"], r"--models 'base,rlhf': expected a comma-separated subset of base, sft, dpo, grpo"),
    (["--models", "sft,sft"], r"named twice"),
    (["--models", ""], r"expected a comma-separated subset"),
    (["--grpo_adapter", "MISSING"], r"--grpo_adapter .*MISSING: no adapter there .*run grpo_train\.py first"),
    (["--prompts_file", "BAD"], r"bad\.jsonl:2: field 'word_limit' must be a positive integer below 10\*\*9 or null"),
    (["--max_prompts", "0"], r"must be at least 1"),
])
def test_bad_input_stops_before_a_model_loads(sample_data_dir, adapters, tmp_path, extra, message):
    """The base model path does not exist: any error about it would mean it was loaded first."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "word_limit": 5}\n{"prompt": "Hi", "word_limit": "five"}\n')
    extra = [str(tmp_path / "MISSING") if x == "MISSING" else str(bad) if x == "BAD" else x for x in extra]
    args = eval_args(tmp_path / "no-model-here", sample_data_dir, adapters, tmp_path / "out", *extra)
    with pytest.raises(InputError, match=message):
        evaluate.main(args)
    assert not (tmp_path / "out").exists()


def test_command_line_error_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"unknown option --max_tokens; did you mean --max_new_tokens\?"):
        evaluate.parse_args(["--max_tokens", "5"])  # a misspelt flag
    config = tmp_path / "my_eval.yaml"
    config.write_text("models: sft\nmax_new_tokns: 5\n")  # a misspelt key, checked as recipes are
    with pytest.raises(InputError, match=r"my_eval.yaml:2: unknown key 'max_new_tokns'; did you mean"):
        evaluate.parse_args(["--config", str(config)])
    config.write_text("models: sft\nmax_new_tokens: 5\n")
    assert evaluate.parse_args(["--config", str(config)]).max_new_tokens == 5
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--models", "sft",
                             "--sft_adapter", str(tmp_path / "none")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("evaluate: error: --sft_adapter ")
    assert "Traceback" not in result.stderr
