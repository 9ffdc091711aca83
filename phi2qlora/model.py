"""Phi-2 (or the tiny offline model) loaded as it trains: the compute dtype, the one NF4
quantisation, the chat tokens' rows in the spare embedding rows, adapters on top, and the
fixes this stack needs (each docstring says which library, which version, and why)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from phi2qlora.chat import CHAT_TEMPLATE, CHAT_TOKENS, END, PAD, chat_token_ids
from phi2qlora.errors import InputError
from phi2qlora.files import check_adapter_folder, check_model_source, check_safetensors, read_json_file

# Every script's dtype options take the same names: torch's, and the usual short ones.
DTYPE_NAMES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}


def dtype_name(requested: str | None, flag: str = "--dtype", auto: bool = True) -> str:
    """torch's name for a dtype given as float16 / fp16 / half, bfloat16 / bf16, float32 /
    fp32 (or auto, where `auto`); anything else is one line naming `flag`."""
    text = "auto" if requested is None else str(requested).strip().lower().removeprefix("torch.")
    if text == "auto" and auto:
        return "auto"
    if text not in DTYPE_NAMES:
        raise InputError(f"{flag} {requested}: expected {'auto, ' if auto else ''}float16 (or fp16), bfloat16 "
                         "(or bf16) or float32 (or fp32)")
    return DTYPE_NAMES[text]


def pick_dtype(requested: str | None = "auto", flag: str = "--dtype"):
    """The compute dtype. `auto`: bf16 where the GPU computes it natively (compute
    capability >= 8.0), fp16 on older GPUs such as the T4 (7.5), which reports bf16 as
    "supported" but only emulates it, slowly; fp32 on the CPU."""
    import torch

    name = dtype_name(requested, flag)
    if name != "auto":
        return getattr(torch, name)
    if not torch.cuda.is_available():
        return torch.float32
    major, _ = torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16


def load_chat_tokenizer(name_or_path: str, revision: str = "main"):
    """The base tokenizer with the chat tokens added, END as EOS and PAD as pad."""
    from transformers import AutoTokenizer

    check_model_source(name_or_path, "tokenizer", marks=("tokenizer_config.json", "tokenizer.json"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except Exception as e:  # not on the Hub, not in the offline cache; tokenizers raises a bare Exception
        raise InputError(could_not_load(name_or_path, e)) from None  # for a tokenizer.json it cannot read
    tokenizer.add_tokens(CHAT_TOKENS, special_tokens=True)
    tokenizer.eos_token = END
    tokenizer.pad_token = PAD
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def could_not_load(name: str, error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    offline = " (offline, HF_HUB_OFFLINE=1: a Hub model must already be in the cache)" \
        if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return f"could not load {name!r}{offline}: {first[:200]}; give a local model folder or a Hub id such as microsoft/phi-2"



def nf4_config(dtype, double_quant: bool = True):
    """The project's one 4-bit quantisation: NF4 (the QLoRA paper's data type for normally
    distributed weights), double quantisation of the scales (~0.4 bits a weight less: 0.4 GB
    of a T4 for Phi-2), computing in `dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)


def load_base_model(name_or_path: str, tokenizer, dtype, *, load_in_4bit: bool = True,
                    double_quant: bool = True, attn_implementation: str | None = "sdpa",
                    revision: str = "main", cpu_packed_kernel: bool = False):
    """The base model, in 4-bit NF4 by default, on this process's device, with rows
    initialised for the chat tokens (see `init_chat_token_rows`).

    Its 4-bit layers keep the layout they train in (`keep_4bit_trainable`), whatever runs
    on them. `cpu_packed_kernel=True` is for a model that never trains (app.py's `nf4`
    weights): on a CPU with AVX512-BF16, bitsandbytes then repacks each layer for its
    bf16 inference kernel at the first eval-mode forward."""
    import torch
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        from accelerate import PartialState

        device = f"cuda:{PartialState().local_process_index}"  # one full copy per process
    else:
        device = "cpu"
    check_model_source(name_or_path)  # a local folder's files whole, before from_pretrained reads them
    quantization_config = nf4_config(dtype, double_quant) if load_in_4bit else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=revision,
            dtype=dtype,
            quantization_config=quantization_config,
            attn_implementation=attn_implementation,  # sdpa: fp16-safe attention on a T4
            device_map={"": device},
        )
    except OSError as e:
        raise InputError(could_not_load(name_or_path, e)) from None
    use_fused_gelu(model)
    if load_in_4bit and not cpu_packed_kernel:
        keep_4bit_trainable(model)
    if torch.cuda.is_available():
        # cuDNN's sdpa kernels cost ~2 ms of host time a call and a new plan for each new
        # sequence length (H100, torch 2.11): without them SFT ran 26% faster (PERFORMANCE.md).
        # A T4 has no cuDNN attention; the flash / memory-efficient kernels remain.
        torch.backends.cuda.enable_cudnn_sdp(False)
    init_chat_token_rows(model, tokenizer)
    return model


def keep_4bit_trainable(model) -> int:
    """Keep every bitsandbytes 4-bit layer in the layout that trains, through any eval-mode
    forward (previews, evaluation during training, GRPO's rollouts and reference passes).

    bitsandbytes 0.50.2, on a CPU with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids and
    newer), repacks a `Linear4bit`'s weight for its CPU inference kernel the first time the
    layer runs in eval mode on an input that needs no grad, and keeps it packed
    (`Linear4bit.forward`, `support_avx512bf16_for_cpu`). A later training forward then takes
    `gemv_4bit`, which has no autograd: with a bias (every Phi-2 projection has one) it raises
    "a view of a leaf Variable that requires grad is being used in an in-place operation" in
    `matmul_4bit`; without one the input gets no gradient, silently. A preview at step 0 did
    exactly that. Turning the flag off before the first forward keeps the trainable layout
    (the packing is lossy to undo: it rounds the scales to bf16). CUDA is unaffected.
    Returns how many layers were set."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


PHI2_HIDDEN_ACT = "gelu_pytorch_tanh"  # what use_fused_gelu gives Phi-2 (memory_plan.py reads it)


def use_fused_gelu(model) -> int:
    """Phi-2's `gelu_new` is a Python formula: ~8 kernels and ~7 saved tensors of the MLP
    width a token in each layer. torch's gelu(approximate="tanh") is the same function in one
    kernel (logits equal to 1e-5, tested): 10% faster SFT, and ~4 MB less a token without
    gradient checkpointing (PERFORMANCE.md). Returns how many layers were changed."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in model.modules():
        if isinstance(getattr(module, "activation_fn", None), NewGELUActivation):
            module.activation_fn = GELUTanh()
            swapped += 1
    if swapped:
        model.config.hidden_act = PHI2_HIDDEN_ACT
    return swapped


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

    Two places drop it: the wrapper's forward computes `F.linear(x, W)`
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
    """TRL 1.16's SFTTrainer and GRPOTrainer cast a quantised model's trainable parameters to
    bf16 when the trainer is built (`prepare_peft_model`, whatever the precision asked for);
    with fp16 mixed precision, the T4's only choice, the first gradient
    unscale then fails. Adapter weights in fp32 are what AMP expects under fp16 and bf16."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def trainable_weights(model) -> dict:
    """A float32 copy of every trainable parameter, by name: the adapter as loaded, for
    restore_sft_weights once a TRL trainer has changed it."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore_sft_weights(model, sft_weights: dict) -> None:
    """Put the exact SFT adapter back into the policy and its frozen `ref` copy once
    GRPOTrainer or DPOTrainer (trl 1.16) is built from a loaded adapter. TRL rounds a
    quantised model's trainable weights to bf16, which moves the policy off the SFT model
    and breaks fp16 training on a T4 (upcast_trainable_params), and its `ref` copy takes the
    LoRA weights (names with '.default.') but not the chat-token rows (names ending in
    '.default'), so without this the reference would not be the SFT model: GRPO's KL would
    not start at zero, nor DPO's rewards."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in sft_weights.items():
            params[name].data = value.clone()  # fp32, as AMP wants trainable weights
            ref = name.replace(".default.", ".ref.") if ".default." in name else name[: -len("default")] + "ref"
            if ref in params:
                params[ref].data = value.clone()


def load_adapter(model, adapter_dir: str, trainable: bool = False, adapter_name: str = "default"):
    """A saved adapter (LoRA + trainable chat-token rows) on top of `load_base_model`'s
    model, or added beside the adapters of a PeftModel under another name (switch with
    `set_adapter(name)`; `with model.disable_adapter():` gives the base). `trainable`
    must be said: PEFT loads adapters frozen by default. An adapter of another base
    (another width, another vocabulary) is refused here, before PEFT's size-mismatch
    traceback."""
    from peft import PeftModel

    check_adapter_fits(adapter_dir, model.config.name_or_path, dims=_module_dims(model))
    if isinstance(model, PeftModel):
        model.load_adapter(adapter_dir, adapter_name=adapter_name, is_trainable=trainable)
        peft_model = model
    else:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, adapter_name=adapter_name,
                                               is_trainable=trainable)
    fix_lm_head_bias(peft_model)
    return peft_model


# ---------------------------------------------------------------------------------------
# Does an adapter fit a base? Its tensors' shapes against the base's modules.
# ---------------------------------------------------------------------------------------
# PEFT's names in adapter_model.safetensors, after "base_model.model.": the module, then what.
_ADAPTER_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A"
                          r"|lora_embedding_B|token_adapter\.trainable_tokens_delta)(?:\.weight)?$")


def check_adapter_fits(adapter_dir, base: str, flag: str = "", base_flag: str = "", revision: str = "main",
                       what_to_do: str = "give the output directory of sft_qlora.py or grpo_train.py",
                       dims=None) -> None:
    """The adapter in `adapter_dir` is whole and was trained on a base of `base`'s shape.
    `dims(module path)` gives a module's (rows, columns): a Linear's out and in features, an
    Embedding's rows and width, None if there is no such module. Without it they are read
    from the safetensors headers of a local base folder (nothing is loaded); a Hub id is
    then checked when load_adapter has the model."""
    config = check_adapter_folder(adapter_dir, flag, what_to_do)
    dims = dims or _weight_dims(base, revision)
    problem = dims and adapter_mismatch(adapter_dir, config, dims)
    if problem:
        trained_on = config.get("base_model_name_or_path") or "another model"
        where = f"{flag} {adapter_dir}" if flag else str(adapter_dir)
        use = f"pass {base_flag} {trained_on}" if base_flag else f"load it on {trained_on}"
        raise InputError(f"{where}: trained on {trained_on}, which is not the base {base} ({problem}); {use}, the "
                         "base it was trained on")


def adapter_mismatch(adapter_dir, config: dict, dims) -> str | None:
    """Where the adapter's tensors do not fit the base `dims` describes, or None."""
    header = check_safetensors(Path(adapter_dir) / "adapter_model.safetensors", "copy the adapter folder again")
    indices = config.get("trainable_token_indices") or {}
    for key, tensor in header.items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            continue  # a form this check does not know (modules_to_save copies, DoRA magnitudes)
        module, kind, shape = match["module"], match["kind"], tensor["shape"]
        found = dims(module)
        if found is None:
            return f"the base has no {module}"
        rows, columns = found
        if kind == "lora_A" and shape[-1] != columns:
            return f"its {module} takes {shape[-1]:,} inputs where the base's takes {columns:,}"
        if kind.startswith("token_adapter") and shape[-1] != columns:
            return f"its rows of {module} are {shape[-1]:,} wide where the base's are {columns:,}"
        if kind == "lora_B" and shape[0] != rows:
            return f"its {module} gives {shape[0]:,} outputs where the base's gives {rows:,}"
        if kind.startswith("token_adapter"):
            ids = indices if isinstance(indices, list) else next(
                (v for name, v in indices.items() if module == name or module.endswith(f".{name}")), [])
            if ids and max(ids) >= rows:
                return (f"its trained token rows of {module} go up to id {max(ids):,}, where the base has {rows:,} "
                        "rows: another vocabulary")
    return None


def _module_dims(model):
    """dims() for a loaded model: through PEFT's wrappers to the layer they wrap."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model

    def dims(path: str):
        try:
            module = root.get_submodule(path)
        except AttributeError:
            return None
        while hasattr(module, "base_layer"):
            module = module.base_layer
        module = getattr(module, "original_module", module)  # PEFT's trainable-tokens wrapper
        if hasattr(module, "in_features"):
            return module.out_features, module.in_features
        if hasattr(module, "num_embeddings"):
            return module.num_embeddings, module.embedding_dim
        return None

    return dims


def _weight_dims(base: str, revision: str = "main"):
    """dims() from the safetensors headers of a local, unquantised model folder, each file
    checked whole on the way; None for a Hub id or a quantised folder."""
    folder = Path(base).expanduser()
    if not (folder / "config.json").is_file():
        return None
    redo = f"the model folder {base} is damaged: copy or download it again"
    if "quantization_config" in read_json_file(folder / "config.json", redo):
        return None  # packed 4-bit shapes: not the layers' own
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        shapes.update({k: v["shape"] for k, v in check_safetensors(path, redo).items()})

    def dims(module: str):
        shape = shapes.get(f"{module}.weight")
        return tuple(shape) if shape and len(shape) == 2 else None

    return dims if shapes else None
