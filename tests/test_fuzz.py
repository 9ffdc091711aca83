"""Fuzzing (issue 8): the data loaders and the rewards on random and mutated input.

A loader may succeed, with well-formed output, or stop with InputError (the one-line
error naming the file and line; exit status 2 through the CLI). Anything else (KeyError,
TypeError, RecursionError, UnicodeEncodeError, ...) is a bug. A reward never raises and
gives finite values in its documented range, whatever the strings.

In CI each test runs a few derandomized examples (reproducible, about 30 s for the file).
To hunt, run many random ones:

    FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py

test_found_* pin what the fuzzer found (fixed in data_prep.py, rewards.py and the phi2qlora readers).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_prep  # noqa: E402
import rewards  # noqa: E402
from phi2qlora.chat import ASSISTANT, END, USER, answer_text, format_chat
from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.files import read_prompt_rows
from phi2qlora.rewards import REWARD_FUNCS, score, word_limit_compliance, word_limit_reward
from phi2qlora.word_limits import (
    MAX_LIMIT_WORDS,
    WORD_LIMIT_TEMPLATES,
    WORD_LIMITS,
    count_words,  # noqa: E402
    limit_of,
    parse_word_limit,
    row_limit,
)

SAMPLE = ROOT / "data" / "sample" / "oasst1_sample.jsonl"
HUNT = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz(n: int):
    """n derandomized examples in CI; FUZZ_EXAMPLES random ones when hunting."""
    return settings(max_examples=HUNT or n, deadline=None, derandomize=not HUNT, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


def quietly(fn, *args, **kwargs):
    """Call fn without its printed summary (pytest would keep every one)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Building blocks: JSON values and lines, good and odd
# ---------------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
# Raw JSON that Python's reader takes badly: too deep, too long, half a character.
DEEP = "[" * 5000 + "]" * 5000
HUGE_INT = "1" + "0" * 5000
SURROGATE = '"text with half a character \\ud800"'
ODD_LITERALS = ["NaN", "-Infinity", "1e999", "-0", "1" + "0" * 400, '"\\u0000"', '"\\ud83d\\ude00 paired"',
                '"\\u2028 \\u0085 \\ufeff"', "[]", "{}", '""', "[[[[[[[[]]]]]]]]"]
BAD_LITERALS = [DEEP, HUGE_INT, SURROGATE]  # crash read_jsonl_rows: see the xfail tests
junk_lines = st.one_of(st.binary(max_size=60), st.text(max_size=60).map(lambda t: t.encode("utf-8")),
                       st.sampled_from([b"", b"   ", b"\t", b"\xef\xbb\xbf", b"\xff\xfe", b"\xed\xa0\x80",
                                        b"\xc3", b'{"a": 1', b"null", b"[1, 2]", b'"a string"', b"42"]))
UTF8_BREAKERS = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"]


def dumps(value, ascii_only=True) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")


def with_raw_field(row: dict, key: str, literal: str) -> bytes:
    """The row as a JSON line, with `key` set to raw JSON text."""
    placeholder = "@@RAW@@"
    return dumps({**row, key: placeholder}).replace(json.dumps(placeholder).encode(), literal.encode())


