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

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

SAMPLE = Path(__file__).parent / "data" / "sample" / "oasst1_sample.jsonl"
EOS = "<|endoftext|>"


def sample_texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Phi-2's tokenizer: bos = eos = unk = <|endoftext|>, no pad token.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=2048
    )


def pretrain(model, tokenizer, texts, steps: int, seq_len: int = 128, batch_size: int = 16, lr: float = 3e-3):
    """Plain next-token training on the texts, each ended by <|endoftext|> (as Phi-2 saw
    documents), so the offline runs start from a model with something to fine-tune."""
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="outputs/tiny-phi")
    parser.add_argument("--sample", default=str(SAMPLE), help="JSONL with a 'text' field to train the tokenizer on")
    parser.add_argument("--vocab_size", type=int, default=1000, help="BPE vocabulary trained on the sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_steps", type=int, default=200, help="0: leave the weights random")
    from common import check_writable, exit_on_input_error, one_line_errors

    def main():
        args = one_line_errors(parser, "--help lists the options").parse_args()
        check_writable(args.output_dir, "--output_dir")
        path = build(args.output_dir, args.sample, args.vocab_size, seed=args.seed,
                     pretrain_steps=args.pretrain_steps)
        print(f"tiny Phi model and tokenizer written to {path}")

    exit_on_input_error(main)
