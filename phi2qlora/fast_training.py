"""The fast training path: Phi-2's decoder layer written as what it is, under TRL and PEFT.

The generic path runs each of a layer's six projections through PEFT's LoRA wrapper and
bitsandbytes' 4-bit wrapper: hundreds of small kernels a layer, most of them casts and
copies between fp32 and 16 bits, and ~0.3-0.5 s of host time a micro-step on an H100
(PERFORMANCE.md). This layer computes the same function from the same modules:

- LayerNorm in fp32 (the residual stream stays fp32, as autocast keeps it), cast once;
- q, k, v and fc1 as **one** product over their weights side by side (`phi2.INPUT_PROJECTIONS`),
  their biases too, plus the LoRA terms of all four (one product for the four A matrices
  side by side when no dropout separates their inputs);
- the partial rotary embedding as one batched product (`phi2.rotation_matrices`);
- `scaled_dot_product_attention`, causal without a mask for right-padded batches;
- gelu in one kernel; dense and fc2 with their LoRA; one fp32 residual sum.

The 4-bit base is dequantised at each use (bitsandbytes' kernel) into a 16-bit buffer that
is never saved for backward: the backward dequantises again, as bitsandbytes' own matmul
does. It reads every weight from the modules PEFT and bitsandbytes hold (NF4 base, LoRA A/B
and scaling, active adapter, disabled adapters), so the adapter files, checkpoints, TRL's
`ref` adapter, previews and `accelerate launch` see the same model. Dropout keeps PEFT's
and Phi-2's semantics: LoRA dropout on each projection's input, `resid_pdrop` on the
attention and MLP outputs; on the CPU the masks are drawn in the generic path's order and
are the same masks (tests/test_fast_training.py).

    from phi2qlora.fast_training import use_fast_training
    use_fast_training(trainer.model, "true")   # after the trainer has wrapped the model
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phi2qlora import phi2

MODES = ("auto", "true", "false", "compile")
# `auto` picks the fast path only on CUDA, and only once a GPU check has passed with its
# figures in PERFORMANCE.md ("Fast training layers"). Passed 2026-12-06 on an H100 (torch
# 2.11, transformers 5.17, peft 0.21.0, trl 1.16, bitsandbytes 0.50.2), Phi-2-shaped model:
# 20 optimizer steps' losses within 0.6% of the generic path's in bf16 and 0.004% in T4 mode
# (fp16, 15 GiB cap); the T4 SFT and GRPO recipes 30 finite steps each on the fast layers.
VERIFIED_ON_GPU = True


# ---------------------------------------------------------------------------------------
# Which models the fast layer can train
# ---------------------------------------------------------------------------------------
def _base_model(model):
    """The transformers model under PEFT's wrappers (or the model itself)."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_layers(model) -> list:
    base = _base_model(model)
    return list(getattr(getattr(base, "model", None), "layers", []))


def _projection_reason(module, name: str) -> str | None:
    """Why `module` (one of a layer's six projections) is beyond the fast layer, or None."""
    import torch.nn as nn
    from peft.tuners.lora import LoraLayer

    base = phi2.base_layer(module)
    if isinstance(module, LoraLayer):
        if any(getattr(module, "use_dora", {}).values()):
            return f"DoRA adapters ({name})"
        if any(getattr(module, "lora_bias", {}).values()):
            return f"LoRA bias ({name})"
        if getattr(module, "lora_variant", None):
            return f"a LoRA variant ({name}: {', '.join(type(v).__name__ for v in module.lora_variant.values())})"
        if getattr(module, "fan_in_fan_out", False):
            return f"fan_in_fan_out ({name})"
        for dropout in module.lora_dropout.values():
            if type(dropout) not in (nn.Dropout, nn.Identity):
                return f"a LoRA dropout of type {type(dropout).__name__} ({name})"
    elif hasattr(module, "base_layer"):
        return f"a {type(module).__name__} adapter on {name} (only LoRA)"
    if not isinstance(base, nn.Linear):
        return f"{name} is a {type(base).__name__} (only 16-bit or bitsandbytes 4-bit linear layers)"
    weight = base.weight
    if weight.dtype not in (torch.uint8, torch.float16, torch.bfloat16, torch.float32) or (
            weight.dtype == torch.uint8 and getattr(weight, "quant_state", None) is None):
        return f"{name}'s weight is {weight.dtype} without a 4-bit quantisation state"
    if base.bias is None:
        return f"{name} has no bias (Phi-2's projections all have one)"
    if base.weight.requires_grad or base.bias.requires_grad:
        return f"{name}'s base weight or bias trains (the fast layer keeps the base frozen)"
    return None


