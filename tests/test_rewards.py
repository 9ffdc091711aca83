"""phi2qlora/rewards.py and the rewards.py CLI: the reward shapes, END detection as TRL decodes,
finite values for any input, scoring a file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import phi2qlora.rewards
from phi2qlora.chat import ASSISTANT, END, USER, format_prompt
from phi2qlora.rewards import (
    CONCISENESS_MIN_WORDS,
    REWARD_FUNCS,
    REWARD_WEIGHTS,
    conciseness_reward,
    format_reward,
    make_reward_funcs,
    word_limit_compliance,
    word_limit_reward,
)
from phi2qlora.word_limits import (
    WORD_LIMIT_TEMPLATES,
    parse_word_limit,
)
from tests.conftest import ROOT
from tests.test_word_limits import TYPED

ALL = [*REWARD_FUNCS, word_limit_compliance]


def words(n: int, word: str = "word") -> str:
    """n distinct-ish words, so the text is not 'repetitive'."""
    return " ".join(f"{word}{i}" for i in range(n)) + "."


def one(f, prompt, completion, **kwargs):
    (value,) = f([prompt], [completion], **kwargs)
    return value


# ---------------------------------------------------------------------------------------
# The rewards
# ---------------------------------------------------------------------------------------
LIMITED = "Explain gravity in no more than 50 words."


@pytest.mark.parametrize("n_words, expected", [
    (10, 1.0), (50, 1.0),       # obeyed; N exactly counts as obeyed
    (55, 0.9),                  # slightly over: 10% over costs 0.1
    (75, 0.5), (100, 0.0),      # 0 at twice the limit
    (125, -0.5), (150, -1.0), (400, -1.0),  # -1 at three times and beyond
])
def test_word_limit_reward_max(n_words, expected):
    completion = words(n_words) + END
    assert one(word_limit_reward, LIMITED, completion) == pytest.approx(expected)


def test_word_limit_reward_min_about_and_none():
    f = word_limit_reward
    assert one(f, "Write at least 40 words.", words(40) + END) == 1.0
    assert one(f, "Write at least 40 words.", words(20) + END) == pytest.approx(0.0)
    assert one(f, "Write at least 40 words.", words(10) + END) == pytest.approx(-0.5)
    assert one(f, "in about 100 words", words(108) + END) == 1.0      # within 10%
    assert one(f, "in about 100 words", words(85) + END) == pytest.approx(0.9)
    assert one(f, "in about 100 words", words(160) + END) == pytest.approx(0.0)
    assert one(f, "in exactly 3 words", words(7) + END) == 1.0         # +-5 words at least
    assert one(f, "Why is the sky blue?", words(500) + END) == 0.0    # no limit: neutral
    assert one(f, "Why is the sky blue?", "") == 0.0


def test_word_limit_reward_empty_cut_off_and_column():
    f = word_limit_reward
    assert one(f, LIMITED, END) == -1.0
    assert one(f, LIMITED, " \n\t" + END) == -1.0
    assert one(f, LIMITED, words(10)) == 0.0                      # cut off: length unknown, not rewarded
    assert one(f, LIMITED, words(10), ended=[True]) == 1.0
    assert one(f, LIMITED, words(150), ended=[False]) == -1.0     # cut off and already far over
    # The word_limit column wins over the text; None falls back to the text.
    assert f(["Why?", LIMITED], [words(30) + END] * 2, word_limit=[20, None]) == [0.5, 1.0]
    assert one(f, "Write at least 20 words", words(15) + END, word_limit=[20]) < 1.0  # kind from the text
    assert one(f, "Why?", words(30) + END, word_limit=[0]) == 0.0    # not a limit


def test_conciseness_reward():
    f = conciseness_reward
    short, long = one(f, "Why?", words(20) + END), one(f, "Why?", words(120) + END)
    assert 1.0 > short > long > 0.0
    assert one(f, "Why?", words(400) + END) == 0.0
    floor = min(one(f, "Why?", words(n) + END) for n in (1, 50, 199, 200, 10_000))
    for bad in ["", END, "   \n" + END, "?!..." + END, words(10), words(10) + "<|pad|>"]:
        assert one(f, "Why?", bad) == -1.0 < floor
    assert one(f, "Why?", words(10), ended=[True]) > 0
    assert one(f, "Why?", words(50) + END, target_words=100) == pytest.approx(0.5)


def test_format_reward():
    f = format_reward
    good = "Paris is the capital of France." + END
    assert one(f, "Q", good) == 1.0
    assert one(f, "Q", "Paris is the capital of France.") == 0.0                  # never ended
    assert one(f, "Q", "Paris.\nAnswer: Paris, the city." + END) == 1.0          # a colon is fine
    assert one(f, "Q", "Paris.\n<|user|>\nAnd Spain?" + END) == 0.0              # leaked token text
    assert one(f, "Q", "Paris.\nUser: And Spain?\nAssistant: Madrid." + END) == 0.0  # invented turn
    assert one(f, "Q", "Paris.\n### Instruction: say more" + END) == 0.0
    assert one(f, "Q", "Paris." + END + "\nthe model went on") == 0.0           # text after END
    assert one(f, "Q", "Paris." + END + "\n") == 1.0
    assert one(f, "Q", "User: Paris.\nHuman: ok") == -1.0                        # leaked and cut off
    assert one(f, "Q", "I am a bot. " * 40 + END) == 0.0                         # runaway repetition
    assert one(f, "Q", "I am a bot. " * 40) == -1.0
    assert one(f, "Q", "The answer is 42.\n" * 8 + END) < 0.5                     # the same line over and over
    assert one(f, "Q", "Yes" + "!" * 500 + END) == 0.0                           # one word, a runaway of characters
    assert one(f, "Q", "Ha" * 300 + END) == 0.0
    assert one(f, "Q", "") == -1.0
    assert one(f, "Q", " " + END) == -1.0


def test_real_replies_are_not_repetitive():
    texts = [json.loads(line)["text"] for line in open(ROOT / "data" / "sample" / "oasst1_sample.jsonl")]
    replies = [t for t in texts if len(t) > 200]
    assert len(replies) > 20
    assert format_reward(["Q"] * len(replies), [t + END for t in replies]) == [1.0] * len(replies)


def test_word_limit_compliance():
    prompts = [LIMITED, LIMITED, "Why?", "at least 10 words", LIMITED]
    completions = [words(30), words(60) + END, words(30), words(12), ""]
    assert word_limit_compliance(prompts, completions) == [1.0, 0.0, None, 1.0, 0.0]
    assert word_limit_compliance(["Why?"], [words(30)], word_limit=[20]) == [0.0]


# ---------------------------------------------------------------------------------------
# END as TRL delivers it: stripped from the text, present in completion_ids
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer with the chat tokens, loaded as training loads it."""
    from phi2qlora.model import load_chat_tokenizer
    from phi2qlora.tiny_tokenizer import train_tokenizer

    texts = [words(50), "Paris is the capital of France.", "Hello there, how are you?"] * 5
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, vocab_size=300).save_pretrained(path)
    return load_chat_tokenizer(str(path))


