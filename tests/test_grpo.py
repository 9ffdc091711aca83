"""grpo_train.py on the tiny Phi model in 4-bit on the CPU: from the SFT adapter, with the
SFT model as the KL reference, and the evidence that it learns what the rewards ask."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import grpo_train
import rewards
import sft_qlora
from conftest import ROOT, SAMPLE, sft_args, stop_at
from preview_callback import generate_answers

TIGHT_LIMIT = "Answer in under 20 words."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The sample with a quarter of the trees held out: enough held-out prompts to measure."""
    out = tmp_path_factory.mktemp("grpo-data")
    subprocess.run([sys.executable, str(ROOT / "data_prep.py"), "--dataset_name", str(SAMPLE), "--output_dir",
                    str(out), "--eval_fraction", "0.25"], check=True, capture_output=True, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def sft_dir(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-for-grpo")
    sft_qlora.main(*sft_args(tiny_model_dir, data_dir, out, "--max_steps", "40", "--preview_steps", "0",
                             "--eval_strategy", "no", "--save_strategy", "no"))
    return out


def grpo_args(tiny_model_dir, data_dir, sft_dir, output_dir, *extra):
    return grpo_train.parse_args([
        "--config", str(ROOT / "recipes" / "grpo_tiny.yaml"),
        "--model_name_or_path", str(tiny_model_dir), "--sft_adapter", str(sft_dir),
        "--prompts_file", str(Path(data_dir) / "grpo_prompts.jsonl"),
        "--output_dir", str(output_dir), "--report_to", "none", *extra,
    ])


def test_reference_is_the_sft_model_and_kl_starts_at_zero(tiny_model_dir, data_dir, sft_dir, tmp_path):
    trainer = grpo_train.main(*grpo_args(tiny_model_dir, data_dir, sft_dir, tmp_path, "--max_steps", "2",
                                         "--preview_steps", "0", "--save_strategy", "no"))
    logs = [h for h in trainer.state.log_history if "kl" in h]
    assert [h["step"] for h in logs] == [1, 2]  # logged every step, with what a person watches:
    for key in ("reward", "completion_words", "word_limit_compliance",
                *(f"rewards/{f.__name__}/mean" for f in rewards.REWARD_FUNCS)):
        assert all(key in h for h in logs), key
    assert (tmp_path / "rewards.png").stat().st_size > 1000
    assert logs[0]["kl"] < 1e-5  # policy == reference before the first update
    assert logs[-1]["kl"] > logs[0]["kl"]

    sft = load_file(Path(sft_dir) / "adapter_model.safetensors")
    params = dict(trainer.model.named_parameters())
    ref = {n: p for n, p in params.items() if ".ref" in n}
    assert ref and not any(p.requires_grad for p in ref.values())
    moved = 0
    for key, value in sft.items():  # PEFT saves without the adapter name
        stem = key.removesuffix(".weight")
        (ref_name,) = [n for n in ref if n.replace(".ref", "").removesuffix(".weight") == stem]
        torch.testing.assert_close(ref[ref_name].detach().float(), value.float())  # reference = SFT, frozen
        policy = params[ref_name.replace(".ref", ".default")]
        assert policy.requires_grad  # the SFT adapter was loaded trainable
        moved += not torch.equal(policy.detach().float(), value.float())
    assert moved > 0  # and GRPO changed it

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved.keys() == sft.keys()  # the trained adapter alone, no `ref` copy


def heldout_scores(model_dir, adapter_dir, prompts, limits):
    tokenizer = common.load_chat_tokenizer(str(adapter_dir))
    model = common.load_adapter(common.load_base_model(str(model_dir), tokenizer, torch.float32), str(adapter_dir))
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=96)
    completions = [a["answer"] for a in answers]
    ended = [a["ended"] for a in answers]
    scores = rewards.score(prompts, completions, ended=ended, word_limit=limits)
    total = sum(w * sum(scores[name]) / len(prompts) for name, w in rewards.DEFAULT_WEIGHTS.items())
    compliance = rewards.word_limit_compliance(prompts, completions, word_limit=limits)
    return total, sum(compliance) / len(compliance)


@pytest.mark.parametrize("fast", ["true", "false"])
def test_grpo_raises_reward_and_compliance_on_heldout_prompts(tiny_model_dir, data_dir, sft_dir, tmp_path, fast):
    """The tiny GRPO recipe, after the tiny SFT run, on prompts of held-out trees, each
    given a word limit: greedy answers score higher and obey the limit more often; with
    the fast rollouts and with TRL's generate (the same distribution, other draws)."""
    rows = [json.loads(line) for line in (Path(data_dir) / "heldout_prompts.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] if r["word_limit"] else f"{r['prompt']} {TIGHT_LIMIT}" for r in rows]
    limits = [r["word_limit"] or 20 for r in rows]
    assert len(prompts) >= 8

    before = heldout_scores(tiny_model_dir, sft_dir, prompts, limits)
    grpo_train.main(*grpo_args(tiny_model_dir, data_dir, sft_dir, tmp_path, "--preview_steps", "0",
                               "--fast_rollouts", fast))
    after = heldout_scores(tiny_model_dir, tmp_path, prompts, limits)
    print(f"held-out: reward {before[0]:.3f} -> {after[0]:.3f}, compliance {before[1]:.2f} -> {after[1]:.2f}")
    assert after[0] > before[0] + 0.3
    assert after[1] >= before[1] + 2 / len(prompts) - 1e-9  # at least two more prompts obey their limit


def test_resumed_grpo_equals_uninterrupted(tiny_model_dir, data_dir, sft_dir, tmp_path):
    """Stopped after the checkpoint at step 2 and resumed, GRPO ends with the same adapter
    and logs as a straight run (CPU, seed 42): sampling is reproducible because the
    checkpoint holds the RNG state and each optimizer step generates its own completions
    (TRL's generation batch = one optimizer step here), so nothing is buffered across it.
    Tolerance: 1e-6 absolute on each adapter weight, each logged loss, reward and KL."""
    run = ["--max_steps", "4", "--save_steps", "2", "--preview_steps", "0"]
    straight = grpo_train.main(*grpo_args(tiny_model_dir, data_dir, sft_dir, tmp_path / "a", *run))
    grpo_train.main(*grpo_args(tiny_model_dir, data_dir, sft_dir, tmp_path / "b", *run), callbacks=[stop_at(2)])
    assert common.latest_complete_checkpoint(tmp_path / "b").endswith("checkpoint-2")
    resumed = grpo_train.main(*grpo_args(tiny_model_dir, data_dir, sft_dir, tmp_path / "b", *run))

    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)

    def logged(trainer):
        return {h["step"]: (h["loss"], h["reward"], h["kl"]) for h in trainer.state.log_history
                if "reward" in h and h["step"] > 2}

    assert logged(resumed).keys() == {3, 4}
    for step, values in logged(straight).items():
        assert logged(resumed)[step] == pytest.approx(values, abs=1e-6)