def fast_training_reason(model) -> str | None:
    """Why the fast layer can't train `model` as the generic path would (None when it can)."""
    config = _base_model(model).config
    if reason := phi2.architecture_reason(config):
        return reason
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {config._attn_implementation!r} (the fast layer reproduces sdpa's)"
    if getattr(config, "attention_dropout", 0.0):
        return f"attention dropout {config.attention_dropout} (its masks can't be reproduced)"
    layers = decoder_layers(model)
    if not layers:
        return "no decoder layers found"
    for layer in layers:
        modules = dict(zip(phi2.INPUT_PROJECTIONS, phi2.input_modules(layer)))
        modules.update(dense=layer.self_attn.dense, fc2=layer.mlp.fc2)
        for name, module in modules.items():
            if reason := _projection_reason(module, name):
                return reason
    return None


# ---------------------------------------------------------------------------------------
# The frozen base + LoRA product, forward and backward
# ---------------------------------------------------------------------------------------
class _LoRATerm:
    """One adapter on one projection: where its rows of the output lie (which piece of the
    output, and its columns there) and its scale; `noisy`: LoRA dropout on its input."""

    __slots__ = ("piece", "start", "stop", "scale", "noisy")

    def __init__(self, piece, start, stop, scale, noisy):
        self.piece, self.start, self.stop, self.scale, self.noisy = piece, start, stop, scale, noisy


class _FrozenLinearLoRA(torch.autograd.Function):
    """y = x W^T + b + sum over LoRA terms of scale * (x * noise) A^T B^T on their rows of y,
    returned in `pieces` (column counts: q|k, v and fc1 are read by different ops, and each
    is its own contiguous tensor with its own gradient back, not a slice whose gradient
    autograd would pad with zeros and add up).

    W is the frozen base of one or more projections side by side (`modules`), dequantised
    into a 16-bit buffer at each use and never saved: the backward dequantises again. x is
    [N, in] in the compute dtype; A and B are the adapters' (fp32) parameters, used in the
    compute dtype, their gradients returned in their own dtype. Without noise on any term,
    the A products of all terms are one product."""

    @staticmethod
    def forward(ctx, x, bias, modules, pieces, terms, *tensors):
        n = len(terms)
        a_params, b_params, noises = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
        dtype = x.dtype
        weight = phi2.base_weights(modules, dtype, x.device)
        # One product a piece, each into its own contiguous tensor: a column slice of one wide
        # output sends every elementwise kernel reading it (fc1's gelu, forward and backward)
        # down torch's strided, unvectorised path: 36 ms of a 455 ms GPU step on an H200.
        # Split, a step took 17 ms less GPU on an H100 and kept 10% less without checkpointing
        # (PERFORMANCE.md, "Fast training layers", #15).
        outs, rows = [], 0
        for p in pieces:
            outs.append(torch.addmm(bias[rows:rows + p], x, weight[rows:rows + p].t()))
            rows += p
        del weight
        a_mats = [a.to(dtype) for a in a_params]
        b_mats = [b.to(dtype) * t.scale for b, t in zip(b_params, terms)]  # scale folded into B: [out, r], small
        shared = n > 1 and not any(t.noisy for t in terms)
        if shared:  # one product for every A: they all read x
            a_outs = list((x @ torch.cat(a_mats).t()).split([a.shape[0] for a in a_mats], dim=1))
        else:
            noise = iter(noises)
            a_outs = [(x * next(noise) if t.noisy else x) @ a.t() for t, a in zip(terms, a_mats)]
        for term, a_out, b in zip(terms, a_outs, b_mats):
            outs[term.piece][:, term.start:term.stop].addmm_(a_out, b.t())
        ctx.modules, ctx.pieces, ctx.terms, ctx.shared = modules, pieces, terms, shared
        ctx.param_dtypes = [p.dtype for p in tensors[:2 * n]]
        ctx.save_for_backward(x, *a_mats, *b_mats, *a_outs, *noises)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        terms, n = ctx.terms, len(ctx.terms)
        x, *saved = ctx.saved_tensors
        a_mats, b_mats, a_outs, noises = saved[:n], saved[n:2 * n], saved[2 * n:3 * n], saved[3 * n:]
        grads = [g if g is not None else torch.zeros(len(x), p, dtype=x.dtype, device=x.device)
                 for g, p in zip(grads, ctx.pieces)]
        grad_x = None
        if ctx.needs_input_grad[0]:  # x's gradient through the base: one product a piece, summed
            weight = phi2.base_weights(ctx.modules, x.dtype, x.device)
            rows = 0
            for grad, p in zip(grads, ctx.pieces):
                w = weight[rows:rows + p]
                grad_x = grad @ w if grad_x is None else grad_x.addmm_(grad, w)
                rows += p
            del weight
        grads_y = [grads[t.piece][:, t.start:t.stop] for t in terms]
        grads_b = [(gy.t() @ a_out).mul_(t.scale) for t, gy, a_out in zip(terms, grads_y, a_outs)]
        grads_a_out = [gy @ b for gy, b in zip(grads_y, b_mats)]
        if ctx.shared:  # the A products were one: so are their gradients
            grad_a_all = torch.cat(grads_a_out, dim=1)
            grads_a = list((grad_a_all.t() @ x).split([a.shape[0] for a in a_mats]))
            if grad_x is not None:
                grad_x.addmm_(grad_a_all, torch.cat(a_mats))
        else:
            grads_a, noise = [], iter(noises)
            for term, a, grad_a_out in zip(terms, a_mats, grads_a_out):
                mask = next(noise) if term.noisy else None
                grads_a.append(grad_a_out.t() @ (x if mask is None else x * mask))
                if grad_x is not None:
                    if mask is None:
                        grad_x.addmm_(grad_a_out, a)
                    else:
                        grad_x.addcmul_(grad_a_out @ a, mask)
        grads = [g.to(dt) for g, dt in zip(grads_a + grads_b, ctx.param_dtypes)]
        return (grad_x, None, None, None, None, *grads, *([None] * len(noises)))


def _lora_terms(modules, pieces, dropout_noise):
    """The active LoRA terms of `modules` (side by side in that order, the output cut into
    `pieces`) for `_FrozenLinearLoRA`: terms, A params, B params, and their noises in order."""
    from peft.tuners.lora import LoraLayer

    terms, a_params, b_params, noises = [], [], [], []
    piece, piece_start, start = 0, 0, 0
    for module in modules:
        rows = phi2.base_layer(module).out_features
        while start >= piece_start + pieces[piece]:
            piece_start += pieces[piece]
            piece += 1
        if isinstance(module, LoraLayer) and not module.disable_adapters and not module.merged:
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                noise = dropout_noise(module, name)
                terms.append(_LoRATerm(piece, start - piece_start, start - piece_start + rows,
                                       float(module.scaling[name]), noise is not None))
                a_params.append(module.lora_A[name].weight)
                b_params.append(module.lora_B[name].weight)
                if noise is not None:
                    noises.append(noise)
        start += rows
    return terms, a_params, b_params, noises


def _bias(modules, dtype):
    return torch.cat([phi2.base_layer(m).bias.detach() for m in modules]).to(dtype)


def frozen_linear_lora(x, modules, noises_for, pieces=None):
    """x [N, in] through `modules` side by side: base + LoRA. Returns the output [N, sum of
    out_features], or its `pieces` (column counts) as separate tensors."""
    total = sum(phi2.base_layer(m).out_features for m in modules)
    cut = list(pieces or [total])
    terms, a_params, b_params, noises = noises_for(modules, cut)
    outs = _FrozenLinearLoRA.apply(x, _bias(modules, x.dtype), modules, cut, terms, *a_params, *b_params, *noises)
    return outs if pieces else outs[0]


# ---------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------
def _noise(shape, dtype, device, p):
    """Dropout's noise as torch draws it (`empty_like(input).bernoulli_(1 - p).div_(1 - p)`):
    on the CPU, the same RNG calls in the same order give the same masks."""
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p).div_(1 - p)


