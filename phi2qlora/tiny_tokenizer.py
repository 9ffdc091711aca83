"""The offline stand-in for Phi-2's tokenizer: byte-level BPE trained on the project's own
sample data, with Phi-2's special-token setup (bos = eos = unk = <|endoftext|>, no pad).
make_tiny_model.py and benchmarks/make_phi2_shaped.py build their models on it."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample" / "oasst1_sample.jsonl"
EOS = "<|endoftext|>"


def sample_texts(path: str | Path = SAMPLE):
    """The `text` field of each line of the project's sample (or another JSONL file)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer (Phi-2's kind: GPT-2's byte-level pre-tokenizer and
    decoder), trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
