"""Rewards for GRPO: obey the prompt's word limit, be concise, end the turn cleanly.

    python rewards.py pairs.jsonl [--out scored.jsonl]   # score prompt/completion pairs by hand

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
    GRPOConfig(reward_weights=[DEFAULT_WEIGHTS[f.func.__name__] for f in reward_funcs], ...)

For each row, the first of these that is known decides:
  1. an `ended` column or kwarg (True / False), as the CLI passes it;
  2. `completion_ids` with `end_token_id` bound: ended iff END's id is in the ids;
  3. END's text in the completion (decoded with the special tokens kept, or typed):
     ended, and only the text before it is the answer.
Otherwise the answer counts as cut off (unverified: not rewarded). `REWARD_FUNCS` unbound
inside TRL would see every answer as cut off; it warns once when that happens.

Reading a limit (parse_word_limit, as_bound): the prompt's words give a relation, made an
inclusive bound n. Strict comparatives exclude N, as English and IFEval do (lm-eval's
NumberOfWords, relation "less than": w < N): "under / less than / fewer than / below /
shorter than N words" is max N-1; "more than / over / longer than / exceeding N" is min
N+1. "at most / no more than / within / up to / maximum / N words or less / limit to N"
is max N; "at least / no fewer than / minimum / N+ / N words or more" is min N; "about /
exactly / roughly / in N words" is about N. A negation in the clause turns the relation
round ("don't use more than 40 words": max 40).

Shapes (w = the answer's words, by common.count_words, IFEval's \\w+ count; n = the bound):
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

import argparse
import functools
import json
import math
import re
import warnings
import zlib
from numbers import Integral, Real
from pathlib import Path

from common import (ASSISTANT, END, PAD, USER, InputError, check_writable, count_words, exit_on_input_error, json_error,
                    one_line_errors, write_jsonl_atomic)

CONCISENESS_TARGET_WORDS = 200
# Below this an answer is too short to be "concise": no credit, or GRPO finds that one word
# and an end of turn maximise every reward (seen on the tiny model).
CONCISENESS_MIN_WORDS = 8
ABOUT_TOLERANCE = (5, 0.10)  # an "about N words" answer may be off by max(5 words, 10% of N)
CHAT_TOKEN_TEXTS = (USER, ASSISTANT, END, PAD)

# ---------------------------------------------------------------------------------------
# Reading the limit from a prompt.
# ---------------------------------------------------------------------------------------
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
          "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fourty fifty sixty seventy eighty ninety".split()
NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)}
NUMBER_WORDS.update({w: 10 * (i + 2) for i, w in enumerate(_TENS[:3])})
NUMBER_WORDS.update({w: 10 * (i + 4) for i, w in enumerate(_TENS[3:])})  # "fourty": a common typo
_SCALES = {"hundred": 100, "thousand": 1000}
MAX_LIMIT_WORDS = 999_999_999  # a bigger number in a prompt is not a word limit

_TOK = r"(?:" + "|".join(sorted([*NUMBER_WORDS, *_SCALES], key=len, reverse=True)) + r")\b"
# At most 12 more number words ("nine hundred and ninety-nine thousand nine hundred and
# ninety-nine" takes 9): unbounded, a long run of them ("one one one ...") cost quadratic time,
# 10 s for 16 KB, as each start in the run scanned to its end.
_NUM_WORDS = rf"(?:an?\s+(?=hundred|thousand))?\b{_TOK}(?:(?:\s+|\s*-\s*)(?:and\s+)?{_TOK}){{0,12}}"
_DIGITS = r"(?<![\w.,])(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?![0-9])"

# Words before the number, and the relation they set between an answer's words w and N.
# Longer phrases first. Strict comparatives ("under", "less than", "fewer than", "below",
# "shorter than"; "more than", "over", "longer than", "exceed(ing)") exclude N itself, as
# English and IFEval (relation "less than": w < N) read them; the others include it.
_PRE = [
    (r"no\s+more\s+than|not\s+more\s+than|no\s+longer\s+than|not\s+longer\s+than|not\s+exceeding"
     r"|not\s+to\s+exceed|at\s+most|within|up\s+to|maximum\s+of|maximum|max|limit\s+of"
     r"|limit(?:ed|ing|s)?(?:\s+[\w']+){0,4}?\s+to|keep(?:\s+[\w']+){0,3}?\s+to", "<="),
    (r"less\s+than|fewer\s+than|shorter\s+than|under|below", "<"),
    (r"no\s+less\s+than|not\s+less\s+than|no\s+fewer\s+than|not\s+fewer\s+than|no\s+shorter\s+than"
     r"|at\s+least|minimum\s+of|minimum|min", ">="),
    (r"more\s+than|longer\s+than|exceeding|exceed|over", ">"),
    (r"exactly|about|around|roughly|approximately|approx|close\s+to|nearly", "about"),
    (r"in", None),  # "in 50 words": about 50, unless a word after says otherwise
]
# After the number: "50 words or less" includes 50, as "or" says.
_POST = [
    (r"or\s+(?:less|fewer|under|below|shorter)|at\s+most|maximum|max|tops|limit|cap", "<="),
    (r"or\s+(?:more|longer|above|over)|at\s+least|minimum|min", ">="),
    (r"or\s+so|exactly", "about"),
]
# "a 50-word summary": a target length, "about"; "a 50-word article" is not ours to write.
_NOUNS = (r"answer|response|reply|summary|explanation|description|essay|story|paragraph|poem"
          r"|overview|introduction|intro|bio|pitch|abstract|statement|note|message|email|post")

LIMIT_RE = re.compile(
    r"(?:\b(?P<pre>" + "|".join(p for p, _ in _PRE) + r")\b\.?[\s:]*)?"
    rf"(?P<num>{_DIGITS}|{_NUM_WORDS})(?P<plus>\+)?"
    r"(?:\s*-\s*|\s+)words?\b"
    r"(?:\s*,?\s*(?P<post>" + "|".join(p for p, _ in _POST) + r")\b"
    rf"|\s+(?P<noun>{_NOUNS})\b)?",
    re.IGNORECASE,
)
_PRE_KIND = [(re.compile(rf"(?:{p})$", re.I), k) for p, k in _PRE]
_POST_KIND = [(re.compile(rf"(?:{p})$", re.I), k) for p, k in _POST]
# A negation just before, in the same clause, turns the relation round: "don't use more
# than 50 words" (not w > 50) is w <= 50, "do not exceed 50 words" the same.
_NEGATED = re.compile(r"(?:\b(?:not|no|never|without)|n['’]t)\b(?:\s+[\w'’]+){0,3}\s*$", re.I)
_CLAUSE_BREAK = re.compile(r".*[.!?;:,\n]", re.S)
_NEGATION = {"<": ">=", "<=": ">", ">": "<=", ">=": "<"}


def as_bound(relation: str, n: int) -> tuple[str, int] | None:
    """THE reading rule, in one place: a relation between the words w and N as the
    inclusive bound every reward, metric and verdict uses. w < N is ("max", N - 1), w <= N
    ("max", N), w >= N ("min", N), w > N ("min", N + 1); "about" stays ("about", N). None
    where no answer of at least one word can obey ("under 1 word") or N is too big."""
    kind, bound = {"<": ("max", n - 1), "<=": ("max", n), ">=": ("min", n), ">": ("min", n + 1),
                   "about": ("about", n)}[relation]
    return (kind, bound) if 1 <= bound <= MAX_LIMIT_WORDS else None


def words_to_number(text: str) -> int | None:
    """'twenty-five' -> 25, 'one hundred and fifty' -> 150, '1,000' -> 1000."""
    text = text.strip().lower()
    if text[:1].isdigit():
        digits = text.replace(",", "")
        return int(digits) if digits.isdigit() and len(digits) <= 9 else None
    total = current = 0
    for tok in re.findall(r"[a-z]+", text):
        if tok in NUMBER_WORDS:
            current += NUMBER_WORDS[tok]
        elif tok == "hundred":
            current = max(current, 1) * 100
        elif tok == "thousand":
            total += max(current, 1) * 1000
            current = 0
        if total + current > MAX_LIMIT_WORDS:
            return None  # "a hundred hundred hundred ... words": no limit, and no float overflow later
    return total + current


def _kind(table, text: str | None) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())
    return next((k for pattern, k in table if pattern.match(text)), None)


def parse_word_limit(text) -> tuple[str, int] | None:
    """The word limit a prompt sets, as an inclusive bound ("max" | "min" | "about", n), or
    None: "under 50 words" is ("max", 49), "at most 50 words" ("max", 50), "more than 50
    words" ("min", 51) (see as_bound; IFEval reads the strict ones the same way).

    Reads the user's last message when given a chat-rendered prompt. When a prompt holds
    several limits the last wins (instructions are appended). Never raises."""
    text = user_message(text)
    found = None
    for m in LIMIT_RE.finditer(text):
        n = words_to_number(m["num"])
        if not n:  # "zero words", or a number too long to be a limit
            continue
        pre = " ".join(m["pre"].lower().split()) if m["pre"] else None
        relation = _kind(_PRE_KIND, pre) or (">=" if m["plus"] else _kind(_POST_KIND, m["post"]))
        if relation is None:
            if pre != "in" and not m["noun"]:
                continue  # "Name 10 words that rhyme": a number of words, not a limit
            relation = "about"
        if relation != "about":
            before = text[max(0, m.start() - 80): m.start()]
            clause = _CLAUSE_BREAK.sub("", before)
            if _NEGATED.search(clause):
                relation = _NEGATION[relation]
        found = as_bound(relation, n) or found
    return found


# ---------------------------------------------------------------------------------------
# Reading prompts and completions of any shape.
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
    for token in CHAT_TOKEN_TEXTS:
        text = text.replace(token, " ")
    return text


def answer_text(completion) -> str:
    """The answer's own text: up to END's text if present, chat tokens' texts removed."""
    text = as_text(completion).split(END, 1)[0]
    for token in CHAT_TOKEN_TEXTS:
        text = text.replace(token, " ")
    return text


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
                    "(TRL strips <|end|> from the text): use rewards.make_reward_funcs(tokenizer)",
                    stacklevel=3,
                )
            flags.append(False)
    return flags


