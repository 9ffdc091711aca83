"""Phi-2's block as the fast paths compute it, in one place: the training layers
(`phi2qlora/fast_training.py`) and the rollout decoder (`phi2qlora/rollouts.py`) both read
their weights and turn their heads here, so the two cannot drift apart.

Phi-2's block is parallel: one LayerNorm output feeds the attention's q, k, v and the MLP's
fc1. Side by side, those four weights are one matrix of 3 x 2560 + 10,240 = 17,920 rows
(`INPUT_PROJECTIONS`), read by one product instead of four. The rotary embedding turns the
first `rotary_dim` (32 of 80) dims of each head; written as one [head_dim, head_dim] matrix a
position it is one batched product for q and k of every head.
"""

from __future__ import annotations

import torch

# The order of the input projections' rows in the side-by-side matrix ("w_in"): [q | k | v | fc1].
INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "fc1")
OUTPUT_PROJECTIONS = ("dense", "fc2")


def architecture_reason(config) -> str | None:
    """Why a model of this config is not Phi-2's block as written here (None when it is)."""
    if config.model_type != "phi":
        return f"model type {config.model_type!r} (only Phi)"
    if getattr(config, "qk_layernorm", False):
        return "qk_layernorm"
    if config.num_key_value_heads != config.num_attention_heads:
        return "grouped key/value heads"
    return None


def input_modules(layer) -> list:
    """A Phi decoder layer's q, k, v and fc1, in `INPUT_PROJECTIONS` order (LoRA-wrapped or not)."""
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, mlp.fc1]


def base_layer(module):
    """The frozen linear layer under a PEFT wrapper (or the module itself)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def is_4bit(module) -> bool:
    return getattr(base_layer(module).weight, "quant_state", None) is not None


def base_weight_into(module, out: torch.Tensor) -> torch.Tensor:
    """Write a linear layer's frozen weight [out_features, in_features] into `out`: the
    bitsandbytes 4-bit weight dequantised (its own kernel, nested scales included), else
    the weight itself. No LoRA: the callers add it their own way."""
    weight = base_layer(module).weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return out.copy_(weight.detach())
    import bitsandbytes.functional as bnbf

    if out.is_cuda and out.dtype == state.dtype and out.is_contiguous():  # bitsandbytes 0.50: no `out` on the CPU
        bnbf.dequantize_4bit(weight.data, state, out=out)
    else:
        out.copy_(bnbf.dequantize_4bit(weight.data, state))
    return out


def base_weights(modules, dtype, device) -> torch.Tensor:
    """The frozen weights of `modules` side by side (stacked rows), one fresh matrix."""
    rows = [base_layer(m).out_features for m in modules]
    out = torch.empty(sum(rows), base_layer(modules[0]).in_features, dtype=dtype, device=device)
    start = 0
    for module, n in zip(modules, rows):
        base_weight_into(module, out[start:start + n])
        start += n
    return out


_ROTATE_HALF: dict = {}


def rotate_half_matrix(rotary_dim: int, dtype, device) -> torch.Tensor:
    """R with x @ R == cat(-x2, x1) over the rotary dims (Phi's `rotate_half`). Built once a
    (size, dtype, device), on the host: the decoder's captured CUDA graphs may ask for it, and
    no host-to-device copy can run inside a capture."""
    key = (rotary_dim, dtype, torch.device(device))
    if key not in _ROTATE_HALF:
        half = rotary_dim // 2
        matrix = torch.zeros(rotary_dim, rotary_dim, dtype=dtype)
        matrix[torch.arange(half, rotary_dim), torch.arange(half)] = -1
        matrix[torch.arange(half), torch.arange(half, rotary_dim)] = 1
        _ROTATE_HALF[key] = matrix.to(device)
    return _ROTATE_HALF[key]


def rotation_matrices(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, dtype) -> torch.Tensor:
    """One [head_dim, head_dim] matrix a position from Phi's rotary `cos` and `sin`
    [..., rotary_dim]: x @ M equals x * cos + rotate_half(x) * sin on the first `rotary_dim`
    dims and leaves the rest as they are. Returns [..., head_dim, head_dim] in `dtype`."""
    rot = cos.shape[-1]
    cos, sin = cos.to(dtype), sin.to(dtype)
    turn = torch.eye(head_dim, dtype=dtype, device=cos.device).expand(*cos.shape[:-1], head_dim, head_dim).clone()
    turn[..., :rot, :rot] = torch.diag_embed(cos) + rotate_half_matrix(rot, dtype, cos.device) * sin[..., None, :]
    return turn


def turn_heads(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """q and k of every head [N, heads, head_dim] turned by their position's matrix
    [N, head_dim, head_dim]: one batched product, read in place from the projection's output."""
    return torch.bmm(x, turn)
