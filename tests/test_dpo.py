"""dpo_train.py on the tiny Phi model in 4-bit on the CPU: from the tiny SFT adapter, with
the SFT model as the reference, on the hand-written pairs sample (replies of similar
length, so a margin of summed log-probs can turn within a few steps)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, stop_at
from safetensors.torch import load_file
from tiny_adapters import sft_adapter

import data_prep
import dpo_train
from phi2qlora.errors import InputError
from phi2qlora.model import load_adapter, load_base_model, load_chat_tokenizer
from phi2qlora.pairs import FORMAT, completion_logps, preference_accuracy, read_pair_rows
from phi2qlora.training import latest_complete_checkpoint

PAIRS_SAMPLE = ROOT / "data" / "sample" / "oasst1_pairs_sample.jsonl"
# The tiny recipe at a smaller scale: the 8 pairs of the sample, 2 a step (16 steps: 4 epochs).
SMALL = ["--max_length", "256", "--max_prompt_tokens", "128", "--per_device_train_batch_size", "2",
         "--learning_rate", "1e-3", "--preview_steps", "0", "--eval_file", ""]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    data_prep.main(data_prep.parse_script_args(data_prep.ScriptArguments, [
        "--dataset_name", str(PAIRS_SAMPLE), "--output_dir", str(out), "--eval_fraction", "0"]))
    return out


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tiny_model_dir, sample_data_dir):
    return sft_adapter(tmp_path_factory, tiny_model_dir, sample_data_dir)


def dpo_args(model_dir, pairs, sft, out, *extra):
    return dpo_train.parse_args([
        "--config", str(ROOT / "recipes" / "dpo_tiny.yaml"), "--model_name_or_path", str(model_dir),
        "--sft_adapter", str(sft), "--train_file", str(pairs / "pairs_train.jsonl"), "--output_dir", str(out),
        "--report_to", "none", *SMALL, *extra])


@pytest.fixture(scope="module")
def trained(tiny_model_dir, pairs_dir, sft_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    trainer = dpo_train.main(*dpo_args(tiny_model_dir, pairs_dir, sft_dir, out, "--max_steps", "16",
                                       "--save_strategy", "no"))
    return trainer, out


def test_reference_is_the_sft_model(trained, sft_dir):
    """At step 0 the policy is the reference, so the first loss is log 2 and both rewards are
    0; the frozen `ref` adapter holds the SFT weights, chat-token rows included (trl 1.16's
    copy leaves them out), while the policy, loaded trainable, moved."""
    trainer, _ = trained
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5

    sft = load_file(sft_dir / "adapter_model.safetensors")
    params = dict(trainer.model.named_parameters())
    ref = {n: p for n, p in params.items() if ".ref" in n}
    assert ref and not any(p.requires_grad for p in ref.values())
    assert any("trainable_tokens" in k for k in sft)
    moved = 0
    for key, value in sft.items():  # PEFT saves without the adapter name
        stem = key.removesuffix(".weight")
        (ref_name,) = [n for n in ref if n.replace(".ref", "").removesuffix(".weight") == stem]
        torch.testing.assert_close(ref[ref_name].detach().float(), value.float(), atol=0, rtol=0)
        policy = params[ref_name.replace(".ref", ".default")]
        assert policy.requires_grad and policy.dtype == torch.float32  # fp32, as fp16 AMP needs
        moved += not torch.equal(policy.detach().float(), value.float())
    assert moved > 0


def test_precomputed_reference_is_the_sft_model_too(tiny_model_dir, pairs_dir, sft_dir, tmp_path):
    """With precompute_ref_log_probs, trl 1.16 scores the reference inside DPOTrainer's
    constructor, before the SFT weights could be put back from outside: the subclass puts
    them back first, so step 1 is log 2 here too (without it: 0.666, rewards 0.17 / 0.12)."""
    trainer = dpo_train.main(*dpo_args(tiny_model_dir, pairs_dir, sft_dir, tmp_path, "--max_steps", "1",
                                       "--save_strategy", "no", "--precompute_ref_log_probs", "true"))
    first = next(h for h in trainer.state.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert "ref_chosen_logps" in trainer.train_dataset.column_names


def test_loss_falls_and_the_people_s_choice_wins_more_often(trained, tiny_model_dir, pairs_dir, sft_dir):
    """DPO's loss falls from log 2, and on its training pairs the DPO model prefers the
    people's choice (summed log-probs, as DPO compares them) more often than the SFT model
    it started from, and every pair's margin grew. Measured: 0.25 -> 0.50 of the 8 pairs,
    margins up by 27 to 57 nats (CPU, seed 42; `pytest -s` prints the accuracies)."""
    trainer, out = trained
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < 0.3 < losses[0]
    assert (out / "loss.png").stat().st_size > 1000

    pairs = [row for _, row in read_pair_rows(pairs_dir / "pairs_train.jsonl")]
    tokenizer = load_chat_tokenizer(str(sft_dir))
    accuracy, margins = {}, {}
    for name, adapter in (("sft", sft_dir), ("dpo", out)):
        model = load_adapter(load_base_model(str(tiny_model_dir), tokenizer, torch.float32), str(adapter)).eval()
        chosen, rejected = completion_logps(model, tokenizer, pairs, max_length=256)
        accuracy[name] = preference_accuracy(chosen, rejected)
        margins[name] = [c - r for (c, _), (r, _) in zip(chosen, rejected)]
    print(f"preference accuracy on the training pairs: SFT {accuracy['sft']:.2f} -> DPO {accuracy['dpo']:.2f}")
    assert accuracy["dpo"] > accuracy["sft"]
    assert all(d > s for d, s in zip(margins["dpo"], margins["sft"]))  # every margin grew


def test_adapter_loads_in_plain_peft(trained, tiny_model_dir, sft_dir):
    """The saved folder is the trained adapter alone (no `ref` copy), with the SFT adapter's
    keys, and plain transformers + PEFT load it with the trained weights."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    _, out = trained
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == load_file(sft_dir / "adapter_model.safetensors").keys()
    assert not (out / "ref").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key].float(), value.float(), atol=0, rtol=0)