def nonblank(data: bytes, unicode_blank: bool = False) -> int:
    """Lines data_prep and the rewards CLI read: split on \\n, blank ones skipped (blank in
    ASCII for data_prep; the rewards CLI strips decoded lines, so "\\u00a0" is blank too)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]

    def blank(line: bytes) -> bool:
        try:
            return not (line.decode("utf-8").strip() if unicode_blank else line.strip())
        except UnicodeDecodeError:
            return not line.strip()

    return sum(1 for line in data.split(b"\n") if not blank(line))


@st.composite
def mutated_lines(draw, rows: list[dict], keys: list[str], literals: list[str]) -> list:
    """1-4 mutations of rows (dicts; a line may become bytes): fields dropped, retyped or
    odd; parents relinked (cycles, self-parents, other trees) and ids shared; lines cut,
    broken, repeated, removed or replaced by junk."""
    lines = [dict(r) for r in rows]
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        op = draw(st.sampled_from(["drop", "set", "raw", "relink", "share_id", "cut", "utf8", "repeat", "remove",
                                   "junk", "blank"]))
        if op in ("drop", "set", "raw", "relink", "share_id") and not isinstance(line, dict):
            continue
        if op in ("relink", "share_id"):
            ids = [other["message_id"] for other in lines if isinstance(other, dict) and "message_id" in other]
            if ids:
                line["parent_id" if op == "relink" else "message_id"] = draw(st.sampled_from(ids))
        elif op in ("drop", "set", "raw"):
            key = draw(st.sampled_from(keys + sorted(line)))
            if op == "drop":
                line.pop(key, None)
            elif op == "set":
                line[key] = draw(json_values)
            else:
                lines[i] = with_raw_field(line, key, draw(st.sampled_from(literals)))
        elif op in ("cut", "utf8"):
            data = line if isinstance(line, bytes) else dumps(line, draw(st.booleans()))
            at = draw(st.integers(0, len(data)))
            lines[i] = data[:at] if op == "cut" else data[:at] + draw(st.sampled_from(UTF8_BREAKERS)) + data[at:]
        elif op == "repeat":
            lines.insert(draw(st.integers(0, len(lines))), line)
        elif op == "remove":
            del lines[i]
        else:
            lines.insert(i, draw(junk_lines) if op == "junk" else b"  ")
    return lines


@st.composite
def file_bytes(draw, lines: list) -> bytes:
    """Lines as a file: ASCII or raw UTF-8 JSON, \\n or \\r\\n, maybe a byte-order mark,
    maybe no final newline."""
    ascii_only, eol = draw(st.booleans()), draw(st.sampled_from([b"\n", b"\r\n"]))
    data = eol.join(line if isinstance(line, bytes) else dumps(line, ascii_only) for line in lines)
    data += draw(st.sampled_from([eol, b""]))
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + data


# ---------------------------------------------------------------------------------------
# 1. data_prep.py
# ---------------------------------------------------------------------------------------
SAMPLE_ROWS = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").split("\n") if line.strip()]
FEW_ROWS = SAMPLE_ROWS[:40]  # 9 trees: quick to run, enough to split
MESSAGE_KEYS = sorted(data_prep.MESSAGE_FIELDS)
ALL_LITERALS = ODD_LITERALS + BAD_LITERALS


def nested_trees(rows: list[dict]) -> list[dict]:
    """Flat oasst1 rows -> the *.trees.jsonl export: {message_tree_id, prompt: {..., replies}}."""
    nodes = {r["message_id"]: {k: v for k, v in r.items() if k not in ("parent_id", "message_tree_id")}
             for r in rows}
    trees = []
    for r in rows:
        node = nodes[r["message_id"]]
        if r["parent_id"] is None:
            trees.append({"message_tree_id": r["message_tree_id"], "tree_state": "ready_for_export", "prompt": node})
        elif r["parent_id"] in nodes:
            nodes[r["parent_id"]].setdefault("replies", []).append(node)
    return trees


def run_data_prep(src: Path, out: Path, **kwargs):
    """data_prep as its CLI runs it: the summary, or None after exit status 2. Anything else
    raises and fails the test. On an error nothing is written."""
    args = data_prep.ScriptArguments(dataset_name=str(src), output_dir=str(out), **kwargs)
    try:
        summary = quietly(exit_on_input_error, lambda: data_prep.main(args))
    except SystemExit as e:
        assert e.code == 2
        assert not out.exists(), "a failed run wrote output"
        event("data_prep: InputError")  # --hypothesis-show-statistics gives the shares
        return None
    check_outputs(out, summary, args)
    event("data_prep: written")
    return summary


def read_jsonl(path: Path) -> list[dict]:
    # Split on \n only, as JSON Lines readers do: str.splitlines() also splits at a raw
    # U+0085 or U+2028, which ensure_ascii=False leaves inside strings.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def without_limit(text: str, word_limit: int | None) -> str:
    """A prompt or user turn without the word-limit instruction data_prep appended, whose
    bound is `word_limit` ("under 50 words": 49, so N is word_limit or word_limit + 1)."""
    if word_limit is None:
        return text
    for template in WORD_LIMIT_TEMPLATES:
        for n in (word_limit, word_limit + 1):
            instruction = template.format(n=n)
            for sep in (" ", "\n\n"):
                if text.endswith(sep + instruction) and n in WORD_LIMITS:
                    assert limit_of(template, n) == word_limit
                    return text[: -len(sep + instruction)]
    raise AssertionError(f"no word-limit instruction for {word_limit} at the end of {text!r}")


def base_prompt(row: dict) -> str:
    """A GRPO prompt without the word-limit instruction data_prep appended."""
    return without_limit(row["prompt"], row["word_limit"])


def first_prompt(row: dict) -> str:
    """A conversation's opening prompt as the input had it (a concise example's limit is on
    its last user turn, the first one in a single-turn conversation)."""
    first = row["messages"][0]["content"]
    return without_limit(first, row["word_limit"]) if len(row["messages"]) == 2 else first


def check_outputs(out: Path, summary: dict, args) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(data_prep.OUTPUT_FILES)  # no temp files left
    train, held_out = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    grpo, heldout_prompts = read_jsonl(out / "grpo_prompts.jsonl"), read_jsonl(out / "heldout_prompts.jsonl")
    assert train and len(train) == summary["examples_train"] <= args.max_examples
    assert len(held_out) == summary["examples_eval"]
    for row in train + held_out:
        assert set(row) == {"text", "messages", "word_limit"} and row["text"] == format_chat(row["messages"])
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(m["content"] and m["content"] == m["content"].strip() for m in row["messages"])
        if row["word_limit"] is not None:  # a concise example: its own reply obeys the limit its last turn sets
            without_limit(row["messages"][-2]["content"], row["word_limit"])
            assert parse_word_limit(row["messages"][-2]["content"]) == ("max", row["word_limit"])
            assert 1 <= count_words(row["messages"][-1]["content"]) <= row["word_limit"]
    assert all(row["word_limit"] is None for row in held_out)
    assert sum(row["word_limit"] is not None for row in train) == summary["examples_train_word_limited"]
    # The split is by tree, and trees with the same opening prompt stay together.
    key = data_prep.prompt_key
    train_keys = {key(first_prompt(r)) for r in train}
    eval_keys = {key(first_prompt(r)) for r in held_out}
    assert not train_keys & eval_keys
    assert summary["trees_train"] + summary["trees_eval"] == summary["trees_with_conversations"]
    assert summary["messages_kept"] + sum(summary["dropped"].values()) == summary["messages_read"]
    # Prompts come from their own side, and rewards.py reads each word limit as data_prep meant it.
    for rows, keys in ((grpo, train_keys if summary["examples_train_before_cap"] == len(train) else None),
                       (heldout_prompts, eval_keys)):
        assert len({key(base_prompt(r)) for r in rows}) == len(rows)
        for r in rows:
            assert set(r) == {"prompt", "word_limit"}
            assert keys is None or key(base_prompt(r)) in keys
            if r["word_limit"] is not None:
                assert r["word_limit"] in WORD_LIMITS or r["word_limit"] + 1 in WORD_LIMITS
                assert parse_word_limit(r["prompt"]) == ("max", r["word_limit"]), r["prompt"]
                assert row_limit(r["prompt"], r["word_limit"]) == ("max", r["word_limit"])
    assert len(grpo) == summary["grpo_prompts"] and len(heldout_prompts) == summary["heldout_prompts"]


run_options = st.fixed_dictionaries({
    "strategy": st.sampled_from(data_prep.STRATEGIES),
    "lang": st.sampled_from(["en", "all", "en,de", "EN"]),
    "eval_fraction": st.sampled_from([0.0, 0.05, 0.5]),
    "skip_bad_lines": st.booleans(),
    "max_examples": st.sampled_from([32000, 3]),
})


@fuzz(25)
@given(data=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode)),
       ext=st.sampled_from([".jsonl", ".jsonl.gz", ".trees.jsonl", ".trees.jsonl.gz", ".parquet"]),
       gzip_it=st.booleans(), options=run_options)
def test_data_prep_random_bytes(data, ext, gzip_it, options):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"in{ext}"
        src.write_bytes(gzip.compress(data) if gzip_it and ext.endswith(".gz") else data)
        run_data_prep(src, Path(tmp) / "out", **options)


@fuzz(60)
@given(data=st.data(), ext=st.sampled_from([".jsonl", ".jsonl.gz"]), options=run_options)
def test_data_prep_mutated_flat_rows(data, ext, options):
    lines = data.draw(mutated_lines(FEW_ROWS, MESSAGE_KEYS, ALL_LITERALS))
    raw = data.draw(file_bytes(lines))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"in{ext}"
        src.write_bytes(gzip.compress(raw) if ext.endswith(".gz") else raw)
        summary = run_data_prep(src, Path(tmp) / "out", **options)
    if summary is not None:  # every line is one message, or one skipped line
        assert summary["messages_read"] + summary["bad_lines_skipped"] == nonblank(raw)
        assert options["skip_bad_lines"] or summary["bad_lines_skipped"] == 0


@st.composite
def mutated_trees(draw) -> list:
    """The nested export of FEW_ROWS with 1-4 mutations: anywhere in a tree a field dropped,
    retyped or odd, replies that are no list, a node that is no object, a subtree twice."""
    trees = json.loads(json.dumps(nested_trees(FEW_ROWS)))
    for _ in range(draw(st.integers(1, 4))):
        tree = draw(st.sampled_from(trees))
        nodes = [tree, tree["prompt"]] if isinstance(tree.get("prompt"), dict) else [tree]
        for node in nodes[1:]:
            nodes += [r for r in node.get("replies", []) if isinstance(r, dict)] if isinstance(
                node.get("replies"), list) else []
        node = draw(st.sampled_from(nodes))
        key = draw(st.sampled_from(MESSAGE_KEYS + ["replies", "prompt", "message_tree_id"]))
        op = draw(st.sampled_from(["drop", "set", "repeat"]))
        if op == "drop":
            node.pop(key, None)
        elif op == "set":
            node[key] = draw(json_values)
        elif isinstance(node.get("replies"), list) and node["replies"]:
            node["replies"].append(draw(st.sampled_from(node["replies"])))  # duplicate ids
    return draw(mutated_lines(trees, ["prompt", "message_tree_id"], ALL_LITERALS)) if draw(st.booleans()) else trees


@fuzz(40)
@given(data=st.data(), ext=st.sampled_from([".trees.jsonl", ".trees.jsonl.gz"]), options=run_options)
def test_data_prep_mutated_trees(data, ext, options):
    raw = data.draw(file_bytes(data.draw(mutated_trees())))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"in{ext}"
        src.write_bytes(gzip.compress(raw) if ext.endswith(".gz") else raw)
        summary = run_data_prep(src, Path(tmp) / "out", **options)
    if summary is not None:
        assert summary["bad_lines_skipped"] <= nonblank(raw)
        assert options["skip_bad_lines"] or summary["bad_lines_skipped"] == 0


def parquet_mutations():
    """(name, change to a pyarrow table) pairs: columns dropped, retyped, out of range, nested."""
    import pyarrow as pa

    def replace(table, name, values, type=None):
        array = pa.array(values(table.num_rows), type)
        if name not in table.column_names:
            return table.append_column(name, array)
        return table.set_column(table.column_names.index(name), name, array)

    return {
        "drop": lambda t, c: t.remove_column(t.column_names.index(c)) if c in t.column_names else t,
        "nulls": lambda t, c: replace(t, c, lambda n: [None] * n, pa.string()),
        "ints": lambda t, c: replace(t, c, range, pa.int64()),
        "floats_nan": lambda t, c: replace(t, c, lambda n: [float("nan")] * n),
        "binary": lambda t, c: replace(t, c, lambda n: [b"\xff\xfe"] * n),
        "lists": lambda t, c: replace(t, c, lambda n: [[1, 2]] * n),
        "structs": lambda t, c: replace(t, c, lambda n: [{"a": 1}] * n),
        "timestamp_year_31690708": lambda t, c: replace(t, c, lambda n: [10**15] * n, pa.timestamp("s")),
        "timestamp_tz_far": lambda t, c: replace(t, c, lambda n: [10**12] * n, pa.timestamp("s", tz="UTC")),
        "date32": lambda t, c: replace(t, c, lambda n: [0] * n, pa.date32()),
        "decimal": lambda t, c: replace(t, c, lambda n: [1] * n, pa.decimal128(5, 2)),
        "dictionary": lambda t, c: replace(t, c, lambda n: ["x"] * n, pa.dictionary(pa.int32(), pa.string())),
        "duplicate_column": lambda t, c: t.append_column(c, t.column(0)),
        "empty": lambda t, c: t.slice(0, 0),
    }


IGNORED_COLUMNS = ["user_id", "review_count", "synthetic", "emojis"]  # changes there must not matter


@fuzz(40)
@given(changes=st.lists(st.tuples(st.sampled_from(sorted(parquet_mutations())),
                                  st.sampled_from(MESSAGE_KEYS + IGNORED_COLUMNS)), min_size=1, max_size=3),
       options=run_options)
def test_data_prep_mutated_parquet(changes, options):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(FEW_ROWS)
    mutations = parquet_mutations()
    for name, column in changes:
        table = mutations[name](table, column)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.parquet"
        pq.write_table(table, src)
        summary = run_data_prep(src, Path(tmp) / "out", **options)
    if summary is not None:
        assert summary["messages_read"] + summary["bad_lines_skipped"] == table.num_rows


# Valid random forests in oasst1's schema. Replies carry their id in their text, so each
# conversation written can be traced back; root prompts come from a small pool, so trees
# share opening prompts (the split must keep those together).
ROOT_TEXTS = ["hi", "Hello!", "  hi  ", "What is 2+2?", "Is it safe or not", "Tell me why I shouldn't",
              "¿Qué es esto?", "你好", "Write a poem\nabout the sea"]
iso_dates = st.one_of(st.none(), st.datetimes().map(lambda d: d.isoformat()),
                      st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()))


@st.composite
def forests(draw) -> list[dict]:
    rows = []
    for t in range(draw(st.integers(2, 6))):
        tree = f"T{t}"
        members = []
        for k in range(draw(st.integers(1, 12))):
            mid = f"{tree}-{k}"
            parent = None if k == 0 else draw(st.sampled_from(members))
            role = "prompter" if parent is None else ("assistant" if parent["role"] == "prompter" else "prompter")
            if draw(st.integers(0, 9)) == 0:  # now and then the wrong role
                role = "assistant" if role == "prompter" else "prompter"
            text = (draw(st.sampled_from(ROOT_TEXTS) | st.text(max_size=20)) if parent is None
                    else f"#{mid}# " + draw(st.text(max_size=30)))
            if draw(st.integers(0, 14)) == 0:
                text = draw(st.sampled_from(["", " \n "]))
            row = {"message_id": mid, "parent_id": parent and parent["message_id"], "message_tree_id": tree,
                   "role": role, "text": text, "lang": draw(st.sampled_from(["en", "en", "en", "EN", "de", None])),
                   "user_id": "u", "review_count": 3}
            for name, values in (("deleted", st.sampled_from([False, False, False, True, None])),
                                 ("review_result", st.sampled_from([True, True, True, False, None])),
                                 ("rank", st.one_of(st.none(), st.integers(0, 3), st.floats(0, 3))),
                                 ("created_date", iso_dates)):
                if draw(st.integers(0, 4)):  # the export leaves out false / null fields
                    row[name] = draw(values)
            rows.append(row)
            members.append(row)
    return rows


def surviving(rows: list[dict], langs: set | None) -> dict:
    """Messages data_prep must keep, found independently: alive, reviewed or not yet, with
    text, in a kept language, roles alternating from a prompt, and every ancestor kept."""
    by_id = {r["message_id"]: r for r in rows}
    kept = {}

    def keeps(r) -> bool:
        if r["message_id"] in kept:
            return kept[r["message_id"]]
        parent = by_id.get(r["parent_id"]) if r["parent_id"] else None
        ok = (r.get("deleted") is not True and r.get("review_result") is not False and r["text"].strip() != ""
              and (langs is None or (r["lang"] or "").lower() in langs)
              and (r["role"] == "prompter" if parent is None else r["role"] != parent["role"])
              and (r["parent_id"] is None or (parent is not None and keeps(parent))))
        kept[r["message_id"]] = ok
        return ok

    return {r["message_id"]: r for r in rows if keeps(r)}


def answered_roots(kept: dict) -> set:
    return {m["parent_id"] for m in kept.values() if m["parent_id"] in kept and kept[m["parent_id"]]["parent_id"] is None}


def traced(conversation: list[dict]) -> list[str]:
    """The ids of a conversation's replies (the text starts with #id#)."""
    return [m["content"].split("#")[1] for m in conversation[1:]]


