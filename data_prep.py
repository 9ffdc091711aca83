"""Turn OpenAssistant oasst1 into chat JSONL for SFT, plus prompts for GRPO and pairs for DPO.

    python data_prep.py                                      # the Hub dataset -> data/
    python data_prep.py --dataset_name dump.trees.jsonl.gz --strategy all_replies
    python data_prep.py --tokenizer microsoft/phi-2          # also report token lengths
    python data_prep.py --pairs concise                      # DPO pairs under word limits too
    python data_prep.py --config data_prep.yaml              # the same flags, from YAML

oasst1 is a forest of conversation trees: a user prompt, several assistant replies ranked
by volunteers, user follow-ups to each reply, and so on. The rows are flat messages linked
by parent_id. This script

  1. reads the messages (the Hub, flat .jsonl / .jsonl.gz / .parquet rows, or the nested
     *.trees.jsonl[.gz] export), checking every field, so a bad line stops the run with
     its file:line instead of surfacing later as a strange training example;
  2. drops deleted messages, messages that failed review and other languages, and with
     them every message whose parent is gone (so whole subtrees go);
  3. turns each tree into conversations (--strategy, below), and drops each one in which a
     reply breaks the word limit its own user turn states ("Explain photosynthesis in
     under 50 words." answered in 50 words), read as the rewards read it; the summary
     counts them, and --keep_limit_breaking keeps them;
  4. splits by tree into train / eval: no tree, and no identical opening prompt, is on
     both sides;
  5. adds a word-limit instruction to the last user turn of a share (--concise_share) of
     the train conversations whose last reply already obeys it: concise SFT examples made
     of real answers, never shortened ones;
  6. writes train.jsonl and eval.jsonl ({"text", "messages", "word_limit"}; eval rows never
     carry a limit), grpo_prompts.jsonl (first prompts of train trees) and
     heldout_prompts.jsonl (of eval trees), as {"prompt", "word_limit"}, a share
     (--word_limit_fraction) asking for a word limit. `word_limit` is null, or the most
     words that obey the instruction as rewards.py and IFEval read it ("under 50": 49).
     Rows are in seeded random order, so the first N are a fair sample. Nothing is
     written until all of it is built, and each file is replaced atomically;
  7. writes DPO's preference pairs, pairs_train.jsonl and pairs_eval.jsonl, split as the
     SFT files (--pairs, below).

Strategies
  best_thread (default): one conversation per tree, following the best-ranked reply at
      every level. The volunteers' top choice is the cleanest target; each prompt is
      trained on once, so trees with many replies are not over-weighted by near-duplicate
      examples, and the train / eval split stays a split of distinct conversations.
  all_replies: one example per surviving assistant reply, its ancestors as the history.
      Several times as many examples, but every prompt recurs with each of its replies,
      including the ones ranked worst.

Counts. The real oasst1 cannot be downloaded where this was written, so there are no
counts for it here. Measured instead on the benchmark's SYNTHETIC oasst1-sized file
(88,838 messages in 10,415 trees, seed 0, made by benchmarks/bench_data_prep.py; not real
data), with the defaults (--lang en, --eval_fraction 0.05, --seed 42): 30,655 messages
survive the filters, and 4,263 trees give conversations.
  best_thread:  4,053 train / 210 eval conversations
  all_replies: 18,181 train / 942 eval examples (4.5x)
  either: 3,999 GRPO prompts (distinct openings of train trees), 210 held-out prompts

Pairs (--pairs, comma-separated): TRL's conversational preference rows, {"prompt": the chat
up to a user turn, "chosen": [one assistant turn], "rejected": [...], "kind", "ranks",
"word_limit", "tree"}, from every user turn with two or more surviving replies ranked
against each other (a turn whose replies carry no rank gives none: "unranked").
  best_worst (default): the best-ranked reply against the worst-ranked one.
  all_ranked: every two ranked replies, the better one chosen.
  concise: added to the ranked pairs; for two replies ranked at most --concise_rank_gap
      apart, a word limit the shorter obeys and the longer breaks is appended to the
      user's turn, and the shorter is chosen. The limit is the lesson: without one the
      ranked pairs keep the people's choice, which the summary says how often is the
      longer reply (41 of 43 on the bundled sample).
On the synthetic file above (random ranks, so no length preference): 5,697 user turns with
2+ replies, 879 unranked; best_worst 4,590 train / 228 eval pairs, all_ranked 10,788 / 534,
concise 6,455 / 305 more beside best_worst's.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from phi2qlora.args import parse_script_args
from phi2qlora.chat import format_chat, reserved_text_in
from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.files import BadLine, check_writable, jsonl_lines, parse_json_line, write_jsonl_atomic
from phi2qlora.model import load_chat_tokenizer
from phi2qlora.word_limits import (
    WORD_LIMIT_TEMPLATES,
    WORD_LIMITS,
    count_words,
    limit_of,
    obeys,
    parse_word_limit,
    with_instruction,
)

STRATEGIES = ("best_thread", "all_replies")
ROLES = {"prompter": "user", "assistant": "assistant"}

# A concise SFT example's limit is drawn from the smallest few of WORD_LIMITS that its reply
# obeys, so the limit binds (the reply is near it), not one far above any answer.
CONCISE_TIGHTEST = 3

# (how the name ends, how to read it); the first match wins, so .trees.* come first.
FORMATS = (
    (".trees.jsonl.gz", "trees"),
    (".trees.jsonl", "trees"),
    (".jsonl.gz", "jsonl"),
    (".jsonl", "jsonl"),
    (".parquet", "parquet"),
)
# A name with one of these suffixes is meant as a file, not a Hub id.
FILE_SUFFIXES = {".json", ".jsonl", ".gz", ".parquet", ".csv", ".tsv", ".txt", ".zip", ".arrow"}
DROP_REASONS = (
    "deleted",
    "failed_review",
    "empty_text",
    "other_lang",
    "chat_token_text",  # the text holds <|end|>, <|user|>, ... which the tokenizer reads as turn boundaries
    "role_order",  # an assistant opening a tree, or two turns of one role in a row
    "tree_root_dropped",  # below a root prompt that was deleted or failed review
    "parent_missing",  # below a dropped message, or its parent is not in the input
)
# The fields we read; the rest (user_id, emojis, labels, ...) is ignored.
MESSAGE_FIELDS = {"message_id", "parent_id", "message_tree_id", "role", "text", "lang"}
MESSAGE_FIELDS |= {"deleted", "review_result", "rank", "created_date"}
LANG_NAMES = {"en": "English"}
OUTPUT_FILES = ("train.jsonl", "eval.jsonl", "grpo_prompts.jsonl", "heldout_prompts.jsonl",
                "pairs_train.jsonl", "pairs_eval.jsonl")


@dataclass
class ScriptArguments:
    dataset_name: str = field(
        default="OpenAssistant/oasst1",
        metadata={
            "help": "Hub dataset id (train + validation are used), or a local file of flat message rows "
            "(.jsonl, .jsonl.gz, .parquet) or of nested trees (.trees.jsonl, .trees.jsonl.gz)."
        },
    )
    output_dir: str = field(
        default="data",
        metadata={"help": "Where train.jsonl, eval.jsonl, grpo_prompts.jsonl and heldout_prompts.jsonl go."},
    )
    strategy: str = field(
        default="best_thread",
        metadata={
            "help": "best_thread: one conversation per tree along the best-ranked reply at each level (the "
            "volunteers' top choice, every prompt once, no near-duplicates over-weighting popular trees). "
            "all_replies: one example per assistant reply with its ancestors as history (several times "
            "more, prompts repeated, worst-ranked replies included).",
            "choices": list(STRATEGIES),
        },
    )
    lang: str = field(
        default="en",
        metadata={"help": "Keep messages in this language code (comma-separate several: en,de), or 'all'."},
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Share of trees held out for eval.jsonl and heldout_prompts.jsonl."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for the split, the train cap and the word limits."})
    max_examples: int = field(
        default=32000, metadata={"help": "Most train examples to keep (a seeded subsample); eval is not capped."}
    )
    word_limit_fraction: float = field(
        default=0.5, metadata={"help": "Share of GRPO and held-out prompts that get a word-limit instruction."}
    )
    # 0.3: enough limited examples for SFT to learn that a limit means a reply within it
    # (about 1 in 5 train rows on the sample), while most rows keep the user's own words, so
    # the answers to prompts without a limit keep their natural length.
    concise_share: float = field(
        default=0.3,
        metadata={"help": "Share of the train conversations whose best (last) reply already obeys a word limit "
                  "(at most 149 words) that get that limit appended to their last user turn, in one of "
                  "WORD_LIMIT_TEMPLATES' phrasings: concise SFT examples from real answers, never shortened ones. "
                  "0: none. Eval rows never get one."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer path or Hub id: if given, report token lengths of the train texts."},
    )
    max_length: int = field(
        default=256, metadata={"help": "With --tokenizer: count the train texts longer than this many tokens."}
    )
    keep_limit_breaking: bool = field(
        default=False,
        metadata={"help": "Keep conversations in which a reply breaks the word limit its own user turn states "
                  "(\"Explain photosynthesis in under 50 words.\" answered in 50 words). By default they are dropped: "
                  "SFT would teach the model to break the limits the GRPO reward then asks it to keep."},
    )
    skip_bad_lines: bool = field(
        default=False,
        metadata={"help": "Skip (and count) malformed lines or rows instead of stopping at the first one."},
    )
    pairs: str = field(
        default="best_worst",
        metadata={"help": "DPO preference pairs, comma-separated kinds: best_worst (each user turn's best-ranked "
                  "reply against its worst-ranked), all_ranked (every two ranked replies, the better chosen), "
                  "concise (added to best_worst unless all_ranked is named: replies ranked at most "
                  "--concise_rank_gap apart under a stated word limit that the shorter obeys and the longer breaks, "
                  "the shorter chosen)."},
    )
    concise_rank_gap: int = field(
        default=1, metadata={"help": "--pairs concise: the most two replies' ranks may differ (1: neighbours)."}
    )


class BadRow(Exception):
    """One line or row is unusable; the reader adds where it is."""


# ---------------------------------------------------------------------------------------
# 1. Read: every source becomes the same list of checked message dicts.
# ---------------------------------------------------------------------------------------
def source_kind(name: str) -> str:
    """'trees', 'jsonl', 'parquet' for a local file, 'hub' for a dataset id."""
    path = Path(name)
    kind = next((k for ext, k in FORMATS if name.lower().endswith(ext)), None)
    if kind is None:
        if path.exists() or path.suffix.lower() in FILE_SUFFIXES:
            accepted = ", ".join(ext for ext, _ in reversed(FORMATS))
            raise InputError(
                f"{name}: unknown file type; data_prep reads {accepted}, or a Hub dataset id like OpenAssistant/oasst1"
            )
        return "hub"
    if path.is_dir():
        raise InputError(f"{name}: is a directory, not a file")
    if not path.is_file():
        raise InputError(f"{name}: file not found")
    return kind


def parquet_rows(path: str):
    import pyarrow.parquet as pq  # only this source needs it

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: cannot read it as parquet: {one_line(e)}") from None
    # Only the columns we use: the nested detoxify / emojis / labels ones are slow to convert.
    table = table.select([c for c in table.column_names if c in MESSAGE_FIELDS])
    for start in range(0, table.num_rows, 1000):
        part = table.slice(start, 1000)
        try:
            rows = part.to_pylist()
        except Exception:  # a value Python cannot hold, such as a timestamp past the year 9999
            rows = [{name: python_value(part.column(name), j) for name in part.column_names}
                    for j in range(part.num_rows)]
        for i, row in enumerate(rows, start):
            yield f"{path}: row {i} (from 0)", row


class Unreadable:
    """A parquet value Python cannot hold; it fails every field check, which names it."""

    def __init__(self, error: Exception):
        self.error = one_line(error)

    def __str__(self):
        return f"an unreadable value ({self.error})"


def python_value(column, j: int):
    try:
        return column[j].as_py()
    except Exception as e:
        return Unreadable(e)


def hub_rows(name: str):
    import datasets  # slow to import, and only this source needs it

    try:
        ds = datasets.load_dataset(name)
    except Exception as e:
        raise InputError(f"could not load {name!r} from the Hub: {one_line(e)}") from None
    for split in ("train", "validation"):
        if split in ds:
            part = ds[split].select_columns([c for c in ds[split].column_names if c in MESSAGE_FIELDS])
            for i, row in enumerate(part.to_list()):
                yield f"{name}[{split}] row {i}", row


def read_messages(args: ScriptArguments, kind: str, summary: dict) -> list[dict]:
    records = {"trees": jsonl_records, "jsonl": jsonl_records, "parquet": parquet_rows, "hub": hub_rows}[kind]
    unit = "line" if kind in ("trees", "jsonl") else "row"
    messages, first_seen, skipped = [], {}, []
    for where, record in records(args.dataset_name):
        try:
            batch = flatten_tree(decode(record)) if kind == "trees" else [parse_message(decode(record))]
            check_unique_ids(batch, first_seen)
        except BadRow as e:
            if not args.skip_bad_lines:
                raise InputError(f"{where}: {e}. Fix the {unit} or pass --skip_bad_lines to skip it.") from None
            skipped.append(f"{where}: {e}")
            continue
        for m in batch:
            first_seen[m["id"]] = where
        messages.extend(batch)
    summary["messages_read"] = len(messages)
    summary["bad_lines_skipped"] = len(skipped)
    summary["bad_lines_first"] = skipped[:5]
    summary["trees_read"] = len({m["tree"] for m in messages})
    return messages


def jsonl_records(path: str):
    """(where, line as bytes) for each non-blank line; `decode` makes it a JSON value."""
    for n, raw in jsonl_lines(path, progress=True):
        yield f"{path}:{n}", raw


def decode(record):
    """A line of a JSONL file (bytes) -> its JSON value; a parquet or Hub row already is one."""
    if not isinstance(record, bytes):
        return record
    try:
        return parse_json_line(record)
    except BadLine as e:
        raise BadRow(str(e)) from None


def check_unique_ids(batch: list[dict], first_seen: dict) -> None:
    ids = set()
    for m in batch:
        if m["id"] in first_seen or m["id"] in ids:
            where = first_seen.get(m["id"], "this line")
            raise BadRow(f"duplicate message_id {m['id']!r} (first seen at {where})")
        ids.add(m["id"])


def flatten_tree(tree) -> list[dict]:
    """One line of the nested export -> its messages, parent_id taken from the nesting."""
    if not isinstance(tree, dict):
        raise BadRow(f"expected a JSON object (one tree), got {short(tree)}")
    tree_id = tree.get("message_tree_id")
    if not isinstance(tree_id, str) or not tree_id:
        raise BadRow(missing_or_wrong("message_tree_id", tree, "a non-empty string"))
    if not isinstance(tree.get("prompt"), dict):
        raise BadRow(missing_or_wrong("prompt", tree, "a message object"))
    out, stack = [], [(tree["prompt"], None, "prompt")]
    while stack:
        node, parent_id, path = stack.pop()
        message = parse_message(node, prefix=f"{path}.", nested=(parent_id, tree_id))
        out.append(message)
        replies = node.get("replies", [])
        if not isinstance(replies, list):
            raise BadRow(f"field '{path}.replies' must be a list, got {short(replies)}")
        stack.extend((reply, message["id"], f"{path}.replies[{i}]") for i, reply in enumerate(replies))
    return out


def parse_message(raw, prefix: str = "", nested: tuple | None = None) -> dict:
    """Check one message's fields and keep what we use. `nested` is (parent_id, tree_id)
    for a message from a trees export, where those come from the structure."""
    if not isinstance(raw, dict):
        if prefix:
            raise BadRow(f"field '{prefix[:-1]}' must be a message object, got {short(raw)}")
        raise BadRow(f"expected a JSON object, got {short(raw)}")

    def get(name, check, expected, required=True):
        if name not in raw:
            if required:
                raise BadRow(f"missing required field '{prefix}{name}'")
            return None
        if not check(raw[name]):
            raise BadRow(f"field '{prefix}{name}' must be {expected}, got {short(raw[name])}")
        return raw[name]

    message_id = get("message_id", is_id, "a non-empty string")
    if nested is None:
        parent_id = get("parent_id", is_str_or_none, "a string or null (null for a root prompt)")
        tree_id = get("message_tree_id", is_id, "a non-empty string")
    else:
        parent_id, tree_id = nested
    role = get("role", is_role, "'prompter' or 'assistant'")
    text = get("text", is_str, "a string")
    if (bad := unpaired_surrogate(text)) is not None:  # a lone "\ud800" escape cannot be written out
        raise BadRow(f"field '{prefix}text' holds an unpaired surrogate escape ({text[bad]!r} at character {bad})")
    lang = get("lang", is_str_or_none, "a string or null")
    # The export leaves out false / null fields, so these may be absent.
    deleted = get("deleted", is_bool_or_none, "true or false", required=False)
    review = get("review_result", is_bool_or_none, "true, false or null", required=False)
    rank = get("rank", is_number_or_none, "a number or null", required=False)
    date = get("created_date", is_date, "an ISO date like 2023-02-05T14:23:50+00:00, or null", required=False)
    return {
        "id": message_id,
        "parent": parent_id,
        "tree": tree_id,
        "role": role,
        # oasst texts often end in stray newlines; trained on, they would come before <|end|>.
        "text": text.strip(),
        "lang": lang.lower() if lang else None,
        "deleted": deleted is True,
        "review": review,
        # A whole rank as an int: Parquet and the Hub's oasst1 store ranks as floats (a column
        # with nulls), JSON as ints, and the pairs' "ranks" must read the same from both.
        "rank": None if rank is None or math.isnan(rank) else int(rank) if float(rank).is_integer() else rank,
        "date": date_key(date),
    }


def is_str(v):
    return isinstance(v, str)


def unpaired_surrogate(text: str) -> int | None:
    """Where JSON's "\ud800" left half a character, which UTF-8 cannot hold, or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def is_id(v):
    return isinstance(v, str) and v != ""


