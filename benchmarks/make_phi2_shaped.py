"""A randomly initialised model of Phi-2's exact shape, for GPU runs without the hub.

Phi-2's weights can't be fetched here, so speed, memory and fp16 checks use this model:
PhiConfig with vocab 51,200, hidden 2,560, MLP 10,240, 32 layers, 32 heads, partial
rotary 0.4, saved in fp16 safetensors with a tokenizer that has spare rows for the chat
tokens (the tiny model's BPE tokenizer: more tokens a text than Phi-2's, so sequences
are if anything longer). Random weights are not Phi-2's activations: this checks shapes,
memory, speed and the fp16 code path, not Phi-2's numerics.

    python benchmarks/make_phi2_shaped.py /tmp/phi2-shaped
"""

import sys
from pathlib import Path

import torch
from transformers import PhiConfig, PhiForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from phi2qlora.tiny_tokenizer import sample_texts, train_tokenizer  # noqa: E402

PHI2 = dict(vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
            num_attention_heads=32, partial_rotary_factor=0.4, max_position_embeddings=2048,
            layer_norm_eps=1e-5, resid_pdrop=0.1, tie_word_embeddings=False)


def build(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    tokenizer = train_tokenizer(sample_texts(), 1000)
    config = PhiConfig(**PHI2, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = PhiForCausalLM(config).half()
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    print(f"Phi-2-shaped model ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params) in {output_dir}")
    return output_dir


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else "outputs/phi2-shaped")
