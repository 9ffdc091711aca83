"""grpo_train.py on the tiny Phi model in 4-bit on the CPU: from the SFT adapter, with the
SFT model as the KL reference, and the evidence that it learns what the rewards ask."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE, pickles_under, sft_args, stop_at
from safetensors.torch import load_file

import evaluate
import grpo_train
import sft_qlora
from phi2qlora.answers import generate_answers
from phi2qlora.files import read_prompt_rows
from phi2qlora.model import load_adapter, load_base_model, load_chat_tokenizer
from phi2qlora.rewards import REWARD_FUNCS, REWARD_WEIGHTS, score, weighted_total, word_limit_compliance
from phi2qlora.training import latest_complete_checkpoint
from phi2qlora.word_limits import WORD_LIMIT_TEMPLATES, WORD_LIMITS, with_instruction

TIGHT_LIMIT = "Answer in under 20 words."


def prepared(out, concise_share: str):
    """The sample with a quarter of the trees held out: enough held-out prompts to measure."""
    subprocess.run([sys.executable, str(ROOT / "data_prep.py"), "--dataset_name", str(SAMPLE), "--output_dir",
                    str(out), "--eval_fraction", "0.25", "--concise_share", concise_share],
                   check=True, capture_output=True, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """With concise SFT examples: every train conversation whose reply fits a limit (29 of the
    sample's 35) gets one (test_compliance_at_each_stage)."""
    return prepared(tmp_path_factory.mktemp("grpo-data"), "1")


def tiny_sft(tiny_model_dir, data_dir, out):
    sft_qlora.main(*sft_args(tiny_model_dir, data_dir, out, "--max_steps", "40", "--preview_steps", "0",
                             "--eval_strategy", "no", "--save_strategy", "no"))
    return out


@pytest.fixture(scope="module")
def sft_dir(tiny_model_dir, data_dir, tmp_path_factory):
    return tiny_sft(tiny_model_dir, data_dir, tmp_path_factory.mktemp("sft-for-grpo"))


@pytest.fixture(scope="module")
def grpo_dirs(tiny_model_dir, data_dir, sft_dir, tmp_path_factory):
    """The tiny GRPO recipe after the tiny SFT run, once for each rollout path ("true": the
    fast rollouts, "false": TRL's generate), shared by the tests that need it."""
    done = {}

    def run(fast: str):
        if fast not in done:
            out = tmp_path_factory.mktemp(f"grpo-fast-{fast}")
            grpo_train.main(*grpo_args(tiny_model_dir, data_dir, sft_dir, out, "--preview_steps", "0",
                                       "--fast_rollouts", fast))
            done[fast] = out
        return done[fast]

    return run


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
                *(f"rewards/{f.__name__}/mean" for f in REWARD_FUNCS)):
        assert all(key in h for h in logs), key
    assert (tmp_path / "rewards.png").stat().st_size > 1000
    # GRPO trains with the weights evaluate.py and rewards.py total with (REWARD_WEIGHTS), and
    # the `reward` it logs is that total of the logged means.
    assert trainer.reward_weights.tolist() == pytest.approx([REWARD_WEIGHTS[f.__name__] for f in REWARD_FUNCS])
    for h in logs:
        assert h["reward"] == pytest.approx(weighted_total({f.__name__: h[f"rewards/{f.__name__}/mean"]
                                                            for f in REWARD_FUNCS}), abs=1e-5)
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
    tokenizer = load_chat_tokenizer(str(adapter_dir))
    model = load_adapter(load_base_model(str(model_dir), tokenizer, torch.float32), str(adapter_dir))
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=96)
    completions = [a["answer"] for a in answers]
    ended = [a["ended"] for a in answers]
    scores = score(prompts, completions, ended=ended, word_limit=limits)
    total = sum(w * sum(scores[name]) / len(prompts) for name, w in REWARD_WEIGHTS.items())
    compliance = word_limit_compliance(prompts, completions, word_limit=limits)
    return total, sum(compliance) / len(compliance)


