"""Score your own prompt / completion pairs with the GRPO rewards, as GRPO scores its
rollouts (the rewards themselves: phi2qlora/rewards.py).

    python rewards.py pairs.jsonl [--out scored.jsonl]

Each line: {"prompt": str, "completion": str, "ended": bool (default true), "word_limit":
int (optional)}; the prompt may be the user's message or the chat-rendered prompt. Prints
a table of each reward, the weighted total and the word-limit compliance per row.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from phi2qlora.args import parse_script_args
from phi2qlora.chat import answer_text, user_message
from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.files import check_writable, read_jsonl_rows, write_jsonl_atomic
from phi2qlora.rewards import REWARD_FUNCS, REWARD_WEIGHTS, score, weighted_total, word_limit_compliance
from phi2qlora.word_limits import count_words, row_limit, valid_limit


def read_pairs(path: str) -> list[dict]:
    rows = [check_pair(row, f"{path}:{n}") for n, row in read_jsonl_rows(path, "file", objects=False, if_missing="")]
    if not rows:
        raise InputError(f"{path}: no rows (each line: {{\"prompt\": ..., \"completion\": ...}})")
    return rows


def check_pair(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object with \"prompt\" and \"completion\"")
    for name in ("prompt", "completion"):
        if not isinstance(row.get(name), str):
            got = "missing" if name not in row else f"a {type(row[name]).__name__}"
            raise InputError(f"{where}: field '{name}' must be a string ({got})")
    if row.get("ended") is None:
        row["ended"] = True  # someone's own text counts as a finished answer
    elif not isinstance(row["ended"], bool):
        raise InputError(f"{where}: field 'ended' must be true or false, got {json.dumps(row['ended'])}")
    limit = row.get("word_limit")
    if limit is not None and valid_limit(limit) is None:
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
            "total": weighted_total(values),
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
    weights = ", ".join(f"{short[n]} {REWARD_WEIGHTS[n]:g}" for n in names)
    lines.append(f"{len(scored)} rows; total = weighted sum ({weights}); comply: mean over rows with a limit")
    return "\n".join(lines)


@dataclass
class RewardsArguments:
    """Score prompt/completion pairs with the GRPO rewards. Each line: {"prompt": str,
    "completion": str, "ended": bool (default true), "word_limit": int (optional)}; the
    prompt may be the user's message or the chat-rendered prompt."""

    pairs: str | None = field(default=None, metadata={"help": "JSONL file of prompt/completion pairs (or the first "
                                                              "argument: python rewards.py pairs.jsonl)"})
    out: str | None = field(default=None, metadata={"help": "also write the scored rows here (JSONL)"})


def parse_args(argv: list[str] | None = None) -> RewardsArguments:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--pairs", *argv]  # the file as the first argument, as the usage line has it
    args = parse_script_args(RewardsArguments, argv)
    if not args.pairs:
        raise InputError("which pairs? python rewards.py pairs.jsonl (--help lists the options)")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
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
