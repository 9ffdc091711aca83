"""How a 4-bit model answers on the CPU: bitsandbytes' packed kernel, its plain NF4 path,
and the NF4 values unpacked to fp32, side by side in one run.

    python benchmarks/bench_cpu_4bit.py --model_dir outputs/tiny-phi
    taskset -c 0,1 python benchmarks/bench_cpu_4bit.py --model_dir /tmp/phi2-shaped --runs 3

Each path loads in a process of its own (so peak RSS is its own) as app.py loads a base:
- `nf4 packed`: `load_base_model(..., cpu_packed_kernel=True)`; on a CPU with AVX512-BF16,
  bitsandbytes repacks each layer for its bf16 inference kernel at the first forward;
  elsewhere it is the same as `nf4`.
- `nf4`: the layout training keeps (`keep_4bit_trainable`): dequantised at each use.
- `dequantized`: loaded in NF4, then `model.dequantize()` to fp32 nn.Linear layers: the
  same values as `nf4`, app.py's CPU default.
Greedy, batch 1, `--new_tokens` new tokens after one untimed call; median and range of
`--runs`. Agreement is against `dequantized` (the values the adapters were trained on):
how many runs' first token is the same, and how many tokens match before the first
difference; `max |dlogit|` on the prompt. Also one 2560 x 10240 product for one token.
Prints a table and writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PATHS = ("dequantized", "nf4", "nf4 packed")
PROMPT = "Explain why the sky is blue in under 50 words."


def child(path: str, model_dir: str, new_tokens: int, runs: int) -> dict:
    import torch
    from bitsandbytes.functional import has_avx512bf16

    from phi2qlora.chat import format_prompt
    from phi2qlora.model import load_base_model, load_chat_tokenizer

    start = time.perf_counter()
    tokenizer = load_chat_tokenizer(model_dir)
    model = load_base_model(model_dir, tokenizer, torch.float32, cpu_packed_kernel=path == "nf4 packed")
    if path == "dequantized":
        model = model.dequantize(dtype=torch.float32)
    model.eval()
    enc = tokenizer([format_prompt(PROMPT)], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**enc).logits[0, -1].tolist()  # also repacks, for the packed path
    load_s = time.perf_counter() - start
    seconds, tokens = [], None
    with torch.no_grad():
        for i in range(runs + 1):
            t = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            if i:  # the first call warms up
                seconds.append(time.perf_counter() - t)
            tokens = out[0, enc["input_ids"].shape[1]:].tolist()
    return {"path": path, "avx512_bf16": bool(has_avx512bf16()), "threads": torch.get_num_threads(),
            "load_s": load_s, "tok_s": [new_tokens / s for s in seconds], "tokens": tokens, "last_logits": logits,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def product_ms(repeats: int = 20) -> dict:
    """One Phi-2 MLP product (2560 -> 10240) for one token, each way, median ms."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    dense = torch.nn.Linear(2560, 10240)
    x = torch.randn(1, 1, 2560)
    result = {}
    for name in ("fp32", "nf4", "nf4 packed"):
        if name == "fp32":
            layer = dense
        else:
            layer = bnb.nn.Linear4bit(2560, 10240, compute_dtype=torch.float32, quant_type="nf4")
            layer.load_state_dict(dense.state_dict())
            layer = layer.to("cpu")  # quantises
            layer.support_avx512bf16_for_cpu = layer.support_avx512bf16_for_cpu and name == "nf4 packed"
        layer.eval()
        with torch.no_grad():
            for _ in range(3):
                layer(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                layer(x)
                times.append((time.perf_counter() - t) * 1e3)
        result[name] = statistics.median(times)
    return result


def agreement(reference: list[int], tokens: list[int]) -> int:
    same = 0
    for a, b in zip(reference, tokens):
        if a != b:
            break
        same += 1
    return same


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True, help="a model folder: make_tiny_model.py's or make_phi2_shaped.py's")
    p.add_argument("--new_tokens", type=int, default=24)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/bench-cpu"))
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(child(args._child, args.model_dir, args.new_tokens, args.runs)))
        return
    results = {}
    for path in PATHS:
        run = subprocess.run([sys.executable, __file__, "--model_dir", args.model_dir, "--new_tokens",
                              str(args.new_tokens), "--runs", str(args.runs), "--_child", path],
                             capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{path}: failed\n{run.stderr[-3000:]}")
        results[path] = json.loads(run.stdout.strip().splitlines()[-1])
    reference = results["dequantized"]
    print(f"{args.model_dir}: batch 1, {args.new_tokens} new tokens, {args.runs} runs, "
          f"{reference['threads']} threads, AVX512-BF16 {'yes' if reference['avx512_bf16'] else 'no'}")
    print("| path | new tok/s (median, min-max) | peak RSS GiB | load s | tokens as dequantized | max abs dlogit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for path, r in results.items():
        same = agreement(reference["tokens"], r["tokens"])
        dlogit = max(abs(a - b) for a, b in zip(reference["last_logits"], r["last_logits"]))
        r.update(same_tokens=same, max_abs_dlogit=dlogit)
        print(f"| {path} | {statistics.median(r['tok_s']):.2f} ({min(r['tok_s']):.2f}-{max(r['tok_s']):.2f}) | "
              f"{r['peak_rss_gib']:.2f} | {r['load_s']:.1f} | {same}/{len(reference['tokens'])} | {dlogit:.2e} |")
    products = product_ms()
    print("one 2560 x 10240 product for one token, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in products.items()))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for r in results.values():
        r.pop("last_logits")
    (Path(args.out) / "results.json").write_text(json.dumps({"paths": results, "product_ms": products}, indent=1))


if __name__ == "__main__":
    main()
