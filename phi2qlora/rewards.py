"""Rewards for GRPO: obey the prompt's word limit, be concise, end the turn cleanly, and
their weights (`rewards.py` at the top level scores your own pairs with them).

Each reward has TRL's signature, `f(prompts, completions, completion_ids=None, **kwargs)`,
and returns one finite float per completion, whatever it is given (None, non-strings,
unicode, 10k words, mismatched columns): a NaN would poison the group's advantages.

How a reward knows the answer ENDED. GRPOTrainer decodes completions with
`skip_special_tokens=True`, and every chat token (END, USER, ASSISTANT, PAD) is a special
token, so the completion string never holds "<|end|>" (nor a leaked "<|user|>"). TRL cuts
each `completion_ids` row just after the first EOS, and END is the EOS, so a turn ended iff
END's id is in its ids. The ids depend on the tokenizer (50297 for Phi-2, 1002 for the tiny
model), so they are bound with `functools.partial`, which TRL accepts and names by the
wrapped function:

    reward_funcs = make_reward_funcs(tokenizer)          # = REWARD_FUNCS with the chat ids bound
    GRPOConfig(reward_weights=reward_weights(reward_funcs), ...)

For each row, the first of these that is known decides:
  1. an `ended` column or kwarg (True / False), as the CLI passes it;
  2. `completion_ids` with `end_token_id` bound: ended iff END's id is in the ids;
  3. END's text in the completion (decoded with the special tokens kept, or typed):
     ended, and only the text before it is the answer.
Otherwise the answer counts as cut off (unverified: not rewarded). `REWARD_FUNCS` unbound
inside TRL would see every answer as cut off; it warns once when that happens.

How a limit is read from a prompt: phi2qlora/word_limits.py (`as_bound`).

Shapes (w = the answer's words, by word_limits.count_words, IFEval's \\w+ count; n = the bound):
  word_limit_reward, in [-1, 1]; 0.0 when the prompt sets no limit.
    max n:   1 for w <= n, then linear: 0 at 2n, -1 at 3n and beyond (max(-1, 2 - w/n)).
    min n:   1 for w >= n, else 2w/n - 1 (0 at n/2, -1 at 0 words).
    about n: 1 within +-max(5, 10% of n), then 1 - 2d/n for the d words beyond, floor -1.
    An empty answer (no words) gets -1; a cut-off one at most 0 (its length is unknown).
  conciseness_reward, in [-1, 1]: clip(1 - w/target, 0, 1) for a complete answer (target
    CONCISENESS_TARGET_WORDS = 200 by default); 0 under CONCISENESS_MIN_WORDS (8) words,
    too short to count as concise; -1 for an empty or cut-off one.
  format_reward, in [-1, 1]: 1, minus 1 if not ended, minus 1 for a leaked role marker
    (a USER/ASSISTANT token id or text, "User:"/"Assistant:"/"Human:"/"### Instruction:"
    at a line start, text after END), minus up to 1 for runaway repetition; floor -1. An
    empty answer gets -1.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
import zlib
from numbers import Integral

from phi2qlora.chat import ASSISTANT, END, PAD, USER, answer_text, as_text
from phi2qlora.word_limits import ABOUT_TOLERANCE, count_words, obeys, row_limit, valid_limit

CONCISENESS_TARGET_WORDS = 200
# Below this an answer is too short to be "concise": no credit, or GRPO finds that one word
# and an end of turn maximise every reward (seen on the tiny model).
CONCISENESS_MIN_WORDS = 8


def _rows(x) -> list:
    if x is None:
        return []
    if isinstance(x, (str, bytes, dict)):
        return [x]
    try:
        return list(x)
    except TypeError:
        return [x]


def _at(column, i):
    """Row i of a kwargs column, or None when the column is missing, short or not a list."""
    if isinstance(column, (list, tuple)) and i < len(column):
        return column[i]
    return None


def _ids(row) -> list[int] | None:
    """One row of completion_ids as ints (a list, tuple, tensor or array), or None."""
    if row is None or isinstance(row, (str, bytes)):
        return None
    try:
        if hasattr(row, "tolist"):  # a tensor or array
            row = row.tolist()
        return [int(t) for t in row if isinstance(t, Integral) and not isinstance(t, bool)]
    except TypeError:
        return None


_warned_unbound = False


def _ended_flags(completions: list, completion_ids, ended, end_token_id) -> list[bool]:
    global _warned_unbound
    flags = []
    for i, completion in enumerate(completions):
        given = _at(ended, i)
        ids = _ids(_at(completion_ids, i))
        if isinstance(given, (bool, Integral)):
            flags.append(bool(given))
        elif end_token_id is not None and ids is not None:
            flags.append(end_token_id in ids)
        elif END in as_text(completion):
            flags.append(True)
        else:
            if ids is not None and end_token_id is None and not _warned_unbound:
                _warned_unbound = True
                warnings.warn(
                    "rewards: completion_ids were given but no end_token_id, so no answer can be seen to end "
                    "(TRL strips <|end|> from the text): use phi2qlora.rewards.make_reward_funcs(tokenizer)",
                    stacklevel=3,
                )
            flags.append(False)
    return flags



def _finite(x: float, lo: float = -1.0, hi: float = 1.0) -> float:
    x = float(x)
    return min(hi, max(lo, x)) if math.isfinite(x) else 0.0


def limit_score(kind: str, n: int, words: int) -> float:
    """1 when `words` obeys the limit, falling linearly to -1 (see the module docstring)."""
    if kind == "max":
        return 1.0 if words <= n else max(-1.0, 2.0 - words / n)
    if kind == "min":
        return 1.0 if words >= n else 2.0 * words / n - 1.0
    tolerance = max(ABOUT_TOLERANCE[0], ABOUT_TOLERANCE[1] * n)
    beyond = abs(words - n) - tolerance
    return 1.0 if beyond <= 0 else max(-1.0, 1.0 - 2.0 * beyond / n)


def word_limit_reward(prompts=None, completions=None, completion_ids=None, *, word_limit=None, ended=None,
                      end_token_id=None, **kwargs) -> list[float]:
    """Obeying the prompt's word limit, in [-1, 1]; 0.0 for prompts with no limit."""
    completions = _rows(completions)
    prompts = _rows(prompts)
    flags = _ended_flags(completions, completion_ids, ended, end_token_id)
    out = []
    for i, completion in enumerate(completions):
        limit = row_limit(_at(prompts, i), _at(word_limit, i))
        if limit is None:
            out.append(0.0)
            continue
        words = count_words(answer_text(completion))
        score = -1.0 if words == 0 else limit_score(*limit, words)
        out.append(_finite(score if flags[i] else min(score, 0.0)))
    return out