def test_resumed_dpo_equals_uninterrupted(tiny_model_dir, pairs_dir, sft_dir, tmp_path):
    """Stopped after the checkpoint at step 2 and resumed, DPO ends with the same adapter and
    the same later losses as a straight run (CPU, seed 42). Tolerance: 1e-6 absolute on each
    adapter weight and each logged loss."""
    run = ["--max_steps", "4", "--save_steps", "2"]
    straight = dpo_train.main(*dpo_args(tiny_model_dir, pairs_dir, sft_dir, tmp_path / "a", *run))
    dpo_train.main(*dpo_args(tiny_model_dir, pairs_dir, sft_dir, tmp_path / "b", *run), callbacks=[stop_at(2)])
    assert latest_complete_checkpoint(tmp_path / "b").endswith("checkpoint-2")
    assert (tmp_path / "b" / "checkpoint-2" / "ref").is_dir()  # checkpoints keep the reference beside the policy
    resumed = dpo_train.main(*dpo_args(tiny_model_dir, pairs_dir, sft_dir, tmp_path / "b", *run))

    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)

    def losses(trainer):
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > 2}

    assert losses(resumed).keys() == {3, 4}
    for step, loss in losses(straight).items():
        assert losses(resumed)[step] == pytest.approx(loss, abs=1e-6)


