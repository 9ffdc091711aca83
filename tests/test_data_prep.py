"""data_prep.py: strategies, filters, split, prompts, input formats and friendly errors.

Most tests build small oasst-like files in tmp_path and call data_prep.main(); a few run
the CLI to check the exit code and the one-line error."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_prep  # noqa: E402
from data_prep import ScriptArguments  # noqa: E402
from phi2qlora.chat import format_chat
from phi2qlora.errors import InputError  # noqa: E402
from phi2qlora.word_limits import WORD_LIMIT_TEMPLATES, WORD_LIMITS, obeys, parse_word_limit

# The strict comparatives, which allow at most n-1 words (as IFEval reads them).
STRICT_TEMPLATES = {t for t in WORD_LIMIT_TEMPLATES if re.search(r"\b(?:under|less than|fewer than)\b", t)}
OUTPUTS = ("train.jsonl", "eval.jsonl", "grpo_prompts.jsonl", "heldout_prompts.jsonl")
T0 = datetime(2023, 2, 1, tzinfo=timezone.utc)


# ---------------------------------------------------------------------------------------
# Building inputs
# ---------------------------------------------------------------------------------------
def msg(mid, parent, role, tree, *, rank=None, minute=0, lang="en", deleted=False, review=True, text=None):
    """One flat oasst1 row, with a few of the columns data_prep must ignore."""
    return {
        "message_id": mid,
        "parent_id": parent,
        "user_id": "u-" + mid,
        "created_date": (T0 + timedelta(minutes=minute)).isoformat(),
        "text": text if text is not None else f"text of {mid}",
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": review,
        "deleted": deleted,
        "rank": rank,
        "synthetic": False,
        "message_tree_id": tree,
        "tree_state": "ready_for_export",
        "emojis": {"name": ["+1"], "count": [2]},
    }


def fixture_rows(with_orphans: bool = True) -> list[dict]:
    rows = [
        # Tree A: ranks, ties, a deleted best reply, a trailing user turn.
        msg("a0", None, "prompter", "A"),
        msg("a1", "a0", "assistant", "A", rank=2, minute=1),
        msg("a11", "a1", "prompter", "A", minute=2),
        msg("a111", "a11", "assistant", "A", rank=0, minute=3),
        msg("a2", "a0", "assistant", "A", rank=1, minute=1),
        msg("a21", "a2", "prompter", "A", minute=20),  # unranked, later
        msg("a22", "a2", "prompter", "A", minute=10),  # unranked, earlier: wins the tie
        msg("a221", "a22", "assistant", "A", minute=11),  # unranked, though earlier
        msg("a222", "a22", "assistant", "A", rank=0, minute=15),  # ranked: wins
        msg("a2221", "a222", "prompter", "A", minute=16),  # trailing user turn
        msg("a3", "a0", "assistant", "A", rank=0, minute=1, deleted=True),  # best rank, deleted
        msg("a31", "a3", "prompter", "A", minute=2),
        msg("a311", "a31", "assistant", "A", minute=3),
        # Tree B: root failed review -> the whole tree goes.
        msg("b0", None, "prompter", "B", review=False),
        msg("b1", "b0", "assistant", "B", rank=0),
        msg("b11", "b1", "prompter", "B"),
        msg("b111", "b11", "assistant", "B"),
        # Tree C: root deleted.
        msg("c0", None, "prompter", "C", deleted=True),
        msg("c1", "c0", "assistant", "C"),
        # Tree D: Spanish.
        msg("d0", None, "prompter", "D", lang="es"),
        msg("d1", "d0", "assistant", "D", lang="es"),
        # Tree E: a prompt nobody answered.
        msg("e0", None, "prompter", "E"),
        # Tree F: a reply that failed review (and its follow-up); an unreviewed one is fine.
        msg("f0", None, "prompter", "F"),
        msg("f1", "f0", "assistant", "F", rank=0, review=False),
        msg("f11", "f1", "prompter", "F"),
        msg("f2", "f0", "assistant", "F", rank=1, review=None),
        # Tree H: equal ranks, the earlier wins; float ranks.
        msg("h0", None, "prompter", "H"),
        msg("h1", "h0", "assistant", "H", rank=0.0, minute=9),
        msg("h2", "h0", "assistant", "H", rank=0.0, minute=3),
        msg("h3", "h0", "assistant", "H", rank=1.0, minute=1),
    ]
    if with_orphans:  # parent absent from the input; g2 is below it
        rows += [msg("g1", "ghost", "prompter", "F"), msg("g2", "g1", "assistant", "F")]
    return rows


def to_trees(rows: list[dict]) -> list[dict]:
    """Flat rows -> the nested export: one tree per line, parent_id from the nesting."""
    nodes = {}
    for r in rows:
        node = {k: v for k, v in r.items() if k not in ("parent_id", "message_tree_id", "tree_state")}
        nodes[r["message_id"]] = dict(node, replies=[])
    trees = []
    for r in rows:
        if r["parent_id"] is None:
            trees.append({"message_tree_id": r["message_tree_id"], "tree_state": "ready_for_export",
                          "prompt": nodes[r["message_id"]]})
        else:
            nodes[r["parent_id"]]["replies"].append(nodes[r["message_id"]])
    return trees


def write_input(path: Path, rows: list) -> Path:
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if ".trees." in name:
        rows = to_trees(rows)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def run(tmp_path: Path, rows: list, name: str = "in.jsonl", out: str = "out", **kwargs):
    # Concise examples change the last user turn of some train rows; the tests of the other
    # steps read the rows as the input has them, so they are off unless a test asks.
    kwargs.setdefault("concise_share", 0.0)
    src = write_input(tmp_path / name, rows)
    args = ScriptArguments(dataset_name=str(src), output_dir=str(tmp_path / out), **kwargs)
    return data_prep.main(args), tmp_path / out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def conversations(out: Path) -> list[list[tuple]]:
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
    return sorted([[(m["role"], m["content"]) for m in r["messages"]] for r in rows])


def expected(*threads: str) -> list[list[tuple]]:
    """'a0 a2 a22' -> the conversation with those messages, roles alternating from user."""
    return sorted(
        [[("user" if i % 2 == 0 else "assistant", f"text of {mid}") for i, mid in enumerate(t.split())] for t in threads]
    )


WORDS = "apple river stone cloud music paper garden window silver orange forest candle".split()


def synthetic_rows(n_trees: int, seed: int = 0) -> list[dict]:
    """Simple trees whose every reply text names its tree, and some shared opening prompts."""
    rng = random.Random(seed)
    rows = []
    for t in range(n_trees):
        tree = f"t{t:04d}"
        if t % 10 == 0:
            prompt = rng.choice(["Hello", "hello ", "hi there"])  # shared by many trees
        else:
            prompt = f"Question {t}: " + " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
        rows.append(msg(tree, None, "prompter", tree, text=prompt))
        for a in range(rng.randint(1, 3)):
            reply = f"{tree}-a{a}"
            rows.append(msg(reply, tree, "assistant", tree, rank=a, text=f"reply {tree} {a}"))
            if rng.random() < 0.5:
                rows.append(msg(reply + "-p", reply, "prompter", tree, minute=1, text=f"follow-up {tree} {a}"))
                rows.append(msg(reply + "-pa", reply + "-p", "assistant", tree, minute=2, text=f"reply {tree} x{a}"))
    return rows


def tree_of(row: dict) -> str:
    return row["messages"][-1]["content"].split()[1]


def template_of(prompt: str):
    """(template, n) for a prompt ending in a word-limit instruction, else None."""
    for template in WORD_LIMIT_TEMPLATES:
        pattern = re.escape(template).replace(re.escape("{n}"), r"(\d+)")
        match = re.search(r"(?:^|\s)" + pattern + "$", prompt)
        if match:
            return template, int(match.group(1)), prompt[: match.start()].strip()
    return None


# ---------------------------------------------------------------------------------------
# Strategies, ranking, filters
# ---------------------------------------------------------------------------------------
def test_best_thread_follows_best_surviving_reply(tmp_path):
    summary, out = run(tmp_path, fixture_rows(), strategy="best_thread", eval_fraction=0)
    # a3 (rank 0) is deleted -> a2; a22 is earlier than a21; ranked a222 beats earlier unranked
    # a221; the trailing user turn a2221 is trimmed. E has no answer. h2 ties h1 but is earlier.
    assert conversations(out) == expected("a0 a2 a22 a222", "f0 f2", "h0 h2")
    assert summary["examples_train"] == 3 and summary["examples_eval"] == 0


def test_all_replies_gives_each_assistant_reply_with_its_ancestors(tmp_path):
    summary, out = run(tmp_path, fixture_rows(), strategy="all_replies", eval_fraction=0)
    assert conversations(out) == expected(
        "a0 a1", "a0 a1 a11 a111", "a0 a2", "a0 a2 a22 a221", "a0 a2 a22 a222",
        "f0 f2", "h0 h1", "h0 h2", "h0 h3",
    )


def test_filters_are_counted_by_reason(tmp_path):
    summary, _ = run(tmp_path, fixture_rows(), eval_fraction=0)
    assert summary["messages_read"] == 32
    assert summary["trees_read"] == 7
    assert summary["dropped"] == {
        "deleted": 2,  # a3, c0
        "failed_review": 2,  # b0, f1
        "empty_text": 0,
        "other_lang": 2,  # d0, d1
        "chat_token_text": 0,
        "role_order": 0,
        "tree_root_dropped": 4,  # b1 b11 b111, c1
        "parent_missing": 5,  # a31 a311 (under deleted a3), f11 (under f1), g1 (absent parent) g2
    }
    assert summary["trees_dropped_root"] == 2
    assert summary["messages_kept"] == 32 - 15 == 17
    assert summary["trees_with_conversations"] == 3


def test_lang_all_keeps_other_languages(tmp_path):
    summary, out = run(tmp_path, fixture_rows(), lang="all", eval_fraction=0)
    assert expected("d0 d1")[0] in conversations(out)
    assert summary["dropped"]["other_lang"] == 0
    _, out_es = run(tmp_path, fixture_rows(), out="es", lang="es", eval_fraction=0)
    assert conversations(out_es) == expected("d0 d1")


def test_role_order_drops_an_assistant_root_and_repeated_roles(tmp_path):
    rows = fixture_rows(with_orphans=False) + [
        msg("x0", None, "assistant", "X"),
        msg("x1", "x0", "prompter", "X"),
        msg("h21", "h2", "assistant", "H", minute=4),  # assistant after assistant
    ]
    summary, out = run(tmp_path, rows, eval_fraction=0)
    assert summary["dropped"]["role_order"] == 2
    assert expected("h0 h2")[0] in conversations(out)


def test_rows_are_text_and_messages_and_text_is_format_chat(tmp_path):
    _, out = run(tmp_path, synthetic_rows(60), strategy="all_replies")
    for name in ("train.jsonl", "eval.jsonl"):
        rows = read_jsonl(out / name)
        assert rows
        for row in rows:
            assert set(row) == {"text", "messages", "word_limit"} and row["word_limit"] is None
            assert row["text"] == format_chat(row["messages"])
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_text_is_stripped(tmp_path):
    rows = [msg("p", None, "prompter", "P", text="  Hi?\n"), msg("r", "p", "assistant", "P", text="Hello.\n\n")]
    _, out = run(tmp_path, rows, eval_fraction=0)
    assert read_jsonl(out / "train.jsonl")[0]["messages"] == [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
    ]


# ---------------------------------------------------------------------------------------
# Split, cap, prompts
# ---------------------------------------------------------------------------------------
def test_split_is_by_tree_and_prompt_without_leakage(tmp_path):
    rows = synthetic_rows(200)
    summary, out = run(tmp_path, rows, strategy="all_replies", eval_fraction=0.2)
    train, held = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    train_trees, eval_trees = {tree_of(r) for r in train}, {tree_of(r) for r in held}
    assert eval_trees and not train_trees & eval_trees
    assert len(train_trees | eval_trees) == 200
    norm = lambda r: " ".join(r["messages"][0]["content"].split()).casefold()  # noqa: E731
    assert not {norm(r) for r in train} & {norm(r) for r in held}
    # "Hello" / "hello " are one prompt: all of their trees sit on one side.
    hello_sides = {("eval" if tree_of(r) in eval_trees else "train") for r in train + held if norm(r) == "hello"}
    assert len(hello_sides) == 1
    assert summary["trees_eval"] == len(eval_trees) and 20 <= len(eval_trees) <= 60


def test_split_is_deterministic_and_follows_the_seed(tmp_path):
    rows = synthetic_rows(120)
    run(tmp_path, rows, out="one", seed=7)
    run(tmp_path, rows, out="two", seed=7)
    run(tmp_path, rows, out="three", seed=8)
    for name in OUTPUTS:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert (tmp_path / "one" / "eval.jsonl").read_bytes() != (tmp_path / "three" / "eval.jsonl").read_bytes()


def test_max_examples_caps_train_only(tmp_path):
    rows = synthetic_rows(100)
    full, out_full = run(tmp_path, rows, out="full", strategy="all_replies")
    capped, out_cap = run(tmp_path, rows, out="cap", strategy="all_replies", max_examples=10)
    train_full, train_cap = read_jsonl(out_full / "train.jsonl"), read_jsonl(out_cap / "train.jsonl")
    assert len(train_cap) == capped["examples_train"] == 10
    assert capped["examples_train_before_cap"] == full["examples_train"] == len(train_full) > 10
    assert all(r in train_full for r in train_cap)
    assert (out_full / "eval.jsonl").read_bytes() == (out_cap / "eval.jsonl").read_bytes()
    _, out_again = run(tmp_path, rows, out="again", strategy="all_replies", max_examples=10)
    assert (out_again / "train.jsonl").read_bytes() == (out_cap / "train.jsonl").read_bytes()


def test_train_rows_are_shuffled_not_grouped_by_tree(tmp_path):
    # sft_qlora takes the first N rows as its sample: they must not be a few trees' replies.
    summary, out = run(tmp_path, synthetic_rows(100), strategy="all_replies")
    train = read_jsonl(out / "train.jsonl")
    same_tree_neighbours = sum(tree_of(a) == tree_of(b) for a, b in zip(train, train[1:]))
    grouped = len(train) - summary["trees_train"]  # what tree order would give
    assert grouped > 40 and same_tree_neighbours < grouped / 3


def test_prompts_come_from_the_right_side_with_varied_word_limits(tmp_path):
    summary, out = run(tmp_path, synthetic_rows(300), eval_fraction=0.1, word_limit_fraction=0.5)
    first = lambda name: {r["messages"][0]["content"] for r in read_jsonl(out / name)}  # noqa: E731
    train_prompts, eval_prompts = first("train.jsonl"), first("eval.jsonl")
    templates = set()
    for name, side, other in (("grpo_prompts.jsonl", train_prompts, eval_prompts),
                              ("heldout_prompts.jsonl", eval_prompts, train_prompts)):
        rows = read_jsonl(out / name)
        bases = []
        for row in rows:
            assert set(row) == {"prompt", "word_limit"}
            parsed = template_of(row["prompt"])
            if row["word_limit"] is None:
                assert parsed is None
                bases.append(row["prompt"])
            else:
                template, n, base = parsed
                assert 20 <= n <= 150  # the bound: "under 50 words" allows 49
                assert row["word_limit"] == (n - 1 if template in STRICT_TEMPLATES else n)
                templates.add(template)
                bases.append(base)
        assert set(bases) <= side and not set(bases) & other
        assert len({" ".join(b.split()).casefold() for b in bases}) == len(bases)  # unique
        limited = sum(r["word_limit"] is not None for r in rows)
        assert limited == round(0.5 * len(rows))
    assert summary["grpo_prompts"] == len(read_jsonl(out / "grpo_prompts.jsonl"))
    assert len(templates) >= 5


def concise_input(reply_words: list[int]) -> list[dict]:
    """One single-turn tree per reply length, and a two-turn one whose last reply is short."""
    rows = []
    for t, n in enumerate(reply_words):
        rows.append(msg(f"q{t}", None, "prompter", f"T{t}", text=f"Question {t}: why?"))
        rows.append(msg(f"r{t}", f"q{t}", "assistant", f"T{t}", rank=0, text=" ".join(f"w{t}x{i}" for i in range(n))))
    rows += [msg("m0", None, "prompter", "M", text="Tell me a story"), msg("m1", "m0", "assistant", "M", rank=0, text="No."),
             msg("m2", "m1", "prompter", "M", text="Please, a short one", minute=1),
             msg("m3", "m2", "assistant", "M", rank=0, minute=2, text="Once there was a fox. The end.")]
    return rows


CONCISE_WORDS = [1, 5, 19, 20, 24, 40, 60, 99, 100, 140, 149, 150, 151, 300] * 6


@pytest.mark.parametrize("share", [0.3, 1.0])
def test_concise_examples_are_real_replies_that_obey_their_limit(tmp_path, share):
    rows = concise_input(CONCISE_WORDS)
    plain, out0 = run(tmp_path, rows, out="plain", eval_fraction=0.2)
    summary, out = run(tmp_path, rows, out="concise", eval_fraction=0.2, concise_share=share)
    before, after = read_jsonl(out0 / "train.jsonl"), read_jsonl(out / "train.jsonl")
    assert len(before) == len(after) == summary["examples_train"]
    eligible = [r for r in before if 1 <= len(r["messages"][-1]["content"].split()) <= 149]  # fits every phrasing
    assert summary["concise_eligible"] == len(eligible) and 0 < len(eligible) < len(before)
    limited = [(a, b) for a, b in zip(after, before) if a["word_limit"] is not None]
    assert summary["examples_train_word_limited"] == len(limited) == round(share * len(eligible))
    assert any(len(a["messages"]) == 4 for a, _ in limited) or share < 1
    for a, b in zip(after, before):
        if a["word_limit"] is None:
            assert a == b  # untouched
            continue
        reply, user = a["messages"][-1]["content"], a["messages"][-2]["content"]
        assert a["messages"][:-2] == b["messages"][:-2] and a["messages"][-1] == b["messages"][-1]  # the reply, whole
        template, n, base = template_of(user)
        assert base == b["messages"][-2]["content"] and a["text"] == format_chat(a["messages"])
        assert a["word_limit"] == (n - 1 if template in STRICT_TEMPLATES else n)
        words = len(reply.split())
        assert words <= a["word_limit"]  # it obeys the limit it was given
        fitting = [m for m in WORD_LIMITS if (m - 1 if template in STRICT_TEMPLATES else m) >= words]
        assert n in fitting[:3]  # one of the tightest that fit: the limit binds
    # Held out: nothing added, and nothing else changed by it.
    assert all(r["word_limit"] is None for r in read_jsonl(out / "eval.jsonl"))
    for name in ("eval.jsonl", "grpo_prompts.jsonl", "heldout_prompts.jsonl"):
        assert (out / name).read_bytes() == (out0 / name).read_bytes()
    assert plain["examples_train_word_limited"] == 0


def test_concise_share_default_and_range(tmp_path):
    assert ScriptArguments().concise_share == 0.3
    summary, _ = run(tmp_path, concise_input(CONCISE_WORDS), eval_fraction=0, concise_share=0.3)
    assert summary["examples_train_word_limited"] == round(0.3 * summary["concise_eligible"])
    for bad in (-0.1, 1.5):
        with pytest.raises(InputError, match=rf"^--concise_share must be between 0 and 1 .*got {bad}$"):
            run(tmp_path, fixture_rows(), concise_share=bad)
    result = subprocess.run([sys.executable, str(ROOT / "data_prep.py"), "--dataset_name", "x.jsonl",
                             "--concise_share", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["data_prep: error: --concise_share must be between 0 and 1 "
                                                  "(a share of the train conversations), got 2.0"]


def test_word_limit_templates_hold_n_once():
    assert len(WORD_LIMIT_TEMPLATES) >= 8 and len(set(WORD_LIMIT_TEMPLATES)) == len(WORD_LIMIT_TEMPLATES)
    for template in WORD_LIMIT_TEMPLATES:
        assert template.count("{n}") == 1
        assert template_of("Why? " + template.format(n=42))[1:] == (42, "Why?")


# ---------------------------------------------------------------------------------------
# Input formats
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["in.jsonl.gz", "in.parquet", "in.trees.jsonl", "in.trees.jsonl.gz"])
@pytest.mark.parametrize("strategy", ["best_thread", "all_replies"])
def test_other_formats_match_flat_jsonl(tmp_path, name, strategy):
    rows = fixture_rows(with_orphans=False)  # the nested export cannot hold orphans
    flat, out_flat = run(tmp_path, rows, out="flat", strategy=strategy)
    other, out_other = run(tmp_path, rows, name=name, out="other", strategy=strategy)
    for name_ in data_prep.OUTPUT_FILES:  # the pairs too: Parquet holds whole ranks as floats
        assert (out_flat / name_).read_bytes() == (out_other / name_).read_bytes(), name_
    ignore = ("source", "files")
    assert {k: v for k, v in flat.items() if k not in ignore} == {k: v for k, v in other.items() if k not in ignore}


def test_hub_source_reads_train_and_validation(tmp_path, monkeypatch):
    import datasets

    rows = fixture_rows()
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows[:20]), validation=datasets.Dataset.from_list(rows[20:])
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name: splits if name == "OpenAssistant/oasst1" else None)
    hub = data_prep.main(ScriptArguments(output_dir=str(tmp_path / "hub"), concise_share=0.0))
    flat, out_flat = run(tmp_path, rows, out="flat")
    for name in OUTPUTS:
        assert (tmp_path / "hub" / name).read_bytes() == (out_flat / name).read_bytes()
    assert hub["messages_read"] == flat["messages_read"] == 32


def test_input_is_never_modified(tmp_path):
    src = write_input(tmp_path / "in.jsonl", fixture_rows())
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    data_prep.main(ScriptArguments(dataset_name=str(src), output_dir=str(tmp_path / "out")))
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    with pytest.raises(InputError, match="the input is one of the output files"):
        data_prep.main(ScriptArguments(dataset_name=str(src.rename(tmp_path / "train.jsonl")), output_dir=str(tmp_path)))


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
GOOD = [msg("p", None, "prompter", "P"), msg("r", "p", "assistant", "P"), msg("q", None, "prompter", "Q")]


DROP = object()  # bad(field=DROP) leaves the field out


def bad(**changes):
    row = msg("z", "q", "assistant", "Q")
    row.update(changes)
    return {k: v for k, v in row.items() if v is not DROP}


BAD_LINES = {
    "malformed": ('{"message_id": "z", "text": ', "malformed JSON"),
    "missing_text": (bad(text=DROP), "missing required field 'text'"),
    "missing_role": (bad(role=DROP), "missing required field 'role'"),
    "rank": (bad(rank="abc"), "field 'rank' must be a number or null, got 'abc'"),
    "deleted": (bad(deleted="yes"), "field 'deleted' must be true or false, got 'yes'"),
    "text": (bad(text=5), "field 'text' must be a string, got 5"),
    "role": (bad(role="user"), "field 'role' must be 'prompter' or 'assistant', got 'user'"),
    "date": (bad(created_date="yesterday"), "field 'created_date' must be an ISO date"),
    "not_object": ("[1, 2]", "expected a JSON object"),
    "duplicate": (bad(message_id="r"), "duplicate message_id 'r'"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_line_names_file_line_and_field(tmp_path, case):
    line, problem = BAD_LINES[case]
    src = write_input(tmp_path / "x.jsonl", GOOD + [line])
    with pytest.raises(InputError) as err:
        data_prep.main(ScriptArguments(dataset_name=str(src), output_dir=str(tmp_path / "out")))
    message = str(err.value)
    assert message.startswith(f"{src}:4: ") and problem in message
    assert message.endswith("Fix the line or pass --skip_bad_lines to skip it.") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_bad_parquet_row_names_the_row(tmp_path):
    src = write_input(tmp_path / "x.parquet", GOOD + [bad(role="user")])
    with pytest.raises(InputError, match=r"x\.parquet: row 3 \(from 0\): field 'role' must be 'prompter'"):
        data_prep.main(ScriptArguments(dataset_name=str(src), output_dir=str(tmp_path / "out")))


def test_bad_nested_field_names_its_path(tmp_path):
    rows = fixture_rows(with_orphans=False)
    rows[1]["rank"] = "abc"  # a1, the first reply of tree A's prompt
    src = write_input(tmp_path / "x.trees.jsonl", rows)
    with pytest.raises(InputError, match=r"x\.trees\.jsonl:1: field 'prompt\.replies\[0\]\.rank' must be a number"):
        data_prep.main(ScriptArguments(dataset_name=str(src), output_dir=str(tmp_path / "out")))


def test_skip_bad_lines_counts_and_lists_them(tmp_path):
    rows = fixture_rows()
    dirty = rows[:3] + [BAD_LINES["malformed"][0]] + rows[3:10] + [bad(rank="abc")] + rows[10:]
    clean, out_clean = run(tmp_path, rows, out="clean")
    summary, out = run(tmp_path, dirty, name="dirty.jsonl", skip_bad_lines=True)
    assert summary["bad_lines_skipped"] == 2
    assert [loc.split(": ")[0] for loc in summary["bad_lines_first"]] == [
        f"{tmp_path / 'dirty.jsonl'}:4", f"{tmp_path / 'dirty.jsonl'}:12"
    ]
    assert "field 'rank'" in summary["bad_lines_first"][1]
    assert conversations(out) == conversations(out_clean)
    assert summary["messages_read"] == clean["messages_read"]


def test_unknown_extension_lists_accepted_ones(tmp_path):
    src = tmp_path / "x.csv"
    src.write_text("message_id,text\n")
    with pytest.raises(InputError, match=r"x\.csv: unknown file type") as err:
        data_prep.main(ScriptArguments(dataset_name=str(src), output_dir=str(tmp_path / "out")))
    for ext in (".jsonl", ".jsonl.gz", ".parquet", ".trees.jsonl", ".trees.jsonl.gz"):
        assert ext in str(err.value)


@pytest.mark.parametrize(
    "rows, kwargs, problem",
    [
        ([], {}, "no messages in it"),
        ([msg("s0", None, "prompter", "S", lang="es"), msg("s1", "s0", "assistant", "S", lang="es")], {},
         "no English conversations left after filtering (2 messages read; dropped 2 other_lang); try --lang all"),
        ([msg("u0", None, "prompter", "U"), msg("v0", None, "prompter", "V", deleted=True)], {},
         "no conversations left after filtering"),
        (GOOD, {}, "only one distinct prompt left"),
    ],
    ids=["empty", "other_lang", "unanswered", "one_tree"],
)
def test_nothing_usable_says_why(tmp_path, rows, kwargs, problem):
    src = write_input(tmp_path / "x.jsonl", rows)
    with pytest.raises(InputError) as err:
        data_prep.main(ScriptArguments(dataset_name=str(src), output_dir=str(tmp_path / "out"), **kwargs))
    assert problem in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("late", [False, True], ids=["bad_line", "bad_tokenizer"])
def test_failed_run_leaves_old_outputs_and_no_temp_files(tmp_path, late):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("old\n")
    rows = fixture_rows() if late else GOOD + [bad(rank="abc")]
    src = write_input(tmp_path / "in.jsonl", rows)
    # A tokenizer that cannot load fails only after everything else is built.
    tokenizer = str(tmp_path / "no" / "such" / "tokenizer") if late else None
    with pytest.raises(InputError, match="could not load tokenizer" if late else "field 'rank'"):
        data_prep.main(ScriptArguments(dataset_name=str(src), output_dir=str(out), tokenizer=tokenizer))
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]
    assert (out / "train.jsonl").read_text() == "old\n"


def cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "data_prep.py"), *args], cwd=cwd, capture_output=True, text=True)


def test_cli_bad_line_exits_2_with_one_line(tmp_path):
    src = write_input(tmp_path / "x.jsonl", GOOD + ["{not json"])
    result = cli("--dataset_name", str(src), "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"data_prep: error: {src}:4: malformed JSON")
    assert not (tmp_path / "out").exists()


def test_cli_missing_file_exits_2(tmp_path):
    result = cli("--dataset_name", "nope.jsonl", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, "data_prep: error: nope.jsonl: file not found\n")
    assert not (tmp_path / "data").exists()


def test_cli_reads_a_yaml_config(tmp_path):
    src = write_input(tmp_path / "in.jsonl", fixture_rows())
    config = tmp_path / "prep.yaml"
    config.write_text(f"dataset_name: {src}\noutput_dir: {tmp_path / 'out'}\nstrategy: all_replies\neval_fraction: 0\n")
    result = cli("--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train examples" in result.stdout
    assert len(read_jsonl(tmp_path / "out" / "train.jsonl")) == 9


# ---------------------------------------------------------------------------------------
# Token lengths, and the shared sample
# ---------------------------------------------------------------------------------------
def test_token_lengths_with_a_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    summary, out = run(tmp_path, synthetic_rows(80), tokenizer=str(tmp_path / "tok"), max_length=12)

    # The chat tokens are one token each; the rest splits as Whitespace does.
    chat = re.compile(r"<\|user\|>|<\|assistant\|>|<\|end\|>")
    lengths = sorted(
        len(chat.findall(r["text"])) + len(re.findall(r"\w+|[^\w\s]+", chat.sub(" ", r["text"])))
        for r in read_jsonl(out / "train.jsonl")
    )
    stats = summary["token_lengths"]
    assert stats["max"] == lengths[-1] and stats["p50"] == lengths[(len(lengths) + 1) // 2 - 1]
    assert stats["over_max_length"] == sum(n > 12 for n in lengths) > 0


SAMPLE = ROOT / "data" / "sample" / "oasst1_sample.jsonl"


@pytest.mark.skipif(not SAMPLE.exists(), reason="data/sample/oasst1_sample.jsonl not there yet")
@pytest.mark.parametrize("strategy", ["best_thread", "all_replies"])
def test_sample_file(tmp_path, strategy):
    before = SAMPLE.read_bytes()
    summary, out = run_path(tmp_path, SAMPLE, strategy=strategy, lang="all")
    train = read_jsonl(out / "train.jsonl")
    assert train and len(train) == summary["examples_train"]
    for row in train + read_jsonl(out / "eval.jsonl"):
        assert row["text"] == format_chat(row["messages"])
        assert row["messages"][0]["role"] == "user" and row["messages"][-1]["role"] == "assistant"
    assert SAMPLE.read_bytes() == before


def run_path(tmp_path: Path, src: Path, **kwargs):
    args = ScriptArguments(dataset_name=str(src), output_dir=str(tmp_path / "out"), **kwargs)
    return data_prep.main(args), tmp_path / "out"



def test_chat_tokens_written_in_a_text_drop_the_message_and_its_subtree(tmp_path):
    """`<|end|>` typed in a message would become a real end of turn once tokenized."""
    rows = [
        msg("p0", None, "prompter", "t1"),
        msg("r1", "p0", "assistant", "t1", rank=0, text="Type <|end|> to finish the turn."),
        msg("p11", "r1", "prompter", "t1"),
        msg("r2", "p0", "assistant", "t1", rank=1),
        msg("q0", None, "prompter", "t2", text="What does <|endoftext|> mean in GPT-2?"),
        msg("s1", "q0", "assistant", "t2", rank=0),
    ]
    summary, out = run(tmp_path, rows, eval_fraction=0)
    assert conversations(out) == expected("p0 r2")  # r1 lost its rank-0 place; t2 lost its root
    assert summary["dropped"]["chat_token_text"] == 2
    assert summary["dropped"]["parent_missing"] == 2  # p11 under r1, s1 under q0


# ---------------------------------------------------------------------------------------
# Replies that break the word limit their own prompt states
# ---------------------------------------------------------------------------------------
def test_the_sample_reply_that_breaks_its_prompts_limit_is_dropped_and_counted(tmp_path):
    """The bundled sample asks "Explain photosynthesis in under 50 words." (at most 49, as
    IFEval reads it) and both replies have more (50 and 70 words): best_thread's conversation
    and all_replies' two are dropped and counted on the summary's own line, the prompt stays
    for GRPO; --keep_limit_breaking keeps them."""
    prompt = "Explain photosynthesis in under 50 words."
    for strategy, broken in (("best_thread", 1), ("all_replies", 2)):
        out = tmp_path / strategy
        result = cli("--dataset_name", str(SAMPLE), "--output_dir", str(out), "--strategy", strategy, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if "limit broken" in line)
        assert re.fullmatch(rf"\s+limit broken\s+{broken}\s+conversations whose reply breaks the word limit its "
                            r"prompt states: dropped", line), line
        rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
        assert not [r for r in rows if r["messages"][0]["content"].startswith(prompt)]
        assert any(r["prompt"].startswith(prompt) for r in read_jsonl(out / "grpo_prompts.jsonl")
                   + read_jsonl(out / "heldout_prompts.jsonl"))
        # Every kept reply keeps the limit its user turn states.
        for r in rows:
            for asked, reply in zip(r["messages"], r["messages"][1:]):
                if asked["role"] == "user" and (limit := parse_word_limit(asked["content"])):
                    assert obeys(limit, reply["content"]), (asked, reply)
    summary, out = run_path(tmp_path / "kept", SAMPLE, keep_limit_breaking=True, eval_fraction=0)
    assert summary["limit_breaking"] == 1 and summary["limit_breaking_kept"]
    assert [r for r in read_jsonl(out / "train.jsonl") if r["messages"][0]["content"].startswith(prompt)]


def test_every_turn_that_states_a_limit_is_held_to_it(tmp_path):
    """A follow-up's limit counts as the opening's does: SFT's loss covers every reply."""
    fifty = " ".join(["word"] * 50)
    rows = [
        msg("p0", None, "prompter", "t1", text="Tell me about rivers."),
        msg("r0", "p0", "assistant", "t1", rank=0, text=fifty),
        msg("p1", "r0", "prompter", "t1", text="Shorter please, at most 10 words."),
        msg("r1", "p1", "assistant", "t1", rank=0, text=fifty),  # breaks the follow-up's limit
        msg("q0", None, "prompter", "t2", text="Name a colour in 5 words or fewer."),
        msg("s0", "q0", "assistant", "t2", rank=0, text="Blue, like the sky."),  # keeps it (5 words)
    ]
    summary, out = run(tmp_path, rows, eval_fraction=0)
    assert summary["limit_breaking"] == 1
    assert conversations(out) == [[("user", "Name a colour in 5 words or fewer."), ("assistant", "Blue, like the sky.")]]