def test_end_detected_from_completion_ids_as_trl_decodes(chat_tokenizer):
    tok = chat_tokenizer
    texts = ["Paris is the capital of France." + END, "Paris is the capital of", "Paris.\n" + USER + "\nAnd Spain?" + END]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    decoded = tok.batch_decode(ids, skip_special_tokens=True)  # what GRPOTrainer passes as completions
    assert all(END not in d and USER not in d for d in decoded)
    prompts = [format_prompt("What is the capital of France? Answer in under 10 words.")] * 3

    funcs = make_reward_funcs(tok)
    got = {f.func.__name__: f(prompts=prompts, completions=decoded, completion_ids=ids, word_limit=[None] * 3,
                                trainer_state=None, log_extra=None, log_metric=None) for f in funcs}
    assert got["format_reward"] == [1.0, 0.0, 0.0]   # ended; cut off; ended but leaked <|user|>
    assert got["conciseness_reward"][1] == -1.0 < got["conciseness_reward"][0]
    assert got["word_limit_reward"][0] == 1.0 and got["word_limit_reward"][1] == 0.0

    # Unbound inside TRL: nothing can be seen to end, and it says so.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        phi2qlora.rewards._warned_unbound = False
        assert format_reward(prompts, decoded, ids) == [0.0, 0.0, 0.0]
    assert any("make_reward_funcs" in str(w.message) for w in caught)


