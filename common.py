"""What the scripts share: the chat format, word counting, atomic writes, and loading
Phi-2 (or the tiny offline model) in 4-bit with the chat tokens ready to train."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

# ---------------------------------------------------------------------------------------
# Chat format. Phi-2 was never chat-tuned, so the project defines its own turns with new
# special tokens. Phi-2's tokenizer uses ids up to ~50,295 while its embedding has 51,200
# rows, so these tokens land in existing (unused) rows: no resize.
# ---------------------------------------------------------------------------------------
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"  # end of turn; also the tokenizer's EOS, so generate() and GRPO stop on it
PAD = "<|pad|>"  # distinct from EOS, so padding never masks a real end of turn
CHAT_TOKENS = [USER, ASSISTANT, END, PAD]
ROLE_TOKENS = {"user": USER, "assistant": ASSISTANT}

# The same format as `format_chat`, for tokenizer.apply_chat_template. The
# {% generation %} markers let TRL's `assistant_only_loss` put the loss on the
# assistant's words and its end-of-turn token, nothing else.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def format_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render messages as CHAT_TEMPLATE does, without needing a tokenizer."""
    parts = []
    for m in messages:
        if m["role"] not in ROLE_TOKENS:
            raise ValueError(f"unknown role: {m['role']!r} (expected 'user' or 'assistant')")
        parts.append(f"{ROLE_TOKENS[m['role']]}\n{m['content']}{END}\n")
    if add_generation_prompt:
        parts.append(f"{ASSISTANT}\n")
    return "".join(parts)


def format_prompt(prompt: str) -> str:
    """A single user turn, ready for the assistant's answer."""
    return format_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)


_WORD = re.compile(r"\w+")


def count_words(text: str | None) -> int:
    """Words as IFEval counts them: runs of word characters (nltk's RegexpTokenizer(r'\\w+'))."""
    return len(_WORD.findall(text or ""))


# ---------------------------------------------------------------------------------------
# Files: written whole or not at all.
# ---------------------------------------------------------------------------------------
def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file or
    none, never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_jsonl_atomic(path: str | os.PathLike, rows) -> int:
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    write_atomic(path, "".join(lines))
    return len(lines)


