"""Time data_prep.py end to end on a synthetic oasst1-sized file.

    python benchmarks/bench_data_prep.py [--repeats 5] [--seed 0] [--keep DIR]

oasst1 cannot be downloaded here, so this writes a look-alike: 88,838 flat message rows
(oasst1's train + validation count) in about 10k trees, with oasst1's shape: a prompt,
1-5 ranked assistant replies, user follow-ups, up to 6 levels; ~10% of messages deleted
or failed review; a dozen languages with English the largest; text lengths lognormal,
mostly 100-1000 characters; and the extra columns (user_id, detoxify, emojis, labels)
that cost parsing time. It then runs `python data_prep.py` on it as a user would
(interpreter start, imports, reading, writing) for each strategy, and prints the median
and the spread of the wall times and the counts of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_prep  # noqa: E402

N_MESSAGES = 88_838
# Roughly oasst1's language mix (share of trees).
LANGS = {"en": 45, "es": 25, "ru": 8, "de": 4, "zh": 4, "fr": 3, "th": 3, "pt-BR": 3, "ca": 2, "uk": 1, "it": 1, "ja": 1}
_letters = random.Random(1234)
WORDS = ["".join(_letters.choices("abcdefghijklmnopqrstuvwxyz", k=_letters.randint(2, 10))) for _ in range(3000)]
GREETINGS = ["Hello", "hi", "What is the meaning of life?", "Tell me a joke."]  # prompts many trees share


def text_of_length(rng: random.Random, chars: int) -> str:
    words = rng.choices(WORDS, k=max(1, chars // 7))
    return " ".join(words)[:chars].capitalize() + "."


def n_replies(rng: random.Random, role: str, depth: int) -> int:
    """How many children a message gets: several ranked assistant replies per prompt, fewer
    follow-ups the deeper the conversation."""
    if depth >= 5:
        return 0
    if role == "prompter":
        weights = [0, 15, 20, 45, 15, 5] if depth == 0 else [15, 50, 28, 7]
    else:
        weights = [58, 30, 10, 2] if depth < 3 else [75, 22, 3]
    return rng.choices(range(len(weights)), weights)[0]


def message(rng, tree_id, parent, role, lang, date, message_id=None) -> dict:
    chars = int(min(8000, max(20, rng.lognormvariate(math.log(420 if role == "assistant" else 200), 0.75))))
    flag = rng.random()
    return {
        "message_id": message_id or str(uuid.UUID(int=rng.getrandbits(128))),
        "parent_id": parent,
        "user_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "created_date": date.isoformat(),
        "text": text_of_length(rng, chars),
        "role": role,
        "lang": lang,
        "review_count": rng.randint(2, 5),
        "review_result": False if flag < 0.04 else (None if flag < 0.07 else True),
        "deleted": 0.04 <= flag < 0.09,
        "rank": None,
        "synthetic": False,
        "model_name": None,
        "detoxify": {k: rng.random() / 100 for k in ("toxicity", "severe_toxicity", "obscene", "threat", "insult")},
        "message_tree_id": tree_id,
        "tree_state": "ready_for_export",
        "emojis": {"name": ["+1", "_skip_reply"], "count": [rng.randint(0, 9), rng.randint(0, 3)]},
        "labels": {"name": ["spam", "quality"], "value": [0.0, rng.random()], "count": [3, 3]},
    }


def synthetic_oasst(n_messages: int = N_MESSAGES, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    start = datetime(2023, 1, 1, tzinfo=timezone.utc)
    rows = []
    while len(rows) < n_messages:
        tree_id = str(uuid.UUID(int=rng.getrandbits(128)))
        lang = rng.choices(list(LANGS), list(LANGS.values()))[0]
        date = start + timedelta(seconds=rng.randrange(120 * 86400))
        root = message(rng, tree_id, None, "prompter", lang, date, message_id=tree_id)
        if rng.random() < 0.01:
            root["text"] = rng.choice(GREETINGS)
        tree, frontier = [root], [(root, 0)]
        while frontier:
            parent, depth = frontier.pop()
            role = "assistant" if parent["role"] == "prompter" else "prompter"
            children = []
            for _ in range(n_replies(rng, parent["role"], depth)):
                date = datetime.fromisoformat(parent["created_date"]) + timedelta(minutes=rng.randrange(1, 5000))
                children.append(message(rng, tree_id, parent["message_id"], role, lang, date))
            if len(children) > 1 and rng.random() < 0.85:  # most sibling sets get ranked
                for rank, child in enumerate(rng.sample(children, len(children))):
                    child["rank"] = rank
            tree += children
            frontier += [(c, depth + 1) for c in children]
        rows += tree
    return rows[:n_messages]  # the last tree may lose a few leaves' worth: harmless


def time_cli(input_path: Path, out_dir: Path, strategy: str) -> float:
    command = [sys.executable, str(ROOT / "data_prep.py"), "--dataset_name", str(input_path)]
    command += ["--output_dir", str(out_dir), "--strategy", strategy]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def counts(input_path: Path, out_dir: Path, strategy: str) -> dict:
    args = data_prep.ScriptArguments(dataset_name=str(input_path), output_dir=str(out_dir), strategy=strategy)
    with contextlib.redirect_stdout(io.StringIO()):
        return data_prep.main(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="write the synthetic file and outputs here instead of a temp dir")
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(opts.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        input_path = work / "oasst1_synthetic.jsonl"
        start = time.perf_counter()
        rows = synthetic_oasst(seed=opts.seed)
        with open(input_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        n_trees = len({r["message_tree_id"] for r in rows})
        size_mb = input_path.stat().st_size / 1e6
        print(f"synthetic file: {len(rows):,} messages, {n_trees:,} trees, {size_mb:.0f} MB "
              f"(made in {time.perf_counter() - start:.1f} s)")

        for strategy in data_prep.STRATEGIES:
            out_dir = work / f"out_{strategy}"
            times = [time_cli(input_path, out_dir, strategy) for _ in range(opts.repeats)]
            s = counts(input_path, out_dir, strategy)
            print(
                f"{strategy:12s} median {statistics.median(times):.2f} s  (min {min(times):.2f}, max {max(times):.2f}, "
                f"{opts.repeats} runs)  kept {s['messages_kept']:,} messages, {s['trees_with_conversations']:,} trees -> "
                f"train {s['examples_train']:,}, eval {s['examples_eval']:,}, grpo prompts {s['grpo_prompts']:,}, "
                f"held-out prompts {s['heldout_prompts']:,}; dropped {s['dropped']}"
            )


if __name__ == "__main__":
    main()
