"""Fast sampling from the current policy, for GRPO's rollouts.

Plain `generate` on the 4-bit model with a LoRA adapter runs about 1,000 small kernels a
token through PEFT's and bitsandbytes' Python wrappers: ~100-150 ms a decode step on an
H100 whatever the batch, 100 to 300 times what reading the weights costs (PERFORMANCE.md).
This does the same sampling another way:

1. The policy as it is now: each 4-bit base weight dequantised (PEFT's own helper) plus its
   LoRA delta (`get_delta_weight`), q/k/v fused into one matrix, the trainable chat-token
   rows of the embedding and `lm_head` merged (`get_merged_weights`). 16-bit, rebuilt at
   every call, so the tokens always come from this step's adapter weights.
2. A static KV cache and a decode step of ~14 kernels a layer, Phi's own computation
   (parallel attention and MLP, partial rotary, the model's activation), captured once as a
   CUDA graph and replayed for every token: no Python in the loop.
3. Sampling inside the graph: Gumbel-max on logits / temperature (the same distribution as
   softmax sampling), or argmax when greedy.

Everything is freed when the call returns: the 16-bit weights (5.2 GiB for Phi-2) and the
cache exist only while rollouts run, so training keeps its memory. On the CPU the same
code runs without the graph (the tests compare it with plain `generate`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

CHECK_DONE_EVERY = 16  # decode steps between the (synchronising) "all answers ended?" checks


def unsupported_reason(model, generation: dict) -> str | None:
    """Why the fast path can't reproduce this sampling (None when it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type != "phi":
        return f"model type {config.model_type!r} (only Phi)"
    if getattr(config, "qk_layernorm", False):
        return "qk_layernorm"
    if config.num_key_value_heads != config.num_attention_heads:
        return "grouped key/value heads"
    for module in base.modules():
        use_dora = getattr(module, "use_dora", None)
        if isinstance(use_dora, dict) and any(use_dora.values()):
            return "DoRA adapters"
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
def _linear_weight(module, dtype):
    """A linear layer's effective weight and bias: the base (dequantised if 4-bit) plus the
    deltas of the active LoRA adapters."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    base = module.get_base_layer() if isinstance(module, LoraLayer) else module
    weight = dequantize_module_weight(base).to(dtype=torch.float32, copy=True)
    if isinstance(module, LoraLayer) and not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name in module.lora_A:
                weight += module.get_delta_weight(name).float()
    return weight.to(dtype), None if base.bias is None else base.bias.detach().to(dtype)


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
    """Every weight that decoding reads, as the policy has it now."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = []
    for layer in base.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [_linear_weight(m, dtype) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        layers.append({
            "ln": (layer.input_layernorm.weight.to(dtype), layer.input_layernorm.bias.to(dtype),
                   layer.input_layernorm.eps),
            "qkv": (torch.cat([w for w, _ in qkv]), torch.cat([b for _, b in qkv])),
            "dense": _linear_weight(attn.dense, dtype),
            "fc1": _linear_weight(mlp.fc1, dtype),
            "fc2": _linear_weight(mlp.fc2, dtype),
            "act": mlp.activation_fn,
        })
    norm = base.model.final_layernorm
    rotary = base.model.rotary_emb
    return {"layers": layers, "embed": _token_weight(base.model.embed_tokens, dtype)[0],
            "final_ln": (norm.weight.to(dtype), norm.bias.to(dtype), norm.eps),
            "lm_head": _token_weight(base.lm_head, dtype),
            "inv_freq": rotary.inv_freq.float(), "rope_scale": float(getattr(rotary, "attention_scaling", 1.0)),
            "heads": base.config.num_attention_heads, "head_dim": layers[0]["qkv"][0].shape[1] // base.config.num_attention_heads,
            "rotary_dim": 2 * rotary.inv_freq.numel()}


# ---------------------------------------------------------------------------------------
# 2. Phi's forward over a static KV cache
# ---------------------------------------------------------------------------------------
def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def forward(w: dict, cache: list, tokens, positions, columns, mask):
    """Phi's decoder for `tokens` [B, T] at `positions` [B, T], their keys and values
    written to cache `columns` [T]; `mask` [B, 1, T, L] is added to the attention scores.
    Returns the last position's hidden state after the final layer norm, [B, hidden]."""
    heads, head_dim, rot = w["heads"], w["head_dim"], w["rotary_dim"]
    batch, length = tokens.shape
    x = F.embedding(tokens, w["embed"])
    freqs = positions.float()[..., None] * w["inv_freq"]
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = (angles.cos() * w["rope_scale"]).to(x.dtype)[:, :, None, None, :]
    sin = (angles.sin() * w["rope_scale"]).to(x.dtype)[:, :, None, None, :]
    for lw, kv_cache in zip(w["layers"], cache):
        h = F.layer_norm(x, (x.shape[-1],), *lw["ln"])
        qkv = F.linear(h, *lw["qkv"]).view(batch, length, 3, heads, head_dim)
        qk_rot = qkv[:, :, :2, :, :rot]
        qk_rot.copy_(_rotate(qk_rot, cos, sin))
        kv_cache.index_copy_(3, columns, qkv[:, :, 1:].permute(0, 2, 3, 1, 4))  # [B, 2, H, T, D]
        q = qkv[:, :, 0].transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, kv_cache[:, 0], kv_cache[:, 1], attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(batch, length, heads * head_dim)
        mlp = F.linear(lw["act"](F.linear(h, *lw["fc1"])), *lw["fc2"])
        x = x + F.linear(attn, *lw["dense"]) + mlp
    return F.layer_norm(x[:, -1], (x.shape[-1],), *w["final_ln"])


def pick_tokens(logits, temperature: float):
    """Argmax when greedy; else Gumbel-max, a sample from softmax(logits / temperature)."""
    if not temperature:
        return logits.argmax(-1)
    noise = torch.rand_like(logits).clamp_(min=1e-20)
    return (logits / temperature - torch.log(-torch.log(noise))).argmax(-1)


# ---------------------------------------------------------------------------------------
# 3. Sampling: prefill eagerly, then one captured decode step replayed per token
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, input_ids, attention_mask, *, max_new_tokens: int, temperature: float,
             eos_token_ids, pad_token_id: int, dtype=None, use_graph: bool | None = None):
    """New tokens [B, max_new_tokens] for left-padded prompts, sampled from the model as its
    weights are now; after a row's first end token, `pad_token_id`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = input_ids.device
    dtype = dtype or base.config.dtype or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    use_graph = device.type == "cuda" if use_graph is None else use_graph
    w = merged_weights(model, dtype)
    batch, prompt_len = input_ids.shape
    total = -(-(prompt_len + max_new_tokens) // 16) * 16  # aligned: the memory-efficient sdpa kernel takes the mask
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

    def decode_step():
        s = state
        s["bias"].index_fill_(3, s["column"], 0)  # the new token sees itself
        h = forward(w, cache, s["token"], s["position"], s["column"], s["bias"])
        nxt = pick_tokens(F.linear(h, *w["lm_head"]).float(), temperature)
        nxt = torch.where(s["done"], torch.full_like(nxt, pad_token_id), nxt)
        out.index_copy_(1, s["step"], nxt[:, None])
        s["done"] |= (nxt[:, None] == eos).any(-1)
        s["token"].copy_(nxt[:, None])
        s["position"].add_(1)
        s["column"].add_(1)
        s["step"].add_(1)

    graph = None
    for step in range(1, max_new_tokens):
        if step % CHECK_DONE_EVERY == 0 and bool(state["done"].all()):
            break
        if graph is not None:
            graph.replay()
        elif use_graph and step >= 2:  # step 1 ran eagerly: that was the warm-up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                decode_step()
            graph.replay()
        else:
            stream = torch.cuda.Stream() if use_graph else None
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                decode_step()
            if stream is not None:
                torch.cuda.current_stream().wait_stream(stream)
    del graph, cache, w
    return out


def completion_lists(new_tokens, eos_token_ids) -> list[list[int]]:
    """Each row up to and including its first end token, as TRL's generation returns them."""
    eos = set(eos_token_ids)
    rows = []
    for row in new_tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
        rows.append(row[: end + 1])
    return rows