def test_make_reward_funcs_pairs_with_weights():
    from trl.trainer.utils import get_callable_name

    funcs = make_reward_funcs(token_ids={USER: 7, ASSISTANT: 8, END: 9}, target_words=20)
    names = [get_callable_name(f) for f in funcs]
    assert names == [f.__name__ for f in REWARD_FUNCS] == list(REWARD_WEIGHTS)
    assert [REWARD_WEIGHTS[n] for n in names] == [1.0, 0.3, 0.5]
    concise, fmt = funcs[1], funcs[2]
    assert concise(["Q"], ["a b c d e f g h i j"], [[1, 2, 9]]) == [0.5]
    assert fmt(["Q"], ["a b c"], [[1, 8, 2, 9]]) == [0.0]        # ASSISTANT's id in the answer
    with pytest.raises(ValueError, match="tokenizer or token_ids"):
        make_reward_funcs()


# ---------------------------------------------------------------------------------------
# Finite for any input
# ---------------------------------------------------------------------------------------
template_prompts = st.builds(lambda t, n, pre: pre + t.format(n=n), st.sampled_from(WORD_LIMIT_TEMPLATES),
                             st.integers(-10, 10**12), st.text(max_size=50))


prompts_st = st.one_of(st.none(), st.text(), template_prompts, st.sampled_from([t for t, _ in TYPED]),
                       st.integers(), st.binary(max_size=20), st.lists(st.text(max_size=5), max_size=3))


completions_st = st.one_of(
    st.none(), st.text(), st.text(alphabet=st.characters(codec="utf-8"), min_size=500, max_size=3000),
    st.builds(lambda t, e: t + (END if e else ""), st.text(), st.booleans()),
    st.sampled_from(["", " ", "\n\t", "...!?", END, "🙂" * 50, "User:", "<|user|>" * 3]),
    st.integers(), st.floats(allow_nan=True), st.lists(st.text(max_size=5), max_size=3),
)


odd_limits = st.one_of(st.none(), st.integers(-5, 10**15), st.floats(allow_nan=True, allow_infinity=True),
                       st.text(max_size=3), st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(prompts_st, completions_st, odd_limits,
                               st.one_of(st.none(), st.lists(st.integers(-2, 2**40), max_size=5)),
                               st.one_of(st.none(), st.booleans(), st.text(max_size=2))), max_size=6),
       end_id=st.one_of(st.none(), st.integers(0, 3)))
def test_every_reward_is_finite_for_any_input(rows, end_id):
    prompts = [r[0] for r in rows]
    completions = [r[1] for r in rows]
    kwargs = dict(word_limit=[r[2] for r in rows], ended=[r[4] for r in rows], trainer_state=None)
    ids = [r[3] for r in rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in REWARD_FUNCS:
            for extra in ({}, {"end_token_id": end_id}):
                values = f(prompts, completions, ids, **kwargs, **extra)
                assert len(values) == len(rows)
                assert all(isinstance(v, float) and math.isfinite(v) and -1.0 <= v <= 1.0 for v in values)
        compliance = word_limit_compliance(prompts, completions, word_limit=kwargs["word_limit"])
        assert len(compliance) == len(rows) and all(v in (None, 0.0, 1.0) for v in compliance)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.from_regex(r"(?i)(in |under |at least |about )?[\w -]{0,30} words?[\w ]{0,10}"),
                      template_prompts, st.none(), st.integers(), st.lists(st.text(max_size=4))))
def test_parse_word_limit_never_raises(text):
    result = parse_word_limit(text)
    assert result is None or (result[0] in ("max", "min", "about") and isinstance(result[1], int) and result[1] >= 1)