# ---------------------------------------------------------------------------------------
# Bad input: one line, before any model loads, nothing written or lost.
# ---------------------------------------------------------------------------------------
def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_longer_than_the_limit_are_dropped_by_line(tiny_model_dir, pairs_dir, sft_dir, capsys):
    """The follow-up question's pair carries its whole chat (96 tiny tokens against 18-27 for
    the others): dropped, with its line, at --max_prompt_tokens 64; every pair at 10."""
    tokenizer = load_chat_tokenizer(str(sft_dir))
    path = pairs_dir / "pairs_train.jsonl"
    follow_up = next(n for n, row in read_pair_rows(path) if len(row["prompt"]) == 3)
    dataset = dpo_train.load_pairs(str(path), tokenizer, max_prompt_tokens=64, max_length=256)
    assert len(dataset) == 7 and all(len(p) == 1 for p in dataset["prompt"])
    assert (f"[dpo] {path}: 1 pairs dropped, their prompt is longer than --max_prompt_tokens 64 (lines {follow_up}); "
            "raise it (and max_length) to keep them") in capsys.readouterr().out
    with pytest.raises(InputError, match=r"no pair has a prompt within --max_prompt_tokens 10 tokens \(8 longer\)"):
        dpo_train.load_pairs(str(path), tokenizer, max_prompt_tokens=10, max_length=256)


def bad_input_argv(model_dir, sft, train_file, out, *extra):
    return ["--config", str(ROOT / "recipes" / "dpo_tiny.yaml"), "--model_name_or_path", str(model_dir),
            "--sft_adapter", str(sft), "--train_file", str(train_file), "--output_dir", str(out), *SMALL, *extra]


@pytest.mark.parametrize("case, message", [
    ("bad_line", r"pairs_train\.jsonl:2: field 'chosen' must be a list of one assistant turn"),
    ("empty", r"pairs_train\.jsonl: no pairs in the file\. data_prep\.py writes pairs only from user turns"),
    ("prompt_cap", r"--max_prompt_tokens \(600\) must be below --max_length \(256\)"),
    ("beta", r"--beta must be above 0 for DPO"),
    ("no_adapter", r"--sft_adapter .*missing-sft: no adapter there .*run sft_qlora\.py first"),
])
def test_bad_input_stops_before_a_model_loads(tiny_model_dir, pairs_dir, sft_dir, tmp_path, case, message):
    """Each mistake is one InputError before any model loads, and the output folder keeps
    what it held: no run.json, no checkpoint."""
    good = [row for _, row in read_pair_rows(pairs_dir / "pairs_train.jsonl")]
    rows = {"bad_line": [good[0], {**good[1], "chosen": good[1]["chosen"][0]["content"]}], "empty": []}
    train_file = write_pairs(tmp_path / "pairs_train.jsonl", rows.get(case, good))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file")
    extra = {"prompt_cap": ["--max_prompt_tokens", "600"], "beta": ["--beta", "0"]}.get(case, [])
    sft = tmp_path / "missing-sft" if case == "no_adapter" else sft_dir
    with pytest.raises(InputError, match=message):
        dpo_train.main(*dpo_train.parse_args(bad_input_argv(tiny_model_dir, sft, train_file, out, *extra)))
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_bad_input_from_the_command_line_is_one_line(tiny_model_dir, pairs_dir, sft_dir, tmp_path):
    train_file = write_pairs(tmp_path / "pairs_train.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    result = subprocess.run([sys.executable, str(ROOT / "dpo_train.py"),
                             *bad_input_argv(tiny_model_dir, sft_dir, train_file, tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"dpo_train: error: {train_file}:1: field 'prompt' must be a non-empty list of turns; each line must be "
        + FORMAT)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Where users look: evaluate.py's table and chart, app.py's columns.
# ---------------------------------------------------------------------------------------
def test_evaluate_compares_sft_dpo_and_grpo(trained, tiny_model_dir, sample_data_dir, pairs_dir, sft_dir, tmp_path):
    """evaluate.py with the SFT, DPO and GRPO adapters (a scaled copy of SFT stands in for
    GRPO) writes the table and the chart, with each model's preference accuracy following
    from its log-prob margins on the pairs, overall and by pair kind."""
    import evaluate
    from tiny_adapters import scaled_adapter

    _, dpo_dir = trained
    grpo_dir = scaled_adapter(sft_dir, tmp_path / "grpo", 3.0)
    pairs = [row for _, row in read_pair_rows(pairs_dir / "pairs_train.jsonl")]
    for row in pairs[:3]:
        row["kind"] = "concise"  # a second kind, for the split by kind
    pairs_file = write_pairs(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "eval"
    report = evaluate.main(evaluate.parse_args([
        "--model_name_or_path", str(tiny_model_dir), "--sft_adapter", str(sft_dir), "--dpo_adapter", str(dpo_dir),
        "--grpo_adapter", str(grpo_dir), "--models", "base,sft,dpo,grpo",
        "--prompts_file", str(sample_data_dir / "grpo_prompts.jsonl"), "--max_prompts", "2", "--max_new_tokens", "8",
        "--pairs_file", str(pairs_file), "--pairs_max_length", "256", "--output_dir", str(out)]))
    assert list(report["metrics"]) == ["base", "sft", "dpo", "grpo"]

    tokenizer = load_chat_tokenizer(str(sft_dir))
    dpo = load_adapter(load_base_model(str(tiny_model_dir), tokenizer, torch.float32), str(dpo_dir)).eval()
    chosen, rejected = completion_logps(dpo, tokenizer, pairs, max_length=256)
    m = report["metrics"]["dpo"]
    assert m["preference_pairs"] == 8
    assert m["preference_accuracy"] == pytest.approx(preference_accuracy(chosen, rejected))
    assert m["preference_accuracy_per_token"] == pytest.approx(preference_accuracy(chosen, rejected, per_token=True))
    assert m["preference_by_kind"]["concise"]["accuracy"] == pytest.approx(preference_accuracy(chosen[:3],
                                                                                               rejected[:3]))
    assert m["preference_by_kind"]["ranked"]["pairs"] == 5
    assert m["preference_accuracy"] > report["metrics"]["sft"]["preference_accuracy"]  # trained on these pairs

    markdown = (out / "report.md").read_text()
    assert "| preference accuracy | pref. acc. per token |" in markdown
    assert all(f"| {name} | " in markdown for name in report["metrics"])
    assert "| model | concise (3) | ranked (5) |" in markdown
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "report.json").read_text())["metrics"]["dpo"] == m


