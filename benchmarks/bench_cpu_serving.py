"""How a model answers on a CPU, each serving path side by side in one run: llama.cpp on
GGUF files (export_model.py --gguf), bitsandbytes' packed kernel, its plain NF4 path, and
the NF4 values unpacked to fp32 (the baseline: app.py's CPU path for adapters), and ONNX
Runtime GenAI's int4 (a candidate measured, not chosen: PERFORMANCE.md).

    python benchmarks/bench_cpu_serving.py --model_dir outputs/tiny-phi
    taskset -c 0,1 python benchmarks/bench_cpu_serving.py --model_dir /tmp/phi2-shaped --runs 3 \
        --paths dequantized --gguf /tmp/phi2-gguf/phi2-shaped-q4_k_m.gguf /tmp/phi2-gguf/phi2-shaped-q8_0.gguf

Each path loads in a process of its own (so peak RSS is its own):
- `gguf NAME`: the file on llama.cpp's CPU backend (llama-cpp-python), as the CPU Space
  serves it (`phi2qlora.gguf.load`), every core this process may use; `gguf plain NAME`
  (`--gguf_plain`): the same without llama.cpp's repacked weights, as `load` runs a build
  that has AMX kernels;
- `nf4 packed`: `load_base_model(..., cpu_packed_kernel=True)`; on a CPU with AVX512-BF16,
  bitsandbytes repacks each layer for its bf16 inference kernel at the first forward;
  elsewhere it is the same as `nf4`.
- `nf4`: the layout training keeps (`keep_4bit_trainable`): dequantised at each use.
- `onnx DIR` (`--onnx`, run by `--onnx_python`): ONNX Runtime GenAI on its builder's folder.
- `dequantized`: loaded in NF4, then `model.dequantize()` to fp32 nn.Linear layers: the
  same values as `nf4`, app.py's CPU default.
Greedy, `--new_tokens` new tokens after one untimed call, at batch 1 (one request, as the
page serves them) and `--batch` (that many prompts at once; for llama.cpp one decode a
step over that many sequences); median and range of `--runs`. Agreement is against
`dequantized` (the values the adapters were trained on): how many tokens match before the
first difference; `max |dlogit|` on the prompt. Also one 2560 x 10240 product for one token.
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
PATHS = ("dequantized", "nf4", "nf4 packed")  # and "gguf FILE" for each --gguf
PROMPT = "Explain why the sky is blue in under 50 words."


def timed(call, runs: int) -> tuple[list[float], object]:
    """`call()` once to warm up, then `runs` times: the seconds each took, and the last result."""
    call()
    seconds, result = [], None
    for _ in range(runs):
        t = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - t)
    return seconds, result


def gguf_timed(llm, new_tokens: int, runs: int) -> tuple[list[float], list[int], list[int]]:
    """New tok/s of `runs` greedy generations after an untimed one (no stop at the end of
    turn: the same number of tokens each run), their tokens, and the prompt's."""
    from phi2qlora.gguf import prompt_tokens

    prompt = prompt_tokens(llm, PROMPT)

    def generate() -> list[int]:
        tokens = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if len(tokens) == new_tokens:
                break
        return tokens

    seconds, tokens = timed(generate, runs)
    return [new_tokens / s for s in seconds], tokens, prompt


def gguf_batched(llm, new_tokens: int, runs: int, batch: int) -> tuple[list[float], list[int]]:
    """New tok/s of `batch` greedy sequences decoded together: one `llama_decode` a step for
    all rows, on a second llama.cpp context of `batch` sequences over the same weights
    (llama-cpp-python's `Llama` holds one sequence). Row 0 has PROMPT, the others the
    preview prompts; no row stops. Also row 0's tokens, to hold against batch 1's."""
    import numpy as np

    import llama_cpp
    from phi2qlora.chat import DEFAULT_PROMPTS
    from phi2qlora.gguf import prompt_tokens

    prompts = [prompt_tokens(llm, p) for p in [PROMPT, *DEFAULT_PROMPTS][:batch]]
    params = llama_cpp.llama_context_default_params()
    per_row = -(-(max(map(len, prompts)) + new_tokens) // 256) * 256  # llama.cpp splits n_ctx evenly
    params.n_seq_max, params.n_ctx = batch, batch * per_row
    params.n_batch = params.n_ubatch = max(sum(map(len, prompts)), batch)
    params.n_threads = params.n_threads_batch = llm.context_params.n_threads
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    rows = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    n_vocab = llm.n_vocab()

    def decode(entries):  # (token, position, sequence); every entry's logits wanted
        rows.n_tokens = len(entries)
        for i, (token, pos, seq) in enumerate(entries):
            rows.token[i], rows.pos[i], rows.n_seq_id[i], rows.seq_id[i][0], rows.logits[i] = token, pos, 1, seq, True
        if llama_cpp.llama_decode(ctx, rows) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))
                for i in range(len(entries))]

    def generate() -> list[int]:  # row 0's tokens
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        firsts = decode([(t, pos, seq) for seq, p in enumerate(prompts) for pos, t in enumerate(p)])
        tokens = [firsts[sum(map(len, prompts[: seq + 1])) - 1] for seq in range(batch)]
        first_row = [tokens[0]]
        for step in range(new_tokens - 1):
            tokens = decode([(t, len(prompts[seq]) + step, seq) for seq, t in enumerate(tokens)])
            first_row.append(tokens[0])
        return first_row

    try:
        seconds, first_row = timed(generate, runs)
    finally:
        llama_cpp.llama_batch_free(rows)
        llama_cpp.llama_free(ctx)
    return [batch * new_tokens / s for s in seconds], first_row


