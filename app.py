"""The base model and the fine-tuned ones answer the same prompt, side by side.

    python app.py                                 # Phi-2 + outputs/phi2-oasst1-qlora (+ -grpo), on 127.0.0.1:7860
    python app.py --base microsoft/phi-2 --sft outputs/phi2-oasst1-qlora --grpo outputs/phi2-oasst1-grpo
    python app.py --sft outputs/phi2-oasst1-qlora --dpo outputs/phi2-oasst1-dpo --grpo outputs/phi2-oasst1-grpo
    python app.py --merged outputs/phi2-sft-merged outputs/phi2-grpo-merged   # export_model.py's folders
    python app.py --gguf outputs/space/models      # GGUF files (export_model.py --gguf): llama.cpp, the fast CPU path
    python app.py --host 0.0.0.0                  # reachable from other machines: only when you mean it
    python app.py --share                         # a public gradio.live link: only when you mean it

Adapters share one base in memory and take turns on it (`set_adapter`); the base answers
with them switched off (`disable_adapter`). Merged exports are plain transformers models,
each loaded whole. GGUF files run on llama.cpp (phi2qlora/gguf.py); on a machine without a
GPU, `python app.py` serves export_model.py's GGUF files when they are in their default
folder. Answers are greedy (as in training previews), so a prompt gets the same answer
every time, and they stream into their columns as the tokens come.

From Python (a notebook):

    import app
    args = app.parse_args(["--sft", "outputs/phi2-oasst1-qlora"])
    demo = app.build_demo(app.load_columns(args), args)
    app.launch(demo, args)
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from phi2qlora.answers import generate_answers
from phi2qlora.args import parse_script_args
from phi2qlora.chat import CHAT_TOKENS, DEFAULT_PROMPTS
from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.files import check_model_source, is_adapter_folder
from phi2qlora.model import (
    check_adapter_fits,
    load_adapter,
    load_base_model,
    load_chat_tokenizer,
    nf4_config,
    pick_dtype,
)
from phi2qlora.word_limits import LIMIT_INSTRUCTION, count_words, limit_verdict, with_instruction

if TYPE_CHECKING:
    import gradio as gr

DEFAULT_SFT = "outputs/phi2-oasst1-qlora"  # sft_qlora.py's default output_dir
DEFAULT_GRPO = "outputs/phi2-oasst1-grpo"  # grpo_train.py's
DEFAULT_DPO = "outputs/phi2-oasst1-dpo"  # dpo_train.py's
# Each adapter column: (name, its default folder, the script that trains it), in page order.
ADAPTERS = (("sft", DEFAULT_SFT, "sft_qlora.py"), ("dpo", DEFAULT_DPO, "dpo_train.py"),
            ("grpo", DEFAULT_GRPO, "grpo_train.py"))
DEFAULT_GGUF = "outputs/phi2-oasst1-merged-gguf"  # export_model.py --gguf's
MAX_WORD_LIMIT = 1000
MIN_NEW_TOKENS = 8  # the slider's low end
WEIGHTS = ("auto", "nf4", "dequantized", "full")  # see weights_for


@dataclass
class AppArguments:
    base: str = field(default="microsoft/phi-2", metadata={"help": "the model the adapters were trained on"})
    sft: str | None = field(default=None, metadata={
        "help": f"SFT adapter folder; default {DEFAULT_SFT}, skipped with a note if it is not there"})
    grpo: str | None = field(default=None, metadata={
        "help": f"GRPO adapter folder; default {DEFAULT_GRPO}, skipped with a note if it is not there"})
    dpo: str | None = field(default=None, metadata={
        "help": f"DPO adapter folder; default {DEFAULT_DPO}, skipped with a note if it is not there"})
    merged: list[str] = field(default_factory=list, metadata={
        "help": "merged model folders (export_model.py), shown instead of adapters"})
    gguf: list[str] = field(default_factory=list, metadata={
        "help": "GGUF files, or folders of them (export_model.py --gguf), served by llama.cpp on the CPU: "
                "the fast CPU path; shown instead of adapters"})
    threads: int = field(default=0, metadata={"help": "llama.cpp's threads for --gguf (0: every core this process "
                                                     "may use)"})
    show_base: bool = field(default=True, metadata={"help": "show the base model's answer too"})
    dtype: str = field(default="auto", metadata={"help": "auto: fp16 on a T4, bf16 on Ampere+, fp32 on the CPU"})
    weights: str = field(default="auto", metadata={
        "choices": list(WEIGHTS),
        "help": "nf4: 4-bit NF4, as training loads the base; dequantized: loaded in NF4, then unpacked to "
                "--dtype (the very values the adapters were trained on, at full-precision speed); full: the "
                "weights as stored. auto: nf4 on CUDA; on the CPU dequantized for the base, full for merged "
                "exports (NF4 matmuls are ~15x slower there)"})
    max_new_tokens: int = field(default=128, metadata={"help": "the page's starting value"})
    max_new_tokens_cap: int = field(default=512, metadata={"help": "the most the page may ask for"})
    max_prompt_chars: int = field(default=2000, metadata={"help": "longer prompts are refused by the server"})
    max_queue: int = field(default=16, metadata={"help": "requests waiting at once; more are turned away"})
    host: str = field(default="127.0.0.1", metadata={"help": "0.0.0.0 listens on every network interface"})
    port: int = field(default=7860, metadata={"help": "0: the first free one from 7860"})
    share: bool = field(default=False, metadata={"help": "a public gradio.live link (Gradio turns it on in Colab "
                                                         "unless told; here it is off unless asked)"})


# ---------------------------------------------------------------------------------------
# Models: one column of the page each.
# ---------------------------------------------------------------------------------------
BASE = "<base>"  # Column.adapter for the base under its adapters: all of them switched off


@dataclass
class Column:
    key: str  # the page's element ids: answer-KEY, stats-KEY
    label: str
    model: object
    tokenizer: object
    adapter: str | None = None  # which adapter to switch on (BASE: none); None: the model as it is
    lock: threading.Lock = field(default_factory=threading.Lock)  # shared by columns on one model
    engine: str = "transformers"  # or "llama.cpp": a GGUF model, `model` a llama_cpp.Llama

    def stream(self, prompt: str, max_new_tokens: int):
        """The answer as it grows: dicts of generate_answers' shape, the last one final."""
        if self.engine == "llama.cpp":
            from phi2qlora.gguf import stream_answer

            with self.lock:
                yield from stream_answer(self.model, prompt, max_new_tokens)
            return
        with self.active() as model:
            yield from stream_answers(model, self.tokenizer, prompt, max_new_tokens)

    @contextmanager
    def active(self):
        """The model as this column shows it; one at a time per model, since switching
        adapters changes the model under any other request."""
        with self.lock:
            if self.adapter == BASE:
                with self.model.disable_adapter():
                    yield self.model
            else:
                if self.adapter is not None:
                    self.model.set_adapter(self.adapter)
                yield self.model