@fuzz(40)
@given(rows=forests(), strategy=st.sampled_from(data_prep.STRATEGIES), lang=st.sampled_from(["en", "all"]),
       eval_fraction=st.sampled_from([0.0, 0.3]), order=st.randoms(use_true_random=False))
def test_data_prep_random_forests_in_every_format(rows, strategy, lang, eval_fraction, order):
    import pyarrow as pa
    import pyarrow.parquet as pq

    options = dict(strategy=strategy, lang=lang, eval_fraction=eval_fraction, word_limit_fraction=0.5)
    shuffled = list(rows)
    order.shuffle(shuffled)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"in.jsonl": b"\n".join(dumps(r) for r in rows),
                   "shuffled.jsonl.gz": gzip.compress(b"\n".join(dumps(r, False) for r in shuffled)),
                   "in.trees.jsonl": b"\n".join(dumps(t) for t in nested_trees(rows))}
        for name, raw in sources.items():
            (tmp / name).write_bytes(raw)
        try:  # pyarrow may not infer one type for a column this mixed: then no parquet copy
            columns = sorted({k for r in rows for k in r})  # a field missing from a row is null
            pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in columns}), tmp / "in.parquet")
            sources["in.parquet"] = b""
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
        results = {name: run_data_prep(tmp / name, tmp / f"out-{name}", **options) for name in sources}
        outputs = {name: {f: (tmp / f"out-{name}" / f).read_bytes() for f in data_prep.OUTPUT_FILES}
                   for name, summary in results.items() if summary is not None}

    # The same messages in any format and any order: the same outcome, byte for byte.
    assert len({s is None for s in results.values()}) == 1
    assert len({json.dumps(o, sort_keys=True, default=repr) for o in outputs.values()}) <= 1
    summary = results["in.jsonl"]
    kept = surviving(rows, None if lang == "all" else {"en"})
    assistants = [m for m in kept.values() if m["role"] == "assistant"]
    answered = {kept[m["parent_id"]]["text"] for m in assistants if kept[m["parent_id"]]["parent_id"] is None}
    openings = {data_prep.prompt_key(text) for text in answered}
    assert (summary is None) == (not openings or (eval_fraction > 0 and len(openings) < 2))
    if summary is None:  # nothing left, or one distinct prompt, which cannot be split
        return
    assert summary["messages_kept"] == len(kept)
    expected = len(assistants) if strategy == "all_replies" else len(answered_roots(kept))
    assert summary["examples_train_before_cap"] + summary["examples_eval"] == expected
    out = outputs["in.jsonl"]
    for line in (out["train.jsonl"] + out["eval.jsonl"]).decode().split("\n")[:-1]:
        row = json.loads(line)
        messages = [dict(m) for m in row["messages"]]
        if row["word_limit"] is not None:  # a concise example: its last user turn as the input had it
            messages[-2]["content"] = without_limit(messages[-2]["content"], row["word_limit"])
        ids = traced(messages)
        first = kept[ids[0]]
        assert first["parent_id"] in kept and kept[first["parent_id"]]["parent_id"] is None
        assert kept[first["parent_id"]]["text"].strip() == messages[0]["content"]
        assert [kept[i]["parent_id"] for i in ids[1:]] == ids[:-1]  # a path down one tree


