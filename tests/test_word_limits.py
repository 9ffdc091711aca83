"""phi2qlora/word_limits.py: every phrasing the project writes and the ones people type, read as
IFEval reads them."""

from __future__ import annotations

import random
import re

import pytest

import data_prep
from phi2qlora.chat import ASSISTANT, END, USER, format_prompt
from phi2qlora.rewards import (
    word_limit_compliance,
)
from phi2qlora.word_limits import (
    LIMIT_INSTRUCTION,
    WORD_LIMIT_TEMPLATES,
    WORD_LIMITS,
    parse_word_limit,
    row_limit,
    words_to_number,
)


def words(n: int, word: str = "word") -> str:
    """n distinct-ish words, so the text is not 'repetitive'."""
    return " ".join(f"{word}{i}" for i in range(n)) + "."


# ---------------------------------------------------------------------------------------
# parse_word_limit
# ---------------------------------------------------------------------------------------
# data_prep's phrasings and whether each is strict ("under 50 words": 49 at most), by hand.
STRICT_TEMPLATES = {"Answer in under {n} words.", "Answer with less than {n} words.", "Respond in fewer than {n} words.",
                    "Keep your answer under {n} words."}


@pytest.mark.parametrize("template", WORD_LIMIT_TEMPLATES)
@pytest.mark.parametrize("n", [2, 7, 20, 50, 75, 150, 1000])
def test_every_data_prep_template_parses(template, n):
    instruction = template.format(n=n)
    expected = ("max", n - 1 if template in STRICT_TEMPLATES else n)
    assert parse_word_limit(instruction) == expected
    # As data_prep appends it, after a prompt that has numbers of its own, and chat-rendered.
    for prompt in (f"List 3 uses of Python 2 and 3. {instruction}", f"Fix this:\n\nx = 5\n\n{instruction}"):
        assert parse_word_limit(prompt) == expected
        assert parse_word_limit(format_prompt(prompt)) == expected


def test_data_prep_rows_parse_to_their_word_limit():
    trees = [({"text": f"Question {i}: why is the sky blue?" + ("\nwith code" if i % 2 else "")}, []) for i in range(200)]
    rows = data_prep.prompt_rows(trees, 0.5, random.Random(0))
    limited = [r for r in rows if r["word_limit"] is not None]
    assert len(limited) == 100
    for r in rows:
        expected = ("max", r["word_limit"]) if r["word_limit"] else None
        assert parse_word_limit(r["prompt"]) == expected, r["prompt"]
        assert row_limit(r["prompt"], r["word_limit"]) == expected


TYPED = [
    ("Explain photosynthesis in under 50 words.", ("max", 49)),  # strict: 50 words is not under 50
    ("Describe Rome in less than fifty words", ("max", 49)),
    ("Use fewer than twenty-five words.", ("max", 24)),
    ("Keep it below 30 words.", ("max", 29)),
    ("Make it shorter than 12 words", ("max", 11)),
    ("Summarize, no more than one hundred words", ("max", 100)),
    ("NOT MORE THAN 30 WORDS!", ("max", 30)),
    ("Reply with at most 1 word", ("max", 1)),
    ("within one hundred and fifty words", ("max", 150)),
    ("Maximum 80 words.", ("max", 80)),
    ("maximum of 40 words", ("max", 40)),
    ("max: 60 words", ("max", 60)),
    ("You can use up to 200 words.", ("max", 200)),
    ("Answer in 30 words or less", ("max", 30)),
    ("Answer in 30 words or fewer", ("max", 30)),
    ("Reply in 45 words or under.", ("max", 45)),
    ("75 words max", ("max", 75)),
    ("There is a 50-word limit.", ("max", 50)),
    ("Stay under a 100 word limit", ("max", 100)),
    ("Limit it to sixty words.", ("max", 60)),
    ("Don't use more than 40 words.", ("max", 40)),
    ("Do not exceed 120 words", ("max", 120)),
    ("Write a story of at least 300 words.", ("min", 300)),
    ("No fewer than 100 words, please.", ("min", 100)),
    ("Write more than 500 words about it", ("min", 501)),
    ("Write over 200 words", ("min", 201)),
    ("Don't write under 40 words.", ("min", 40)),                # not (w < 40)
    ("Do not use fewer than 40 words.", ("min", 40)),
    ("Never use more than 40 words.", ("max", 40)),              # not (w > 40)
    ("Write 1,000 words or more.", ("min", 1000)),
    ("50+ words", ("min", 50)),
    ("Minimum 200 words", ("min", 200)),
    ("Describe it in exactly twenty words.", ("about", 20)),
    ("about 100 words", ("about", 100)),
    ("Around 60 words would be ideal", ("about", 60)),
    ("roughly 40 words", ("about", 40)),
    ("Approximately 250 words.", ("about", 250)),
    ("Write a 50-word summary of this 900-word text.", ("about", 50)),
    ("Say it in three words.", ("about", 3)),
    ("Describe yourself in one word", ("about", 1)),
    ("in under 1 WORD", None),                                   # no answer with a word obeys it
    ("Explain it. Then answer again in under 20 words.", ("max", 19)),  # the last limit wins
    ("at least 100 words but under 200 words", ("max", 199)),
]