def check_limits(args: AppArguments) -> None:
    if not MIN_NEW_TOKENS <= args.max_new_tokens <= args.max_new_tokens_cap:
        raise InputError(f"--max_new_tokens {args.max_new_tokens}: must be from {MIN_NEW_TOKENS} to "
                         f"--max_new_tokens_cap ({args.max_new_tokens_cap})")
    for name in ("max_prompt_chars", "max_queue"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} {getattr(args, name)}: must be at least 1")


def adapter_folders(args: AppArguments) -> dict[str, str]:
    """{'sft': folder, 'dpo': folder, 'grpo': folder} to load, those there. A folder named on
    the command line must hold an adapter; a default one that does not (not trained yet) is
    skipped with a note."""
    if args.merged or args.gguf:
        if args.sft or args.dpo or args.grpo:
            raise InputError("give adapters (--sft/--dpo/--grpo) or exported models (--merged, --gguf), not both")
        return {}
    found = {}
    for name, default, script in ADAPTERS:
        given = getattr(args, name)
        folder = given or default
        if given or is_adapter_folder(folder):
            check_adapter_fits(folder, args.base, f"--{name}", "--base",
                               what_to_do=f"give the output directory of {script}")
            found[name] = folder
        else:
            print(f"[app] no {name.upper()} adapter in {default} (not trained yet?): its column is left out")
    if not found:
        raise InputError(f"nothing fine-tuned to show: no adapter in {', '.join(d for _, d, _ in ADAPTERS)}; "
                         "train one (README), or give --sft DIR, --dpo DIR, --grpo DIR or --merged DIR")
    return found