def conciseness_reward(prompts=None, completions=None, completion_ids=None, *, ended=None, end_token_id=None,
                       target_words=None, **kwargs) -> list[float]:
    """Shorter complete answers score higher: clip(1 - words/target, 0, 1), but 0 under
    CONCISENESS_MIN_WORDS; an empty or cut-off answer gets -1, below any complete one."""
    completions = _rows(completions)
    flags = _ended_flags(completions, completion_ids, ended, end_token_id)
    target = target_words if valid_limit(target_words) else CONCISENESS_TARGET_WORDS
    out = []
    for i, completion in enumerate(completions):
        words = count_words(answer_text(completion))
        if words == 0 or not flags[i]:
            out.append(-1.0)
        else:
            out.append(_finite(0.0 if words < CONCISENESS_MIN_WORDS else max(0.0, 1.0 - words / target)))
    return out


_ROLE_LINE = re.compile(
    r"^[ \t>*_#\-]*(?:user|assistant|human|###\s*(?:instruction|response|input))[ \t*_]*:", re.I | re.M)


def leaked_role(completion, ids=None, role_token_ids=()) -> bool:
    """A role marker in the answer: a USER/ASSISTANT token (by id, or by text when decoded
    with special tokens kept), a "User:"-style label at a line start, or text after END."""
    if ids and role_token_ids and any(t in role_token_ids for t in ids):
        return True
    text = as_text(completion)
    if USER in text or ASSISTANT in text:
        return True
    if END in text and text.split(END, 1)[1].strip(" \t\n" + PAD):
        return True
    return bool(_ROLE_LINE.search(answer_text(text)))


def repetition(text: str) -> float:
    """How much of the text repeats itself, in [0, 1]: the larger of the share of repeated
    word 4-grams (a repeated sentence or line shows here too) and, for 300+ characters, how
    far zlib compresses it beyond what prose does (a ratio under 0.25: "!!!!...", "HaHaHa")."""
    words = [w.lower() for w in re.findall(r"\w+", text)]
    scores = [0.0]
    grams = list(zip(words, words[1:], words[2:], words[3:]))
    if len(grams) >= 8:
        scores.append(1.0 - len(set(grams)) / len(grams))
    data = text.encode("utf-8", "replace")
    if len(data) >= 300:
        ratio = len(zlib.compress(data, 6)) / len(data)
        scores.append(min(1.0, max(0.0, (0.25 - ratio) / 0.15)))
    return max(scores)


