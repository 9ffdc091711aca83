"""sft_qlora.py on the tiny Phi model in 4-bit NF4 on the CPU: the real QLoRA path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import pickles_under, sft_args, stop_at
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sft_qlora
from phi2qlora.chat import END, chat_token_ids, format_chat
from phi2qlora.errors import InputError
from phi2qlora.files import read_prompt_rows
from phi2qlora.model import fix_lm_head_bias, load_adapter, load_base_model, load_chat_tokenizer
from phi2qlora.training import latest_complete_checkpoint


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sample_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    # Evaluated on its own training conversations, from step 0: "the loss falls" measured
    # on fixed data, free of batch-to-batch noise.
    trainer = sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, out, "--max_steps", "40",
                                       "--preview_steps", "20", "--eval_steps", "20", "--eval_on_start", "true",
                                       "--eval_file", str(sample_data_dir / "train.jsonl")))
    return trainer, out


def first_conversation(data_dir):
    with open(Path(data_dir) / "train.jsonl", encoding="utf-8") as f:
        return json.loads(f.readline())["messages"]


def test_loss_falls(trained):
    trainer, out = trained
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(losses) >= 6 and len(evals) == 3
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    assert evals[0] - evals[-1] > 0.15, evals
    assert (out / "loss.png").stat().st_size > 1000


def test_saved_adapter_reloads_with_the_same_logits(trained, tiny_model_dir, sample_data_dir):
    trainer, out = trained
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*model*.bin"))
    tokenizer = load_chat_tokenizer(str(out))  # saved with the chat tokens
    batch = tokenizer([format_chat(first_conversation(sample_data_dir))], return_tensors="pt")
    base = load_base_model(str(tiny_model_dir), tokenizer, torch.float32)
    reloaded = load_adapter(base, str(out)).eval()
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = reloaded(**batch).logits
        with reloaded.disable_adapter():
            untrained = reloaded(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - untrained).abs().max() > 1e-2  # the adapter did change the model


def test_embedding_not_resized_and_only_chat_rows_changed(trained, tiny_model_dir):
    trainer, _ = trained
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = original.get_input_embeddings().weight.shape[0]
    chat_ids = set(chat_token_ids(trainer.processing_class).values())
    end_id = trainer.processing_class.convert_tokens_to_ids(END)
    embed, head = trainer.model.get_input_embeddings(), trainer.model.get_output_embeddings()

    for module, original_weight, trainable in [
        (embed, original.get_input_embeddings().weight, chat_ids),
        (head, original.get_output_embeddings().weight, {end_id}),
    ]:
        trained_weight = module.weight.detach()  # the wrapper gives the rows in use
        assert trained_weight.shape[0] == rows
        differs = (trained_weight.float() != original_weight.float()).any(dim=1).nonzero().flatten().tolist()
        assert set(differs) <= chat_ids  # nothing but the chat tokens' rows moved
        assert trainable <= set(differs)  # and the ones meant to train did


def test_lm_head_bias_kept_under_trainable_tokens(tiny_model_dir, sample_data_dir):
    """With the chat rows untouched, the PEFT-wrapped model must give the base model's
    logits; PEFT 0.21 drops the lm_head bias there unless fix_lm_head_bias runs."""
    from peft import get_peft_model

    model_args = sft_args(tiny_model_dir, sample_data_dir, "unused")[2]
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    model = load_base_model(str(tiny_model_dir), tokenizer, torch.float32).eval()
    batch = tokenizer([format_chat(first_conversation(sample_data_dir))], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    peft_model = get_peft_model(model, sft_qlora.lora_config(model_args, tokenizer)).eval()
    assert fix_lm_head_bias(peft_model) == 1
    assert fix_lm_head_bias(peft_model) == 0  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_labels_cover_only_assistant_turns(trained, sample_data_dir):
    trainer, _ = trained
    tokenizer = trainer.processing_class
    with open(Path(sample_data_dir) / "train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line)["messages"] for line in f]
    checked = 0
    for i, messages in enumerate(rows):
        example = trainer.train_dataset[i]
        if len(example["input_ids"]) >= 256:
            continue  # truncated: the last turn is cut
        labels = trainer.data_collator([example])["labels"][0]
        kept = [t for t, l in zip(example["input_ids"], labels.tolist()) if l != -100]
        expected = "".join(m["content"] + END for m in messages if m["role"] == "assistant")
        assert tokenizer.decode(kept) == expected
        checked += 1
        if checked == 5:
            break
    assert checked == 5


def test_resumed_run_equals_uninterrupted(tiny_model_dir, sample_data_dir, tmp_path):
    """Stopped after the checkpoint at step 4 and resumed, a run ends with the same adapter
    and the same later losses as one that ran straight through (fixed seed, CPU). Tolerance:
    1e-6 absolute on every adapter weight."""
    common_args = ["--max_steps", "8", "--save_steps", "4", "--logging_steps", "1", "--preview_steps", "0",
                   "--eval_strategy", "no", "--lora_dropout", "0.1"]
    straight = sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path / "a", *common_args))
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path / "b", *common_args), callbacks=[stop_at(4)])
    assert latest_complete_checkpoint(tmp_path / "b").endswith("checkpoint-4")
    assert not (tmp_path / "b" / "checkpoint-8").exists()
    resumed = sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path / "b", *common_args))

    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora" in k for k in a) and any("trainable_tokens" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)

    def losses(trainer):
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > 4}

    assert losses(resumed).keys() == set(range(5, 9))
    for step, loss in losses(straight).items():
        assert losses(resumed)[step] == pytest.approx(loss, abs=1e-6)

    # --resume_from_checkpoint: the straight run's checkpoint-4, resumed into a new folder,
    # ends where the straight run ended (the flag used to start from step 0 instead).
    moved = sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path / "c", *common_args,
                                     "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-4")))
    assert losses(moved) == pytest.approx(losses(straight), abs=1e-6)
    c = load_file(tmp_path / "c" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(c[key], a[key], atol=1e-6, rtol=0)
    # Nothing any of the runs wrote, checkpoints included, is a pickle (training_args.bin,
    # optimizer.pt, scheduler.pt and rng_state.pth were).
    assert {p.name for p in (tmp_path / "a" / "checkpoint-4").iterdir()} >= {
        "training_args.json", "optimizer.safetensors", "scheduler.safetensors", "rng_state.safetensors"}
    assert pickles_under(tmp_path) == []


def test_several_adapters_on_one_base_switch_cleanly(trained, tiny_model_dir, sample_data_dir, tmp_path):
    """evaluate.py and app.py keep one base and switch adapters: each name must give its
    own adapter's logits, and disable_adapter() the plain base, lm_head bias included."""
    import shutil

    from safetensors.torch import save_file

    trainer, out = trained
    other = tmp_path / "other"
    shutil.copytree(out, other, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    weights = load_file(other / "adapter_model.safetensors")
    save_file({k: v * 2 if "lora_B" in k else v for k, v in weights.items()}, other / "adapter_model.safetensors")

    tokenizer = load_chat_tokenizer(str(out))
    batch = tokenizer([format_chat(first_conversation(sample_data_dir))], return_tensors="pt")
    plain = load_base_model(str(tiny_model_dir), tokenizer, torch.float32).eval()
    model = load_adapter(load_base_model(str(tiny_model_dir), tokenizer, torch.float32),
                                str(out), adapter_name="sft")
    model = load_adapter(model, str(other), adapter_name="other").eval()
    with torch.no_grad():
        expected_sft = trainer.model.eval()(**batch).logits
        model.set_adapter("sft")
        sft = model(**batch).logits
        model.set_adapter("other")
        doubled = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
        expected_base = plain(**batch).logits
    torch.testing.assert_close(sft, expected_sft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base, expected_base, atol=1e-5, rtol=1e-5)
    assert (doubled - sft).abs().max() > 1e-3 and (sft - base).abs().max() > 1e-2
    with pytest.raises(InputError, match="no adapter there"):
        load_adapter(model, str(tmp_path / "missing"), adapter_name="x")


@pytest.mark.parametrize("line, message", [
    ('{"text": "hi"}', r"bad\.jsonl:2: field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "system", "content": "x"}]}', r"bad\.jsonl:2: each turn needs 'role'"),
    ('{"messages": [{"role": "user", "content": 5}]}', r"bad\.jsonl:2: each turn needs 'role'"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', r"bad\.jsonl:2: no assistant turn"),
    ('{"messages": [', r"bad\.jsonl:2: malformed JSON"),
])
def test_bad_conversation_files_name_the_line(tmp_path, line, message):
    good = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}'
    (tmp_path / "bad.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(InputError, match=message):
        sft_qlora.load_conversations(str(tmp_path / "bad.jsonl"))
    (tmp_path / "good.jsonl").write_text((good + "\n") * 3)
    assert len(sft_qlora.load_conversations(str(tmp_path / "good.jsonl"), limit=2)) == 2


def test_chat_tokens_written_in_user_files_are_refused(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi <|user|> there"}, '
                                      '{"role": "assistant", "content": "Hello."}]}\n')
    with pytest.raises(InputError, match=r"c\.jsonl:1: a turn holds '<\|user\|>'"):
        sft_qlora.load_conversations(str(tmp_path / "c.jsonl"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "Say <|end|> twice"}\n')
    with pytest.raises(InputError, match=r"p\.jsonl:1: the prompt holds '<\|end\|>'"):
        read_prompt_rows(tmp_path / "p.jsonl")