def weights_for(args: AppArguments, merged: bool) -> str:
    """How to load a model's weights. The adapters were trained on the NF4 base and correct
    that model, quantisation error included, so by default the base is read through NF4; a
    merged export (export_model.py) already holds those values. On the CPU, NF4 products are
    slow (one Phi-2 MLP product for one token, 2 cores without AVX512-BF16: 5.7 ms in fp32,
    78 ms in NF4, benchmarks/bench_cpu_serving.py), so the values are unpacked to full precision
    there; on CUDA they stay packed (Phi-2 in about 2 GB). `nf4` on a CPU with AVX512-BF16 is
    bitsandbytes' packed bf16 kernel: faster than fp32, but not the arithmetic the adapters
    were checked in, so never the default."""
    import torch

    if args.weights not in WEIGHTS:
        raise InputError(f"--weights {args.weights!r}: expected one of {', '.join(WEIGHTS)}")
    if args.weights != "auto":
        return args.weights
    if torch.cuda.is_available():
        return "nf4"
    return "full" if merged else "dequantized"


def packed_note(weights: str) -> str:
    """Which kernel `nf4` runs on this CPU: bitsandbytes' packed bf16 one needs AVX512-BF16."""
    import torch

    if weights != "nf4" or torch.cuda.is_available():
        return ""
    from bitsandbytes.functional import has_avx512bf16

    return " (bitsandbytes' packed AVX512-BF16 kernel, bf16)" if has_avx512bf16() else " (NF4 dequantised at each use)"


def load_base(args: AppArguments, tokenizer, dtype, weights: str):
    # nf4 never trains here: bitsandbytes may use its packed CPU kernel (AVX512-BF16 only).
    model = load_base_model(args.base, tokenizer, dtype, load_in_4bit=weights != "full",
                            cpu_packed_kernel=weights == "nf4")
    if weights == "dequantized":
        model = model.dequantize(dtype=dtype)  # Linear4bit -> nn.Linear holding the NF4 values
    return model.eval()


def load_merged(folder: str, dtype, weights: str):
    """A merged export: a plain transformers model folder whose tokenizer has the chat tokens."""
    import torch

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(folder) / "config.json").is_file():
        raise InputError(f"--merged {folder}: no model there (config.json missing); give a folder "
                         "export_model.py wrote")
    check_model_source(folder, "--merged")  # every JSON and safetensors file whole
    missing = [t for t in CHAT_TOKENS if t not in AutoTokenizer.from_pretrained(folder).get_vocab()]
    if missing:  # load_chat_tokenizer would add them as new, untrained tokens: silent nonsense
        raise InputError(f"--merged {folder}: the tokenizer there lacks the chat tokens {missing}; "
                         "export the model with export_model.py")
    tokenizer = load_chat_tokenizer(folder)
    quantization = None if weights == "full" else nf4_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=quantization, use_safetensors=True, attn_implementation="sdpa",
        device_map={"": "cuda:0" if torch.cuda.is_available() else "cpu"})
    if weights == "dequantized":
        model = model.dequantize(dtype=dtype)
    return model.eval(), tokenizer