# ---------------------------------------------------------------------------------------
# 2. The readers of data_prep's outputs: read_prompt_rows, sft_qlora.load_conversations,
#    grpo_train.load_prompts
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    """The tiny model's tokenizer (make_tiny_model.train_tokenizer, as the tiny_model_dir
    fixture builds it) with the chat tokens: seconds, where the whole tiny model takes minutes."""
    from phi2qlora.model import load_chat_tokenizer
    from phi2qlora.tiny_tokenizer import sample_texts, train_tokenizer

    path = tmp_path_factory.mktemp("fuzz-tokenizer")
    train_tokenizer(sample_texts(SAMPLE), 1000).save_pretrained(path)
    return load_chat_tokenizer(str(path))


SAFE_LITERALS = ODD_LITERALS + BAD_LITERALS
prompt_rows = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=40)},
                                    optional={"word_limit": st.none() | st.integers(1, 500), "note": json_values})
exchanges = st.lists(st.tuples(st.text(max_size=30), st.text(max_size=30)), min_size=1, max_size=3).map(
    lambda pairs: [{"role": role, "content": text} for pair in pairs for role, text in zip(("user", "assistant"), pair)])
conversation_rows = st.fixed_dictionaries({"messages": exchanges},
                                          optional={"text": st.text(max_size=10)})


