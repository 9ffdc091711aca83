"""Fast sampling from the current policy, for GRPO's rollouts and the previews.

Plain `generate` on the 4-bit model with a LoRA adapter launches about 1,000 small kernels
a token through PEFT's and bitsandbytes' Python wrappers: ~120 ms a decode step on an H100
whatever the batch, 100 times what reading the weights costs (PERFORMANCE.md). This
samples the same distribution another way:

1. The policy as it is now: each 4-bit base weight dequantised (PEFT's own helper) plus
   scaling x B @ A of the active LoRA adapters, and the embedding's and `lm_head`'s
   trainable chat-token rows (`get_merged_weights`), in 16 bits. Rebuilt at every call
   (~35 ms for Phi-2 on an H100), so the tokens always come from this step's weights.
2. Phi's decoder over a static KV cache, written for decoding: q, k, v and fc1 in one
   matrix product (attention and MLP read the same input), the partial rotary embedding as
   one batched product, ~11 kernels a layer. The decode step is captured as a CUDA graph
   (one per 256 cache columns attended) and replayed for every token: no Python per token.
   Its attention is cuDNN's where the GPU has it (an H100: ~30 us a layer against the
   memory-efficient kernel's ~60); its host cost, which made training turn it off, is paid
   once, at capture. 4.5 ms a token at batch 32: 6,200 new tokens/s, 18x plain `generate`.
3. Sampling inside the graph: Gumbel-max on logits / temperature (the same distribution as
   softmax sampling; other sampling settings fall back to TRL), or argmax when greedy.

The 16-bit weights (5.2 GiB for Phi-2) and the cache exist only during the call, so
training keeps its memory. On the CPU the same code runs without the graph: the tests
compare its tokens with plain `generate`'s.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from phi2qlora import phi2

CHECK_DONE_EVERY = 16  # decode steps between the (synchronising) "all answers ended?" checks
CACHE_STEP = 32  # the cache's length rounds up to this (aligned rows for the attention kernel)
# Attention reads the cache up to the next multiple of this: one captured graph per length.
# A capture costs ~16 ms (and a new length a cuDNN plan); 32 more columns attended cost
# ~27 us a step (H100, Phi-2's shape). For GRPO's 128-256 new tokens, one or two graphs:
# 6,204 new tokens/s against 5,662 with a graph every 32 columns (PERFORMANCE.md).
ATTEND_STEP = 256


def _base(model):
    """The transformers model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model, generation: dict) -> str | None:
    """Why the fast path can't reproduce this sampling (None when it can)."""
    base = _base(model)
    if reason := phi2.architecture_reason(base.config):
        return reason
    for module in base.modules():
        for option, name in (("use_dora", "DoRA adapters"), ("lora_bias", "LoRA bias")):
            value = getattr(module, option, None)
            if isinstance(value, dict) and any(value.values()):
                return name
    if generation.get("top_p", 1.0) not in (None, 1.0):
        return f"top_p {generation['top_p']}"
    if generation.get("top_k") not in (None, 0):
        return f"top_k {generation['top_k']}"
    if generation.get("min_p") is not None:
        return f"min_p {generation['min_p']}"
    if generation.get("repetition_penalty", 1.0) not in (None, 1.0):
        return f"repetition_penalty {generation['repetition_penalty']}"
    return None


# ---------------------------------------------------------------------------------------
# 1. The current policy's weights, merged into 16-bit copies
# ---------------------------------------------------------------------------------------
def _merge_linear_into(out, module) -> None:
    """Write a linear layer's effective weight into `out`: the base (dequantised if 4-bit)
    plus scaling x B @ A of each active LoRA adapter, one matrix product each."""
    from peft.tuners.lora import LoraLayer

    phi2.base_weight_into(module, out)
    if isinstance(module, LoraLayer) and not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                out.addmm_(module.lora_B[name].weight.to(out.dtype), module.lora_A[name].weight.to(out.dtype),
                           alpha=module.scaling[name])


def _bias(module, dtype):
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.bias.detach().to(dtype)


def _token_weight(module, dtype):
    """An embedding's or lm_head's weight with the trainable chat-token rows in place."""
    from peft.utils.other import TrainableTokensWrapper

    if isinstance(module, TrainableTokensWrapper):
        layer, base = module.token_adapter, module.original_module
        if layer.disable_adapters or layer.merged or not layer.active_adapters:
            weight = base.weight
        else:
            weight = layer.get_merged_weights(layer.active_adapters)
    else:
        base, weight = module, module.weight
    bias = getattr(base, "bias", None)
    return weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)