def load_columns(args: AppArguments) -> list[Column]:
    """Every model the page shows, loaded. Paths are checked before anything loads."""
    check_limits(args)
    use_cpu_fast_path(args)
    adapters = adapter_folders(args)
    if args.gguf:  # llama.cpp alone: no torch, as on the CPU Space
        return gguf_columns(args)
    import torch

    dtype = pick_dtype(args.dtype)
    base_weights, merged_weights = weights_for(args, merged=False), weights_for(args, merged=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"[app] on {device}, {str(dtype).split('.')[-1]}; weights: base {base_weights}{packed_note(base_weights)}"
          + (f", merged {merged_weights}" if args.merged else ""))
    columns = []
    if adapters or args.show_base:
        tokenizer = load_chat_tokenizer(args.base)  # as training built it: the same chat-token ids
        base = load_base(args, tokenizer, dtype, base_weights)
        if adapters:
            for name, folder in adapters.items():
                config = json.loads((Path(folder) / "adapter_config.json").read_text())
                trained_on = config.get("base_model_name_or_path")
                if trained_on and trained_on != args.base:
                    print(f"[app] note: {folder} was trained on {trained_on}, loaded here on {args.base}")
                base = load_adapter(base, folder, adapter_name=name).eval()
            lock = threading.Lock()
            if args.show_base:
                columns.append(Column("base", f"Base · {short(args.base)}", base, tokenizer, BASE, lock))
            columns += [Column(name, f"{name.upper()} · {short(folder)}", base, tokenizer, name, lock)
                        for name, folder in adapters.items()]
        else:
            columns.append(Column("base", f"Base · {short(args.base)}", base, tokenizer))
    for i, folder in enumerate(args.merged):
        model, tokenizer = load_merged(folder, dtype, merged_weights)
        columns.append(Column(f"merged{i}", f"Merged · {short(folder)}", model, tokenizer))
    print("[app] columns: " + ", ".join(c.label for c in columns))
    return columns


def use_cpu_fast_path(args: AppArguments) -> None:
    """On a machine without CUDA, with no model named and export_model.py's GGUF files in
    their default folder, serve those: llama.cpp answers several times faster than the fp32
    path (PERFORMANCE.md). `--weights` (or any model flag) keeps the exact fp32 path."""
    if args.sft or args.dpo or args.grpo or args.merged or args.gguf or args.weights != "auto":
        return  # a model named, or the exact path asked for (the Space names its GGUFs: no torch there)
    import torch

    if torch.cuda.is_available():
        return
    if not Path(DEFAULT_GGUF).is_dir() or not any(Path(DEFAULT_GGUF).glob("*.gguf")):
        print(f"[app] no GPU and no GGUF export in {DEFAULT_GGUF}: the adapters run on the fp32 path (about 1.5 "
              "new tokens/s at Phi-2's size on 2 cores); python export_model.py --gguf q4_k_m makes the fast path")
        return
    print(f"[app] no GPU: serving the GGUF exports in {DEFAULT_GGUF} with llama.cpp (the fast CPU path); "
          "--weights dequantized gives the adapters on the fp32 base instead")
    args.gguf = [DEFAULT_GGUF]


def gguf_columns(args: AppArguments) -> list[Column]:
    """One column per GGUF file, each on llama.cpp's CPU backend. Every file is checked
    (there, and loadable) before the page starts."""
    from phi2qlora.gguf import gguf_files, load

    files = gguf_files(args.gguf)
    columns = []
    for i, path in enumerate(files):
        llm = load(path, threads=args.threads or None)
        columns.append(Column(f"gguf{i}", path.stem, llm, None, engine="llama.cpp"))
        print(f"[app] {path.stem}: llama.cpp, {path.name} ({path.stat().st_size / 1e9:.2f} GB), "
              f"{llm.context_params.n_threads} threads")
    print("[app] columns: " + ", ".join(c.label for c in columns))
    return columns


