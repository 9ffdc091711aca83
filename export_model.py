"""Merge an adapter into Phi-2 and save a standalone model: plain transformers, no PEFT.

    python export_model.py                                     # GRPO adapter -> outputs/phi2-oasst1-merged (fp16)
    python export_model.py --adapter outputs/phi2-oasst1-qlora --output_dir outputs/phi2-sft-merged
    python export_model.py --quantize_4bit                     # also outputs/phi2-oasst1-merged-4bit (NF4, ~1.8 GB)

The result loads with `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir)`: safetensors weights, the tokenizer with the chat
tokens and chat template, and a generation config that stops at <|end|> and pads with
<|pad|>. After saving, the script checks the export against the adapter as it was trained
(greedy answers to the preview prompts, logits on them) and writes the figures to
`export.json` beside the weights.

What it merges into. The adapter was trained on the NF4-quantised base: what it learned
corrects that model, quantisation error included. So by default (`--merge_into nf4`) the
base is loaded in NF4 exactly as training loaded it, dequantised, and the LoRA deltas
and the trained chat-token rows are added to those weights: the export computes what the
trained model computed, up to rounding (on the tiny test model in fp32: logits within
1e-4, identical greedy answers). `--merge_into original` adds them to the unquantised
weights instead; that model differs from the trained one by the quantisation error (on
the tiny model: logits off by 0.3 to 0.5; with the demo's adapter all four preview
answers differ), and is there for those who want the full-precision base under the
adapter anyway. The NF4 base depends on the dtype the weights were loaded in before
quantising (bf16 rounds them otherwise than fp16), so `--train_dtype` must be what
training used: `auto` picks as sft_qlora.py does on this machine (fp16 on a T4);
exporting on another kind of GPU, name it (`--train_dtype float16` after a T4 run).

Phi-2's lm_head keeps its bias (PEFT's merge writes the trained rows into the base
nn.Linear, bias included), and the export is written into a temporary folder beside the
target and renamed into place only when complete: a crash never leaves half an export.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phi2qlora.args import parse_script_args
from phi2qlora.chat import format_prompt
from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.files import _umask, check_output_apart, path_relation, read_json_file, write_atomic
from phi2qlora.model import (
    check_adapter_fits,
    dtype_name,
    load_adapter,
    load_base_model,
    load_chat_tokenizer,
    nf4_config,
    pick_dtype,
)

EXPORT_INFO = "export.json"  # beside every export: its settings, its check, the files it wrote


@dataclass
class ExportArguments:
    model_name_or_path: str = field(default="microsoft/phi-2", metadata={"help": "the base the adapter was trained on"})
    model_revision: str = field(default="main", metadata={"help": "the base model's revision"})
    adapter: str = field(default="outputs/phi2-oasst1-grpo",
                         metadata={"help": "the adapter to merge: grpo_train.py's or sft_qlora.py's output dir"})
    output_dir: str = field(default="outputs/phi2-oasst1-merged", metadata={"help": "where the merged model goes"})
    # fp16: what a T4 computes in and what Colab users can load; half the size of fp32.
    dtype: str = field(default="float16", metadata={"help": "saved weights: float16 (fp16), bfloat16 (bf16) or float32 (fp32)"})
    merge_into: str = field(default="nf4", metadata={
        "help": "nf4: the dequantised NF4 base the adapter was trained on (reproduces the trained model); "
                "original: the unquantised base weights"})
    train_dtype: str = field(default="auto", metadata={
        "help": "the compute dtype training used (auto: what sft_qlora.py picks on this machine, fp16 on a T4); "
                "the NF4 base is rebuilt from weights in this dtype, as training built it"})
    use_bnb_nested_quant: bool = field(default=True, metadata={"help": "double quantisation, as in the recipes"})
    quantize_4bit: bool = field(default=False, metadata={"help": "also save a 4-bit NF4 copy (bitsandbytes)"})
    quantized_output_dir: str | None = field(default=None, metadata={"help": "default: <output_dir>-4bit"})
    check: bool = field(default=True, metadata={
        "help": "compare the export with base + adapter as trained: greedy answers and logits on the preview prompts"})
    check_max_new_tokens: int = field(default=64, metadata={"help": "length of each check answer"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing export"})
    gguf: str | None = field(default=None, metadata={
        "help": "also write GGUF files for llama.cpp, Ollama and the CPU Space: q4_k_m, q8_0 or f16, "
                "comma-separated (into <output_dir>-gguf/)"})
    space: str | None = field(default=None, metadata={
        "help": "add this model to a Hugging Face Space folder (created if missing): its GGUF (the first of --gguf; "
                "q4_k_m if none is given), the page, requirements.txt, README.md"})
    space_label: str | None = field(default=None, metadata={"help": "the model's column in the Space; default: the "
                                                                    "adapter folder's name"})


def device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def check_args(args: ExportArguments) -> list[Path]:
    """Everything checked before a model loads; returns the target folders."""
    check_adapter_fits(args.adapter, args.model_name_or_path, "--adapter", "--model_name_or_path", args.model_revision,
                       "give the output dir of grpo_train.py or sft_qlora.py")
    if args.merge_into not in ("nf4", "original"):
        raise InputError(f"--merge_into {args.merge_into!r}: expected nf4 or original")
    args.dtype = dtype_name(args.dtype, "--dtype", auto=False)
    args.train_dtype = dtype_name(args.train_dtype, "--train_dtype")
    if args.space and not args.gguf:
        args.gguf = "q4_k_m"
    kinds = gguf_kinds(args)
    if kinds:
        from phi2qlora.gguf import converter_dir

        converter_dir()  # installed and unpacked, before an hour of merging
    targets = [Path(args.output_dir)]
    if args.quantize_4bit:
        targets.append(Path(args.quantized_output_dir or f"{args.output_dir.rstrip('/')}-4bit"))
    if kinds:
        targets.append(gguf_dir(args))
    inputs = {"--adapter": args.adapter, "--model_name_or_path": args.model_name_or_path}
    flags = ["--output_dir", "--quantized_output_dir" if args.quantize_4bit else None, "--gguf"]
    for target, flag in zip(targets, [f for f in flags if f]):
        check_output_apart(target, flag, inputs)
        if target != targets[0] and (relation := path_relation(target, targets[0])):  # publish() swaps each alone
            raise InputError(f"{flag} {target}: {relation} the --output_dir {targets[0]}; give each a folder of its own")
        check_replaceable(target, args.overwrite)
    if args.space:
        check_output_apart(args.space, "--space", inputs)
    return targets


def check_replaceable(target: Path, overwrite: bool) -> None:
    """An existing folder is replaced only with --overwrite, and only when it is an export
    this script wrote and holds nothing else (export.json lists its files): --overwrite
    never deletes a file it did not write. The new export is written beside it and swapped
    in (`publish`)."""
    if not target.exists():
        return
    if not target.is_dir():
        raise InputError(f"{target}: is a file, where the export's folder goes; choose another output folder")
    present = sorted(p.name for p in target.iterdir())
    if not present:
        return
    if not overwrite:
        raise InputError(f"{target}: already exists and is not empty; pass --overwrite to replace it")
    info = target / EXPORT_INFO
    written = read_json_file(info, f"remove {target} yourself").get("files") if info.is_file() else None
    if not isinstance(written, list):
        why = (f"no {EXPORT_INFO}: not an export of this script" if not info.is_file()
               else f"its {EXPORT_INFO} does not list the files it wrote (an export of an earlier version)")
        raise InputError(f"--overwrite {target}: {why}, so its files may be yours and are not replaced; choose "
                         "another output folder, or remove it yourself")
    foreign = [name for name in present if name not in written]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise InputError(f"--overwrite {target}: holds {foreign[0]}{more}, which export_model.py did not write and "
                         "--overwrite would delete; move it out, or choose another output folder")


def gguf_kinds(args: ExportArguments) -> list[str]:
    from phi2qlora.gguf import QUANTS

    kinds = [k.strip().lower() for k in (args.gguf or "").split(",") if k.strip()]
    unknown = [k for k in kinds if k not in QUANTS]
    if unknown:
        raise InputError(f"--gguf {args.gguf}: unknown type {unknown[0]!r}; expected {', '.join(QUANTS)}")
    return kinds


def gguf_dir(args: ExportArguments) -> Path:
    return Path(f"{args.output_dir.rstrip('/')}-gguf")


def gguf_name(args: ExportArguments, kind: str) -> str:
    return f"{args.space_label or Path(args.adapter).resolve().name}-{kind}.gguf"


def load_tokenizer(args: ExportArguments):
    saved = (Path(args.adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_chat_tokenizer(args.adapter if saved else args.model_name_or_path,
                                    "main" if saved else args.model_revision)
    tokenizer.padding_side = "left"  # an exported model generates; batched generation pads on the left
    return tokenizer


def trained_model(args: ExportArguments, tokenizer, load_in_4bit: bool = True):
    """Base + adapter, loaded as training loaded them (4-bit NF4 unless told otherwise)."""
    base = load_base_model(args.model_name_or_path, tokenizer, pick_dtype(args.train_dtype), load_in_4bit=load_in_4bit,
                           double_quant=args.use_bnb_nested_quant, revision=args.model_revision)
    return load_adapter(base, args.adapter).eval()


def merged_model(args: ExportArguments, tokenizer):
    """The adapter merged into the base weights chosen by --merge_into, in --dtype."""
    import torch

    if args.merge_into == "nf4":
        base = load_base_model(args.model_name_or_path, tokenizer, pick_dtype(args.train_dtype),
                               double_quant=args.use_bnb_nested_quant, revision=args.model_revision)
        # The very weights the 4-bit matmuls used in training, as ordinary nn.Linear layers.
        base = base.dequantize(dtype=pick_dtype(args.train_dtype))
    else:
        base = load_base_model(args.model_name_or_path, tokenizer, pick_dtype(args.train_dtype), load_in_4bit=False,
                               revision=args.model_revision)
    # merge_and_unload adds B @ A * scale to each LoRA target and writes the trained chat-token
    # rows into the embedding and lm_head (an nn.Linear whose bias stays as it was).
    model = load_adapter(base, args.adapter).merge_and_unload()
    return model.to(getattr(torch, args.dtype))


def save_model(model, tokenizer, folder: Path) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # <|end|>: stop at the end of the turn
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    mode = 0o666 & ~_umask()  # transformers writes the weights 0600; an export is meant to be shared
    for path in folder.iterdir():
        os.chmod(path, mode)


def compare(model, reference, tokenizer, max_new_tokens: int, theirs: list[dict]) -> dict:
    """Greedy answers to the preview prompts and logits on them: the export vs base + adapter
    (`theirs`: base + adapter's answers)."""
    import torch

    from phi2qlora.answers import generate_answers
    from phi2qlora.chat import DEFAULT_PROMPTS

    batch = tokenizer([format_prompt(p) for p in DEFAULT_PROMPTS], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(device())
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        got, expected = model(**batch).logits.float()[mask], reference(**batch).logits.float()[mask]
    ours = generate_answers(model, tokenizer, DEFAULT_PROMPTS, max_new_tokens)
    return {
        "prompts": len(DEFAULT_PROMPTS),
        "same_greedy_answers": sum(a["answer"] == b["answer"] for a, b in zip(ours, theirs)),
        "max_logit_diff": round((got - expected).abs().max().item(), 6),
        "logit_scale": round(expected.abs().max().item(), 3),
        "same_argmax": round((got.argmax(-1) == expected.argmax(-1)).float().mean().item(), 4),
    }


def check_exports(args: ExportArguments, tokenizer, folders: list[Path], gguf: Path | None = None) -> list[dict]:
    """Each saved folder, loaded by plain transformers, against base + adapter as trained;
    then each GGUF, loaded by llama.cpp, against the same. The trained model answers once."""
    from transformers import AutoModelForCausalLM

    from phi2qlora.answers import generate_answers
    from phi2qlora.chat import DEFAULT_PROMPTS

    reference = trained_model(args, tokenizer)
    theirs = generate_answers(reference, tokenizer, DEFAULT_PROMPTS, args.check_max_new_tokens)
    results = []
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": device()}).eval()
        results.append(compare(model, reference, tokenizer, args.check_max_new_tokens, theirs))
        del model
    if gguf is not None:
        results.append(compare_ggufs(args, tokenizer, gguf, theirs))
    return results


def compare_ggufs(args: ExportArguments, tokenizer, folder: Path, theirs: list[dict]) -> dict:
    """Greedy answers to the preview prompts from each GGUF against base + adapter as trained
    (`theirs`).
    Quantised answers drift from the trained model's; how far is measured on the tokens of
    the answers (both read by this tokenizer): the same first token, and how many tokens
    agree before the first difference."""
    from phi2qlora.chat import DEFAULT_PROMPTS
    from phi2qlora.gguf import greedy_answers, load

    results = {}
    for kind in gguf_kinds(args):
        ours = greedy_answers(load(folder / gguf_name(args, kind)), DEFAULT_PROMPTS, args.check_max_new_tokens)
        results[kind] = agreement(ours, theirs, tokenizer)
    return results


def agreement(ours: list[dict], theirs: list[dict], tokenizer) -> dict:
    same_prefix = []
    for a, b in zip(ours, theirs):
        x, y = (tokenizer(r["answer"], add_special_tokens=False)["input_ids"] for r in (a, b))
        same_prefix.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))))
    return {
        "prompts": len(theirs),
        "same_answers": sum(a["answer"] == b["answer"] for a, b in zip(ours, theirs)),
        "same_first_token": sum(k > 0 for k in same_prefix),
        "mean_tokens_before_a_difference": round(sum(same_prefix) / len(same_prefix), 2),
        "answers": [a["answer"] for a in ours],
    }