def _dropout_p(dropout) -> float:
    return dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0


class _Noises:
    """The layer's dropout noises, drawn up front in the generic path's order: q, k, v (LoRA),
    dense (LoRA), the attention's resid_pdrop, fc1 (LoRA), fc2 (LoRA), the MLP's resid_pdrop,
    each projection's adapters in PEFT's order."""

    def __init__(self, layer, shape, inter, dtype, device):
        from peft.tuners.lora import LoraLayer

        self.by_module = {}
        hidden_shape, inter_shape = shape, (*shape[:-1], inter)

        def lora(module, in_shape):
            if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
                return
            for name in module.active_adapters:
                if name in module.lora_A and (p := _dropout_p(module.lora_dropout[name])):
                    self.by_module[(id(module), name)] = _noise(in_shape, dtype, device, p).view(-1, in_shape[-1])

        attn, mlp = layer.self_attn, layer.mlp
        resid_p = _dropout_p(layer.resid_dropout)
        for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.dense):
            lora(module, hidden_shape)
        self.attn_out = _noise(hidden_shape, dtype, device, resid_p).view(-1, shape[-1]) if resid_p else None
        lora(mlp.fc1, hidden_shape)
        lora(mlp.fc2, inter_shape)
        self.mlp_out = _noise(hidden_shape, dtype, device, resid_p).view(-1, shape[-1]) if resid_p else None

    def for_modules(self, modules, pieces):
        return _lora_terms(modules, pieces, lambda module, name: self.by_module.get((id(module), name)))