def is_str_or_none(v):
    return v is None or isinstance(v, str)


def is_bool_or_none(v):
    return v is None or isinstance(v, bool)


def is_number_or_none(v):
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def is_role(v):
    return isinstance(v, str) and v in ROLES


def is_date(v):
    try:
        date_key(v)
        return True
    except (TypeError, ValueError):
        return False


def date_key(v) -> float:
    """Seconds since the epoch (UTC when no zone is given); undated messages sort last."""
    if v is None:
        return math.inf
    dt = v if isinstance(v, datetime) else datetime.fromisoformat(v)
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def short(value) -> str:
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    except (RecursionError, ValueError):  # nested too deeply to write back, or a 5,000-digit number
        text = f"a {type(value).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def missing_or_wrong(name: str, raw: dict, expected: str) -> str:
    if name not in raw:
        return f"missing required field '{name}'"
    return f"field '{name}' must be {expected}, got {short(raw[name])}"


def one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------
# 2. Filter: walk down from the roots, so a dropped message takes its subtree with it.
# ---------------------------------------------------------------------------------------
def own_drop_reason(m: dict, langs: set | None) -> str | None:
    if m["deleted"]:
        return "deleted"
    if m["review"] is False:  # null means not reviewed yet, which is fine
        return "failed_review"
    if not m["text"]:
        return "empty_text"
    if langs is not None and m["lang"] not in langs:
        return "other_lang"
    if reserved_text_in(m["text"]):
        return "chat_token_text"
    return None


