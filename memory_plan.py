"""Will this recipe fit? Peak GPU memory of an SFT, DPO or GRPO recipe, estimated before
anything is loaded, and with `--auto` the micro-batch, accumulation and checkpointing that fit
while keeping the effective batch.

    python memory_plan.py                                        # recipes/sft_phi2_t4.yaml on a T4
    python memory_plan.py --config recipes/grpo_phi2_t4.yaml
    python memory_plan.py --config recipes/dpo_phi2_t4.yaml     # a micro-batch of pairs: 2 sequences each
    python memory_plan.py --per_device_train_batch_size 16       # any recipe field, over the recipe
    python memory_plan.py --auto --gpu_gib 80 --gpu h100         # fastest plan that fits an H100
    python memory_plan.py --hidden_act gelu_new                  # as if Phi-2 ran its own unfused gelu

The estimate is the peak of `torch.cuda.max_memory_allocated()`: the weights (NF4 or 16-bit),
the adapter with its AdamW state, and the larger of two moments: training on the longest
micro-batch, or sampling through phi2qlora/rollouts.py (GRPO's rollouts, the previews), which holds
a 16-bit copy of the policy and a KV cache. Training's bytes a token were measured on a
Phi-2-shaped model (benchmarks/bench_gpu.py; PERFORMANCE.md lists
each measured peak beside its estimate). A GPU needs room beyond that for the CUDA context
and the allocator's slack: a plan fits when `1.1 x peak + 0.5 GiB` is within `--gpu_gib`.
Importable: `estimate(recipe_dict)`, `auto_plan(recipe_dict, gpu_gib, gpu)`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.recipes import read_recipe

GIB = 2**30
DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "sft_phi2_t4.yaml"
# microsoft/phi-2's shape, used when the model is not a local directory (nothing is downloaded).
PHI2 = {"vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32}

# Activation bytes a token of a micro-batch (whole model, both dtypes of AMP), fitted to the
# peaks benchmarks/bench_gpu.py measured on an H100 (bf16) with Phi-2's shape, MLP activation
# computed by one fused kernel, LoRA dropout 0. Keys: (16-bit base, gradient checkpointing).
ACT_BYTES = {(False, True): 4.585e-4 * GIB, (False, False): 3.828e-3 * GIB,
             (True, True): 3.35e-4 * GIB, (True, False): 3.19e-3 * GIB}
# Phi-2's own Python gelu_new keeps ~7 intermediate tensors of the MLP width a token
# (without checkpointing from the plain-TRL peak, 34.5 GiB at 16 x 256).
GELU_NEW_BYTES = {True: 5.74e-5 * GIB, False: 3.4e-3 * GIB}
# LoRA dropout > 0 keeps a dropped copy of each adapter's input: only without checkpointing
# does that outlive one layer.
DROPOUT_BYTES = {True: 0.0, False: 6.87e-4 * GIB}
# The fast Phi-2 layers (phi2qlora/fast_training.py), fitted to bench_gpu.py's fast jobs
# (H100, 2026-12-06; without checkpointing refitted 2026-12-07 to grouped 64 and 80, 46.54
# and 57.33 GiB, once q|k, v and fc1 became three contiguous products, 10% less kept a
# token): bytes a token (keys as ACT_BYTES; the 16-bit base takes the 4-bit figure, measured
# before the refit only), a fixed part a micro-step that does not grow with its tokens
# (16-bit weights dequantised for one layer, the LoRA products' outputs), and LoRA dropout's
# noise, which the fast layer keeps for backward.
FAST_ACT_BYTES = {(False, True): 2.2e-4 * GIB, (False, False): 2.63e-3 * GIB,
                  (True, True): 2.2e-4 * GIB, (True, False): 2.63e-3 * GIB}
FAST_FIXED_BYTES = 0.52 * GIB
FAST_DROPOUT_BYTES = {True: 0.0, False: 1.47e-3 * GIB}
# A GPU needs this beyond the allocated peak: CUDA context, cuBLAS workspaces, allocator slack.
SLACK_FACTOR, CONTEXT_GIB = 1.1, 0.5
# Time a micro-step (seconds): fixed host cost + cost a token, by (fast layers, checkpointing).
# h100: least squares over each timed step's seconds and real tokens of bench_gpu.py's g64
# jobs on an H100 80GB, 2026-12-07 (generic and fast with checkpointing, fast without: calls C, D
# in PERFORMANCE.md; the generic path without checkpointing: run 2, not run since). t4: not
# measured on a T4; bench_gpu.py's T4 projection of the H100 kernels (PERFORMANCE.md, "Fast
# training layers": 583 tok/s generic and 716 fast with checkpointing, 996 fast without),
# the generic path without checkpointing 1.23x the fast one's cost a token (706 against 869
# tok/s projected in one call, #35, 2026-12-07); small host terms.
SPEED = {"h100": {(False, False): (0.25, 42e-6), (False, True): (0.24, 68e-6),
                  (True, False): (0.12, 22e-6), (True, True): (0.16, 31e-6)},
         "t4": {(False, False): (0.05, 1.23e-3), (False, True): (0.08, 1.72e-3),
                (True, False): (0.05, 1.00e-3), (True, True): (0.08, 1.40e-3)}}


@dataclass
class Estimate:
    peak_gib: float
    parts: dict
    fits: bool
    need_gib: float

    def line(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.parts.items())
        return f"peak {self.peak_gib:.2f} GiB ({parts}); needs {self.need_gib:.1f} GiB"


@dataclass
class PlanArguments:
    """memory_plan.py's own options; every other flag is a field of the recipe's script."""

    gpu_gib: float = field(default=15.0, metadata={"help": "GPU memory (a T4 shows 15 GiB)"})
    gpu: str = field(default="t4", metadata={"help": "speed model for --auto: t4 or h100"})
    auto: bool = field(default=False, metadata={"help": "pick micro-batch, accumulation and checkpointing"})
    hidden_act: str | None = field(
        default=None, metadata={"help": "as if the MLP ran this activation (gelu_new: Phi-2's own, unfused)"})
    prompt_tokens: int | None = field(
        default=None, metadata={"help": "GRPO: the prompts' length in tokens (default: max_prompt_tokens)"})


def script_classes(recipe: dict) -> tuple:
    """The dataclasses the recipe's training script parses it into."""
    from trl import DPOConfig, GRPOConfig, ModelConfig, SFTConfig

    from phi2qlora.args import DPOScriptArguments, GRPOScriptArguments, SFTScriptArguments

    if is_grpo(recipe):
        return GRPOScriptArguments, GRPOConfig, ModelConfig
    if is_dpo(recipe):
        return DPOScriptArguments, DPOConfig, ModelConfig
    return SFTScriptArguments, SFTConfig, ModelConfig