@torch.no_grad()
def merged_weights(model, dtype) -> dict:
    """Every weight that decoding reads, as the policy has it now. Phi's attention and MLP
    read the same normalised input, so q, k, v and fc1 are one matrix ("w_in"): one product
    of 92 MB instead of four smaller ones; dense's and fc2's biases are added as one."""
    base = _base(model)
    hidden, inter = base.config.hidden_size, base.config.intermediate_size
    device = base.model.embed_tokens.weight.device
    layers = []
    for layer in base.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        ins = phi2.input_modules(layer)  # [q | k | v | fc1], the training layers' layout too
        w_in = torch.empty(3 * hidden + inter, hidden, dtype=dtype, device=device)
        for i, module in enumerate(ins):
            _merge_linear_into(w_in[i * hidden: i * hidden + module.out_features], module)
        dense = torch.empty(hidden, hidden, dtype=dtype, device=device)
        fc2 = torch.empty(hidden, inter, dtype=dtype, device=device)
        _merge_linear_into(dense, attn.dense)
        _merge_linear_into(fc2, mlp.fc2)
        norm = layer.input_layernorm
        layers.append({"ln": (norm.weight.to(dtype), norm.bias.to(dtype), norm.eps), "w_in": w_in,
                       "b_in": torch.cat([_bias(m, dtype) for m in ins]), "dense_t": dense.t(), "fc2_t": fc2.t(),
                       "b_out": (_bias(attn.dense, torch.float32) + _bias(mlp.fc2, torch.float32)).to(dtype),
                       "act": mlp.activation_fn})
    norm, rotary = base.model.final_layernorm, base.model.rotary_emb
    heads = base.config.num_attention_heads
    return {"layers": layers, "embed": _token_weight(base.model.embed_tokens, dtype)[0],
            "final_ln": (norm.weight.to(dtype), norm.bias.to(dtype), norm.eps),
            "lm_head": _token_weight(base.lm_head, dtype),
            "inv_freq": rotary.inv_freq.float(), "rope_scale": float(getattr(rotary, "attention_scaling", 1.0)),
            "heads": heads, "head_dim": hidden // heads, "hidden": hidden}


# ---------------------------------------------------------------------------------------
# 2. Phi's forward over a static KV cache
# ---------------------------------------------------------------------------------------
def _rotations(positions, w, dtype):
    """The partial rotary embedding as one matrix a position, [N, head_dim, head_dim]
    (`phi2.rotation_matrices`), from Phi's cos and sin at `positions`."""
    freqs = positions.float()[:, None] * w["inv_freq"]
    angles = torch.cat((freqs, freqs), dim=-1)
    return phi2.rotation_matrices(angles.cos() * w["rope_scale"], angles.sin() * w["rope_scale"], w["head_dim"], dtype)


def forward(w: dict, cache: list, tokens, positions, columns, mask, attend: int | None = None):
    """Phi's decoder for `tokens` [B, T] at `positions` [B, T], their keys and values
    written to cache `columns` [T]; attention over the first `attend` cache columns, with
    `mask` [B, 1, T, L] added to the scores. Returns the last position's hidden state after
    the final layer norm, [B, hidden]."""
    heads, head_dim, hidden = w["heads"], w["head_dim"], w["hidden"]
    batch, length = tokens.shape
    rows = batch * length
    attend = attend or cache[0].shape[3]
    x = F.embedding(tokens, w["embed"]).view(rows, hidden)
    turn = _rotations(positions.reshape(rows), w, x.dtype)
    mask = mask[..., :attend]
    for lw, kv in zip(w["layers"], cache):
        y = F.linear(F.layer_norm(x, (hidden,), *lw["ln"]), lw["w_in"], lw["b_in"])  # [q | k | v | fc1]
        qk = phi2.turn_heads(y[:, :2 * hidden].view(rows, 2 * heads, head_dim), turn).view(batch, length, 2, heads, head_dim)
        v = y[:, 2 * hidden: 3 * hidden].view(batch, length, heads, head_dim)
        kv[:, 0].index_copy_(2, columns, qk[:, :, 1].transpose(1, 2))
        kv[:, 1].index_copy_(2, columns, v.transpose(1, 2))
        attn = F.scaled_dot_product_attention(qk[:, :, 0].transpose(1, 2), kv[:, 0, :, :attend],
                                              kv[:, 1, :, :attend], attn_mask=mask)
        x.addmm_(attn.transpose(1, 2).reshape(rows, hidden), lw["dense_t"])  # in place: no copy of x
        x.addmm_(lw["act"](y[:, 3 * hidden:]), lw["fc2_t"])
        x += lw["b_out"]
    return F.layer_norm(x.view(batch, length, hidden)[:, -1], (hidden,), *w["final_ln"])


def pick_tokens(logits, temperature: float):
    """Argmax when greedy; else Gumbel-max, a sample from softmax(logits / temperature)."""
    if not temperature:
        return logits.argmax(-1)
    noise = torch.rand_like(logits).clamp_(min=1e-20)
    return (logits / temperature - torch.log(-torch.log(noise))).argmax(-1)


# ---------------------------------------------------------------------------------------
# 3. Sampling: prefill eagerly, then a captured decode step replayed per token
# ---------------------------------------------------------------------------------------
# The decode step's attention kernels, in order: cuDNN's where the GPU has one (Ampere and
# later; not bitwise deterministic: repeats differ by ~1e-5), else the memory-efficient one.
DECODE_KERNELS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def decode_attention(device):
    """DECODE_KERNELS for the decode steps. cuDNN builds a plan for each new cache length, once
    a process (~0.5 s for the first); the prefill, whose length changes at every call, keeps
    the default kernels. On the CPU, the default kernels (the tests compare against `generate`)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(list(DECODE_KERNELS), set_priority=True)


@torch.no_grad()
def generate(model, input_ids, attention_mask, *, max_new_tokens: int, temperature: float,
             eos_token_ids, pad_token_id: int, dtype=None, use_graph: bool | None = None):
    """New tokens [B, max_new_tokens] for left-padded prompts, sampled from the model as its
    weights are now; after a row's first end token, `pad_token_id`."""
    base = _base(model)
    device = input_ids.device
    dtype = dtype or base.config.dtype or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    w = merged_weights(model, dtype)
    batch, prompt_len = input_ids.shape
    total = -(-(prompt_len + max_new_tokens) // CACHE_STEP) * CACHE_STEP
    heads, head_dim = w["heads"], w["head_dim"]
    cache = [torch.zeros(batch, 2, heads, total, head_dim, device=device, dtype=dtype) for _ in w["layers"]]
    blocked = torch.finfo(dtype).min
    valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    valid[:, :prompt_len] = attention_mask.bool()

    # Prefill: causal over the prompt's real tokens; each position also sees itself, so rows
    # of left padding stay finite (nothing reads them).
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    columns = torch.arange(prompt_len, device=device)
    allowed = valid[:, None, :] & (torch.arange(total, device=device)[None, None, :] <= columns[None, :, None])
    allowed |= torch.arange(total, device=device)[None, None, :] == columns[None, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, blocked)[:, None]
    hidden = forward(w, cache, input_ids, positions, columns, mask)
    logits = F.linear(hidden, *w["lm_head"]).float()

    eos = torch.tensor(list(eos_token_ids), device=device)[None, :]
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    token = pick_tokens(logits, temperature)
    out[:, 0] = token
    done = (token[:, None] == eos).any(-1)
    # The decode state, all on the device so that a replayed graph advances it by itself.
    state = {"token": token[:, None].clone(), "position": positions[:, -1:] + 1,
             "column": torch.tensor([prompt_len], device=device), "step": torch.tensor([1], device=device),
             "done": done, "bias": torch.zeros(batch, 1, 1, total, dtype=dtype, device=device).masked_fill_(
                 ~valid[:, None, None, :], blocked)}

    def decode_step(attend):
        s = state
        s["bias"].index_fill_(3, s["column"], 0)  # the new token sees itself
        h = forward(w, cache, s["token"], s["position"], s["column"], s["bias"], attend)
        nxt = pick_tokens(F.linear(h, *w["lm_head"]).float(), temperature)
        nxt = torch.where(s["done"], torch.full_like(nxt, pad_token_id), nxt)
        out.index_copy_(1, s["step"], nxt[:, None])
        s["done"] |= (nxt[:, None] == eos).any(-1)
        s["token"].copy_(nxt[:, None])
        s["position"].add_(1)
        s["column"].add_(1)
        s["step"].add_(1)

    graphs, pool = {}, None
    with decode_attention(device):
        for step in range(1, max_new_tokens):
            if step % CHECK_DONE_EVERY == 0 and bool(state["done"].all()):
                break
            attend = min(total, -(-(prompt_len + step) // ATTEND_STEP) * ATTEND_STEP)  # this step's column, included
            if not use_graph:
                decode_step(attend)
            elif attend in graphs:
                graphs[attend].replay()
            elif step == 1:  # the warm-up, on a side stream as capture wants
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    decode_step(attend)
                torch.cuda.current_stream().wait_stream(stream)
            else:
                graph = graphs[attend] = torch.cuda.CUDAGraph()
                pool = pool or torch.cuda.graph_pool_handle()  # shared: the graphs never run at once
                with torch.cuda.graph(graph, pool=pool):
                    decode_step(attend)
                graph.replay()
    return out


def generate_or_none(*args, **kwargs):
    """`generate`, or None when its 16-bit weights and cache don't fit beside what the GPU
    already holds (training's memory): the caller falls back to plain `generate`."""
    try:
        return generate(*args, **kwargs)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def completion_lists(new_tokens, eos_token_ids) -> list[list[int]]:
    """Each row up to and including its first end token, as TRL's generation returns them."""
    eos = set(eos_token_ids)
    rows = []
    for row in new_tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
        rows.append(row[: end + 1])
    return rows