def stream_answers(model, tokenizer, prompt: str, max_new_tokens: int):
    """A transformers model's greedy answer as it grows (TextIteratorStreamer on a thread),
    then generate_answers' final row for it."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    done = {}

    def run():
        try:
            done["answer"] = generate_answers(model, tokenizer, [prompt], max_new_tokens, streamer=streamer)[0]
        except BaseException as e:  # raised again below, in the request's thread
            done["error"] = e
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        yield {"prompt": prompt, "answer": text.strip(), "words": count_words(text), "ended": False}
    worker.join()
    if "error" in done:
        raise done["error"]
    yield done["answer"]


def short(name: str) -> str:
    """A local folder by its own name (outputs/x/phi2-oasst1-qlora -> phi2-oasst1-qlora); a
    hub model by its full id."""
    return Path(name).name if Path(name).exists() else name


# ---------------------------------------------------------------------------------------
# One request: check it, then each model answers.
# ---------------------------------------------------------------------------------------
def full_prompt(prompt, word_limit, max_new_tokens, args: AppArguments) -> tuple[str, int]:
    """The prompt as the models get it, with the word limit appended in the phrasing GRPO
    learned; and the number of new tokens. The Textbox's max_length is checked only in the
    browser, so the length is checked here; Gradio checks the Number and Slider ranges on
    the server, and they are checked here again for callers that bypass Gradio."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("Type a prompt first.")
    prompt = prompt.strip()
    if len(prompt) > args.max_prompt_chars:
        raise InputError(f"The prompt is {len(prompt):,} characters long; this server takes at most "
                         f"{args.max_prompt_chars:,}. Shorten it.")
    tokens = _whole_number(max_new_tokens)
    if tokens is None or not 1 <= tokens <= args.max_new_tokens_cap:
        raise InputError(f"Max new tokens must be a whole number from 1 to {args.max_new_tokens_cap}.")
    if word_limit in (None, "", 0):
        return prompt, tokens
    limit = _whole_number(word_limit)
    if limit is None or not 1 <= limit <= MAX_WORD_LIMIT:
        raise InputError(f"The word limit must be a whole number from 1 to {MAX_WORD_LIMIT}, or empty for none.")
    return with_instruction(prompt, LIMIT_INSTRUCTION.format(n=limit)), tokens  # as data_prep.py adds it


def _whole_number(x) -> int | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return int(x) if x.is_integer() else None


def stats_line(answer: dict, prompt: str, max_new_tokens: int) -> str:
    """'**12 words** · ended · obeys the limit (at most 50 words)', words counted as IFEval
    counts them, the limit read from the prompt as the GRPO rewards read it."""
    words = f"{answer['words']} word" + ("" if answer["words"] == 1 else "s")
    parts = [f"**{words}**", "ended" if answer["ended"] else f"cut off at {max_new_tokens} tokens"]
    if verdict := limit_verdict(prompt, answer["answer"]):
        parts.append(verdict)
    return " · ".join(parts)


def answer_all(columns: list[Column], args: AppArguments, prompt, word_limit, max_new_tokens):
    """Yield the page's outputs (the prompt as sent, then answer and stats per column) as
    each model finishes. Errors become a message in the page, never a traceback."""
    import gradio as gr

    try:
        sent, tokens = full_prompt(prompt, word_limit, max_new_tokens, args)
    except InputError as e:
        raise gr.Error(str(e)) from None
    outputs = [f"**Sent:** {sent}"] + ["", "*waiting...*"] * len(columns)
    yield list(outputs)
    for i, column in enumerate(columns):
        try:
            for answer in column.stream(sent, tokens):  # the text grows in its column as tokens come
                outputs[1 + 2 * i] = answer["answer"]
                yield list(outputs)
        except Exception as e:  # shown to the user in one line; the details go to the server's log
            traceback.print_exc()
            memory = "torch" in sys.modules and isinstance(e, sys.modules["torch"].OutOfMemoryError)
            hint = " Ask for fewer tokens." if memory else ""
            raise gr.Error(f"{column.label} failed ({type(e).__name__}: {str(e)[:300]}).{hint}") from None
        outputs[2 + 2 * i] = stats_line(answer, sent, tokens)
        yield list(outputs)