def read_plan(argv: list[str]) -> tuple[PlanArguments, dict]:
    """This script's options, and the recipe with the flags over it read by the training
    scripts' own argument path: the same checks (unknown keys, types, values, file:line)
    and every field the recipe leaves out at the value training would use."""
    from phi2qlora.args import parse_config, recipe_path

    keys, _ = read_recipe(recipe_path(argv, DEFAULT_RECIPE))
    # Precision changes no term of the estimate; with it off the configs build on any machine.
    flags = [*argv, "--fp16", "False", "--bf16", "False"]
    plan, *configs = parse_config((PlanArguments, *script_classes(keys)), flags, DEFAULT_RECIPE)
    recipe = {f.name: getattr(c, f.name) for c in configs for f in dataclasses.fields(c)}
    recipe.update({k: getattr(plan, k) for k in ("hidden_act", "prompt_tokens") if getattr(plan, k)})
    return plan, recipe


def load_recipe(path: str | Path) -> dict:
    """A recipe as its training script reads it (see read_plan)."""
    return read_plan(["--config", str(path)])[1]


def resolved(recipe: dict) -> dict:
    """A recipe dict (perhaps partial, as callers build them) with the fields it leaves out
    at the defaults of its script's dataclasses."""
    defaults = {}
    for cls in script_classes(recipe):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
    return {**defaults, **recipe}


