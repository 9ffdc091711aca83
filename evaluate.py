"""Compare the base model and the SFT, DPO and GRPO adapters on held-out prompts.

One base model is loaded (4-bit NF4, as in training) and the adapters are switched on it,
so three models cost the memory of one. Each answers every prompt greedily, in batches;
the answers are scored with the GRPO rewards and summarised per model:

    python evaluate.py                                   # base, SFT and GRPO on data/heldout_prompts.jsonl
    python evaluate.py --models base,sft                 # any subset, in any order
    python evaluate.py --models base,sft,dpo,grpo        # with dpo_train.py's adapter too
    python evaluate.py --prompts_file my_prompts.txt     # .jsonl rows {"prompt", "word_limit"} or .txt lines

Writes `report.json` (settings, metrics, every answer with its scores), `report.md` (the
metrics table, then the models' answers side by side for a sample of prompts) and
`report.png` (the metrics as bars) into `--output_dir` (default outputs/eval).

Metrics, per model (w = an answer's words, counted as the rewards count them):
  word_limit_compliance  share of prompts with a word limit whose answer obeys it
                         (word_limit_compliance: IFEval's strict per-prompt
                         accuracy for the length instruction; "under 50 words" allows
                         at most 49; an answer with no word never obeys)
  mean_words, median_words
  end_of_turn_rate       share of answers that ended with <|end|> within max_new_tokens
  repetition_rate        share of answers whose repetition() score is above
                         REPETITION_FREE (0.3), where format_reward starts to
                         penalise repetition: a quarter of the word 4-grams repeated, or
                         text that compresses like "!!!!"
  empty_rate             share of answers with no words
  <reward> per reward    mean of each of REWARD_FUNCS over all prompts (the word
                         limit reward is 0 for prompts without a limit), and `reward`,
                         their sum weighted by REWARD_WEIGHTS, as GRPO logs it
  preference_accuracy    on the held-out pairs of `--pairs_file` (data_prep.py's
                         pairs_eval.jsonl): share of pairs whose chosen reply the model
                         finds more likely, by summed log-probs (the margin DPO trains);
                         `_per_token` by the mean log-prob a token, blind to length
Greedy decoding, so the same weights give the same answers; `--seed` picks the prompts
shown in report.md.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phi2qlora.args import parse_script_args
from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.files import atomic_path, check_output_apart, read_prompt_rows, write_atomic
from phi2qlora.model import check_adapter_fits, load_adapter, load_base_model, load_chat_tokenizer, pick_dtype
from phi2qlora.pairs import read_pair_rows
from phi2qlora.rewards import (
    REPETITION_FREE,
    REWARD_FUNCS,
    REWARD_WEIGHTS,
    repetition,
    score,
    weighted_total,
    word_limit_compliance,
)
from phi2qlora.word_limits import describe_limit, row_limit

MODELS = ("base", "sft", "dpo", "grpo")
DEFAULT_PAIRS = "data/pairs_eval.jsonl"


@dataclass
class EvalArguments:
    model_name_or_path: str = field(default="microsoft/phi-2", metadata={"help": "the base model the adapters were trained on"})
    model_revision: str = field(default="main", metadata={"help": "the base model's revision"})
    sft_adapter: str = field(default="outputs/phi2-oasst1-qlora", metadata={"help": "sft_qlora.py's output dir"})
    grpo_adapter: str = field(default="outputs/phi2-oasst1-grpo", metadata={"help": "grpo_train.py's output dir"})
    dpo_adapter: str = field(default="outputs/phi2-oasst1-dpo", metadata={"help": "dpo_train.py's output dir"})
    models: str = field(default="base,sft,grpo",
                        metadata={"help": "which to compare, comma-separated: base, sft, dpo, grpo"})
    prompts_file: str = field(default="data/heldout_prompts.jsonl",
                              metadata={"help": ".jsonl rows {'prompt', 'word_limit'} (data_prep.py) or .txt, one per line"})
    max_prompts: int | None = field(default=None, metadata={"help": "use the first N prompts only"})
    output_dir: str = field(default="outputs/eval", metadata={"help": "where report.json, report.md, report.png go"})
    # 256 tokens is about 190 words: room for a full answer to a question without a limit
    # (GRPO trains at 160 tokens), so "cut off" means the model ran on, not a tight cap.
    max_new_tokens: int = field(default=256, metadata={"help": "length cap of each answer, in tokens"})
    # 16 prompts x 256 new tokens fits a T4 next to Phi-2 in 4-bit with room to spare.
    batch_size: int = field(default=16, metadata={"help": "prompts generated together"})
    # The NF4 base is quantised from the weights in this dtype, so it should be the one
    # training used (bf16 rounds Phi-2's fp16 weights before quantising: another base).
    dtype: str = field(default="auto", metadata={"help": "compute dtype, as in training: auto (fp16 on a T4, bf16 on "
                                                         "Ampere+, fp32 on the CPU), float16 (fp16), bfloat16 (bf16), "
                                                         "float32 (fp32)"})
    load_in_4bit: bool = field(default=True, metadata={"help": "load the base in 4-bit NF4, as it was trained"})
    use_bnb_nested_quant: bool = field(default=True, metadata={"help": "double quantisation, as in training"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "attention kernel (sdpa is fp16-safe on a T4)"})
    sample_prompts: int = field(default=8, metadata={"help": "prompts shown side by side in report.md"})
    seed: int = field(default=42, metadata={"help": "picks the prompts shown in report.md; seeds torch too"})
    pairs_file: str = field(default=DEFAULT_PAIRS, metadata={
        "help": "preference pairs (data_prep.py's pairs_eval.jsonl) for the preference accuracy; '' for none. The "
                "default is skipped with a note when it is not there"})
    max_pairs: int | None = field(default=None, metadata={"help": "score the first N pairs only"})
    # DPO's T4 recipe cuts prompt + reply at 512 tokens: the margins measured are the ones it trains.
    pairs_max_length: int = field(default=512, metadata={"help": "cut each prompt + reply at this many tokens"})


def requested_models(args: EvalArguments) -> dict[str, str | None]:
    """`{name: adapter dir or None for the base}`, checked before anything loads."""
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        raise InputError(f"--models {args.models!r}: expected a comma-separated subset of {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise InputError(f"--models {args.models!r}: a model is named twice")
    dirs = {"base": None, "sft": args.sft_adapter, "dpo": args.dpo_adapter, "grpo": args.grpo_adapter}
    script = {"sft": "sft_qlora.py", "dpo": "dpo_train.py", "grpo": "grpo_train.py"}
    for name in names:
        if name != "base":
            check_adapter_fits(dirs[name], args.model_name_or_path, f"--{name}_adapter", "--model_name_or_path",
                               args.model_revision,
                               f"run {script[name]} first, pass its output dir, or leave {name} out of --models")
    return {name: dirs[name] for name in names}


def load_models(args: EvalArguments, adapters: dict[str, str]):
    """One base model with every adapter loaded beside the others under its own name, and
    the tokenizer: the one saved with an adapter (chat tokens included) or the base's."""
    saved = [d for d in adapters.values() if (Path(d) / "tokenizer_config.json").is_file()]
    tokenizer = load_chat_tokenizer(saved[0] if saved else args.model_name_or_path,
                                    "main" if saved else args.model_revision)
    model = load_base_model(args.model_name_or_path, tokenizer, pick_dtype(args.dtype),
                            load_in_4bit=args.load_in_4bit, double_quant=args.use_bnb_nested_quant,
                            attn_implementation=args.attn_implementation, revision=args.model_revision)
    for name, adapter_dir in adapters.items():
        model = load_adapter(model, adapter_dir, adapter_name=name)
    return model.eval(), tokenizer