def decoded_nonblank(raw: bytes) -> int:
    """Lines read_jsonl_rows reads: JSON Lines end in \\n (a \\r before it is
    whitespace to JSON)."""
    text = raw.decode("utf-8-sig", errors="replace")  # with a limit, a reader may stop before a bad byte
    return sum(1 for line in text.split("\n") if line.strip())


@st.composite
def reader_file(draw, rows_strategy, keys: list[str], max_int=2**70) -> bytes:
    rows = draw(st.lists(rows_strategy, min_size=0, max_size=5))
    if draw(st.booleans()):
        rows = draw(mutated_lines(rows, keys, SAFE_LITERALS)) if rows else [draw(junk_lines)]
    raw = draw(file_bytes(rows))
    return raw


def call_reader(fn, *args):
    try:
        result = quietly(fn, *args)
    except InputError as e:
        assert str(e) and "\n" not in str(e)
        event("reader: InputError")
        return None
    event("reader: read")
    return result


@fuzz(60)
@given(raw=reader_file(prompt_rows, ["prompt", "word_limit"]), suffix=st.sampled_from([".jsonl", ".txt"]))
def test_read_prompt_rows(raw, suffix):

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"prompts{suffix}"
        src.write_bytes(raw)
        rows = call_reader(read_prompt_rows, src)
    if rows is None:
        return
    for row in rows:
        assert set(row) == {"prompt", "word_limit"} and isinstance(row["prompt"], str) and row["prompt"].strip()
        limit = row["word_limit"]
        assert limit is None or (type(limit) is int and limit >= 1)
    if suffix == ".jsonl":
        assert len(rows) == decoded_nonblank(raw)  # a line is a row, or the read stops
    else:  # lines end in \n only: U+0085 or U+2028 inside a prompt don't split it
        assert len(rows) == decoded_nonblank(raw)
        assert all(r["word_limit"] is None for r in rows)


@fuzz(50)
@given(raw=reader_file(conversation_rows, ["messages", "text"]), limit=st.none() | st.integers(1, 4))
def test_sft_load_conversations(raw, limit):
    import sft_qlora

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "train.jsonl"
        src.write_bytes(raw)
        dataset = call_reader(sft_qlora.load_conversations, str(src), limit)
    if dataset is None:
        return
    assert len(dataset) == min(limit or 10**9, decoded_nonblank(raw))  # the lines read all passed
    for row in dataset:
        assert set(row) == {"messages"}
        assert all(set(t) == {"role", "content"} and t["role"] in ("user", "assistant")
                   and isinstance(t["content"], str) for t in row["messages"])
        assert any(t["role"] == "assistant" for t in row["messages"])