def _valid_limit(value) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, Integral):
            return int(value) if value >= 1 else None
        if isinstance(value, Real) and math.isfinite(value) and value >= 1 and float(value).is_integer():
            return int(value)
    except (ArithmeticError, ValueError, TypeError):  # Fraction(10**400): too big for a float
        pass
    return None


def row_limit(prompt, word_limit=None) -> tuple[str, int] | None:
    """The limit for one row: the one the prompt's text sets (what the model read), else,
    for a prompt whose text sets none, the `word_limit` column as the most words allowed
    ("max", n). data_prep.py writes that column as the text's own bound ("under 50 words":
    49), so the two agree on its rows."""
    try:
        parsed = parse_word_limit(prompt)
    except Exception:  # never let a reward raise
        parsed = None
    if parsed is not None:
        return parsed
    n = _valid_limit(word_limit)
    return None if n is None else ("max", n)


def describe_limit(limit: tuple[str, int]) -> str:
    """("max", 49) -> 'at most 49 words': the bound as people and the verdicts show it."""
    kind, n = limit
    return f"{ {'max': 'at most', 'min': 'at least', 'about': 'about'}[kind]} {n} word{'' if n == 1 else 's'}"


def limit_verdict(prompt, answer) -> str | None:
    """'obeys the limit (at most 49 words)' or 'breaks the limit (...)', for the prompt's
    limit as the rewards read it; None when the prompt sets none. The demo and the
    training previews show it."""
    limit = row_limit(prompt)
    if limit is None:
        return None
    return f"{'obeys' if obeys(limit, answer) else 'breaks'} the limit ({describe_limit(limit)})"