def test_huge_and_odd_inputs():
    huge = words(10_000) + END
    prompts = [LIMITED, None, 3, b"\xff", [{"role": "user", "content": LIMITED}], "under 9" * 10_000 + " words"]
    completions = [huge, None, 3.5, "¿Qué? 你好 🙂" + END, [{"role": "assistant", "content": "Hi." + END}], "x" * 1_000_000]
    for f in ALL:
        values = f(prompts, completions, None)
        assert len(values) == len(prompts)
        assert all(v is None or math.isfinite(v) for v in values)
    assert word_limit_reward(prompts[:1], [huge]) == [-1.0]
    assert format_reward(prompts[4:5], completions[4:5]) == [1.0]  # conversational rows work too
    assert word_limit_reward(None, None) == []


def test_constant_group_gives_finite_advantages():
    """TRL: weighted sum of the rewards, minus the group mean, over (group std + 1e-4)."""
    import torch
    from trl.trainer.utils import nanstd

    weights = torch.tensor(list(REWARD_WEIGHTS.values()))
    groups = [
        (LIMITED, [words(30) + END] * 4),  # identical good answers
        (LIMITED, [""] * 4),               # identical empty answers
        ("Why?", [None] * 4),
        ("Why?", ["I am a bot. " * 500] * 4),
    ]
    for prompt, completions in groups:
        per_func = torch.tensor([f([prompt] * 4, completions) for f in REWARD_FUNCS]).T
        total = (per_func * weights).nansum(dim=1)
        grouped = total.view(-1, 4)
        advantages = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        assert torch.isfinite(per_func).all() and torch.isfinite(advantages).all()
        assert torch.equal(advantages, torch.zeros_like(advantages))


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "rewards.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_scores_a_file(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": LIMITED, "completion": words(20)},                                 # raw message, ended by default
        {"prompt": format_prompt("Why is the sky blue?"), "completion": words(300), "ended": False},
        {"prompt": "Tell me a joke.", "completion": words(40), "word_limit": 20},
    ]
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    out = tmp_path / "scored.jsonl"
    result = run_cli(pairs, "--out", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "word_limit" in lines[0] and "format" in lines[0]
    assert lines[4].startswith("mean") and "3 rows" in lines[5]
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["rewards"]["word_limit_reward"] for s in scored] == [1.0, 0.0, 0.0]
    assert [s["rewards"]["format_reward"] for s in scored] == [1.0, 0.0, 1.0]
    assert scored[1]["rewards"]["conciseness_reward"] == -1.0
    assert [s["limit"] for s in scored] == [["max", 50], None, ["max", 20]]
    assert [s["compliance"] for s in scored] == [1.0, None, 0.0]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi", "completion": "x"', "malformed JSON"),
    ('{"prompt": "hi"}', "field 'completion' must be a string (missing)"),
    ('{"prompt": 3, "completion": "x"}', "field 'prompt' must be a string (a int)"),
    ('{"prompt": "hi", "completion": "x", "ended": "yes"}', "field 'ended' must be true or false"),
    ('{"prompt": "hi", "completion": "x", "word_limit": -4}', "field 'word_limit' must be a whole number"),
    ('["hi", "x"]', "expected a JSON object"),
])
def test_cli_bad_line(tmp_path, line, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "ok", "completion": "fine"}\n' + line + "\n", encoding="utf-8")
    result = run_cli(pairs)
    assert result.returncode == 2
    assert result.stderr.startswith(f"rewards: error: {pairs}:2: ")
    assert message in result.stderr and "Traceback" not in result.stderr
    missing = run_cli(tmp_path / "nope.jsonl")
    assert missing.returncode == 2 and "file not found" in missing.stderr


def test_conciseness_gives_no_credit_below_a_real_answer():
    """One word and an end of turn must not be the best answer GRPO can find."""
    n = CONCISENESS_MIN_WORDS
    short, enough, longer = "word " * (n - 1), "word " * n, "word " * (3 * n)
    scores = conciseness_reward(["Q"] * 3, [short, enough, longer], ended=[True] * 3)
    assert scores[0] == 0.0 and scores[1] > scores[2] > 0.0