# No penalty up to 0.3 (the most repetitive reply in data/sample scores 0.18), the full 1 from 0.6.
REPETITION_FREE, REPETITION_FULL = 0.3, 0.6


def format_reward(prompts=None, completions=None, completion_ids=None, *, ended=None, end_token_id=None,
                  role_token_ids=(), **kwargs) -> list[float]:
    """A clean turn, in [-1, 1]: 1 minus 1 if it did not end with END, minus 1 for a leaked
    role marker, minus up to 1 for runaway repetition (floor -1); -1 for an empty answer."""
    completions = _rows(completions)
    flags = _ended_flags(completions, completion_ids, ended, end_token_id)
    roles = set(role_token_ids or ())
    out = []
    for i, completion in enumerate(completions):
        answer = answer_text(completion)
        if count_words(answer) == 0:
            out.append(-1.0)
            continue
        score = 1.0 - (not flags[i]) - leaked_role(completion, _ids(_at(completion_ids, i)), roles)
        rep = repetition(answer)
        score -= min(1.0, max(0.0, (rep - REPETITION_FREE) / (REPETITION_FULL - REPETITION_FREE)))
        out.append(_finite(score))
    return out


def word_limit_compliance(prompts=None, completions=None, word_limit=None, **kwargs) -> list[float | None]:
    """For logging: 1.0 if the answer obeys the prompt's limit (`obeys`: IFEval's strict
    check), 0.0 if not, None where there is no limit. Whether it ended is ignored, as IFEval
    ignores it, so the mean over the limited prompts is IFEval's strict per-prompt accuracy
    for the length instruction (but for answers with no word, which never obey)."""
    completions = _rows(completions)
    prompts = _rows(prompts)
    out = []
    for i, completion in enumerate(completions):
        limit = row_limit(_at(prompts, i), _at(word_limit, i))
        out.append(None if limit is None else float(obeys(limit, completion)))
    return out


REWARD_FUNCS = [word_limit_reward, conciseness_reward, format_reward]
# The one place the weights live: grpo_train.py trains with them (unless a recipe sets
# reward_weights) and evaluate.py and rewards.py total with them. Obeying a stated limit
# matters most; conciseness is a tie-breaker, not a reason to answer in one word.
REWARD_WEIGHTS = {"word_limit_reward": 1.0, "conciseness_reward": 0.3, "format_reward": 0.5}


def reward_weights(reward_funcs=None) -> list[float]:
    """REWARD_WEIGHTS in the order of `reward_funcs` (default REWARD_FUNCS; partials are
    named by the function they wrap, as TRL names them)."""
    funcs = REWARD_FUNCS if reward_funcs is None else reward_funcs
    return [REWARD_WEIGHTS[getattr(f, 'func', f).__name__] for f in funcs]


def weighted_total(means: dict[str, float]) -> float:
    """The weighted sum of each reward's value, as GRPO logs `reward`."""
    return sum(w * means[name] for name, w in REWARD_WEIGHTS.items())


def make_reward_funcs(tokenizer=None, *, token_ids: dict | None = None, target_words: int | None = None) -> list:
    """REWARD_FUNCS, in order, with the chat tokens' ids bound (functools.partial, which TRL
    names after the wrapped function): from `token_ids` ({END: id, USER: id, ASSISTANT: id},
    as chat.chat_token_ids gives) or else from a tokenizer loaded by
    model.load_chat_tokenizer."""
    if token_ids is None:
        if tokenizer is None:
            raise ValueError("make_reward_funcs needs a tokenizer or token_ids")
        from phi2qlora.chat import chat_token_ids

        token_ids = chat_token_ids(tokenizer)
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and unk in (token_ids[END], token_ids[USER], token_ids[ASSISTANT]):
            raise ValueError("the tokenizer lacks the chat tokens: load it with phi2qlora.model.load_chat_tokenizer")
    end_id, roles = token_ids[END], (token_ids[USER], token_ids[ASSISTANT])
    if not all(isinstance(t, int) for t in (end_id, *roles)):
        raise ValueError(f"chat token ids must be ints, got {token_ids}")
    extra = {conciseness_reward: {"target_words": target_words} if target_words else {},
             format_reward: {"role_token_ids": roles}}
    return [functools.partial(f, end_token_id=end_id, **extra.get(f, {})) for f in REWARD_FUNCS]


def score(prompts, completions, completion_ids=None, **kwargs) -> dict[str, list[float]]:
    """Every reward of REWARD_FUNCS on the same rows, by name."""
    return {f.__name__: f(prompts, completions, completion_ids, **kwargs) for f in REWARD_FUNCS}