def obeys(limit: tuple[str, int], answer) -> bool:
    """IFEval's strict check of a length instruction, on our inclusive bound: an answer
    whose words (common.count_words, IFEval's \\w+ count) are within it (for "about", within
    ABOUT_TOLERANCE; IFEval has no such relation). One difference: an answer with no word
    never obeys, where IFEval counts a non-blank one ("...", "!!!") as under any maximum: an
    untrained model's symbols would otherwise "obey" every limit."""
    words = count_words(answer_text(answer))
    return words > 0 and limit_score(*limit, words) == 1.0


def _finite(x: float, lo: float = -1.0, hi: float = 1.0) -> float:
    x = float(x)
    return min(hi, max(lo, x)) if math.isfinite(x) else 0.0


# ---------------------------------------------------------------------------------------
# The rewards.
# ---------------------------------------------------------------------------------------
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
    target = target_words if _valid_limit(target_words) else CONCISENESS_TARGET_WORDS
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
DEFAULT_WEIGHTS = {"word_limit_reward": 1.0, "conciseness_reward": 0.3, "format_reward": 0.5}


def make_reward_funcs(tokenizer=None, *, token_ids: dict | None = None, target_words: int | None = None) -> list:
    """REWARD_FUNCS, in order, with the chat tokens' ids bound (functools.partial, which TRL
    names after the wrapped function): from `token_ids` ({END: id, USER: id, ASSISTANT: id},
    as common.chat_token_ids gives) or else from a tokenizer loaded by
    common.load_chat_tokenizer."""
    if token_ids is None:
        if tokenizer is None:
            raise ValueError("make_reward_funcs needs a tokenizer or token_ids")
        from common import chat_token_ids

        token_ids = chat_token_ids(tokenizer)
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and unk in (token_ids[END], token_ids[USER], token_ids[ASSISTANT]):
            raise ValueError("the tokenizer lacks the chat tokens: load it with common.load_chat_tokenizer")
    end_id, roles = token_ids[END], (token_ids[USER], token_ids[ASSISTANT])
    if not all(isinstance(t, int) for t in (end_id, *roles)):
        raise ValueError(f"chat token ids must be ints, got {token_ids}")
    extra = {conciseness_reward: {"target_words": target_words} if target_words else {},
             format_reward: {"role_token_ids": roles}}
    return [functools.partial(f, end_token_id=end_id, **extra.get(f, {})) for f in REWARD_FUNCS]


