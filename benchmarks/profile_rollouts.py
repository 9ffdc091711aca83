"""Where fast_rollouts' time goes, on a CUDA GPU: the merge, a whole call and its decode
step as committed, with the memory-efficient attention kernel instead of cuDNN's, and with
a graph per 32 cache columns; the eager step, and a kernel profile of a few eager steps.
Figures of PERFORMANCE.md, "Rollouts and previews".

    python benchmarks/make_phi2_shaped.py /tmp/phi2-shaped
    python benchmarks/profile_rollouts.py --model_dir /tmp/phi2-shaped [--dtype float16] [--no_profile]

The adapter is a fresh LoRA r16 on the six projections with random B (so it changes the
model) and the chat-token rows, as the SFT recipe sets them up; batch 32, the benchmark's
synthetic prompts. Times are medians of repeats, synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import synth_prompts  # noqa: E402

from phi2qlora import rollouts as fr  # noqa: E402
from phi2qlora.chat import END, chat_token_ids, format_prompt
from phi2qlora.model import load_base_model, load_chat_tokenizer  # noqa: E402


def timed(fn, repeats=3):
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), min(seconds), max(seconds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default="/tmp/phi2-shaped")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--no_profile", action="store_true")
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model
    from torch.nn.attention import SDPBackend

    dtype = getattr(torch, args.dtype)
    tokenizer = load_chat_tokenizer(args.model_dir)
    tokenizer.padding_side = "left"
    ids = chat_token_ids(tokenizer)
    model = get_peft_model(load_base_model(args.model_dir, tokenizer, dtype), LoraConfig(
        task_type="CAUSAL_LM", r=16, lora_alpha=32, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
        trainable_token_indices={"embed_tokens": list(ids.values()), "lm_head": [ids[END]]}))
    model.eval()
    enc = tokenizer([format_prompt(r["prompt"]) for r in synth_prompts(args.batch)], return_tensors="pt",
                    padding=True, add_special_tokens=False).to("cuda")

    def generate(n, temperature=0.9, **kw):
        return fr.generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=n, temperature=temperature,
                           eos_token_ids=[-1], pad_token_id=tokenizer.pad_token_id, dtype=dtype, **kw)

    n = args.new_tokens
    print(f"prompts {tuple(enc['input_ids'].shape)}, {n} new tokens, {args.dtype}")
    print("merge s (median, min, max)", timed(lambda: fr.merged_weights(model, dtype)))
    committed = (fr.DECODE_KERNELS, fr.ATTEND_STEP)
    variants = (("committed: cuDNN decode attention, a graph per 256 columns", committed),
                ("memory-efficient decode attention", ((SDPBackend.EFFICIENT_ATTENTION,), committed[1])),
                ("a graph per 32 columns", (committed[0], 32)))
    for name, (kernels, attend_step) in variants:
        fr.DECODE_KERNELS, fr.ATTEND_STEP = kernels, attend_step
        generate(n)  # cuDNN's plan for this cache length, built once a process
        short, full = timed(lambda: generate(2)), timed(lambda: generate(n), 5)
        print(f"{name}: {full[0]:.3f} s a call ({full[1]:.3f}-{full[2]:.3f}), {args.batch * n / full[0]:.0f} new tok/s; "
              f"(call - 2-token call) / {n - 2} = {1000 * (full[0] - short[0]) / (n - 2):.2f} ms a token")
    fr.DECODE_KERNELS, fr.ATTEND_STEP = committed
    eager_short, eager_long = timed(lambda: generate(2, use_graph=False), 2), timed(lambda: generate(34, use_graph=False), 2)
    print(f"eager decode step {1000 * (eager_long[0] - eager_short[0]) / 32:.2f} ms")
    if args.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(18, use_graph=False)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"merge + prefill + 17 eager decode steps: {sum(e.count for e in events)} kernels, "
          f"{sum(e.device_time_total for e in events) / 1000:.1f} ms on the GPU")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:28]:
        print(f"{e.device_time_total / 1000:8.2f} ms {e.count:6d}  {e.key[:110]}")


if __name__ == "__main__":
    main()