def as_model(model, name: str):
    """Make `name` the model that runs: the base with the adapters off, or one adapter."""
    from peft import PeftModel

    if name == "base":
        return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
    model.set_adapter(name)
    return contextlib.nullcontext()


def generate_all(model, tokenizer, names: list[str], prompts: list[str], args: EvalArguments) -> dict:
    """`{name: (answers, seconds)}`, one progress bar over every batch of every model."""
    import torch
    from tqdm.auto import tqdm

    from phi2qlora.answers import generate_answers

    starts = range(0, len(prompts), args.batch_size)
    results = {}
    with tqdm(total=len(names) * len(starts), unit="batch", desc="generating") as bar:
        for name in names:
            bar.set_postfix_str(name)
            torch.manual_seed(args.seed)  # greedy needs none, but nothing random goes unseeded
            answers, start = [], time.perf_counter()
            with as_model(model, name):
                for i in starts:
                    batch = prompts[i : i + args.batch_size]
                    answers += generate_answers(model, tokenizer, batch, args.max_new_tokens, batch_size=len(batch))
                    bar.update()
            results[name] = (answers, time.perf_counter() - start)
    return results


def score_answers(rows: list[dict], answers: list[dict]) -> list[dict]:
    """Each answer with its words, end of turn, repetition, compliance and rewards."""
    prompts = [r["prompt"] for r in rows]
    limits = [r["word_limit"] for r in rows]
    texts = [a["answer"] for a in answers]
    ended = [a["ended"] for a in answers]
    scores = score(prompts, texts, ended=ended, word_limit=limits)
    compliance = word_limit_compliance(prompts, texts, word_limit=limits)
    return [{
        "prompt": row["prompt"],
        "word_limit": row["word_limit"],
        "answer": answer["answer"],
        "words": answer["words"],
        "ended": answer["ended"],
        "repetition": round(repetition(answer["answer"]), 4),
        "compliance": compliance[i],
        "rewards": {name: values[i] for name, values in scores.items()},
    } for i, (row, answer) in enumerate(zip(rows, answers))]


def mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarise(scored: list[dict]) -> dict:
    obeyed = [a["compliance"] for a in scored if a["compliance"] is not None]
    words = [a["words"] for a in scored]
    metrics = {
        "answers": len(scored),
        "limited_prompts": len(obeyed),
        "word_limit_compliance": mean(obeyed),
        "mean_words": mean(words),
        "median_words": statistics.median(words),
        "end_of_turn_rate": mean(a["ended"] for a in scored),
        "repetition_rate": mean(a["repetition"] > REPETITION_FREE for a in scored),
        "empty_rate": mean(a["words"] == 0 for a in scored),
    }
    for f in REWARD_FUNCS:
        metrics[f.__name__] = mean(a["rewards"][f.__name__] for a in scored)
    metrics["reward"] = weighted_total(metrics)  # as GRPO logs `reward`
    return metrics


# ---------------------------------------------------------------------------------------
# Preference accuracy: does the model prefer the reply the people chose?
# ---------------------------------------------------------------------------------------
def pair_rows(args: EvalArguments) -> list[dict]:
    """The held-out pairs, checked before anything loads; none if `--pairs_file ''`, or if
    the default file is not there (data_prep.py before DPO existed, or a prompts-only run)."""
    if (args.max_pairs is not None and args.max_pairs < 1) or args.pairs_max_length < 1:
        raise InputError("--max_pairs and --pairs_max_length must be at least 1")
    if not args.pairs_file:
        return []
    if args.pairs_file == DEFAULT_PAIRS and not Path(DEFAULT_PAIRS).is_file():
        print(f"[eval] no {DEFAULT_PAIRS} (data_prep.py writes it): no preference accuracy")
        return []
    return [row for _, row in read_pair_rows(args.pairs_file)][: args.max_pairs]


