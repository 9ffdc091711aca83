"""export_model.py on the tiny Phi model: the merged model stands alone (plain
transformers, no PEFT) and computes what base + adapter computed in training.

Tolerances, measured on the tiny model (logits up to ~14 in size):
  fp32 export merged into the NF4 base   vs the trained model (4-bit base + adapter, fp32):
                                          logits within 1e-4 (seen: 3e-6), same greedy answers
  fp16 export (the default)               logits within 0.15 (seen: 0.005 to 0.06), same top
                                          token at >= 99% of positions (seen: all)
  fp32 merged into the original weights   vs unquantised base + adapter: within 1e-4; vs the
                                          trained model: off by more than 0.05 (seen: 0.3 to 0.5)
  4-bit NF4 copy                          loads and generates; same top token at >= 80% of
                                          positions (seen: 96 to 99%)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_adapters import sft_adapter
from transformers import AutoModelForCausalLM

import export_model
from phi2qlora.answers import generate_answers
from phi2qlora.chat import END, PAD, chat_token_ids, format_prompt
from phi2qlora.errors import InputError
from phi2qlora.model import load_adapter, load_base_model, load_chat_tokenizer

PROMPTS = [
    "What is the difference between weather and climate?",
    "Explain why the sky is blue in under 50 words.",
    "How do I center a div in CSS?",
    "Give me three tips for a job interview.",
    "Write a haiku about autumn.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, sample_data_dir, tmp_path_factory):
    return sft_adapter(tmp_path_factory, tiny_model_dir, sample_data_dir)


def export_args(model_dir, adapter_dir, out, *extra):
    return export_model.parse_args(["--model_name_or_path", str(model_dir), "--adapter", str(adapter_dir),
                                    "--output_dir", str(out), "--check_max_new_tokens", "16", *extra])


@pytest.fixture(scope="module")
def exported(tiny_model_dir, adapter, tmp_path_factory):
    """The fp32 export (exact on the CPU) with its 4-bit copy, checked by the script itself."""
    out = tmp_path_factory.mktemp("export") / "merged"
    info = export_model.main(export_args(tiny_model_dir, adapter, out, "--dtype", "float32", "--quantize_4bit", "true"))
    return out, info


@pytest.fixture(scope="module")
def tokenizer(adapter):
    return load_chat_tokenizer(str(adapter))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, adapter, tokenizer):
    """Base + adapter as training loaded them: 4-bit NF4 base, fp32 compute on the CPU."""
    base = load_base_model(str(tiny_model_dir), tokenizer, torch.float32)
    return load_adapter(base, str(adapter)).eval()


@torch.no_grad()
def logits(model, tokenizer):
    """Logits at every real (unpadded) position of the chat-formatted prompts, in fp32."""
    tokenizer.padding_side = "left"
    batch = tokenizer([format_prompt(p) for p in PROMPTS], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    return model(**batch).logits.float()[batch["attention_mask"].bool()]


def answers(model, tokenizer):
    return [a["answer"] for a in generate_answers(model, tokenizer, PROMPTS, NEW_TOKENS, batch_size=1)]


def test_export_is_a_plain_model_folder(exported, tokenizer):
    out, info = exported
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "export.json"} <= names
    assert not [n for n in names if n.endswith(".bin") or n.startswith("adapter")]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["PhiForCausalLM"]
    generation = json.loads((out / "generation_config.json").read_text())
    ids = chat_token_ids(tokenizer)
    assert generation["eos_token_id"] == ids[END] and generation["pad_token_id"] == ids[PAD]
    assert (out / "model.safetensors").stat().st_mode & 0o044  # readable by others, unlike transformers' 0600
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged", "merged-4bit"] and not leftovers
    check = info[str(out)]["check"]
    assert check["same_greedy_answers"] == check["prompts"] == 4 and check["max_logit_diff"] < 1e-4


def test_loads_without_peft_and_answers_as_the_trained_model(exported, trained, tokenizer):
    """In a fresh process where `import peft` and `import bitsandbytes` fail: the saved
    tokenizer's chat template, the generation config's stop token and the merged weights
    give the trained model's greedy answers, one prompt at a time."""
    out, _ = exported
    script = f"""
import json, sys
sys.modules["peft"] = sys.modules["bitsandbytes"] = None  # any import of them raises
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
answers = []
for prompt in json.loads(sys.argv[1]):
    text = tok.apply_chat_template([{{"role": "user", "content": prompt}}], add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens={NEW_TOKENS}, do_sample=False)
    answers.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
print(json.dumps({{"answers": answers, "type": type(model).__name__, "texts": [
    tok.apply_chat_template([{{"role": "user", "content": p}}], add_generation_prompt=True, tokenize=False)
    for p in json.loads(sys.argv[1])]}}))
"""
    result = subprocess.run([sys.executable, "-c", script, json.dumps(PROMPTS)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    standalone = json.loads(result.stdout.strip().splitlines()[-1])
    assert standalone["type"] == "PhiForCausalLM"
    assert standalone["texts"] == [format_prompt(p) for p in PROMPTS]
    assert standalone["answers"] == answers(trained, tokenizer)


def test_logits_match_the_trained_model_and_not_the_base(exported, trained, tokenizer):
    out, _ = exported
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32
    got, expected = logits(merged, tokenizer), logits(trained, tokenizer)
    with trained.disable_adapter():
        base = logits(trained, tokenizer)
    print(f"fp32 export vs trained: max |logit diff| {(got - expected).abs().max():.2e}")
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - base).abs().max() > 0.1  # the adapter is in it


def test_lm_head_keeps_its_bias_and_the_trained_rows(exported, adapter, tiny_model_dir, tokenizer):
    out, _ = exported
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = load_base_model(str(tiny_model_dir), tokenizer, torch.float32)  # with the chat-token rows
    saved = load_file(adapter / "adapter_model.safetensors")
    indices = json.loads((adapter / "adapter_config.json").read_text())["trainable_token_indices"]
    end = tokenizer.convert_tokens_to_ids(END)
    assert indices["lm_head"] == [end]

    head, embed = merged.get_output_embeddings(), merged.get_input_embeddings()
    assert head.bias is not None and torch.count_nonzero(head.bias) > 0
    torch.testing.assert_close(head.bias, base.lm_head.bias, atol=0, rtol=0)  # bias kept, untouched
    trained_row = saved["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]
    torch.testing.assert_close(head.weight[[end]], trained_row, atol=0, rtol=0)
    assert not torch.equal(trained_row, base.lm_head.weight[[end]])  # the row did train
    rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    torch.testing.assert_close(embed.weight[indices["embed_tokens"]], rows, atol=0, rtol=0)
    others = [i for i in range(embed.weight.shape[0]) if i not in indices["embed_tokens"]]
    torch.testing.assert_close(embed.weight[others], base.get_input_embeddings().weight[others], atol=0, rtol=0)


def test_fp16_default_export_is_close(tiny_model_dir, adapter, trained, tokenizer, tmp_path):
    out = tmp_path / "fp16"
    export_model.main(export_args(tiny_model_dir, adapter, out, "--check", "false"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float16
    got, expected = logits(merged, tokenizer), logits(trained, tokenizer)
    same_top = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"fp16 export vs trained: max |logit diff| {(got - expected).abs().max():.3f}, same top token {same_top:.3f}")
    assert (got - expected).abs().max() < 0.15 and same_top >= 0.99


def test_merge_into_original_weights_is_the_other_model(exported, tiny_model_dir, adapter, trained, tokenizer,
                                                        tmp_path):
    """--merge_into original gives the unquantised base + adapter, which is not the model
    that was trained: the NF4 default is the one that reproduces it."""
    out = tmp_path / "original"
    export_model.main(export_args(tiny_model_dir, adapter, out, "--merge_into", "original", "--dtype", "float32",
                                  "--check", "false"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    full = load_adapter(load_base_model(str(tiny_model_dir), tokenizer, torch.float32,
                                                      load_in_4bit=False), str(adapter)).eval()
    got = logits(merged, tokenizer)
    torch.testing.assert_close(got, logits(full, tokenizer), atol=1e-4, rtol=0)
    off = (got - logits(trained, tokenizer)).abs().max().item()
    print(f"merged into the original weights vs trained: max |logit diff| {off:.3f}")
    assert off > 0.05


def test_4bit_copy_loads_and_generates(exported, trained, tokenizer):
    out, info = exported
    quantized = out.parent / "merged-4bit"
    config = json.loads((quantized / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (quantized / "model.safetensors").stat().st_size < 0.75 * (out / "model.safetensors").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(quantized).eval()  # no quantisation arguments needed
    assert type(model.model.layers[0].mlp.fc1).__name__ == "Linear4bit"
    got, expected = logits(model, tokenizer), logits(trained, tokenizer)
    same_top = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"4-bit copy vs trained: max |logit diff| {(got - expected).abs().max():.3f}, same top token {same_top:.3f}")
    assert same_top >= 0.8
    assert all(a.strip() for a in answers(model, tokenizer))
    assert info[str(quantized)]["check"]["prompts"] == 4


def test_overwrite_replaces_only_an_export_and_a_failed_one_leaves_the_old(tiny_model_dir, adapter,
                                                                           tmp_path, monkeypatch):
    """--overwrite never deletes a file it did not write: a folder of the user's is refused,
    as is an export the user added a file to; a failed export leaves the old one whole."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("notes of my own")
    with pytest.raises(InputError, match="already exists and is not empty; pass --overwrite"):
        export_model.main(export_args(tmp_path / "no-model-here", adapter, mine))
    with pytest.raises(InputError, match=r"--overwrite .*mine: no export\.json: not an export of this script, so its "
                                         r"files may be yours and are not replaced"):
        export_model.main(export_args(tiny_model_dir, adapter, mine, "--overwrite", "true"))
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]

    target = tmp_path / "merged"
    export_model.main(export_args(tiny_model_dir, adapter, target, "--check", "false"))
    written = json.loads((target / "export.json").read_text())["files"]
    assert sorted(p.name for p in target.iterdir()) == written and "model.safetensors" in written
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(model, tokenizer, folder):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_model, "save_model", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model.main(export_args(tiny_model_dir, adapter, target, "--overwrite", "true", "--check", "false"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine"]  # no temporary folder left
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    monkeypatch.undo()

    export_model.main(export_args(tiny_model_dir, adapter, target, "--overwrite", "true", "--check", "false",
                                  "--dtype", "float32"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine"]  # swapped in, nothing beside it
    assert json.loads((target / "export.json").read_text())["dtype"] == "float32"
    (target / "README.md").write_text("my model card")
    with pytest.raises(InputError, match=r"--overwrite .*merged: holds README\.md, which export_model\.py did not "
                                         r"write and --overwrite would delete; move it out"):
        export_model.main(export_args(tiny_model_dir, adapter, target, "--overwrite", "true", "--check", "false"))
    assert (target / "README.md").read_text() == "my model card"


def test_an_output_folder_that_holds_or_lies_in_an_input_is_refused(tiny_model_dir, adapter, tmp_path):
    """Exporting into `outputs/` (which holds the base and the adapter), into the adapter's
    folder or under it, or into the base model's folder: the first run used to advise
    --overwrite, which then replaced them."""
    outputs = tmp_path / "outputs"
    shutil.copytree(tiny_model_dir, outputs / "tiny-phi")
    shutil.copytree(adapter, outputs / "sft", ignore=shutil.ignore_patterns("checkpoint-*"))
    cases = [
        (outputs, [], r"--output_dir .*outputs: holds the --adapter .*outputs/sft; choose a folder of its own"),
        (outputs / "sft", [], r"--output_dir .*outputs/sft: is the --adapter"),
        (outputs / "sft" / "merged", [], r"--output_dir .*sft/merged: is inside the --adapter"),
        (outputs / "tiny-phi" / "merged", [], r"is inside the --model_name_or_path .*outputs/tiny-phi"),
        (tmp_path / "m", ["--quantize_4bit", "true", "--quantized_output_dir", str(tmp_path / "m" / "q")],
         r"--quantized_output_dir .*m/q: is inside the --output_dir"),
        (tmp_path / "n", ["--space", str(outputs)], r"--space .*outputs: holds the --adapter"),
    ]
    for out, extra, message in cases:
        with pytest.raises(InputError, match=message):
            export_model.main(export_model.parse_args([
                "--model_name_or_path", str(outputs / "tiny-phi"), "--adapter", str(outputs / "sft"),
                "--output_dir", str(out), "--overwrite", "true", *extra]))
    assert sorted(p.name for p in outputs.iterdir()) == ["sft", "tiny-phi"] and not (tmp_path / "m").exists()


@pytest.mark.parametrize("extra, message", [
    (["--adapter", "MISSING"], r"--adapter .*MISSING: no adapter there"),
    (["--merge_into", "fp16"], r"--merge_into 'fp16': expected nf4 or original"),
    (["--dtype", "int8"], r"--dtype int8: expected float16 \(or fp16\), bfloat16 \(or bf16\) or float32"),
    (["--output_dir", "ADAPTER"], r"--output_dir .*: is the --adapter .*; choose a folder of its own"),
])
def test_bad_input_stops_before_a_model_loads(adapter, tmp_path, extra, message):
    extra = [str(tmp_path / "MISSING") if x == "MISSING" else str(adapter) if x == "ADAPTER" else x for x in extra]
    with pytest.raises(InputError, match=message):
        export_model.main(export_args(tmp_path / "no-model-here", adapter, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_misspelt_flag_is_an_input_error():
    with pytest.raises(InputError, match=r"unknown option --quantise_4bit; did you mean --quantize_4bit\?"):
        export_model.parse_args(["--quantise_4bit"])