def score(prompts, completions, completion_ids=None, **kwargs) -> dict[str, list[float]]:
    """Every reward of REWARD_FUNCS on the same rows, by name."""
    return {f.__name__: f(prompts, completions, completion_ids, **kwargs) for f in REWARD_FUNCS}


# ---------------------------------------------------------------------------------------
# CLI: score a JSONL of prompt / completion pairs.
# ---------------------------------------------------------------------------------------
def read_pairs(path: str) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{path}: is a directory, not a file")
    if not p.is_file():
        raise InputError(f"{path}: file not found")
    rows = []
    # Line by line in bytes: a text-mode file decodes 8 KB ahead and blames an earlier line.
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: skip a byte-order mark
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line); "
                                 "save the file as UTF-8") from None
            if line.strip():
                rows.append(check_pair(line, f"{path}:{lineno}"))
    if not rows:
        raise InputError(f"{path}: no rows (each line: {{\"prompt\": ..., \"completion\": ...}})")
    return rows


def check_pair(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: malformed JSON ({json_error(e)})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply to read; each line must be one flat JSON object") from None
    except ValueError:  # Python reads no integer of more than 4,300 digits
        raise InputError(f"{where}: a number in the line is too long to read (over 4,300 digits)") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object with \"prompt\" and \"completion\"")
    for name in ("prompt", "completion"):
        if not isinstance(row.get(name), str):
            got = "missing" if name not in row else f"a {type(row[name]).__name__}"
            raise InputError(f"{where}: field '{name}' must be a string ({got})")
        try:
            row[name].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone "\ud800" escape: it could be neither printed nor written
            raise InputError(f"{where}: field '{name}' holds an unpaired surrogate escape "
                             f"({row[name][e.start]!r} at character {e.start}); fix the escape") from None
    if row.get("ended") is None:
        row["ended"] = True  # someone's own text counts as a finished answer
    elif not isinstance(row["ended"], bool):
        raise InputError(f"{where}: field 'ended' must be true or false, got {json.dumps(row['ended'])}")
    limit = row.get("word_limit")
    if limit is not None and _valid_limit(limit) is None:
        raise InputError(f"{where}: field 'word_limit' must be a whole number of words >= 1 or null, "
                         f"got {json.dumps(limit)}")
    row["word_limit"] = None if limit is None else int(limit)
    return row


