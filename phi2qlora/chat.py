"""The chat format: Phi-2 was never chat-tuned, so the project defines its own turns with
four new special tokens, a template for TRL, and the prompts the previews ask. No torch.

Phi-2's tokenizer uses ids up to ~50,295 while its embedding has 51,200 rows, so these
tokens land in existing (unused) rows: no resize."""

from __future__ import annotations

USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"  # end of turn; also the tokenizer's EOS, so generate() and GRPO stop on it
PAD = "<|pad|>"  # distinct from EOS, so padding never masks a real end of turn
CHAT_TOKENS = [USER, ASSISTANT, END, PAD]
ROLE_TOKENS = {"user": USER, "assistant": ASSISTANT}
# Text that the tokenizer turns into a special token: inside a message it would end the
# turn early or start a fake one, so such text is refused (data_prep.py drops it).
RESERVED_TEXT = (*CHAT_TOKENS, "<|endoftext|>")


def reserved_text_in(text: str) -> str | None:
    """The first chat or end-of-document token written out in `text`, if any."""
    return next((t for t in RESERVED_TEXT if t in text), None)


# The same format as `format_chat`, for tokenizer.apply_chat_template. The
# {% generation %} markers let TRL's `assistant_only_loss` put the loss on the
# assistant's words and its end-of-turn token, nothing else.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def format_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render messages as CHAT_TEMPLATE does, without needing a tokenizer."""
    parts = []
    for m in messages:
        if m["role"] not in ROLE_TOKENS:
            raise ValueError(f"unknown role: {m['role']!r} (expected 'user' or 'assistant')")
        parts.append(f"{ROLE_TOKENS[m['role']]}\n{m['content']}{END}\n")
    if add_generation_prompt:
        parts.append(f"{ASSISTANT}\n")
    return "".join(parts)


def format_prompt(prompt: str) -> str:
    """A single user turn, ready for the assistant's answer."""
    return format_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)


def chat_token_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS}


# The preview prompts, one per thing the runs should change: chat style, stopping, a word
# limit, code. The previews, the export check and the demo ask them.
DEFAULT_PROMPTS = [
    "What is the difference between weather and climate?",
    "Explain why the sky is blue in under 50 words.",
    "Write a Python function that checks whether a word is a palindrome.",
    "Give me three tips for a job interview.",
]


# ---------------------------------------------------------------------------------------
# Prompts and completions of any shape, as TRL, the CLI and the tests pass them.
# ---------------------------------------------------------------------------------------
def as_text(x) -> str:
    """A prompt or completion as a string: None is empty; chat messages give their contents."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    if isinstance(x, dict):
        return as_text(x.get("content"))
    if isinstance(x, (list, tuple)):
        return "\n".join(as_text(m) for m in x)
    try:
        return str(x)
    except Exception:
        return ""


def user_message(prompt) -> str:
    """The user's last message: from a chat-rendered prompt, from a list of messages, or
    the raw text itself."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        users = [m for m in prompt if m.get("role") == "user"]
        return as_text(users[-1] if users else prompt[-1])
    text = as_text(prompt)
    if USER in text:
        text = text.rsplit(USER, 1)[1].split(END, 1)[0]
    for token in CHAT_TOKENS:
        text = text.replace(token, " ")
    return text


def answer_text(completion) -> str:
    """The answer's own text: up to END's text if present, chat tokens' texts removed."""
    text = as_text(completion).split(END, 1)[0]
    for token in CHAT_TOKENS:
        text = text.replace(token, " ")
    return text