class _Turns:
    """The rotation matrices of one forward, built once and read by every layer (and by the
    recompute of gradient checkpointing, which passes the same `cos` again)."""

    def __init__(self):
        self.cos, self.turn = None, None

    def get(self, cos, sin, batch, head_dim, dtype):
        if self.cos is not cos or self.turn.dtype != dtype:
            turn = phi2.rotation_matrices(cos, sin, head_dim, dtype)  # [b, T, d, d], b = 1 or batch
            self.cos, self.turn = cos, turn.expand(batch, *turn.shape[1:]).reshape(-1, head_dim, head_dim)
        return self.turn


class FastPhiLayer:
    """The fast forward, mixed in before the model's own decoder-layer class (so gradient
    checkpointing, hooks and the state dict stay the class's). Fills an empty KV cache (a
    prompt's forward); falls back to the generic forward for what it does not do: decode
    steps over a filled cache, attention weights asked for, no rotary input."""

    _fast_turns: _Turns
    _fast_compile = False
    _generic_class: type

    def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                position_embeddings=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.25 / 5.17 names
        if (position_embeddings is None or kwargs.get("output_attentions")
                or (cache is not None and cache.get_seq_length(self.self_attn.layer_idx) > 0)):
            return self._generic_class.forward(self, hidden_states, attention_mask=attention_mask,
                                               position_ids=position_ids, use_cache=use_cache,
                                               position_embeddings=position_embeddings, **kwargs)
        with torch.autocast(hidden_states.device.type, enabled=False):
            return self._fast_forward(hidden_states, attention_mask, position_embeddings, cache)

    def _fast_forward(self, x, attention_mask, position_embeddings, cache=None):
        attn, mlp, norm = self.self_attn, self.mlp, self.input_layernorm
        ops = _COMPILED_OPS if self._fast_compile else _EAGER_OPS
        batch, length, hidden = x.shape
        heads, head_dim = attn.config.num_attention_heads, attn.head_dim
        ins = phi2.input_modules(self)
        dtype = _compute_dtype(ins[0], x)
        inter = phi2.base_layer(mlp.fc1).out_features
        noises = _Noises(self, (batch, length, hidden), inter, dtype, x.device)

        h = ops.norm(x.view(-1, hidden), norm.weight, norm.bias, norm.eps, dtype)
        qk, v, up = frozen_linear_lora(h, ins, noises.for_modules, [2 * hidden, hidden, inter])  # q|k, v, fc1
        cos, sin = position_embeddings
        turn = self._fast_turns.get(cos, sin, batch, head_dim, dtype)
        q, k, v = ops.heads(qk, v, turn, batch, heads, head_dim)
        if cache is not None:  # a forward that fills an empty cache (a prompt before generation)
            k, v = cache.update(k, v, attn.layer_idx)
        a = ops.attend(q, k, v, attention_mask, attn.scaling)
        attn_out = frozen_linear_lora(a, [attn.dense], noises.for_modules)
        mlp_out = frozen_linear_lora(ops.act(mlp.activation_fn, up), [mlp.fc2], noises.for_modules)
        return ops.residual(x, attn_out, mlp_out, noises.attn_out, noises.mlp_out)