def prune(messages: list[dict], langs: set | None, summary: dict) -> tuple[list[dict], dict]:
    """Surviving root prompts (sorted by tree id) and, for each surviving message id, its
    surviving replies, best first."""
    replies = defaultdict(list)
    roots = []
    for m in messages:
        (roots if m["parent"] is None else replies[m["parent"]]).append(m)

    dropped = Counter(dict.fromkeys(DROP_REASONS, 0))
    kept_roots, kept = [], defaultdict(list)
    reached = set()
    trees_dropped_root = 0
    # (message, its surviving parent or None, the reason inherited from above or None)
    stack = [(root, None, None) for root in roots]
    while stack:
        m, parent, inherited = stack.pop()
        reached.add(m["id"])
        reason = own_drop_reason(m, langs) or inherited
        expected_role = "assistant" if parent and parent["role"] == "prompter" else "prompter"
        if reason is None and m["role"] != expected_role:
            reason = "role_order"
        if reason is None:
            (kept[parent["id"]] if parent else kept_roots).append(m)
            below = None
        else:
            dropped[reason] += 1
            if m["parent"] is None and reason in ("deleted", "failed_review"):
                trees_dropped_root += 1
                below = "tree_root_dropped"
            else:
                below = inherited or "parent_missing"
        stack.extend((child, m if below is None else None, below) for child in replies.get(m["id"], ()))
    # Never reached from a root: the parent is absent (or the ids loop).
    for m in messages:
        if m["id"] not in reached:
            dropped[own_drop_reason(m, langs) or "parent_missing"] += 1

    for siblings in kept.values():
        siblings.sort(key=rank_key)
    kept_roots.sort(key=lambda m: (m["tree"], m["id"]))
    summary["messages_kept"] = len(messages) - sum(dropped.values())
    summary["dropped"] = dict(dropped)
    summary["trees_dropped_root"] = trees_dropped_root
    return kept_roots, kept