def model_shape(recipe: dict) -> dict:
    config = Path(str(recipe.get("model_name_or_path", ""))) / "config.json"
    if config.is_file():
        loaded = json.loads(config.read_text())
        return {k: loaded[k] for k in PHI2}
    return dict(PHI2)


def number(recipe: dict, key: str, kind=int):
    value = recipe[key]
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise InputError(f"recipe field {key}: expected a number, got {value!r}") from None
    if value <= 0 and kind is int:
        raise InputError(f"recipe field {key}: must be positive, got {value}")
    return value


def weight_bytes(shape: dict, recipe: dict) -> tuple[float, float]:
    """(weights, adapter + optimizer) in bytes."""
    h, m, layers, vocab = (shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    linear = layers * (4 * h * h + 2 * h * m)  # q, k, v, dense, fc1, fc2
    other = 2 * vocab * h + layers * (8 * h + m)  # embedding, lm_head, norms and biases
    if recipe["load_in_4bit"]:
        absmax = 1 / 64 + 4 / (64 * 256) if recipe["use_bnb_nested_quant"] else 4 / 64
        weights = linear * (0.5 + absmax) + other * 2
    else:
        weights = (linear + other) * 2
    r = number(recipe, "lora_r")
    sizes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "dense": (h, h), "fc1": (h, m), "fc2": (m, h)}
    targets = recipe.get("lora_target_modules") or list(sizes)
    unknown = [t for t in targets if t not in sizes]
    if unknown:
        raise InputError(f"recipe field lora_target_modules: unknown modules {unknown}; Phi-2 has {list(sizes)}")
    lora = layers * sum(r * (sizes[t][0] + sizes[t][1]) for t in targets)
    adapter = lora * 16  # fp32 weights, gradients and two AdamW moments
    adapter += vocab * h * 4  # the fused LM head's fp32 gradient of lm_head (the END row trains)
    return weights, adapter


def fast_layers(recipe: dict) -> bool:
    """Whether the recipe trains on the fast Phi-2 layers on a GPU (--fast_training)."""
    from phi2qlora.fast_training import trains_fast_on_a_gpu

    return trains_fast_on_a_gpu(recipe.get("fast_training", "auto"))


def act_bytes_per_token(recipe: dict, checkpointing: bool) -> float:
    sixteen, fast = not recipe["load_in_4bit"], fast_layers(recipe)
    per_token = (FAST_ACT_BYTES if fast else ACT_BYTES)[(sixteen, checkpointing)]
    if (recipe.get("hidden_act") or loaded_activation()) == "gelu_new":
        per_token += GELU_NEW_BYTES[checkpointing]
    if float(recipe["lora_dropout"]) > 0:
        per_token += (FAST_DROPOUT_BYTES if fast else DROPOUT_BYTES)[checkpointing]
    return per_token


def act_bytes(recipe: dict, tokens: int, checkpointing: bool) -> float:
    """A micro-batch's activations: bytes a token, and the fast layers' fixed part."""
    fixed = FAST_FIXED_BYTES if fast_layers(recipe) else 0.0
    return fixed + tokens * act_bytes_per_token(recipe, checkpointing)


def loaded_activation() -> str:
    """The MLP activation `model.load_base_model` gives Phi-2: the fused kernel (PHI2_HIDDEN_ACT)."""
    from phi2qlora.model import PHI2_HIDDEN_ACT

    return PHI2_HIDDEN_ACT


def is_grpo(recipe: dict) -> bool:
    return "num_generations" in recipe or "max_completion_length" in recipe


def is_dpo(recipe: dict) -> bool:
    """dpo_train.py's recipe: it continues an SFT adapter on a train file (GRPO reads prompts)."""
    return "precompute_ref_log_probs" in recipe or ("sft_adapter" in recipe and "train_file" in recipe)