@pytest.mark.parametrize("fast", ["true", "false"])
def test_grpo_raises_reward_and_compliance_on_heldout_prompts(tiny_model_dir, data_dir, sft_dir, grpo_dirs, fast):
    """The tiny GRPO recipe, after the tiny SFT run, on prompts of held-out trees, each
    given a word limit: greedy answers score higher and obey the limit more often; with
    the fast rollouts and with TRL's generate (the same distribution, other draws)."""
    rows = [json.loads(line) for line in (Path(data_dir) / "heldout_prompts.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] if r["word_limit"] else f"{r['prompt']} {TIGHT_LIMIT}" for r in rows]
    limits = [r["word_limit"] or 19 for r in rows]  # "under 20 words": at most 19
    assert len(prompts) >= 8

    before = heldout_scores(tiny_model_dir, sft_dir, prompts, limits)
    after = heldout_scores(tiny_model_dir, grpo_dirs(fast), prompts, limits)
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
    assert latest_complete_checkpoint(tmp_path / "b").endswith("checkpoint-2")
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

    # --resume_from_checkpoint: the straight run's checkpoint-2 (its `ref` adapter with it),
    # resumed into a new folder, ends where the straight run ended.
    moved = grpo_train.main(*grpo_args(tiny_model_dir, data_dir, sft_dir, tmp_path / "c", *run,
                                       "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-2")))
    assert logged(moved).keys() == {3, 4}
    for step, values in logged(straight).items():
        assert logged(moved)[step] == pytest.approx(values, abs=1e-6)
    c = load_file(tmp_path / "c" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(c[key], a[key], atol=1e-6, rtol=0)
    assert (tmp_path / "a" / "checkpoint-2" / "ref" / "adapter_model.safetensors").is_file()
    assert pickles_under(tmp_path) == []  # no training_args.bin, optimizer.pt, rng_state.pth, ...


LIMIT, NEW_TOKENS = 20, 96


def limited_heldout_rows(data_dir):
    """The held-out prompts (eval trees only), each with limit LIMIT in the phrasings in turn."""
    rows = read_prompt_rows(data_dir / "heldout_prompts.jsonl")
    bare = [r["prompt"] for r in rows]
    for i, r in enumerate(rows):
        if r["word_limit"] is not None:  # drop data_prep's own instruction, to give every prompt the same N
            bare[i] = next(r["prompt"][: -len(t.format(n=n))].rstrip() for t in WORD_LIMIT_TEMPLATES
                           for n in WORD_LIMITS if r["prompt"].endswith(t.format(n=n)))
    templates = WORD_LIMIT_TEMPLATES
    return [{"prompt": with_instruction(p, templates[i % len(templates)].format(n=LIMIT)),
             "word_limit": None} for i, p in enumerate(bare)]


@pytest.fixture(scope="module")
def plain_data_dir(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("grpo-data-plain"), "0")


def test_compliance_at_each_stage(tiny_model_dir, data_dir, plain_data_dir, sft_dir, grpo_dirs, tmp_path):
    """Word limits end to end on the tiny model (4-bit, CPU, seeded): the base, SFT without
    and with concise examples, then GRPO from the latter, on the held-out prompts, each given
    limit N = 20 in data_prep's ten phrasings in turn (the four strict ones allow 19 words),
    greedy, 96 new tokens, scored as IFEval scores the length instruction. Measured (2 CPU
    cores, torch 2.13, seed 42; `python -m pytest -q -s tests/test_grpo.py -k each_stage`
    prints it):

        model                     compliance  median words  ended
        base                      0.08        0             0.00
        SFT without concise rows  0.50        21.5          0.00
        SFT with concise rows     0.17        29            0.00
        GRPO (30 steps)           1.00        4             1.00

    With concise examples on every train conversation whose reply fits (29 of 35). The two
    SFT runs differ by chance, not by the concise rows: over seeds 42-49 their compliance
    averaged 0.31 without and 0.32 with them (each run between 0.17 and 0.50), and 0.40 and
    0.35 on the sample as it was before data_prep.py dropped its limit-breaking row (where
    seed 42 alone had shown 0.25 and 0.50). So the test holds only what this table shows
    by a wide margin: the base obeys almost nothing, and GRPO obeys nearly everything, well above either
    SFT. The tiny GRPO shortens answers hard, but they stay answers that end: floors of 3
    median words and a 0.75 end-of-turn rate.
    """
    adapters = {"base": None, "sft_plain": tiny_sft(tiny_model_dir, plain_data_dir, tmp_path / "sft-plain"),
                "sft_concise": sft_dir, "grpo": grpo_dirs("true")}
    plain, concise = plain_data_dir, data_dir
    rows = limited_heldout_rows(concise)
    assert rows == limited_heldout_rows(plain) and len(rows) == 12  # the same held-out prompts for every stage
    tokenizer = load_chat_tokenizer(str(adapters["sft_plain"]))
    metrics = {}
    for name, adapter in adapters.items():
        model = load_base_model(str(tiny_model_dir), tokenizer, torch.float32)
        if adapter is not None:
            model = load_adapter(model, str(adapter))
        answers = generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=NEW_TOKENS)
        metrics[name] = evaluate.summarise(evaluate.score_answers(rows, answers))
    print("\n| model | compliance | median words | ended |\n| --- | ---: | ---: | ---: |")
    for name, m in metrics.items():
        print(f"| {name} | {m['word_limit_compliance']:.2f} | {m['median_words']:g} | {m['end_of_turn_rate']:.2f} |")

    c = {name: m["word_limit_compliance"] for name, m in metrics.items()}
    assert all(m["limited_prompts"] == 12 for m in metrics.values())  # every prompt's limit was read
    # Tolerance: the measured figures (docstring) may move by a prompt or two on another CPU;
    # the order and the gaps may not (GRPO at least 2 of the 12 prompts above either SFT).
    assert c["base"] <= 2 / 12
    assert c["grpo"] >= max(c["sft_plain"], c["sft_concise"]) + 2 / 12 - 1e-9 and c["grpo"] >= 10 / 12
    # ... and not by collapsing to a couple of words or running on.
    assert metrics["sft_plain"]["median_words"] >= 10 and metrics["sft_concise"]["median_words"] >= 10
    assert metrics["grpo"]["median_words"] >= 3 and metrics["grpo"]["end_of_turn_rate"] >= 0.75
