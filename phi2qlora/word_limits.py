"""Word limits: counting words as IFEval does, the phrasings the project writes into
prompts, and reading a limit back out of a prompt as one inclusive bound. No torch.

Reading a limit (parse_word_limit, as_bound): the prompt's words give a relation, made an
inclusive bound n. Strict comparatives exclude N, as English and IFEval do (lm-eval's
NumberOfWords, relation "less than": w < N): "under / less than / fewer than / below /
shorter than N words" is max N-1; "more than / over / longer than / exceeding N" is min
N+1. "at most / no more than / within / up to / maximum / N words or less / limit to N"
is max N; "at least / no fewer than / minimum / N+ / N words or more" is min N; "about /
exactly / roughly / in N words" is about N. A negation in the clause turns the relation
round ("don't use more than 40 words": max 40)."""

from __future__ import annotations

import functools
import math
import re
from numbers import Integral, Real

from phi2qlora.chat import answer_text, user_message

_WORD = re.compile(r"\w+")


def count_words(text: str | None) -> int:
    """Words as IFEval counts them: runs of word characters (nltk's RegexpTokenizer(r'\\w+'))."""
    return len(_WORD.findall(text or ""))


def with_instruction(prompt: str, instruction: str) -> str:
    """A prompt with an instruction such as "Answer in under 50 words." added: after a space
    when the prompt is one finished sentence, else on its own line. After code or a list it
    reads better there, and after a sentence with no closing mark it must be: parse_word_limit
    reads "Is it safe or not Use at most 20 words." as a negated limit, "at least 20 words"."""
    sep = " " if "\n" not in prompt and prompt.endswith((".", "!", "?")) else "\n\n"
    return f"{prompt}{sep}{instruction}"


# Word-limit instructions for GRPO prompts, held-out prompts and concise SFT examples
# (data_prep.py). Varied, so the policy learns to read the limit rather than one fixed
# sentence. Each holds `{n}` exactly once. parse_word_limit reads them (tested against
# IFEval's check): the strict ones ("under", "less than", "fewer than") allow at most n-1
# words, the others at most n; a row's `word_limit` is that bound, the most words that obey.
WORD_LIMIT_TEMPLATES = [
    "Answer in under {n} words.",
    "Please keep it to no more than {n} words.",
    "Answer with less than {n} words.",
    "Keep it within {n} words.",
    "Respond in fewer than {n} words.",
    "Use at most {n} words.",
    "(Max {n} words.)",
    "Reply in {n} words or less.",
    "Keep your answer under {n} words.",
    "Limit your response to {n} words.",
]
WORD_LIMITS = (20, 25, 30, 40, 50, 60, 75, 80, 100, 120, 150)
# The phrasing the demo appends for its word limit N: one GRPO was rewarded for obeying (one
# of the templates, tested), and inclusive, so N words obey the limit N ("under N" is at
# most N-1, as IFEval reads it).
LIMIT_INSTRUCTION = "Use at most {n} words."

ABOUT_TOLERANCE = (5, 0.10)  # an "about N words" answer may be off by max(5 words, 10% of N)


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



def valid_limit(value) -> int | None:
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
    n = valid_limit(word_limit)
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
    whose words (count_words, IFEval's \\w+ count) are within it (for "about", within
    ABOUT_TOLERANCE; IFEval has no such relation). One difference: an answer with no word
    never obeys, where IFEval counts a non-blank one ("...", "!!!") as under any maximum: an
    untrained model's symbols would otherwise "obey" every limit."""
    words = count_words(answer_text(answer))
    return words > 0 and within(limit, words)


def within(limit: tuple[str, int], words: int) -> bool:
    """Whether `words` words keep the bound (the word-limit reward's full score)."""
    kind, n = limit
    if kind == "max":
        return words <= n
    if kind == "min":
        return words >= n
    return abs(words - n) <= max(ABOUT_TOLERANCE[0], ABOUT_TOLERANCE[1] * n)


@functools.lru_cache(maxsize=None)  # data_prep asks it for every pair and example, of a few dozen (template, n)
def limit_of(template: str, n: int) -> int:
    """The most words that obey `template` with `n`, as the rewards read it ("under 50": 49)."""
    kind, bound = parse_word_limit(template.format(n=n))
    assert kind == "max", template  # every template is a limit from above (tested)
    return bound