def estimate(recipe: dict, gpu_gib: float = 15.0) -> Estimate:
    """Peak allocated GPU memory of one process running `recipe`."""
    recipe = resolved(recipe)
    shape = model_shape(recipe)
    weights, adapter = weight_bytes(shape, recipe)
    micro = number(recipe, "per_device_train_batch_size")
    checkpointing = bool(recipe["gradient_checkpointing"])
    parts = {"weights": weights, "adapter+optimizer": adapter}
    layers, h, vocab = shape["num_hidden_layers"], shape["hidden_size"], shape["vocab_size"]
    if is_grpo(recipe):
        prompt = recipe.get("prompt_tokens") or number(recipe, "max_prompt_tokens")
        completion = number(recipe, "max_completion_length")
        generation_batch = micro * number(recipe, "gradient_accumulation_steps")
        parts["adapter+optimizer"] += reference_adapter_bytes(adapter, shape)
        sampling = generation_batch * vocab * 4 * 4  # fp32 logits, softmax and sampling buffers a token
        if recipe["fast_rollouts"]:
            generation = fast_sampling_bytes(shape, generation_batch, prompt, completion)
        else:  # TRL's generate: its KV cache
            generation = generation_batch * (prompt + completion) * layers * 2 * h * 2
        training = act_bytes(recipe, micro * (prompt + completion), checkpointing)
        training += micro * completion * vocab * 4 * 2  # logits of the completions for the log-probs
        parts["activations"] = max(generation + sampling, training)
    else:
        length = number(recipe, "max_length")
        parts["activations"] = act_bytes(recipe, micro * length, checkpointing)
        if is_dpo(recipe):
            parts["adapter+optimizer"] += reference_adapter_bytes(adapter, shape)
            parts["activations"] = dpo_activation_bytes(recipe, shape, micro, length, checkpointing)
        if int(recipe["preview_steps"] or 0) > 0 and recipe["fast_previews"]:
            # Previews through fast_rollouts: at most 8 prompts (of ~64 tokens) at once.
            preview = fast_sampling_bytes(shape, 8, 64, number(recipe, "preview_max_new_tokens"))
            parts["activations"] = max(parts["activations"], preview)
    peak = sum(parts.values()) / GIB
    need = SLACK_FACTOR * peak + CONTEXT_GIB
    return Estimate(peak, {k: v / GIB for k, v in parts.items()}, need <= gpu_gib, need)


def reference_adapter_bytes(adapter: float, shape: dict) -> float:
    """GRPO's and DPO's second, frozen copy of the loaded adapter (TRL's `ref`, the SFT model
    as reference): fp32 weights only, no gradients or optimizer state."""
    return (adapter - shape["vocab_size"] * shape["hidden_size"] * 4) / 4


def dpo_activation_bytes(recipe: dict, shape: dict, micro: int, length: int, checkpointing: bool) -> float:
    """A DPO micro-batch of `micro` pairs: the chosen and the rejected sequence of each in one
    forward. Without precompute_ref_log_probs the generic layers' reference forward runs (no
    grad) while the policy's graph is held for the backward: one layer's activations without
    checkpointing at a time, and the `ref` adapter's lm_head rows merged into a 16-bit copy of
    lm_head.
    Checked against the DPO peaks measured on an H100 with trl 1.16 (2026-12-06, bf16, 4 pairs
    a step of ~270 tokens a sequence, checkpointing: 4.1-4.3 GiB)."""
    tokens = 2 * micro * length
    training = act_bytes(recipe, tokens, checkpointing)
    if recipe["precompute_ref_log_probs"] or fast_layers(recipe):
        # The fast layers' reference pass keeps nothing a layer beyond its own products and
        # stays under the policy's backward: the same peak both ways (4.236 GiB, T4 recipe, T4
        # mode, H100, 2026-12-06).
        return training
    layer = tokens * act_bytes_per_token(recipe, False) / shape["num_hidden_layers"]
    return training + layer + shape["vocab_size"] * shape["hidden_size"] * 2


CACHE_STEP = 32  # rollouts.CACHE_STEP (not imported: the planner runs before torch loads)