def rank_key(m: dict):
    # Rank 0 is best; ranked replies before unranked ones; then the earlier; then the id, so
    # the order never depends on the input's order.
    return (m["rank"] is None, m["rank"] or 0, m["date"], m["id"])


# ---------------------------------------------------------------------------------------
# 3. Conversations: lists of messages from a root prompt down to an assistant reply.
# ---------------------------------------------------------------------------------------
def best_thread(root: dict, kept: dict) -> list[list[dict]]:
    thread = [root]
    while kept.get(thread[-1]["id"]):
        thread.append(kept[thread[-1]["id"]][0])
    if thread[-1]["role"] == "prompter":  # roles alternate, so one trim ends on the assistant
        thread.pop()
    return [thread] if len(thread) > 1 else []


def all_replies(root: dict, kept: dict) -> list[list[dict]]:
    out, stack = [], [[root]]
    while stack:
        path = stack.pop()
        if path[-1]["role"] == "assistant":
            out.append(path)
        stack.extend(path + [reply] for reply in reversed(kept.get(path[-1]["id"], ())))
    return out


def build_trees(roots: list[dict], kept: dict, strategy: str) -> list[tuple[dict, list]]:
    """(root, conversations) for each tree that gives at least one."""
    pick = {"best_thread": best_thread, "all_replies": all_replies}[strategy]
    return [(root, convs) for root in roots if (convs := pick(root, kept))]