@pytest.mark.parametrize("text, expected", TYPED)
def test_typed_phrasings(text, expected):
    assert parse_word_limit(text) == expected


@pytest.mark.parametrize("text", [
    "Name 3 fruits.",
    "Explain it in 5 sentences.",
    "What are 10 words that rhyme with cat?",
    "Translate these 4 words: hola, adios, gracias, perro.",
    "I read a 500-word article yesterday; what do you think?",
    "Give me the first 100 words of the Bible.",
    "Answer in under 20 seconds",
    "It costs 2.5 words per token",
    "in zero words",
    "a 1234567890123-word limit",  # too long to be a limit
    "words words words 50",
    "",
    "Why is the sky blue?",
])
def test_no_limit(text):
    assert parse_word_limit(text) is None


def test_only_the_last_user_message_of_a_chat_prompt_counts():
    chat = (f"{USER}\nHow long is a tweet?{END}\n{ASSISTANT}\nUnder 50 words, usually.{END}\n"
            f"{USER}\nWhy?{END}\n{ASSISTANT}\n")
    assert parse_word_limit(chat) is None
    assert parse_word_limit(chat.replace("Why?", "Why? Answer in at most 9 words.")) == ("max", 9)
    assert parse_word_limit([{"role": "user", "content": "Reply in 30 words or less"},
                                     {"role": "assistant", "content": "Over 100 words."}]) == ("max", 30)


def test_number_words():
    for text, n in [("one", 1), ("twelve", 12), ("twenty-five", 25), ("twenty five", 25), ("ninety-nine", 99),
                    ("one hundred", 100), ("a hundred", 100), ("two hundred and fifty", 250),
                    ("one thousand", 1000), ("1,500", 1500), ("42", 42)]:
        assert words_to_number(text) == n
        assert parse_word_limit(f"at most {text} words") == ("max", n)
        assert parse_word_limit(f"under {text} words") == (("max", n - 1) if n > 1 else None)


# ---------------------------------------------------------------------------------------
# Agreement with IFEval's length check
# ---------------------------------------------------------------------------------------
def ifeval_follows(response: str, relation: str, num_words: int) -> bool:
    """IFEval's strict check of "length_constraints:number_words" as lm-eval 0.4.13 has it
    (lm_eval/tasks/ifeval: utils.test_instruction_following_strict, instructions.NumberOfWords
    .check_following, instructions_util.count_words): a non-blank response whose count of
    nltk RegexpTokenizer(r"\\w+") tokens is < num_words ("less than") or >= num_words ("at least")."""
    count = len(re.findall(r"\w+", response))
    return bool(response.strip()) and (count < num_words if relation == "less than" else count >= num_words)


# Each phrasing with the IFEval instruction it means, written by hand: (relation, d) is
# IFEval's relation with num_words = N + d. "under N" is "less than N"; "at most N" is
# "less than N + 1"; "more than N" is "at least N + 1".
PROJECT_PHRASINGS = {
    "Answer in under {n} words.": ("less than", 0),
    "Please keep it to no more than {n} words.": ("less than", 1),
    "Answer with less than {n} words.": ("less than", 0),
    "Keep it within {n} words.": ("less than", 1),
    "Respond in fewer than {n} words.": ("less than", 0),
    "Use at most {n} words.": ("less than", 1),
    "(Max {n} words.)": ("less than", 1),
    "Reply in {n} words or less.": ("less than", 1),
    "Keep your answer under {n} words.": ("less than", 0),
    "Limit your response to {n} words.": ("less than", 1),
}