def score_rows(rows: list[dict]) -> list[dict]:
    prompts = [r["prompt"] for r in rows]
    completions = [r["completion"] for r in rows]
    columns = {"ended": [r["ended"] for r in rows], "word_limit": [r["word_limit"] for r in rows]}
    rewards = score(prompts, completions, None, **columns)
    compliance = word_limit_compliance(prompts, completions, word_limit=columns["word_limit"])
    out = []
    for i, row in enumerate(rows):
        values = {name: values[i] for name, values in rewards.items()}
        limit = row_limit(row["prompt"], row["word_limit"])
        out.append({
            **row,
            "words": count_words(answer_text(row["completion"])),
            "limit": list(limit) if limit else None,
            "rewards": values,
            "total": sum(DEFAULT_WEIGHTS[name] * v for name, v in values.items()),
            "compliance": compliance[i],
        })
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def format_table(scored: list[dict]) -> str:
    names = [f.__name__ for f in REWARD_FUNCS]
    short = {n: n.replace("_reward", "") for n in names}
    head = f"{'#':>4} {'words':>6} {'limit':>9} {'ended':>5} " + " ".join(f"{short[n]:>11}" for n in names)
    head += f" {'total':>7} {'comply':>6}  prompt"
    lines = [head]

    def fmt(v, width, spec=".2f"):
        return f"{'-' if v is None else format(v, spec):>{width}}"

    for i, r in enumerate(scored, 1):
        limit = f"{r['limit'][0]} {r['limit'][1]}" if r["limit"] else "-"
        prompt = " ".join(user_message(r["prompt"]).split())
        prompt = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        lines.append(
            f"{i:>4} {r['words']:>6} {limit:>9} {'yes' if r['ended'] else 'no':>5} "
            + " ".join(fmt(r["rewards"][n], 11) for n in names)
            + f" {fmt(r['total'], 7)} {fmt(r['compliance'], 6, '.0f')}  {prompt}"
        )
    means = {n: _mean(r["rewards"][n] for r in scored) for n in names}
    lines.append(
        f"{'mean':>4} {fmt(_mean(r['words'] for r in scored), 6, '.1f')} {'':>9} {'':>5} "
        + " ".join(fmt(means[n], 11) for n in names)
        + f" {fmt(_mean(r['total'] for r in scored), 7)} {fmt(_mean(r['compliance'] for r in scored), 6)}"
    )
    weights = ", ".join(f"{short[n]} {DEFAULT_WEIGHTS[n]:g}" for n in names)
    lines.append(f"{len(scored)} rows; total = weighted sum ({weights}); comply: mean over rows with a limit")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        prog="rewards",
        description="Score prompt/completion pairs with the GRPO rewards. Each line: {\"prompt\": str, "
        "\"completion\": str, \"ended\": bool (default true), \"word_limit\": int (optional)}; the prompt may be "
        "the user's message or the chat-rendered prompt.",
    )
    parser.add_argument("pairs", help="JSONL file of prompt/completion pairs")
    parser.add_argument("--out", help="also write the scored rows here (JSONL)")
    one_line_errors(parser, "--help lists the options")  # as every other mistake gets, not argparse's usage block
    args = parser.parse_args(argv)
    if args.out and Path(args.out).resolve() == Path(args.pairs).resolve():
        raise InputError(f"{args.out}: --out is the input file; pick another path")
    if args.out and Path(args.out).is_dir():
        raise InputError(f"{args.out}: --out is a directory; give a file path such as scored.jsonl")
    if args.out:
        check_writable(args.out, "--out")  # before the scoring, not after it
    scored = score_rows(read_pairs(args.pairs))
    print(format_table(scored))
    if args.out:
        write_jsonl_atomic(args.out, scored)
        print(f"wrote {args.out}")
    return scored


if __name__ == "__main__":
    exit_on_input_error(main)