def breaks_a_stated_limit(conv: list[dict]) -> bool:
    """Whether a reply breaks the word limit its user turn states, read as the rewards and
    IFEval read it (parse_word_limit: "under 50 words" allows 49). Every assistant turn
    counts, not only the first: SFT's loss covers each of them, so a follow-up asking
    "shorter, under 20 words" answered at length teaches breaking a limit as much."""
    for asked, reply in zip(conv, conv[1:]):
        if asked["role"] == "prompter" and reply["role"] == "assistant":
            limit = parse_word_limit(asked["text"])
            if limit is not None and not obeys(limit, reply["text"]):
                return True
    return False


def without_limit_breaking(trees: list) -> tuple[list, int]:
    """The trees with their limit-breaking conversations taken out, and how many were. A
    tree left with none stays: its opening prompt still serves GRPO, whose reward asks for
    the limit to be kept."""
    out, dropped = [], 0
    for root, convs in trees:
        keep = [c for c in convs if not breaks_a_stated_limit(c)]
        dropped += len(convs) - len(keep)
        out.append((root, keep))
    return out, dropped


# ---------------------------------------------------------------------------------------
# 4. Split by tree. Trees that open with the same prompt ("hi", "hello") go to the same side,
# so no eval prompt was trained on.
# ---------------------------------------------------------------------------------------
def prompt_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def split_trees(trees: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    keys = sorted({prompt_key(root["text"]) for root, _ in trees})
    if eval_fraction == 0:
        return trees, []
    if len(keys) < 2:
        raise InputError(
            "only one distinct prompt left after filtering, so nothing can be held out for eval; "
            "add data or pass --eval_fraction 0"
        )
    random.Random(f"{seed}:split").shuffle(keys)
    n_eval = min(len(keys) - 1, max(1, round(eval_fraction * len(keys))))
    eval_keys = set(keys[:n_eval])
    train = [t for t in trees if prompt_key(t[0]["text"]) not in eval_keys]
    held_out = [t for t in trees if prompt_key(t[0]["text"]) in eval_keys]
    return train, held_out


def sft_rows(trees: list) -> list[dict]:
    rows = []
    for _, convs in trees:
        for conv in convs:
            messages = as_messages(conv)
            rows.append({"text": format_chat(messages), "messages": messages, "word_limit": None})
    return rows


def concise_limit(words: int, rng: random.Random, below: float = math.inf) -> tuple[str, int] | None:
    """A limit instruction that a reply of `words` words obeys, and its bound: a random
    phrasing, N from the CONCISE_TIGHTEST smallest of WORD_LIMITS that fit (with a bound
    under `below`: one a longer reply of `below` words breaks). None if none fits."""
    template = rng.choice(WORD_LIMIT_TEMPLATES)
    fits = [n for n in WORD_LIMITS if words <= limit_of(template, n) < below]
    if words < 1 or not fits:
        return None
    n = rng.choice(fits[:CONCISE_TIGHTEST])
    return template.format(n=n), limit_of(template, n)


def add_concise_limits(rows: list[dict], share: float, rng: random.Random) -> tuple[list[dict], int]:
    """A `share` of the rows whose last reply obeys a limit that every phrasing can express
    (at most min bound of max(WORD_LIMITS), 149 words) get that limit appended to their last
    user turn (with_instruction, as the prompt files add it) and `word_limit` set to its
    bound. The reply is the volunteer's own, whole: a row is never cut to fit. Returns the
    rows (new dicts, in the same order) and how many were eligible."""
    ceiling = min(limit_of(t, max(WORD_LIMITS)) for t in WORD_LIMIT_TEMPLATES)
    eligible = [i for i, r in enumerate(rows) if 1 <= count_words(r["messages"][-1]["content"]) <= ceiling]
    chosen = set(rng.sample(eligible, round(share * len(eligible))))
    out = []
    for i, row in enumerate(rows):
        if i not in chosen:
            out.append(row)
            continue
        instruction, bound = concise_limit(count_words(row["messages"][-1]["content"]), rng)
        messages = [dict(m) for m in row["messages"]]
        messages[-2]["content"] = with_instruction(messages[-2]["content"], instruction)  # the last user turn
        out.append({"text": format_chat(messages), "messages": messages, "word_limit": bound})
    return out, len(eligible)


def shuffled(rows: list, rng: random.Random) -> list:
    # Rows go out in random order, so a consumer taking the first N (sft_qlora's limit) gets
    # a fair sample, not the replies of a few trees.
    rows = list(rows)
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------
# 5. Prompts for GRPO (train trees) and for the held-out check (eval trees).
# ---------------------------------------------------------------------------------------
def prompt_rows(trees: list, word_limit_fraction: float, rng: random.Random) -> list[dict]:
    prompts = shuffled({prompt_key(root["text"]): root["text"] for root, _ in trees}.values(), rng)
    limited = set(rng.sample(range(len(prompts)), round(word_limit_fraction * len(prompts))))
    rows = []
    for i, prompt in enumerate(prompts):
        if i not in limited:
            rows.append({"prompt": prompt, "word_limit": None})
            continue
        n, template = rng.choice(WORD_LIMITS), rng.choice(WORD_LIMIT_TEMPLATES)
        rows.append({"prompt": with_instruction(prompt, template.format(n=n)), "word_limit": limit_of(template, n)})
    return rows


# ---------------------------------------------------------------------------------------
# 6. Preference pairs for DPO: replies to the same user turn, ranked by the volunteers.
# ---------------------------------------------------------------------------------------
PAIR_KINDS = ("best_worst", "all_ranked", "concise")
PAIR_FILES = ("pairs_train.jsonl", "pairs_eval.jsonl")
# Why a user turn with two or more replies gave no ranked pair, or a pair was left out.
PAIR_SKIPS = ("unranked", "tied_rank", "same_text", "limit_broken")


def as_messages(path: list[dict]) -> list[dict]:
    return [{"role": ROLES[m["role"]], "content": m["text"]} for m in path]


def pair_kinds(spec: str) -> set[str]:
    kinds = {k.strip() for k in spec.split(",") if k.strip()}
    if not kinds or kinds - set(PAIR_KINDS):
        raise InputError(f"--pairs {spec!r}: expected a comma-separated subset of {', '.join(PAIR_KINDS)}")
    if kinds == {"concise"}:
        kinds.add("best_worst")  # concise pairs come beside the people's own preferences, never alone
    return kinds


def reply_groups(roots: list[dict], kept: dict) -> list[tuple[list[dict], list[dict]]]:
    """(the chat up to a user turn, its surviving assistant replies best first) for every
    user turn with two or more replies, in tree order."""
    groups, stack = [], [[root] for root in reversed(roots)]
    while stack:
        path = stack.pop()
        replies = kept.get(path[-1]["id"], [])
        if path[-1]["role"] == "prompter" and len(replies) >= 2:
            groups.append((path, replies))
        stack.extend(path + [reply] for reply in reversed(replies))
    return groups


def pair_row(messages: list[dict], chosen: dict, rejected: dict, kind: str, word_limit: int | None = None) -> dict:
    """TRL's conversational preference format (prompt: the chat so far; chosen, rejected:
    one assistant turn each), with where the pair came from."""
    return {"prompt": messages,
            "chosen": [{"role": "assistant", "content": chosen["text"]}],
            "rejected": [{"role": "assistant", "content": rejected["text"]}],
            "kind": kind, "ranks": [chosen["rank"], rejected["rank"]], "word_limit": word_limit,
            "tree": chosen["tree"]}


def ranked_pairs(path: list[dict], replies: list[dict], every_pair: bool, skipped: Counter,
                 keep_limit_breaking: bool = False) -> list[dict]:
    """The best-ranked reply against the worst-ranked one (or every two ranked replies, the
    better one chosen). Rank 0 is the volunteers' best; unranked replies take no part. A
    chosen reply that breaks the word limit its user turn states gives no pair (as SFT drops
    such a conversation), unless `keep_limit_breaking`."""
    ranked = [r for r in replies if r["rank"] is not None]  # best first (rank_key)
    if len(ranked) < 2:
        skipped["unranked"] += 1
        return []
    limit = None if keep_limit_breaking else parse_word_limit(path[-1]["text"])
    rows = []
    for better, worse in itertools.combinations(ranked, 2) if every_pair else [(ranked[0], ranked[-1])]:
        if better["rank"] == worse["rank"]:
            skipped["tied_rank"] += 1
        elif better["text"] == worse["text"]:
            skipped["same_text"] += 1
        elif limit is not None and not obeys(limit, better["text"]):
            skipped["limit_broken"] += 1
        else:
            rows.append(pair_row(as_messages(path), better, worse, "ranked"))
    return rows


def concise_pairs(path: list[dict], replies: list[dict], rank_gap: int, rng: random.Random) -> list[dict]:
    """For two replies the volunteers ranked at most `rank_gap` apart, a word limit the
    shorter obeys and the longer breaks, appended to the user's turn as the concise SFT
    examples and the GRPO prompts add it; the shorter reply is chosen. The limit is what
    the pair teaches: without one, the ranked pairs keep the people's own choice, long or
    short (data_prep's summary says how often that is the longer reply)."""
    if parse_word_limit(path[-1]["text"]) is not None:
        return []  # the turn states its own limit: the ranked pairs hold it to that one
    ranked = [r for r in replies if r["rank"] is not None]
    words = {r["id"]: count_words(r["text"]) for r in ranked}
    rows = []
    for a, b in itertools.combinations(ranked, 2):
        short, long_ = sorted((a, b), key=lambda m: words[m["id"]])
        if abs(a["rank"] - b["rank"]) > rank_gap or words[short["id"]] == words[long_["id"]]:
            continue
        limit = concise_limit(words[short["id"]], rng, below=words[long_["id"]])
        if limit is None:
            continue  # no limit of WORD_LIMITS falls between the two lengths
        instruction, bound = limit
        messages = as_messages(path)
        messages[-1]["content"] = with_instruction(messages[-1]["content"], instruction)
        rows.append(pair_row(messages, short, long_, "concise", bound))
    return rows


def preference_pairs(roots: list[dict], kept: dict, train_trees: list, eval_trees: list, args: ScriptArguments,
                     summary: dict) -> tuple[list[dict], list[dict]]:
    """(train pairs, eval pairs), split as the SFT files are: a pair goes where its tree
    went. Counts and skips go into `summary`."""
    kinds = pair_kinds(args.pairs)
    train_ids = {root["tree"] for root, _ in train_trees}
    eval_ids = {root["tree"] for root, _ in eval_trees}
    rng = random.Random(f"{args.seed}:pairs")
    skipped = Counter(dict.fromkeys(PAIR_SKIPS, 0))
    groups = reply_groups(roots, kept)
    rows = []
    for path, replies in groups:
        rows += ranked_pairs(path, replies, "all_ranked" in kinds, skipped, args.keep_limit_breaking)
        if "concise" in kinds:
            rows += concise_pairs(path, replies, args.concise_rank_gap, rng)
    train = shuffled([r for r in rows if r["tree"] in train_ids], random.Random(f"{args.seed}:pairs_train"))
    held_out = shuffled([r for r in rows if r["tree"] in eval_ids], random.Random(f"{args.seed}:pairs_eval"))
    ranked = [r for r in rows if r["kind"] == "ranked"]
    summary.update(
        pair_kinds=sorted(kinds),
        reply_groups=len(groups),
        pairs_skipped=dict(skipped),
        pairs_train=dict(Counter(r["kind"] for r in train)),
        pairs_eval=dict(Counter(r["kind"] for r in held_out)),
        # How often the people preferred the shorter reply: the length signal the ranked
        # pairs carry, beside the concise pairs' (always the shorter, under a stated limit).
        ranked_chosen_shorter=sum(count_words(r["chosen"][0]["content"]) < count_words(r["rejected"][0]["content"])
                                  for r in ranked),
        ranked_pairs=len(ranked),
        concise_chosen_ranked_better=sum(r["ranks"][0] < r["ranks"][1] for r in rows if r["kind"] == "concise"),
    )
    return train, held_out


def pair_summary_lines(s: dict) -> list[str]:
    def by_kind(counts):
        return ", ".join(f"{k} {n:,}" for k, n in sorted(counts.items())) or "none"

    skipped = ", ".join(f"{reason} {n:,}" for reason, n in s["pairs_skipped"].items() if n) or "none"
    lines = [
        f"  DPO pairs          {sum(s['pairs_train'].values()):>8,}   train ({by_kind(s['pairs_train'])}); eval "
        f"{sum(s['pairs_eval'].values()):,} ({by_kind(s['pairs_eval'])}); --pairs {','.join(s['pair_kinds'])}",
        f"  reply groups       {s['reply_groups']:>8,}   (user turns with 2+ replies) skipped: {skipped}",
    ]
    if not s["ranked_pairs"]:
        lines.append("  no DPO pairs: no user turn has two replies ranked against each other (oasst1's `rank`)")
        return lines
    lines.append(f"  shorter chosen     {s['ranked_chosen_shorter']:>8,}   of {s['ranked_pairs']:,} ranked pairs "
                 "(the people's choice)")
    concise = s["pairs_train"].get("concise", 0) + s["pairs_eval"].get("concise", 0)
    if concise:
        lines.append(f"  concise pairs      {concise:>8,}   the shorter chosen under a limit the prompt states; "
                     f"{s['concise_chosen_ranked_better']:,} of them ranked better by the people")
    return lines


# ---------------------------------------------------------------------------------------
# Lengths, for choosing --max_length and the word limits.
# ---------------------------------------------------------------------------------------
def percentiles(values: list[int]) -> dict:
    """Nearest-rank p50 / p90 / p99 and the max."""
    s = sorted(values)
    if not s:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    at = lambda q: s[max(0, math.ceil(q / 100 * len(s)) - 1)]  # noqa: E731
    return {"p50": at(50), "p90": at(90), "p99": at(99), "max": s[-1]}


def token_lengths(tokenizer_name: str, texts: list[str], max_length: int) -> dict:
    try:
        # As training loads it (chat tokens added, so each counts as one token); never
        # trust_remote_code.
        tokenizer = load_chat_tokenizer(tokenizer_name)
    except Exception as e:
        raise InputError(f"could not load tokenizer {tokenizer_name!r}: {one_line(e)}") from None
    lengths = []
    for i in tqdm(range(0, len(texts), 1000), desc="tokenizing", disable=None):
        batch = tokenizer(texts[i : i + 1000], add_special_tokens=False, verbose=False)["input_ids"]
        lengths += [len(ids) for ids in batch]
    return {
        "tokenizer": tokenizer_name,
        **percentiles(lengths),
        "max_length": max_length,
        "over_max_length": sum(n > max_length for n in lengths),
    }


# ---------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------
def main(args: ScriptArguments) -> dict:
    check_args(args)
    kind = source_kind(args.dataset_name)
    out_dir = Path(args.output_dir)
    check_not_overwriting_input(args.dataset_name, kind, out_dir)
    langs = None if args.lang.strip().lower() == "all" else {x.strip().lower() for x in args.lang.split(",")}
    summary = {"source": args.dataset_name, "strategy": args.strategy, "lang": args.lang}

    messages = read_messages(args, kind, summary)
    if not messages:
        raise InputError(f"{args.dataset_name}: no messages in it (is it empty?)")
    roots, kept = prune(messages, langs, summary)
    trees = build_trees(roots, kept, args.strategy)
    if not trees:
        raise InputError(nothing_left(args, langs, summary))

    limit_breaking = sum(breaks_a_stated_limit(c) for _, convs in trees for c in convs)
    if not args.keep_limit_breaking:
        trees, _ = without_limit_breaking(trees)
    summary.update(limit_breaking=limit_breaking, limit_breaking_kept=args.keep_limit_breaking)

    train_trees, eval_trees = split_trees(trees, args.eval_fraction, args.seed)
    train_all = shuffled(sft_rows(train_trees), random.Random(f"{args.seed}:train"))
    train = train_all[: args.max_examples]  # the cap: a seeded subsample, as the order is random
    train, concise_eligible = add_concise_limits(train, args.concise_share, random.Random(f"{args.seed}:concise"))
    held_out = shuffled(sft_rows(eval_trees), random.Random(f"{args.seed}:eval"))
    grpo = prompt_rows(train_trees, args.word_limit_fraction, random.Random(f"{args.seed}:grpo"))
    heldout_prompts = prompt_rows(eval_trees, args.word_limit_fraction, random.Random(f"{args.seed}:heldout"))
    pairs_train, pairs_eval = preference_pairs(roots, kept, train_trees, eval_trees, args, summary)

    summary.update(
        trees_with_conversations=len(trees),
        trees_train=len(train_trees),
        trees_eval=len(eval_trees),
        examples_train_before_cap=len(train_all),
        examples_train=len(train),
        examples_train_word_limited=sum(r["word_limit"] is not None for r in train),
        concise_eligible=concise_eligible,
        examples_eval=len(held_out),
        grpo_prompts=len(grpo),
        grpo_word_limited=sum(r["word_limit"] is not None for r in grpo),
        heldout_prompts=len(heldout_prompts),
        heldout_word_limited=sum(r["word_limit"] is not None for r in heldout_prompts),
        # How long answers run decides whether the word limits (20..150) actually bind. Each
        # example's last turn is its own reply (earlier turns recur under all_replies).
        assistant_reply_words=percentiles([count_words(row["messages"][-1]["content"]) for row in train]),
    )
    if args.tokenizer:
        summary["token_lengths"] = token_lengths(args.tokenizer, [r["text"] for r in train], args.max_length)

    # Everything is built and checked: only now touch the output directory.
    outputs = dict(zip(OUTPUT_FILES, (train, held_out, grpo, heldout_prompts, pairs_train, pairs_eval)))
    for name, rows in outputs.items():
        write_jsonl_atomic(out_dir / name, rows)
    summary["files"] = [str(out_dir / name) for name in outputs]
    print_summary(summary)
    return summary


def check_args(args: ScriptArguments) -> None:
    if args.strategy not in STRATEGIES:
        raise InputError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {args.strategy!r}")
    if not 0 <= args.eval_fraction < 1:
        raise InputError(f"--eval_fraction must be at least 0 and below 1, got {args.eval_fraction}")
    if not 0 <= args.word_limit_fraction <= 1:
        raise InputError(f"--word_limit_fraction must be between 0 and 1, got {args.word_limit_fraction}")
    if not 0 <= args.concise_share <= 1:
        raise InputError(f"--concise_share must be between 0 and 1 (a share of the train conversations), "
                         f"got {args.concise_share}")
    if args.max_examples < 1 or args.max_length < 1:
        raise InputError("--max_examples and --max_length must be at least 1")
    pair_kinds(args.pairs)
    if args.concise_rank_gap < 0:
        raise InputError(f"--concise_rank_gap must be 0 or more (ranks apart), got {args.concise_rank_gap}")
    if not args.lang.strip():
        raise InputError("--lang must be a language code such as en, or all")


def check_not_overwriting_input(name: str, kind: str, out_dir: Path) -> None:
    if kind != "hub":
        source = Path(name).resolve()
        if any((out_dir / f).resolve() == source for f in OUTPUT_FILES):
            raise InputError(f"{name}: the input is one of the output files; pick another --output_dir")
    # Found now, not after the whole read: a file where the directory (or its parent) should be,
    # a folder the OS won't let us write, or a directory where an output file should be.
    check_writable(out_dir, "--output_dir")
    for f in OUTPUT_FILES:
        if (out_dir / f).is_dir():
            raise InputError(f"{out_dir / f}: is a directory, where an output file goes; move it or pick another --output_dir")


def nothing_left(args: ScriptArguments, langs: set | None, summary: dict) -> str:
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in summary["dropped"].items() if n)
    counts = f"{summary['messages_read']:,} messages read; dropped {dropped or 'none'}"
    if langs is not None and summary["dropped"]["other_lang"]:
        name = LANG_NAMES.get(args.lang.strip().lower(), f"lang={args.lang}")
        return f"no {name} conversations left after filtering ({counts}); try --lang all"
    return f"no conversations left after filtering ({counts}): no tree has a surviving assistant reply"