def preference_metrics(model, tokenizer, names: list[str], pairs: list[dict], args: EvalArguments) -> dict:
    """`{name: {preference_accuracy, preference_accuracy_per_token, preference_pairs,
    preference_by_kind}}`, each model scoring the same pairs (None without pairs)."""
    from phi2qlora.pairs import completion_logps, preference_accuracy

    out = {}
    for name in names:
        if not pairs:
            out[name] = {"preference_accuracy": None, "preference_accuracy_per_token": None, "preference_pairs": 0}
            continue
        with as_model(model, name):
            chosen, rejected = completion_logps(model, tokenizer, pairs, args.pairs_max_length, args.batch_size)
        by_kind = {}
        for kind in sorted({row.get("kind", "ranked") for row in pairs}):
            i = [j for j, row in enumerate(pairs) if row.get("kind", "ranked") == kind]
            c, r = [chosen[j] for j in i], [rejected[j] for j in i]
            by_kind[kind] = {"pairs": len(i), "accuracy": preference_accuracy(c, r),
                             "per_token": preference_accuracy(c, r, per_token=True)}
        out[name] = {"preference_accuracy": preference_accuracy(chosen, rejected),
                     "preference_accuracy_per_token": preference_accuracy(chosen, rejected, per_token=True),
                     "preference_pairs": len(pairs), "preference_by_kind": by_kind}
    return out


def preference_markdown(report: dict) -> str:
    """The note under the table on preference accuracy, and its split by pair kind."""
    first = next(iter(report["metrics"].values()))
    if not first.get("preference_pairs"):
        return ""
    lines = [f"Preference accuracy: on {first['preference_pairs']} pairs of `{report['settings']['pairs_file']}`, "
             "the share whose chosen reply the model finds more likely, by summed log-probs (the margin DPO "
             "trains; it favours the shorter reply) and per token (blind to length).\n"]
    kinds = list(first["preference_by_kind"])
    if len(kinds) > 1:
        lines.append("| model | " + " | ".join(f"{k} ({first['preference_by_kind'][k]['pairs']})" for k in kinds)
                     + " |\n| --- |" + " ---: |" * len(kinds))
        for name, m in report["metrics"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{m['preference_by_kind'][k]['accuracy']:.2f} / {m['preference_by_kind'][k]['per_token']:.2f}"
                for k in kinds) + " |")
        lines.append("\nBy pair kind: summed / per token.\n")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The report: JSON for programs, Markdown for people, a chart for a glance.
# ---------------------------------------------------------------------------------------
COLUMNS = [  # (metric, header, format)
    ("word_limit_compliance", "word-limit compliance", ".2f"),
    ("mean_words", "mean words", ".1f"),
    ("median_words", "median words", ".1f"),
    ("end_of_turn_rate", "ended", ".2f"),
    ("repetition_rate", "repetitive", ".2f"),
    ("empty_rate", "empty", ".2f"),
    *((f.__name__, f.__name__.removesuffix("_reward").replace("_", " "), "+.2f") for f in REWARD_FUNCS),
    ("reward", "reward (weighted)", "+.2f"),
    ("preference_accuracy", "preference accuracy", ".2f"),
    ("preference_accuracy_per_token", "pref. acc. per token", ".2f"),
]