# The tensor work between the products, as plain functions: run as they are, or some under
# torch.compile (`--fast_training compile`: `COMPILED_OPS`), where Inductor fuses their elementwise work.
def _norm(x, weight, bias, eps: float, dtype):
    """LayerNorm in fp32 (Phi-2 overflows fp16 there; autocast runs it in fp32 too), cast once."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(dtype)


def _heads(qk, v, turn, batch: int, heads: int, head_dim: int):
    """q and k turned by the rotary matrices (one batched product) and v, each [batch, heads,
    length, head_dim], read in place from the input product's pieces."""
    qk = phi2.turn_heads(qk.view(-1, 2 * heads, head_dim), turn).view(batch, -1, 2, heads, head_dim)
    q, k = qk.unbind(2)  # one gradient back (stacked), not two zero-padded slices added up
    return q.transpose(1, 2), k.transpose(1, 2), v.view(batch, -1, heads, head_dim).transpose(1, 2)


def _attend(q, k, v, mask, scale: float):
    """sdpa with the backbone's own mask; with none (a right-padded batch's was dropped),
    causal: the flash or memory-efficient kernel. Output [N, hidden] for the dense product."""
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return a.transpose(1, 2).reshape(-1, q.shape[1] * q.shape[3])


def _act(activation, x):
    return activation(x)


def _residual(x, attn_out, mlp_out, attn_noise, mlp_noise):
    """x + dropout(attention) + dropout(MLP), summed in fp32 (the residual stream's dtype)."""
    if attn_noise is not None:
        attn_out, mlp_out = attn_out * attn_noise, mlp_out * mlp_noise
    return x + attn_out.view(x.shape) + mlp_out.view(x.shape)


_OPS = dict(norm=_norm, heads=_heads, attend=_attend, act=_act, residual=_residual)
# The ops `--fast_training compile` hands to Inductor: the two where it has work to fuse, the
# fp32 residual stream's conversions (LayerNorm and its cast to 16 bits; the three-way sum
# and, backward, its two casts). The others are one library kernel each already (bmm, sdpa,
# gelu). On an H100 (2026-12-07, PERFORMANCE.md, "Fast training layers", #24-#35) these two
# compiled, with Inductor's worker pool left out (`_compile_in_this_process`), ran 3-4%
# behind the eager layers in the same call (8.1x and 6.25x plain TRL against 8.3x and 6.5x);
# all five compiled saved no more GPU time and took 3x the compiling. Not the default: in T4
# mode their GPU time a token is no lower (63-64 us against 61), so a T4-length run, whose
# pace is the GPU's, has nothing to gain.
COMPILED_OPS = ("norm", "residual")


class _Ops:
    def __init__(self, wrap, names=()):
        for name, fn in _OPS.items():
            setattr(self, name, wrap(fn) if name in names else fn)


_EAGER_OPS = _Ops(lambda fn: fn)


class _LazyCompiledOps:
    """`_Ops` with `names` (`COMPILED_OPS`) under torch.compile, built at first use. Dynamic
    shapes: grouped batches change length at every step, and one compiled graph serves them
    all (no recompiles as lengths or layers change: tests/test_fast_training.py)."""

    def __init__(self, names=COMPILED_OPS):
        self._names = names

    def __getattr__(self, name):
        _compile_in_this_process()
        ops = _Ops(lambda fn: torch.compile(fn, dynamic=True), self._names)
        self.__dict__.update(ops.__dict__)
        return getattr(ops, name)


_COMPILED_OPS = _LazyCompiledOps()


def _compile_in_this_process():
    """Inductor compiles these few small graphs in this process, not in its pool of worker
    processes (torch 2.11's default: one a core). With the pool alive a training step on an
    H100 (2026-12-07, torch 2.11) had a host floor of ~0.6 s: the compiled layers ran at
    17,032 tok/s, against 23,589 with `TORCHINDUCTOR_COMPILE_THREADS=1`, and their two
    graphs compiled in 1.3 s instead of 5 (PERFORMANCE.md, "Fast training layers", #25, #28).
    A value the user set in that variable is kept."""
    import os

    from torch._inductor import config

    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        config.compile_threads = 1