def print_summary(s: dict) -> None:
    dropped = ", ".join(f"{reason} {n:,}" for reason, n in s["dropped"].items() if n) or "none"
    lines = [
        f"data_prep: {s['source']} (strategy {s['strategy']}, lang {s['lang']})",
        f"  messages read      {s['messages_read']:>8,}   in {s['trees_read']:,} trees",
        f"  bad lines skipped  {s['bad_lines_skipped']:>8,}",
        *(f"      {where}" for where in s["bad_lines_first"]),
        f"  messages kept      {s['messages_kept']:>8,}   dropped: {dropped}",
        f"  trees dropped      {s['trees_dropped_root']:>8,}   (root prompt deleted or failed review)",
        f"  trees used         {s['trees_with_conversations']:>8,}   train {s['trees_train']:,}, eval {s['trees_eval']:,}",
        f"  limit broken       {s['limit_breaking']:>8,}   conversations whose reply breaks the word limit its prompt "
        "states: " + ("kept (--keep_limit_breaking)" if s["limit_breaking_kept"] else "dropped"),
        f"  train examples     {s['examples_train']:>8,}   (of {s['examples_train_before_cap']:,} before the cap)",
        f"  with a word limit  {s['examples_train_word_limited']:>8,}   (concise: of {s['concise_eligible']:,} "
        "whose reply obeys one)",
        f"  eval examples      {s['examples_eval']:>8,}",
        f"  grpo prompts       {s['grpo_prompts']:>8,}   ({s['grpo_word_limited']:,} with a word limit)",
        f"  held-out prompts   {s['heldout_prompts']:>8,}   ({s['heldout_word_limited']:,} with a word limit)",
        "  words per reply (train, last turn): p50 {p50}, p90 {p90}, p99 {p99}, max {max}".format(
            **s["assistant_reply_words"]
        ),
    ]
    if "token_lengths" in s:
        t = s["token_lengths"]
        lines.append(
            f"  train tokens ({t['tokenizer']}): p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}; "
            f"{t['over_max_length']:,} over --max_length {t['max_length']}"
        )
    lines += pair_summary_lines(s)
    lines.append("  wrote " + ", ".join(s["files"]))
    print("\n".join(lines))


if __name__ == "__main__":
    exit_on_input_error(lambda: main(parse_script_args(ScriptArguments, sys.argv[1:])))  # an InputError: one line, exit 2