def metrics_table(metrics: dict[str, dict]) -> str:
    lines = ["| model | " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "| --- |" + " ---: |" * len(COLUMNS)]
    for name, m in metrics.items():
        cells = ["-" if m[key] is None else format(m[key], spec) for key, _, spec in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(text: str) -> str:
    """Text for one Markdown table cell: pipes escaped, lines joined with <br>."""
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")
    return "<br>".join(line for line in text.splitlines() if line.strip()) or "*(empty)*"


def report_markdown(report: dict, shown: list[int]) -> str:
    settings = report["settings"]
    first = next(iter(report["answers"].values()))
    parts = [
        "# Evaluation\n",
        f"{len(first)} prompts from `{settings['prompts_file']}` "
        f"({report['metrics'][next(iter(report['metrics']))]['limited_prompts']} with a word limit), "
        f"greedy, at most {settings['max_new_tokens']} new tokens; base `{settings['model_name_or_path']}`"
        f"{' in 4-bit NF4' if settings['load_in_4bit'] else ''}, compute dtype {settings['compute_dtype']}.\n",
        metrics_table(report["metrics"]) + "\n",
        "Compliance: share of the word-limited prompts obeyed. Ended: the answer closed its turn with "
        "`<|end|>` within the token cap. Repetitive: repetition above "
        f"{REPETITION_FREE}. Rewards: means of rewards.py's rewards; weighted with "
        + ", ".join(f"{name} {w:g}" for name, w in REWARD_WEIGHTS.items()) + ".\n",
        preference_markdown(report),
        f"## Answers side by side ({len(shown)} of {len(first)} prompts, seed {settings['seed']})\n",
    ]
    for i in shown:
        limit = row_limit(first[i]["prompt"], first[i]["word_limit"])  # as the compliance column reads it
        parts.append(f"### Prompt {i + 1}" + (f" (limit: {describe_limit(limit)})" if limit else "") + "\n")
        parts.append("> " + "\n> ".join(first[i]["prompt"].splitlines()) + "\n")
        parts.append("| model | words | ended | answer |\n| --- | ---: | :---: | --- |")
        for name, answers in report["answers"].items():
            a = answers[i]
            parts.append(f"| {name} | {a['words']} | {'yes' if a['ended'] else 'no'} | {cell(a['answer'])} |")
        parts.append("")
    return "\n".join(parts)


def plot_metrics(metrics: dict[str, dict], path: Path) -> None:
    """Grouped bars, one colour per model: rates and rewards on the left, lengths on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [[(k, h) for k, h, _ in COLUMNS if "words" not in k], [(k, h) for k, h, _ in COLUMNS if "words" in k]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.8 / len(metrics)
    for ax, panel in zip(axes, panels):
        for j, (name, m) in enumerate(metrics.items()):
            xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(panel))]
            ax.bar(xs, [m[k] or 0.0 for k, _ in panel], width, label=name)
        ax.set_xticks(range(len(panel)), [h for _, h in panel], rotation=30, ha="right")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("rates and rewards")
    axes[1].set_title("answer length (words)")
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def main(args: EvalArguments) -> dict:
    # Everything the user gave is checked before the model loads: a typo costs seconds.
    models = requested_models(args)
    rows = read_prompt_rows(args.prompts_file)[: args.max_prompts]
    pairs = pair_rows(args)
    check_output_apart(args.output_dir, "--output_dir", {"--model_name_or_path": args.model_name_or_path,
                                                         "--prompts_file": args.prompts_file,
                                                         **({"--pairs_file": args.pairs_file} if pairs else {}),
                                                         **{f"--{n}_adapter": d for n, d in models.items() if d}})
    if min(args.batch_size, args.max_new_tokens, 1 if args.max_prompts is None else args.max_prompts) < 1:
        raise InputError("--batch_size, --max_new_tokens and --max_prompts must be at least 1")
    dtype = pick_dtype(args.dtype)
    print(f"[eval] {', '.join(models)} on {len(rows)} prompts from {args.prompts_file}, "
          f"compute dtype {str(dtype).split('.')[-1]}")

    model, tokenizer = load_models(args, {n: d for n, d in models.items() if d is not None})
    generated = generate_all(model, tokenizer, list(models), [r["prompt"] for r in rows], args)

    answers = {name: score_answers(rows, generated[name][0]) for name in models}
    metrics = {name: {**summarise(answers[name]), "seconds": round(generated[name][1], 2)} for name in models}
    for name, preference in preference_metrics(model, tokenizer, list(models), pairs, args).items():
        metrics[name].update(preference)
    report = {
        "settings": {**asdict(args), "adapters": {n: d for n, d in models.items() if d}, "prompts": len(rows),
                     "compute_dtype": str(dtype).split(".")[-1]},
        "metrics": metrics,
        "answers": answers,
    }
    out = Path(args.output_dir)
    shown = sorted(random.Random(args.seed).sample(range(len(rows)), min(args.sample_prompts, len(rows))))
    write_atomic(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_atomic(out / "report.md", report_markdown(report, shown))
    plot_metrics(metrics, out / "report.png")
    print(metrics_table(metrics))
    print(f"[eval] report.json, report.md and report.png in {out}")
    return report


def parse_args(argv: list[str] | None = None) -> EvalArguments:
    return parse_script_args(EvalArguments, sys.argv[1:] if argv is None else argv)  # --config my.yaml works too


if __name__ == "__main__":
    exit_on_input_error(lambda: main(parse_args()))