def read_jsonl_rows(path: str | os.PathLike, what: str):
    """Yield `(line number, row)` for each non-blank line of a JSONL file, with errors
    that name the file and line (`datasets`' JSON loader names neither)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found; run data_prep.py first (see README)")
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                yield n, row
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save it as UTF-8 JSONL") from None


def read_prompt_rows(path: str | os.PathLike) -> list[dict]:
    """Prompts as `{"prompt", "word_limit"}` rows: a `.jsonl` file as data_prep.py writes
    them (`word_limit` a positive integer or null, optional), or any other text file with
    one prompt per line (no stated limit)."""
    path = Path(path)
    rows = []
    if path.suffix != ".jsonl":
        if not path.is_file():
            raise InputError(f"{path}: prompt file not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
        rows = [{"prompt": line.strip(), "word_limit": None} for line in lines if line.strip()]
    else:
        for n, row in read_jsonl_rows(path, "prompt file"):
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise InputError(f"{path}:{n}: field 'prompt' must be a non-empty string")
            limit = row.get("word_limit")
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
                raise InputError(f"{path}:{n}: field 'word_limit' must be a positive integer or null, got {limit!r}")
            rows.append({"prompt": row["prompt"], "word_limit": limit})
    if not rows:
        raise InputError(f"{path}: no prompts in the file")
    return rows


class InputError(Exception):
    """Bad input from the user (a file, a recipe, a flag): the message says where and what
    to do. Scripts print it without a traceback and exit with status 2."""


def exit_on_input_error(main):
    """Run `main()`; turn an InputError into one line on stderr and exit status 2."""
    import sys

    try:
        return main()
    except InputError as e:
        prog = Path(sys.argv[0]).stem
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------
# Models: the same loading code for Phi-2 on a GPU and the tiny model on a CPU.
# ---------------------------------------------------------------------------------------
def pick_dtype(requested: str | None = "auto"):
    """The compute dtype. `auto`: bf16 where the GPU computes it natively (compute
    capability >= 8.0), fp16 on older GPUs such as the T4 (7.5), which reports bf16 as
    "supported" but only emulates it, slowly; fp32 on the CPU."""
    import torch

    if requested not in (None, "auto"):
        return getattr(torch, requested)
    if not torch.cuda.is_available():
        return torch.float32
    major, _ = torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16


def parse_recipe(dataclass_types, argv: list[str], default_recipe) -> tuple:
    """Parse `--config recipe.yaml` (default: `default_recipe`) and command-line overrides
    with TRL's parser. Mixed precision then follows the compute dtype (`pick_dtype`): fp16
    AMP on a T4, bf16 on Ampere+, none on the CPU. The configs check their fields when
    built, so the flags go in as arguments of a second parse, not as edits afterwards."""
    import torch
    from trl import ModelConfig, TrlParser

    argv = list(argv)
    if "--config" not in argv:
        argv = ["--config", str(default_recipe), *argv]
    parser = TrlParser(dataclass_types)
    first = parser.parse_args_and_config([*argv, "--fp16", "False", "--bf16", "False"])
    model_args = next(a for a in first if isinstance(a, ModelConfig))
    dtype = pick_dtype(model_args.dtype)
    return parser.parse_args_and_config(
        [*argv, "--fp16", str(dtype == torch.float16), "--bf16", str(dtype == torch.bfloat16)])


def load_chat_tokenizer(name_or_path: str, revision: str = "main"):
    """The base tokenizer with the chat tokens added, END as EOS and PAD as pad."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    tokenizer.add_tokens(CHAT_TOKENS, special_tokens=True)
    tokenizer.eos_token = END
    tokenizer.pad_token = PAD
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def chat_token_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS}