def test_app_shows_sft_dpo_and_grpo_side_by_side(trained, tiny_model_dir, sft_dir, tmp_path, capsys, monkeypatch):
    import app
    from phi2qlora.answers import generate_answers

    _, dpo_dir = trained
    args = app.parse_args(["--base", str(tiny_model_dir), "--sft", str(sft_dir), "--dpo", str(dpo_dir),
                           "--grpo", str(sft_dir)])
    columns = app.load_columns(args)
    assert [c.key for c in columns] == ["base", "sft", "dpo", "grpo"]
    assert columns[2].label == f"DPO · {dpo_dir.name}"
    prompt = "What is a good houseplant for a dark room?"
    shown = {c.key: list(c.stream(prompt, 12))[-1] for c in columns}
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    alone = load_adapter(load_base_model(str(tiny_model_dir), tokenizer, torch.float32).dequantize(dtype=torch.float32),
                         str(dpo_dir))
    assert shown["dpo"] == generate_answers(alone, tokenizer, [prompt], 12)[0]  # the DPO adapter, switched on
    assert shown["dpo"]["answer"] != shown["sft"]["answer"] == shown["grpo"]["answer"]

    monkeypatch.chdir(tmp_path)  # no default adapters here: only the one named
    assert app.adapter_folders(app.parse_args(["--dpo", str(dpo_dir)])) == {"dpo": str(dpo_dir)}
    assert f"no SFT adapter in {app.DEFAULT_SFT}" in capsys.readouterr().out
    with pytest.raises(InputError, match=r"--dpo nowhere: no adapter there .*dpo_train\.py"):
        app.adapter_folders(app.parse_args(["--dpo", "nowhere"]))