def write_ggufs(args: ExportArguments, merged: Path, folder: Path, kinds: list[str]) -> None:
    """llama.cpp's converter on the merged fp16 export, then its quantizer for each type."""
    from phi2qlora.gguf import convert, quantize

    folder.mkdir(parents=True)
    f16 = folder / gguf_name(args, "f16")
    print(f"[export] GGUF: llama.cpp's converter -> {f16.name}", flush=True)
    convert(merged, f16)
    for kind in kinds:
        if kind != "f16":
            print(f"[export] GGUF: llama.cpp's quantizer -> {gguf_name(args, kind)}", flush=True)
            quantize(f16, folder / gguf_name(args, kind), kind)
    if "f16" not in kinds:
        f16.unlink()
    # Ollama: `ollama create NAME -f Modelfile` in this folder. The template is the chat format
    # (phi2qlora/chat.py), written out: the tokenizer's template marks the loss for TRL with
    # {% generation %} tags, which Ollama's and llama.cpp's template engines need not know.
    write_atomic(folder / "Modelfile", f"FROM ./{gguf_name(args, kinds[0])}\n"
                 'TEMPLATE """<|user|>\n{{ .Prompt }}<|end|>\n<|assistant|>\n"""\n'
                 'PARAMETER stop "<|end|>"\nPARAMETER temperature 0\n')