def load_base_model(name_or_path: str, tokenizer, dtype, *, load_in_4bit: bool = True,
                    double_quant: bool = True, attn_implementation: str | None = "sdpa",
                    revision: str = "main"):
    """The base model, in 4-bit NF4 by default, on this process's device, with rows
    initialised for the chat tokens (see `init_chat_token_rows`)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if torch.cuda.is_available():
        from accelerate import PartialState

        device = f"cuda:{PartialState().local_process_index}"  # one full copy per process
    else:
        device = "cpu"
    quantization_config = None
    if load_in_4bit:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        revision=revision,
        dtype=dtype,
        quantization_config=quantization_config,
        attn_implementation=attn_implementation,  # sdpa: fp16-safe attention on a T4
        device_map={"": device},
    )
    init_chat_token_rows(model, tokenizer)
    return model


def model_kwargs(model_args) -> dict:
    """load_base_model's options from TRL's ModelConfig, as the recipes set them."""
    return dict(load_in_4bit=model_args.load_in_4bit, double_quant=model_args.use_bnb_nested_quant,
                attn_implementation=model_args.attn_implementation, revision=model_args.model_revision)


def init_chat_token_rows(model, tokenizer) -> None:
    """Give the chat tokens sensible rows in the existing embedding and lm_head: no resize.

    Input rows start at the mean embedding (Hewitt's recipe for new tokens); END's output
    row and bias start as a copy of <|endoftext|>'s, so the model ends a turn where it
    would have ended a document. Deterministic in the base weights, so loading an adapter
    later rebuilds exactly the base it was trained on."""
    import torch

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = embed.weight.shape[0]
    ids = chat_token_ids(tokenizer)
    if len(tokenizer) > rows:
        raise InputError(
            f"the tokenizer has {len(tokenizer)} tokens with the chat tokens but the model's embedding "
            f"has only {rows} rows; this project adds tokens only into spare rows (no resize)"
        )
    first_new = min(ids.values())
    doc_end = tokenizer.get_vocab().get("<|endoftext|>")  # Phi-2's end of document
    with torch.no_grad():
        mean = embed.weight[:first_new].float().mean(0).to(embed.weight.dtype)
        embed.weight[list(ids.values())] = mean
        if doc_end is not None:
            head.weight[ids[END]] = head.weight[doc_end]
            if head.bias is not None:
                head.bias[ids[END]] = head.bias[doc_end]
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = ids[END]
        cfg.pad_token_id = ids[PAD]


def fix_lm_head_bias(model) -> int:
    """Give Phi-2's lm_head its bias back under PEFT's trainable-token wrapper (peft 0.21).

    Two places drop it (STACK-NOTES 3): the wrapper's forward computes `F.linear(x, W)`
    with no bias, and the wrapper has no `bias` attribute, which TRL's fused loss reads
    (`lm_head.weight`, `lm_head.bias`; `weight` already gives the merged rows). Each wrapper
    is probed with a zero input, whose output must be the bias; only where it is missing is
    a hook added, so a fixed PEFT is left alone. Returns how many wrappers were fixed."""
    import torch

    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:
        return 0

    def add_bias(layer, args, output):
        if layer.disable_adapters or layer.merged or not layer.active_adapters:
            return output  # the base layer ran, bias included
        return output + layer.base_layer.bias.to(output.dtype)

    fixed = 0
    for wrapper in model.modules():
        if not isinstance(wrapper, TrainableTokensWrapper):
            continue
        base, layer = wrapper.original_module, wrapper.token_adapter
        if not isinstance(base, torch.nn.Linear) or base.bias is None or "bias" in wrapper.__dict__:
            continue
        object.__setattr__(wrapper, "bias", base.bias)  # an attribute, not a second registered parameter
        with torch.no_grad():
            probe = layer(torch.zeros(1, base.in_features, device=base.weight.device, dtype=base.weight.dtype))[0]
        if torch.count_nonzero(base.bias) and not torch.count_nonzero(probe):
            layer.register_forward_hook(add_bias)
            fixed += 1
    return fixed


def upcast_trainable_params(model) -> None:
    """TRL casts a quantised model's trainable parameters to bf16 when the trainer is built
    (STACK-NOTES 2); with fp16 mixed precision, the T4's only choice, the first gradient
    unscale then fails. Adapter weights in fp32 are what AMP expects under fp16 and bf16."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def load_adapter(model, adapter_dir: str, trainable: bool = False, adapter_name: str = "default"):
    """A saved adapter (LoRA + trainable chat-token rows) on top of `load_base_model`'s
    model, or added beside the adapters of a PeftModel under another name (switch with
    `set_adapter(name)`; `with model.disable_adapter():` gives the base). `trainable`
    must be said: PEFT loads adapters frozen by default."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise InputError(f"{adapter_dir}: no adapter there (adapter_config.json missing); "
                         "give the output directory of sft_qlora.py or grpo_train.py")
    if isinstance(model, PeftModel):
        model.load_adapter(adapter_dir, adapter_name=adapter_name, is_trainable=trainable)
        peft_model = model
    else:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name,
                                               is_trainable=trainable)
    fix_lm_head_bias(peft_model)
    return peft_model


# ---------------------------------------------------------------------------------------
# Runs: checkpoints and curves.
# ---------------------------------------------------------------------------------------
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The highest-numbered `checkpoint-N` that holds every file a resume needs.
    (transformers' get_last_checkpoint takes the highest number even if it is half written.)"""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for d in root.glob("checkpoint-*"):
        step = d.name.split("-")[-1]
        if d.is_dir() and step.isdigit() and all((d / f).is_file() for f in CHECKPOINT_FILES):
            found.append((int(step), d))
    return str(max(found)[1]) if found else None


def plot_history(log_history: list[dict], series: dict[str, str], path: str | os.PathLike, title: str) -> bool:
    """Plot `{label: log key}` against the step from a Trainer's log history. Returns False
    (and writes nothing) when none of the keys was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for label, key in series.items():
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        if points:
            curves[label] = points
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True