def fast_sampling_bytes(shape: dict, batch: int, prompt: int, new_tokens: int) -> float:
    """rollouts.py while it samples: the policy merged in 16 bits (every linear layer, the
    embedding and lm_head), its KV cache in blocks of CACHE_STEP columns, and the prompt's forward."""
    layers, h, m, vocab = (shape[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"))
    merged = (layers * (4 * h * h + 2 * h * m) + 2 * vocab * h) * 2
    columns = -(-(prompt + new_tokens) // CACHE_STEP) * CACHE_STEP
    prefill = batch * prompt * (4 * h + m) * 2 * 2
    return merged + batch * columns * layers * 2 * h * 2 + prefill


def step_seconds(recipe: dict, micro: int, accumulation: int, checkpointing: bool, gpu: str) -> float:
    fixed, per_token = SPEED[gpu][(fast_layers(recipe), checkpointing)]
    tokens = micro * number(recipe, "max_length") if not is_grpo(recipe) else micro * (
        number(recipe, "max_prompt_tokens") + number(recipe, "max_completion_length"))
    if is_dpo(recipe):  # two sequences a pair; the reference forward: 1.1 against 0.86 s measured (H100)
        tokens *= 2 * (1 if recipe["precompute_ref_log_probs"] else 1.28)
    return accumulation * (fixed + per_token * tokens)


def auto_plan(recipe: dict, gpu_gib: float = 15.0, gpu: str = "t4") -> tuple[dict, Estimate]:
    """The fastest (estimated) micro-batch, accumulation and checkpointing that fit, with
    micro-batch x accumulation equal to the recipe's effective batch."""
    recipe = resolved(recipe)
    if gpu not in SPEED:
        raise InputError(f"--gpu must be one of {sorted(SPEED)}, got {gpu!r}")
    effective = number(recipe, "per_device_train_batch_size") * number(recipe, "gradient_accumulation_steps")
    if is_grpo(recipe):
        generations = number(recipe, "num_generations")
        micros = [m for m in range(1, effective + 1) if effective % m == 0 and m % generations == 0]
    else:
        micros = [m for m in range(1, effective + 1) if effective % m == 0]
    # GRPO's fast rollouts (5x faster steps) and the fast previews hold a 16-bit copy of the
    # policy while they sample; where that can't fit, plain generate is the plan.
    fast = "fast_rollouts" if is_grpo(recipe) else "fast_previews"
    rollouts = [{}, {fast: False}] if recipe[fast] else [{}]
    plans = []
    for extra in rollouts:
        for micro in micros:
            for checkpointing in (False, True):
                plan = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": effective // micro,
                        "gradient_checkpointing": checkpointing, **extra}
                est = estimate({**recipe, **plan}, gpu_gib)
                if est.fits:
                    seconds = step_seconds(recipe, micro, effective // micro, checkpointing, gpu)
                    plans.append((seconds, -micro, plan, est))
        if plans:
            break
    if not plans:
        smallest = estimate({**recipe, **rollouts[-1], "per_device_train_batch_size": min(micros),
                             "gradient_checkpointing": True}, gpu_gib)
        raise InputError(f"nothing fits {gpu_gib:g} GiB at effective batch {effective}: even "
                         f"micro-batch {min(micros)} with checkpointing {smallest.line()}. Lower max_length "
                         "(or max_completion_length), or use a larger GPU")
    _, _, plan, est = min(plans, key=lambda p: (p[0], p[1]))
    return plan, est


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, recipe = read_plan(argv)
    from phi2qlora.args import recipe_path

    config = recipe_path(argv, DEFAULT_RECIPE)
    if args.gpu not in SPEED:
        raise InputError(f"--gpu must be one of {', '.join(sorted(SPEED))}, got {args.gpu!r}")
    est = estimate(recipe, args.gpu_gib)
    print(f"{config}: micro-batch {recipe['per_device_train_batch_size']}, accumulation "
          f"{recipe['gradient_accumulation_steps']}, checkpointing {recipe['gradient_checkpointing']}: "
          f"{est.line()} -> {'fits' if est.fits else 'does NOT fit'} {args.gpu_gib:g} GiB")
    if args.auto:
        plan, best = auto_plan(recipe, args.gpu_gib, args.gpu)
        flags = " ".join(f"--{k} {str(v).lower()}" for k, v in plan.items())
        print(f"auto ({args.gpu}, {args.gpu_gib:g} GiB): {flags}  # {best.line()}")
    return 0 if est.fits or args.auto else 1


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