def gguf_child(path: str, new_tokens: int, runs: int, batch: int) -> dict:
    from phi2qlora.gguf import load, prompt_tokens

    start = time.perf_counter()
    plain = path.startswith("gguf plain ")  # llama.cpp's extra buffer types off, as on a build with AMX kernels
    llm = load(path.removeprefix("gguf plain ").removeprefix("gguf "), repacked=False if plain else None)
    llm.eval(prompt_tokens(llm, PROMPT))
    load_s = time.perf_counter() - start
    speeds, tokens, prompt = gguf_timed(llm, new_tokens, runs)
    batched, first_row = gguf_batched(llm, new_tokens, runs, batch) if batch > 1 else (None, None)
    import llama_cpp

    built = [f for f in ("AVX2", "AVX512", "AVX512_BF16", "AMX_INT8") if f"{f} = 1".encode() in
             llama_cpp.llama_print_system_info()]
    build = f"{llama_cpp.__version__}, built with {', '.join(built) or 'none of AVX2, AVX512, AMX'}"
    return {"path": path, "avx512_bf16": None, "llama_cpp": build, "threads": llm.context_params.n_threads,
            "load_s": load_s,
            "tok_s": speeds, "tok_s_batch": batched, "batch_row0_same": first_row and agreement(tokens, first_row),
            "tokens": tokens, "prompt": prompt,
            "last_logits": None, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def onnx_child(folder: str, new_tokens: int, runs: int, batch: int) -> dict:
    """ONNX Runtime GenAI on its model builder's folder (`-p int4 -e cpu`), greedy, token by
    token through `og.Generator` as its examples do, with its own tokenizer (the table says
    whether its prompt tokens are the others'). Batch: `batch` copies of the prompt."""
    import numpy as np
    import onnxruntime_genai as og

    from phi2qlora.chat import format_prompt

    start = time.perf_counter()
    threads = len(os.sched_getaffinity(0))  # as phi2qlora.gguf.load gives llama.cpp
    config = og.Config(folder)
    # Left to itself, ONNX Runtime 1.32 ran one thread on a 2-core VM (5.5 against 10.0 new
    # tok/s at Phi-2's shape, 2026-12-05); both engines get the same cores.
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    prompt = [int(t) for t in og.Tokenizer(model).encode(format_prompt(PROMPT))]

    def generate(rows: int, count: int) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, batch_size=rows, max_length=len(prompt) + count,
                                  min_length=len(prompt) + count)  # no stop at the end of turn
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt] * rows, dtype=np.int32))
        tokens = []
        while len(tokens) < count:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens

    generate(1, 1)
    load_s = time.perf_counter() - start
    seconds, tokens = timed(lambda: generate(1, new_tokens), runs)
    batched, row0 = timed(lambda: generate(batch, new_tokens), runs) if batch > 1 else (None, None)
    return {"path": f"onnx {folder}", "avx512_bf16": None, "threads": threads, "load_s": load_s,
            "tok_s": [new_tokens / s for s in seconds],
            "tok_s_batch": batched and [batch * new_tokens / s for s in batched],
            "batch_row0_same": row0 and agreement(tokens, row0), "tokens": tokens, "prompt": prompt,
            "last_logits": None, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def page_child(paths: list[str], new_tokens: int, runs: int) -> dict:
    """Every GGUF loaded in one process, as the CPU Space's page holds them: its peak RSS and
    load time, and each model's speed with the others loaded."""
    from phi2qlora.gguf import load

    start = time.perf_counter()
    llms = [load(p) for p in paths]
    load_s = time.perf_counter() - start
    speeds = [statistics.median(gguf_timed(llm, new_tokens, runs)[0]) for llm in llms]
    return {"path": "page: " + " + ".join(Path(p).name for p in paths), "load_s": load_s, "tok_s_each": speeds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def child(path: str, model_dir: str, new_tokens: int, runs: int, batch: int) -> dict:
    if path.startswith("page "):
        return page_child(path.removeprefix("page ").split("|"), new_tokens, runs)
    if path.startswith("gguf "):
        return gguf_child(path, new_tokens, runs, batch)
    if path.startswith("onnx "):
        return onnx_child(path.removeprefix("onnx "), new_tokens, runs, batch)
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
    with torch.no_grad():
        seconds, out = timed(lambda: model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                    do_sample=False, pad_token_id=tokenizer.pad_token_id), runs)
        tokens = out[0, enc["input_ids"].shape[1]:].tolist()
        batched = tokenizer([format_prompt(PROMPT)] * batch, return_tensors="pt", add_special_tokens=False)
        batch_s = []
        for _ in range(runs if batch > 1 else 0):
            t = time.perf_counter()
            model.generate(**batched, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
            batch_s.append(time.perf_counter() - t)
    return {"prompt": enc["input_ids"][0].tolist(), "tok_s_batch": [batch * new_tokens / s for s in batch_s] or None,
            "path": path, "avx512_bf16": bool(has_avx512bf16()), "threads": torch.get_num_threads(),
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


def space_run(folder: str, python: str, new_tokens: int) -> dict:
    """The Space folder as a Space runs it (`python app.py` in it, with `python` from a venv
    holding its requirements.txt): seconds until it serves, one request of `new_tokens` to
    every column through gradio_client (prompt included, streamed), and the process's peak
    RSS (VmHWM)."""
    from gradio_client import Client

    from phi2qlora.space import start_space

    if not (Path(folder) / "app.py").is_file():
        sys.exit(f"--space {folder}: no app.py there; export_model.py --space DIR writes a Space folder")
    start = time.perf_counter()
    proc, port = start_space(Path(folder), python)
    try:
        client = None
        while client is None and proc.poll() is None and time.perf_counter() - start < 300:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # noqa: BLE001 - not serving yet
                time.sleep(0.5)
        if client is None:
            sys.exit(f"the Space in {folder} did not start")
        serving_s = time.perf_counter() - start
        t = time.perf_counter()
        outputs = client.predict(PROMPT, None, new_tokens, api_name="/generate")
        answer_s = time.perf_counter() - t
        columns = (len(outputs) - 1) // 2
        full = all("cut off" in outputs[2 + 2 * i] for i in range(columns))  # no answer ended early
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"path": f"space {folder}", "serving_s": serving_s, "columns": columns, "answer_s": answer_s,
            "all_answers_full_length": full, "tok_s_each": columns * new_tokens / answer_s,
            "peak_rss_gib": hwm / 2**20}


def cpu_flags() -> dict:
    """What /proc/cpuinfo says of the two features that change these paths: AVX512-BF16
    (bitsandbytes' packed kernel) and AMX (llama.cpp's AMX kernels, phi2qlora.gguf)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": "?", "avx512_bf16": "?", "amx": "?"}
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return {"model": model, "avx512_bf16": "yes" if "avx512_bf16" in flags else "no",
            "amx": "yes" if "amx_int8" in flags else "no"}


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
    p.add_argument("--batch", type=int, default=4, help="the batched measurement's prompts")
    p.add_argument("--paths", nargs="*", default=list(PATHS), help=f"of {', '.join(PATHS)}")
    p.add_argument("--gguf", nargs="*", default=[], help="GGUF files to serve with llama.cpp (export_model.py --gguf)")
    p.add_argument("--gguf_plain", nargs="*", default=[],
                   help="GGUF files on llama.cpp's plain kernels (no repacked weights: what a build with AMX kernels gets)")
    p.add_argument("--onnx", nargs="*", default=[],
                   help="ONNX Runtime GenAI model folders (its builder's, -p int4 -e cpu): a candidate not chosen")
    p.add_argument("--onnx_python", default=sys.executable,
                   help="the Python of a venv holding onnxruntime-genai (kept out of the project's requirements)")
    p.add_argument("--space", default=None, help="a Space folder (export_model.py --space) to start and query")
    p.add_argument("--space_python", default=sys.executable,
                   help="the Python of a venv holding the Space's requirements.txt")
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/bench-cpu"))
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(child(args._child, args.model_dir, args.new_tokens, args.runs, args.batch)))
        return
    results = {}
    pages = [f"page {'|'.join(args.gguf)}"] if len(args.gguf) > 1 else []
    for path in [*args.paths, *(f"gguf {g}" for g in args.gguf), *(f"gguf plain {g}" for g in args.gguf_plain),
                 *(f"onnx {o}" for o in args.onnx), *pages]:
        python = args.onnx_python if path.startswith("onnx ") else sys.executable
        run = subprocess.run([python, __file__, "--model_dir", args.model_dir, "--new_tokens",
                              str(args.new_tokens), "--runs", str(args.runs), "--batch", str(args.batch),
                              "--_child", path], capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"{path}: failed\n{run.stderr[-3000:]}")
        results[path] = json.loads(run.stdout.strip().splitlines()[-1])
    page = results.pop(pages[0], None) if pages else None
    space = space_run(args.space, args.space_python, args.new_tokens) if args.space else None
    if space:
        print(f"{space['path']}: serving {space['serving_s']:.1f} s after start; one request of {args.new_tokens} new "
              f"tokens to each of its {space['columns']} columns in {space['answer_s']:.1f} s "
              f"({space['tok_s_each']:.2f} new tok/s each, prompt and streaming included"
              f"{'' if space['all_answers_full_length'] else '; an answer ended early: fewer tokens'}); "
              f"peak RSS {space['peak_rss_gib']:.2f} GiB")
    if not results:
        write_results(args.out, {"space": space} if space else {}, {})
        return
    reference = results.get("dequantized") or next(iter(results.values()))
    flags = cpu_flags()
    print(f"{args.model_dir}: greedy, {args.new_tokens} new tokens, {args.runs} runs, {reference['threads']} threads, "
          f"CPU {flags['model']}: AVX512-BF16 {flags['avx512_bf16']}, AMX {flags['amx']}; "
          f"agreement against {reference['path']}")
    llama = next((r["llama_cpp"] for r in results.values() if r.get("llama_cpp")), None)
    if llama:
        print(f"llama.cpp: {llama}")
    print(f"| path | batch 1 new tok/s (median, min-max) | batch {args.batch} new tok/s | peak RSS GiB | load s | "
          "same prompt tokens | tokens as the reference | max abs dlogit |")
    print("| --- | ---: | ---: | ---: | ---: | :---: | ---: | ---: |")
    for path, r in results.items():
        same = agreement(reference["tokens"], r["tokens"])
        dlogit = (max(abs(a - b) for a, b in zip(reference["last_logits"], r["last_logits"]))
                  if r["last_logits"] and reference["last_logits"] else None)
        r.update(same_tokens=same, same_prompt=r["prompt"] == reference["prompt"], max_abs_dlogit=dlogit)
        batched = f"{statistics.median(r['tok_s_batch']):.2f}" if r["tok_s_batch"] else "-"
        if r.get("batch_row0_same") is not None:  # llama.cpp, ONNX: the batched row 0 against batch 1
            batched += f" (row 0: {r['batch_row0_same']}/{args.new_tokens} tokens as batch 1)"
        print(f"| {path} | {statistics.median(r['tok_s']):.2f} ({min(r['tok_s']):.2f}-{max(r['tok_s']):.2f}) | "
              f"{batched} | {r['peak_rss_gib']:.2f} | {r['load_s']:.1f} | "
              f"{'yes' if r['same_prompt'] else 'no'} | {same}/{len(reference['tokens'])} | "
              f"{'-' if dlogit is None else f'{dlogit:.2e}'} |")
    if page:
        print(f"{page['path']}: in one process, loaded in {page['load_s']:.1f} s, peak RSS {page['peak_rss_gib']:.2f} "
              "GiB, new tok/s each " + ", ".join(f"{s:.2f}" for s in page["tok_s_each"]))
        results["page"] = page
    products = product_ms() if any(p in PATHS for p in results) else {}  # transformers paths
    if products:
        print("one 2560 x 10240 product for one token, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in products.items()))
    for r in results.values():
        r.pop("last_logits", None)
        r.pop("prompt", None)
    if space:
        results["space"] = space
    write_results(args.out, results, products)


def write_results(out: str, results: dict, products: dict) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "results.json").write_text(json.dumps({"paths": results, "product_ms": products}, indent=1))


if __name__ == "__main__":
    main()