# ---------------------------------------------------------------------------------------
# The page.
# ---------------------------------------------------------------------------------------
def build_demo(columns: list[Column], args: AppArguments | None = None) -> gr.Blocks:
    """The page: a prompt box, an optional word limit and a max-tokens slider; one column
    per model with its greedy answer and word count. Queued, one generation at a time."""
    import gradio as gr

    args = args or AppArguments()
    with gr.Blocks(title="phi2-qlora: base vs fine-tuned", analytics_enabled=False) as demo:
        gr.Markdown("## Phi-2, before and after fine-tuning\nThe same prompt to each model; greedy answers, "
                    "so the same prompt always gets the same answer. Words are counted as IFEval counts them.")
        prompt = gr.Textbox(label="Prompt", lines=3, max_length=args.max_prompt_chars, elem_id="prompt",
                            placeholder="Ask something...")
        with gr.Row(equal_height=True):
            # minimum 0: the browser sends an empty box as 0, which means no limit (full_prompt)
            word_limit = gr.Number(label="Word limit (optional)", precision=0, minimum=0, maximum=MAX_WORD_LIMIT,
                                   elem_id="word-limit",
                                   info="appended as: " + LIMIT_INSTRUCTION.format(n="N") + " Empty: none")
            max_new_tokens = gr.Slider(MIN_NEW_TOKENS, args.max_new_tokens_cap, value=args.max_new_tokens, step=8,
                                       label="Max new tokens", elem_id="max-new-tokens")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        gr.Examples([[p] for p in DEFAULT_PROMPTS], inputs=[prompt])
        sent = gr.Markdown(elem_id="sent")
        outputs = [sent]
        with gr.Row():
            for column in columns:
                with gr.Column(min_width=240):
                    gr.Markdown(f"**{column.label}**")
                    outputs.append(gr.Textbox(label="Answer", lines=8, max_lines=8, interactive=False,
                                              elem_id=f"answer-{column.key}"))
                    outputs.append(gr.Markdown(elem_id=f"stats-{column.key}"))

        def respond(prompt, word_limit, max_new_tokens):
            yield from answer_all(columns, args, prompt, word_limit, max_new_tokens)

        button.click(respond, [prompt, word_limit, max_new_tokens], outputs, api_name="generate",
                     concurrency_limit=1)
    # One generation at a time (one GPU, or the CPU's cores); at most max_queue waiting.
    demo.queue(default_concurrency_limit=1, max_size=args.max_queue)
    # While that one generation runs, Gradio 6.31's queue looks for a free slot every 1 ms
    # (`sleep_when_free`, 0.05 s on Windows): on a 2-core CPU Space that took 3.3 s of CPU
    # from llama.cpp during a 40 s request (2026-12-05, Phi-2-shaped Q4_K_M x 2: 7.5 against
    # 7.9-8.2 new tok/s each with 0.05 s, benchmarks/bench_cpu_serving.py --space). A queued
    # request then starts up to 50 ms later, next to answers that take seconds.
    if hasattr(getattr(demo, "_queue", None), "sleep_when_free"):
        demo._queue.sleep_when_free = 0.05
    return demo


def launch(demo: gr.Blocks, args: AppArguments | None = None, **kwargs):
    """Serve on args.host:args.port; a public link only if args.share. Both are always
    passed, since Gradio turns share on by itself inside Colab."""
    args = args or AppArguments()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[app] listening on {args.host}: reachable from other machines on this network")
    import gradio as gr

    # System fonts: the default theme fetches Google Fonts, which an offline machine (or a
    # private one) should not need to render a page.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    try:
        return demo.launch(server_name=args.host, server_port=args.port or None, share=args.share,
                           show_error=False, theme=theme, **kwargs)
    except OSError as e:  # Gradio 6.31: "Cannot find empty port in range: 7860-7860. ..."
        if "port" not in str(e):
            raise
        raise InputError(busy_port(args)) from None


def check_port(args: AppArguments) -> None:
    """The page's port is free now: found in a second, not as Gradio's traceback after the
    models took minutes to load."""
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: must be from 1 to 65535 (0: the first free one from 7860)")
    if args.port and not port_is_free(args.host, args.port):
        raise InputError(busy_port(args))


def port_is_free(host: str, port: int) -> bool:
    """Whether a server can listen on host:port, tried as Gradio tries it (SO_REUSEADDR)."""
    import socket

    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise InputError(f"--host {host}: not an address of this machine; leave it out for 127.0.0.1") from None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
        return True
    except OSError:
        return False


def busy_port(args: AppArguments) -> str:
    """One line: the port is taken, and a free one to pass instead."""
    free = next((p for p in range(args.port + 1, min(args.port + 100, 65536)) if port_is_free(args.host, p)), None)
    instead = f"--port {free} (free now)" if free else "another --port"
    return (f"--port {args.port}: already in use on {args.host} (another app.py or another server); pass {instead}, "
            "or --port 0 for the first free one from 7860")


def parse_args(argv: list[str] | None = None) -> AppArguments:
    return parse_script_args(AppArguments, sys.argv[1:] if argv is None else argv)  # --config my.yaml works too


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    check_port(args)
    demo = build_demo(load_columns(args), args)
    launch(demo, args)


if __name__ == "__main__":
    exit_on_input_error(main)