OTHER_PHRASINGS = {
    "Answer with at least {n} words.": ("at least", 0),  # IFEval's own two descriptions
    "Answer with less than {n} words.": ("less than", 0),
    "Your response should contain less than {n} words.": ("less than", 0),
    "Your entire response should contain at least {n} words.": ("at least", 0),
    "Please answer in fewer than {n} words": ("less than", 0),
    "Keep it below {n} words.": ("less than", 0),
    "Make it shorter than {n} words.": ("less than", 0),
    "Write more than {n} words.": ("at least", 1),
    "Use over {n} words": ("at least", 1),
    "Don't use more than {n} words.": ("less than", 1),
    "Do not exceed {n} words.": ("less than", 1),
    "Don't write under {n} words.": ("at least", 0),
    "It must be not less than {n} words": ("at least", 0),
    "No fewer than {n} words, please.": ("at least", 0),
    "Write {n} words or more.": ("at least", 0),
    "{n}+ words": ("at least", 0),
    "Up to {n} words.": ("less than", 1),
    "{n} words max": ("less than", 1),
    "Minimum {n} words.": ("at least", 0),
}


AGREEMENT_NS = sorted({*WORD_LIMITS, 2, 7, 1000})


def agreement(phrasings: dict) -> tuple[int, int]:
    """(cases, agreeing): every phrasing, every N, answers of N-2 .. N+2 words and a blank one,
    our compliance (as a prompt, and as data_prep's row with its word_limit) against IFEval's."""
    cases = agree = 0
    for template, (relation, d) in phrasings.items():
        for n in AGREEMENT_NS:
            prompt = f"Why is the sky blue? {template.format(n=n)}"
            limit = parse_word_limit(prompt)
            for w in [None, *range(max(1, n - 2), n + 3)]:
                answer = "" if w is None else words(w)
                expected = float(ifeval_follows(answer, relation, n + d))
                ours = word_limit_compliance([prompt, prompt], [answer, answer + END],
                                                     word_limit=[None, limit and limit[1]])
                cases += 1
                agree += ours == [expected, expected]
    return cases, agree


def test_project_phrasings_agree_with_ifeval():
    """Every phrasing data_prep.py writes (and so app.py's LIMIT_INSTRUCTION), read as IFEval
    reads it: 10 phrasings x 14 limits x 6 answers (5 for N = 2) = 830 cases, all agreeing
    (before the strict reading, "under / less than / fewer than N" took N words as obeyed)."""

    assert set(PROJECT_PHRASINGS) == set(WORD_LIMIT_TEMPLATES)  # a new phrasing needs its entry here
    assert LIMIT_INSTRUCTION in PROJECT_PHRASINGS
    cases, agree = agreement(PROJECT_PHRASINGS)
    print(f"project phrasings: {agree} of {cases} cases agree with IFEval")
    assert (cases, agree) == (830, 830)


def test_other_phrasings_agree_with_ifeval():
    cases, agree = agreement(OTHER_PHRASINGS)
    print(f"other phrasings: {agree} of {cases} cases agree with IFEval")
    assert (cases, agree) == (len(OTHER_PHRASINGS) * 83,) * 2  # 19 x 83 = 1,577


def test_the_one_difference_from_ifeval_is_an_answer_with_no_word():
    prompt = "Answer with less than 20 words."
    assert ifeval_follows("...", "less than", 20) and not ifeval_follows("  ", "less than", 20)
    assert word_limit_compliance([prompt] * 2, ["...", "  "]) == [0.0, 0.0]
    assert word_limit_compliance([prompt], ["Fine."]) == [1.0]


def test_the_ifeval_mirror_matches_lm_eval_if_installed():
    """The mirror above against lm-eval's own class, where lm-eval[ifeval] is installed (it
    is not a requirement: its import pulls in the whole harness and tries to download nltk's
    punkt_tab)."""
    instructions = pytest.importorskip("lm_eval.tasks.ifeval.instructions")
    for relation in ("less than", "at least"):
        for n in (2, 20, 50):
            checker = instructions.NumberOfWords("length_constraints:number_words")
            checker.build_description(num_words=n, relation=relation)
            for w in range(max(1, n - 2), n + 3):
                assert checker.check_following(words(w)) == ifeval_follows(words(w), relation, n)
