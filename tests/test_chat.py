"""phi2qlora/chat.py and word counting: the chat format as text and as the tokenizer's template."""

from __future__ import annotations

import pytest

from phi2qlora.chat import format_chat, format_prompt
from phi2qlora.model import load_chat_tokenizer
from phi2qlora.word_limits import count_words

CONVERSATION = [
    {"role": "user", "content": "Hi! ¿Qué tal? 你好"},
    {"role": "assistant", "content": "Fine.\n```python\nprint(1)\n```"},
    {"role": "user", "content": "And in 5 words?"},
    {"role": "assistant", "content": "Fine, thanks for asking, friend."},
]


def test_format_chat_matches_the_tokenizer_template(tiny_model_dir):
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    for messages, gen in [(CONVERSATION, False), (CONVERSATION[:1], True), (CONVERSATION[:3], True)]:
        assert format_chat(messages, gen) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen)
    assert format_prompt("Hi") == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="unknown role"):
        format_chat([{"role": "system", "content": "x"}])


def test_count_words():
    assert count_words("Hello, world! It's 3.5 km.") == 7
    assert count_words("") == count_words(None) == 0
    assert count_words("¿Qué tal? 你好") == 3