def publish(tmp: Path, target: Path) -> None:
    """Put a finished export in place: a rename, so readers see the old export or the new one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(args: ExportArguments) -> dict:
    import torch

    targets = check_args(args)
    tokenizer = load_tokenizer(args)
    print(f"[export] {args.model_name_or_path} + {args.adapter}, merged into the {args.merge_into} base "
          f"(built in {str(pick_dtype(args.train_dtype)).split('.')[-1]}), saved in {args.dtype}")
    tmps = [t.with_name(f".{t.name}.tmp-{os.getpid()}") for t in targets]
    try:
        model = merged_model(args, tokenizer)
        save_model(model, tokenizer, tmps[0])
        del model
        free_memory()
        if args.quantize_4bit:
            from transformers import AutoModelForCausalLM

            # Quantised from the merged weights, so the LoRA deltas get NF4's rounding too.
            nf4 = nf4_config(getattr(torch, args.dtype), args.use_bnb_nested_quant)
            model = AutoModelForCausalLM.from_pretrained(tmps[0], quantization_config=nf4,
                                                         device_map={"": device()})
            save_model(model, tokenizer, tmps[1])
            del model
            free_memory()
        kinds = gguf_kinds(args)
        folders = tmps[:-1] if kinds else tmps
        if kinds:
            write_ggufs(args, tmps[0], tmps[-1], kinds)
        checks = check_exports(args, tokenizer, folders, gguf=tmps[-1] if kinds else None) if args.check \
            else [None] * len(tmps)
        infos = []
        labels = ["merged", "merged, 4-bit NF4"][: len(folders)] + (["GGUF (llama.cpp): " + ", ".join(kinds)]
                                                                    if kinds else [])
        for tmp, check, kind in zip(tmps, checks, labels):
            info = {"export": kind, **{k: v for k, v in asdict(args).items() if k not in ("check", "overwrite")},
                    "check": check}
            # The files it wrote: what a later --overwrite may delete (check_replaceable).
            info["files"] = sorted({p.name for p in tmp.iterdir()} | {EXPORT_INFO})
            write_atomic(tmp / EXPORT_INFO, json.dumps(info, indent=1) + "\n")
            infos.append(info)
        for tmp, target in zip(tmps, targets):
            publish(tmp, target)
        if args.space:
            from phi2qlora.space import add_to_space

            add_to_space(Path(args.space), targets[-1] / gguf_name(args, kinds[0]))
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
    for target, info in zip(targets, infos):
        check = info["check"]
        if info["export"].startswith("GGUF"):
            print(f"[export] {info['export']} in {target}" + "".join(
                f"\n  {name}: {c['same_answers']}/{c['prompts']} greedy answers as base + adapter, first token the same "
                f"for {c['same_first_token']}/{c['prompts']}, {c['mean_tokens_before_a_difference']:.1f} tokens on "
                f"average before they differ" for name, c in (check or {}).items()))
            continue
        print(f"[export] {info['export']} model in {target}" + (
            f": {check['same_greedy_answers']}/{check['prompts']} greedy answers as base + adapter, "
            f"logits within {check['max_logit_diff']:.2g} (largest {check['logit_scale']:.3g}), "
            f"same top token at {100 * check['same_argmax']:.1f}% of positions" if check else ""))
    return {str(t): info for t, info in zip(targets, infos)}


def parse_args(argv: list[str] | None = None) -> ExportArguments:
    return parse_script_args(ExportArguments, sys.argv[1:] if argv is None else argv)  # --config my.yaml works too


if __name__ == "__main__":
    exit_on_input_error(lambda: main(parse_args()))
