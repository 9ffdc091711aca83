"""Build a tiny Phi-architecture model and tokenizer for offline runs and tests.

Nothing here comes from the hub: a byte-level BPE tokenizer (Phi-2's kind) is trained on
the project's own sample data, and a `PhiForCausalLM` with a few layers is randomly
initialised, then pretrained for a minute on the sample's texts, so that, like Phi-2, it
knows some language but not the chat format. It mirrors what matters about Phi-2 for our code paths: the same
architecture (partial rotary, parallel attention/MLP, biased untied `lm_head`), an
`<|endoftext|>` EOS and no pad token, and spare embedding rows beyond the tokenizer, so
the chat tokens fit without a resize, as they do in Phi-2 (50,295 ids in 51,200 rows).

    python make_tiny_model.py                      # -> outputs/tiny-phi
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from phi2qlora.tiny_tokenizer import SAMPLE, sample_texts, train_tokenizer


@dataclass
class TinyModelArguments:
    output_dir: str = field(default="outputs/tiny-phi", metadata={"help": "where the model and tokenizer go"})
    sample: str = field(default=str(SAMPLE), metadata={"help": "JSONL with a 'text' field to train the tokenizer on"})
    vocab_size: int = field(default=1000, metadata={"help": "BPE vocabulary trained on the sample"})
    seed: int = field(default=0, metadata={"help": "seed of the random initialisation"})
    pretrain_steps: int = field(default=200, metadata={"help": "0: leave the weights random"})


def pretrain(model, tokenizer, texts, steps: int, seq_len: int = 128, batch_size: int = 16, lr: float = 3e-3):
    """Plain next-token training on the texts, each ended by <|endoftext|> (as Phi-2 saw
    documents), so the offline runs start from a model with something to fine-tune."""
    import torch

    ids = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([data[s : s + seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"pretraining step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return loss.item()


def build(output_dir: str | Path, sample: str | Path = SAMPLE, vocab_size: int = 1000, spare_rows: int = 24,
          seed: int = 0, pretrain_steps: int = 200) -> Path:
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    output_dir = Path(output_dir)
    texts = list(sample_texts(Path(sample)))
    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    config = PhiConfig(
        vocab_size=len(tokenizer) + spare_rows,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        partial_rotary_factor=0.4,  # Phi-2's value
        max_position_embeddings=512,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = PhiForCausalLM(config)
    # Phi-2's lm_head bias is far from zero; a zero bias here would hide bugs that drop it.
    with torch.no_grad():
        model.lm_head.bias.normal_(0.0, 1.0)
    if pretrain_steps:
        pretrain(model, tokenizer, texts, pretrain_steps)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    from phi2qlora.args import parse_script_args
    from phi2qlora.files import check_output_apart, check_writable

    args = parse_script_args(TinyModelArguments, sys.argv[1:] if argv is None else argv)
    check_writable(args.output_dir, "--output_dir")
    check_output_apart(args.output_dir, "--output_dir", {"--sample": args.sample})  # model and tokenizer files go there
    path = build(args.output_dir, args.sample, args.vocab_size, seed=args.seed, pretrain_steps=args.pretrain_steps)
    print(f"tiny Phi model and tokenizer written to {path}")
    return path


if __name__ == "__main__":
    from phi2qlora.errors import exit_on_input_error

    exit_on_input_error(main)