@fuzz(40)
@given(raw=reader_file(prompt_rows, ["prompt", "word_limit"]),
       max_tokens=st.integers(4, 256), limit=st.none() | st.integers(1, 4))
def test_grpo_load_prompts(chat_tokenizer, raw, max_tokens, limit):
    import grpo_train

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.jsonl"
        src.write_bytes(raw)
        dataset = call_reader(grpo_train.load_prompts, str(src), chat_tokenizer, max_tokens, limit)
    if dataset is None:
        return
    assert 1 <= len(dataset) <= (limit or 10**9)
    for row in dataset:
        assert row["prompt"].startswith(USER + "\n") and row["prompt"].endswith(END + "\n" + ASSISTANT + "\n")
        assert len(chat_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]) <= max_tokens
        assert row["word_limit"] is None or row["word_limit"] >= 1


# Found by this file: each crashed read_jsonl_rows or a reader built on it (the
# exception it raised is in the id); each must give an InputError naming the line.
def known_bug(line, reader, crash, name):
    return pytest.param(line, reader, id=f"{name}-was-{crash.__name__}")


COMMON_BUGS = [
    known_bug(DEEP + "\n", "prompt", RecursionError, "deep_json"),
    known_bug('{"prompt": "hi", "word_limit": ' + HUGE_INT + "}\n", "prompt", ValueError, "5000_digit_int"),
    known_bug('{"prompt": "hi", "word_limit": ' + str(2**63) + "}\n", "grpo", OverflowError,
              "word_limit_past_int64_in_Dataset"),
    known_bug('{"prompt": ' + SURROGATE + "}\n", "grpo", TypeError, "unpaired_surrogate_in_tokenizer"),
    known_bug('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": '
              + SURROGATE + "}]}\n", "sft", UnicodeEncodeError, "unpaired_surrogate_in_Dataset"),
]


@pytest.mark.parametrize("line, reader", COMMON_BUGS)
def test_found_common_readers_name_the_line(chat_tokenizer, tmp_path, line, reader):
    import grpo_train
    import sft_qlora

    src = tmp_path / "in.jsonl"
    src.write_text(line, encoding="utf-8")
    read = {"prompt": lambda: read_prompt_rows(src),
            "grpo": lambda: grpo_train.load_prompts(str(src), chat_tokenizer, 64),
            "sft": lambda: sft_qlora.load_conversations(str(src))}[reader]
    with pytest.raises(InputError, match=r"in\.jsonl:1: "):
        quietly(read)