def _compute_dtype(module, x):
    """The dtype the generic path multiplies in: bitsandbytes' compute dtype for a 4-bit
    layer, else the weight's; fp32 activations of an fp32 model stay fp32."""
    base = phi2.base_layer(module)
    if phi2.is_4bit(module):
        return base.compute_dtype or x.dtype
    return base.weight.dtype


# ---------------------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------------------
_FAST_CLASSES: dict[type, type] = {}


def _fast_class(generic: type) -> type:
    if generic not in _FAST_CLASSES:
        _FAST_CLASSES[generic] = type(f"Fast{generic.__name__}", (FastPhiLayer, generic), {"_generic_class": generic})
    return _FAST_CLASSES[generic]


def _drop_mask_if_right_padded(module, args, kwargs):
    """Before the backbone runs: a 2-D attention mask whose rows are all right-padded (ones,
    then zeros) is dropped, so attention runs causal without a mask (flash / memory-efficient
    kernels) and the real tokens see exactly what they saw with it; only pad positions, which
    no loss reads, change. Left padding (GRPO's prompts) keeps its mask. One small
    device-to-host read a forward."""
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2 or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return None
    if mask.shape[1] > 1 and not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None
    kwargs = dict(kwargs, attention_mask=None)
    return args, kwargs


def install(model, compile: bool = False) -> int:
    """Put the fast forward on every decoder layer (no check: see `use_fast_training`)."""
    layers = decoder_layers(model)
    turns = _Turns()
    for layer in layers:
        if not isinstance(layer, FastPhiLayer):
            layer.__class__ = _fast_class(type(layer))
        layer._fast_turns, layer._fast_compile = turns, compile
    backbone = _base_model(model).model
    if getattr(backbone, "_fast_mask_hook", None) is None:
        backbone._fast_mask_hook = backbone.register_forward_pre_hook(_drop_mask_if_right_padded, with_kwargs=True)
    return len(layers)


def uninstall(model) -> None:
    """Back to the generic layers."""
    for layer in decoder_layers(model):
        if isinstance(layer, FastPhiLayer):
            layer.__class__ = layer._generic_class
    backbone = _base_model(model).model
    if getattr(backbone, "_fast_mask_hook", None) is not None:
        backbone._fast_mask_hook.remove()
        backbone._fast_mask_hook = None


def is_installed(model) -> bool:
    return any(isinstance(layer, FastPhiLayer) for layer in decoder_layers(model))


def mode_name(value) -> str:
    """--fast_training's value as a word: a recipe's YAML reads `true` as a boolean."""
    return str(value).lower()


def trains_fast_on_a_gpu(mode) -> bool:
    """Whether a run with this --fast_training trains on the fast layers on a CUDA GPU (for
    memory_plan.py, which plans for a GPU wherever it runs), the model allowing."""
    mode = mode_name(mode)
    return mode in ("true", "compile") or (mode == "auto" and VERIFIED_ON_GPU)


def choose(model, mode: str) -> tuple[bool, str]:
    """Whether the fast layer trains `model` under `mode`, and the line that says why."""
    mode = mode_name(mode)
    if mode not in MODES:
        raise ValueError(f"--fast_training must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "false":
        return False, "generic path (--fast_training false)"
    if mode == "auto":
        if not torch.cuda.is_available():
            return False, "generic path (--fast_training auto: the fast layer is for CUDA; true forces it)"
        if not VERIFIED_ON_GPU:
            return False, ("generic path (--fast_training auto: the fast layer is not yet verified on a GPU; "
                           "true forces it)")
        if reason := fast_training_reason(model):
            return False, f"generic path (--fast_training auto): the fast layer can't train {reason}"
    if reason := fast_training_reason(model):
        return False, f"generic path: the fast layer can't train {reason}"
    return True, "fast Phi-2 layers (phi2qlora/fast_training.py)"


def use_fast_training(model, mode: str = "auto", log=print) -> bool:
    """Install the fast layer on `model` (a PeftModel or a Phi model) where `mode` and the
    model allow it; one line says which path trains and why. Returns True for the fast path."""
    fast, line = choose(model, mode)
    if fast:
        compile = mode_name(mode) == "compile"
        count = install(model, compile=compile)
        line += f": {count} decoder layers" + (", under torch.compile" if compile else "")
    if log is not None:
        log(f"[train] {line}")
    return fast