# ---------------------------------------------------------------------------------------
# 3. rewards.py
# ---------------------------------------------------------------------------------------
ONES = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def spell(n: int, and_: bool = False) -> str:
    """1 <= n < 10**6 in words: 123456 -> 'one hundred twenty-three thousand four hundred fifty-six'."""
    def below_1000(n):
        words = []
        if n >= 100:
            words += [ONES[n // 100 - 1], "hundred"] + (["and"] if and_ and n % 100 else [])
            n %= 100
        if n >= 20:
            words.append(TENS[n // 10 - 2] + (f"-{ONES[n % 10 - 1]}" if n % 10 else ""))
        elif n:
            words.append(ONES[n - 1])
        return words

    thousands, rest = divmod(n, 1000)
    return " ".join((below_1000(thousands) + ["thousand"] if thousands else []) + below_1000(rest))


mixed_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["你好，请", "مرحبا ", "Привет, ", "🙂🙂 ", "e\u0301\u0301 ", "\u200b\u200e\u202e", "\x00\x1b[31m", "\r\n\t",
     "ＡＢＣ５０ ", "٥٠ كلمة ", "Don't ", "or not ", "I can't "])
numbers = st.one_of(
    st.integers(1, 10**12).map(str), st.integers(1000, 10**15).map(lambda n: f"{n:,}"),
    st.integers(-10**6, 0).map(str), st.integers(1, 999_999).map(spell),
    st.integers(1, 999_999).map(lambda n: spell(n, and_=True)),
    st.integers(1, 300).map(lambda k: "one " + "hundred " * k),        # 10**(2k), spelled out
    st.integers(1, 100).map(lambda k: "a thousand " * k),
    st.integers(1, 40).map(lambda k: "nine hundred ninety-nine thousand " * k),
    st.integers(300, 5000).map(lambda k: "9" * k),
    st.sampled_from(["10**30", "1e30", "minus five", "-5", "2.5", "½", "５０", "٥٠", "fifty-", "twenty--five",
                     "one hundred and", "zero", "0", "0050", "1,00,000", "a hundred", "an thousand"]),
)
limit_prompts = st.builds(
    lambda a, pre, n, w, post, b: f"{a}{pre}{n}{w}{post}{b}",
    mixed_text,
    st.sampled_from(["", "in ", "under ", "at least ", "about ", "no more than ", "not more than ", "Keep it to ",
                     "don't use more than ", "max: ", "minimum of ", "exactly ", "Limit your response to ",
                     "never exceed ", "In "]),
    numbers,
    st.sampled_from([" words", " word", "-word", " Words", " WORDS", "words", " wörds", " words,", "\nwords"]),
    st.sampled_from(["", " or less", " or more", " at most", " tops", " or so", " summary", "+", "."]),
    mixed_text,
)
any_prompts = st.one_of(limit_prompts, st.text(), mixed_text,
                        st.integers(1, 4000).map(lambda k: "Answer in under 50 words. " * k),
                        limit_prompts.map(lambda p: format_chat([{"role": "user", "content": p}], True)),
                        st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn"])))
completions = st.one_of(
    st.text(), mixed_text, st.integers(0, 3000).map(lambda k: "word " * k),
    st.builds(lambda t, e, tail: t + (END if e else "") + tail, st.text(max_size=200), st.booleans(),
              st.sampled_from(["", "\n", " more", USER + " hi", "<|pad|>"])),
    st.sampled_from(["User: hi", "### Instruction:", ASSISTANT, "ha" * 5000, "\x00" * 100, "🙂" * 500]),
)
word_limits = st.one_of(st.none(), st.integers(-5, 10**6), st.integers(10**9, 10**400),
                        st.floats(allow_nan=True, allow_infinity=True), st.just(Fraction(10**400)),
                        st.just(Fraction(41, 2)), st.booleans(), st.text(max_size=3))


def check_limit(limit) -> None:
    assert limit is None or (limit[0] in ("max", "min", "about") and type(limit[1]) is int
                             and 1 <= limit[1] <= MAX_LIMIT_WORDS)


@fuzz(300)
@given(text=st.one_of(limit_prompts, any_prompts))
def test_parse_word_limit_reads_any_prompt(text):
    check_limit(parse_word_limit(text))


@fuzz(100)
@given(n=st.integers(1, 999_999), and_=st.booleans(), before=st.sampled_from(["", "Why? ", "List 3 things. "]))
def test_spelled_out_limits_read_as_numbers(n, and_, before):
    assert parse_word_limit(f"{before}Use at most {spell(n, and_)} words.") == ("max", n)
    assert parse_word_limit(f"{before}Answer in under {spell(n, and_)} words.") == (
        ("max", n - 1) if n > 1 else None)  # strict: "under N" allows N-1
    assert parse_word_limit(f"{before}Use at least {n:,} words.") == ("min", n)


@fuzz(150)
@given(rows=st.lists(st.tuples(any_prompts, completions, word_limits, st.booleans()), min_size=1, max_size=4))
def test_rewards_finite_and_consistent_for_any_strings(rows):
    prompts, comps, limits, ended = (list(column) for column in zip(*rows))
    scores = score(prompts, comps, None, word_limit=limits, ended=ended)
    assert set(scores) == {f.__name__ for f in REWARD_FUNCS}
    for values in scores.values():
        assert len(values) == len(rows)
        assert all(type(v) is float and math.isfinite(v) and -1.0 <= v <= 1.0 for v in values)
    compliance = word_limit_compliance(prompts, comps, word_limit=limits)
    for i, c in enumerate(compliance):
        reward = scores["word_limit_reward"][i]
        if c is None:  # no limit: no reward either way
            assert reward == 0.0
        else:  # an answer that ended earns the full reward exactly when it complies
            assert c in (0.0, 1.0) and (reward == 1.0) == (c == 1.0 and ended[i])
        assert (c is None) == (row_limit(prompts[i], limits[i]) is None)


pair_rows = st.fixed_dictionaries(
    {"prompt": any_prompts, "completion": completions},
    optional={"ended": st.one_of(st.booleans(), st.none(), json_scalars),
              "word_limit": st.one_of(st.none(), st.integers(1, 500), json_scalars), "extra": json_values})


@fuzz(50)
@given(data=st.data())
def test_rewards_cli_on_mutated_pairs(data):
    rows = data.draw(st.lists(pair_rows, max_size=4))
    lines = data.draw(mutated_lines(rows, ["prompt", "completion", "ended", "word_limit"], ALL_LITERALS)) \
        if rows and data.draw(st.booleans()) else rows
    raw = data.draw(file_bytes(lines))
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "pairs.jsonl", Path(tmp) / "scored.jsonl"
        src.write_bytes(raw)
        try:
            scored = quietly(exit_on_input_error, lambda: rewards.main([str(src), "--out", str(out)]))
        except SystemExit as e:
            assert e.code == 2 and not out.exists()
            event("rewards CLI: InputError")
            return
        event("rewards CLI: scored")
        written = read_jsonl(out)
    assert len(scored) == len(written) == nonblank(raw, unicode_blank=True)
    for row in written:
        assert type(row["ended"]) is bool and (row["word_limit"] is None or row["word_limit"] >= 1)
        assert row["words"] == count_words(answer_text(row["completion"]))
        assert all(math.isfinite(v) and -1 <= v <= 1 for v in row["rewards"].values())
        assert math.isfinite(row["total"]) and row["compliance"] in (None, 0.0, 1.0)


# ---------------------------------------------------------------------------------------
# What the fuzzer found, pinned (each failed before its fix)
# ---------------------------------------------------------------------------------------
def write_lines(path: Path, lines: list) -> Path:
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else dumps(line) for line in lines) + b"\n")
    return path


def data_prep_error(src: Path, out: Path, **kwargs) -> str:
    with pytest.raises(InputError) as err:
        quietly(data_prep.main, data_prep.ScriptArguments(dataset_name=str(src), output_dir=str(out), **kwargs))
    assert not out.exists()
    return str(err.value)


@pytest.mark.parametrize("literal, problem", [
    (DEEP, "JSON nested too deeply to read"),                       # was RecursionError
    (HUGE_INT, "a number too long to read"),                        # was ValueError
    (SURROGATE, "field 'text' holds an unpaired surrogate escape"),  # was UnicodeEncodeError when writing
], ids=["deep", "huge_int", "surrogate"])
def test_found_data_prep_odd_json_is_a_clear_error(tmp_path, literal, problem):
    lines = FEW_ROWS[:5] + [with_raw_field(FEW_ROWS[5], "text", literal)] + FEW_ROWS[6:]
    src = write_lines(tmp_path / "in.jsonl", lines)
    assert data_prep_error(src, tmp_path / "out").startswith(f"{src}:6: {problem}")
    summary = quietly(data_prep.main, data_prep.ScriptArguments(dataset_name=str(src), output_dir=str(tmp_path / "o"),
                                                                skip_bad_lines=True))
    assert summary["bad_lines_skipped"] == 1 and summary["messages_read"] == len(FEW_ROWS) - 1


def test_found_data_prep_names_the_line_with_a_bad_byte_and_skips_a_bom(tmp_path):
    lines = [dumps(r) for r in FEW_ROWS]
    lines[30] = lines[30].replace(b"e", b"\xff", 1)  # a text-mode read blamed a line 8 KB earlier
    src = write_lines(tmp_path / "in.jsonl", lines)
    assert data_prep_error(src, tmp_path / "out").startswith(f"{src}:31: not UTF-8 text")
    bom = tmp_path / "bom.jsonl.gz"
    bom.write_bytes(gzip.compress(b"\xef\xbb\xbf" + b"\r\n".join(dumps(r) for r in FEW_ROWS)))
    assert quietly(data_prep.main, data_prep.ScriptArguments(dataset_name=str(bom), output_dir=str(tmp_path / "o"))
                   )["messages_read"] == len(FEW_ROWS)


def test_found_data_prep_damaged_gzip_is_a_clear_error(tmp_path):
    data = bytearray(gzip.compress(SAMPLE.read_bytes()))
    data[200:203] = b"\x00\xff\x00"  # zlib.error ("invalid distance too far back") got through
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(bytes(data))
    assert data_prep_error(src, tmp_path / "out").startswith(f"{src}")


def test_found_data_prep_parquet_timestamp_past_year_9999(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(FEW_ROWS)
    table = table.set_column(table.column_names.index("created_date"), "created_date",
                             pa.array([10**15] * len(FEW_ROWS), pa.timestamp("s")))  # OverflowError before
    pq.write_table(table, tmp_path / "in.parquet")
    message = data_prep_error(tmp_path / "in.parquet", tmp_path / "out")
    assert "row 0 (from 0): field 'created_date' must be an ISO date" in message and "unreadable" in message


def test_found_data_prep_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    src = write_lines(tmp_path / "in.jsonl", FEW_ROWS)
    assert "is a file" in data_prep_error(src, tmp_path / "afile" / "out")  # FileExistsError after the read
    (tmp_path / "out" / "eval.jsonl").mkdir(parents=True)
    with pytest.raises(InputError, match="is a directory, where an output file goes"):
        quietly(data_prep.main, data_prep.ScriptArguments(dataset_name=str(src), output_dir=str(tmp_path / "out")))


@pytest.mark.parametrize("prompt", ["Is it safe or not", "Tell me why I shouldn't", "Do this, or not"])
def test_found_word_limit_after_an_unpunctuated_negation_stays_a_maximum(prompt):
    """data_prep appended "Use at most 20 words." after a bare "... or not", and rewards.py
    read "not Use at most 20 words" as a minimum: the instruction now goes on its own line."""
    import random

    rows = data_prep.prompt_rows([({"text": prompt}, [])] * 1, 1.0, random.Random(0))
    assert rows[0]["prompt"].startswith(prompt + "\n\n")
    assert row_limit(rows[0]["prompt"], rows[0]["word_limit"]) == ("max", rows[0]["word_limit"])
    assert parse_word_limit(rows[0]["prompt"]) == ("max", rows[0]["word_limit"])


@pytest.mark.parametrize("prompt", ["Use at least one " + "hundred " * 200 + "words.",
                                    "Write about one " + "hundred " * 200 + "words."], ids=["min", "about"])
def test_found_rewards_spelled_out_huge_limit(prompt):
    """10**400 spelled out reached limit_score, whose float division overflowed."""
    assert parse_word_limit(prompt) is None
    assert score([prompt], ["a short answer"], ended=[True])["word_limit_reward"] == [0.0]
    assert word_limit_compliance([prompt], ["a short answer"]) == [None]
    assert word_limit_reward(["x"], ["hi there"], word_limit=[Fraction(10**400)], ended=[True]) == [0.0]


def test_found_rewards_cli_names_the_line_with_a_bad_byte_and_out_dir(tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "hi", "completion": "x"}\n' * 39 + b'{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match=r"pairs\.jsonl:40: not UTF-8 text"):  # said :1 before
        quietly(rewards.main, [str(src)])
    src.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "hi", "completion": "x"}\n')  # a BOM is fine
    assert len(quietly(rewards.main, [str(src)])) == 1
    with pytest.raises(InputError, match="--out is a directory"):  # IsADirectoryError before
        quietly(rewards.main, [str(src), "--out", str(tmp_path)])


@pytest.mark.parametrize("run", ["one ", "one-", "one and ", "twenty five "])
def test_found_rewards_long_run_of_number_words_takes_linear_time(run):
    """16 KB of "one one one ..." took 10 s of CPU in parse_word_limit (each start in the run
    scanned to its end): a prompt or a pasted table of numbers could stall scoring."""
    import time

    text = "Answer in under 50 words. " + run * (16_000 // len(run))
    start = time.process_time()
    assert parse_word_limit(text) == ("max", 49)
    assert time.process_time() - start < 2.0  # about 0.1 s now
