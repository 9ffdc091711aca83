"""DPO preference pairs: data_prep.py's pairs files from the bundled samples (counts, the
split, the concise rule) and the pairs reader's one-line errors. No model: seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SAMPLE

import data_prep
from phi2qlora.errors import InputError
from phi2qlora.pairs import read_pair_rows, tokenize_pair
from phi2qlora.word_limits import count_words, parse_word_limit, user_message

PAIRS_SAMPLE = ROOT / "data" / "sample" / "oasst1_pairs_sample.jsonl"


def prepared(out: Path, source=SAMPLE, *flags: str) -> tuple[dict, Path]:
    args = data_prep.parse_script_args(data_prep.ScriptArguments,
                                       ["--dataset_name", str(source), "--output_dir", str(out), *flags])
    return data_prep.main(args), out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pairs(out: Path) -> tuple[list[dict], list[dict]]:
    return rows(out / "pairs_train.jsonl"), rows(out / "pairs_eval.jsonl")


def test_counts_match_the_hand_built_expectation(tmp_path):
    """The pairs sample, counted by hand: seven trees whose opening prompt has ranked replies
    (two of them three: ranks 0, 1, 2), one tree whose ranked replies answer a follow-up
    question (its first reply has no sibling), one with two unranked replies, one with a
    single reply. Best against worst: 7 + 1 = 8 pairs; every ranked pair: 3 + 3 + 6 x 1 = 12;
    the rank-0 reply is the shorter in 3 of the 8 (40 < 43, 45 < 47, 23 < 25 words)."""
    summary, out = prepared(tmp_path / "best", PAIRS_SAMPLE, "--eval_fraction", "0")
    assert summary["reply_groups"] == 9 and summary["pairs_skipped"] == {"unranked": 1, "tied_rank": 0, "same_text": 0,
                                                                         "limit_broken": 0}
    assert summary["pairs_train"] == {"ranked": 8} and summary["pairs_eval"] == {}
    assert summary["ranked_chosen_shorter"] == 3
    train, held_out = pairs(out)
    assert len(train) == 8 and held_out == []
    assert sorted(tuple(r["ranks"]) for r in train) == [(0, 1)] * 6 + [(0, 2)] * 2
    follow_up = [r for r in train if len(r["prompt"]) == 3]  # user, assistant, user
    assert len(follow_up) == 1 and follow_up[0]["prompt"][-1]["content"] == "How often should I run in the first month?"

    summary, out = prepared(tmp_path / "all", PAIRS_SAMPLE, "--eval_fraction", "0", "--pairs", "all_ranked")
    assert summary["pairs_train"] == {"ranked": 12}
    assert sorted(tuple(r["ranks"]) for r in pairs(out)[0]) == [(0, 1)] * 8 + [(0, 2)] * 2 + [(1, 2)] * 2


@pytest.mark.parametrize("kind, expected", [("best_worst", 43), ("all_ranked", 57)])
def test_main_sample_counts_and_split(tmp_path, kind, expected):
    """46 English user turns of the main sample have two or more assistant replies; one loses
    its deleted best reply (one reply left) and one hangs below a deleted prompt: 44 groups,
    all ranked. One asks for "under 50 words" and both its replies break it (50 and 70
    words): no pair, as SFT drops its conversation. So 43 best-against-worst pairs; seven
    groups keep three ranked replies, two more pairs each with all_ranked: 57. Pairs split
    by tree, as the SFT files do."""
    # No limits appended to the SFT rows here, so their opening turns are the trees' own.
    summary, out = prepared(tmp_path, SAMPLE, "--eval_fraction", "0.25", "--pairs", kind, "--concise_share", "0")
    train, held_out = pairs(out)
    assert len(train) + len(held_out) == expected and summary["reply_groups"] == 44
    assert train and held_out
    train_trees, eval_trees = {r["tree"] for r in train}, {r["tree"] for r in held_out}
    assert not train_trees & eval_trees
    # The same split as the SFT files: each pair's conversation opens as one of its side's rows.
    sft_openings = {side: {r["messages"][0]["content"] for r in rows(out / f"{side}.jsonl")} for side in ("train", "eval")}
    assert {r["prompt"][0]["content"] for r in train} <= sft_openings["train"]
    assert {r["prompt"][0]["content"] for r in held_out} <= sft_openings["eval"]


def test_chosen_and_rejected_share_the_prompt_and_differ(tmp_path):
    _, out = prepared(tmp_path, SAMPLE, "--pairs", "all_ranked,concise")
    train, held_out = pairs(out)
    for row in train + held_out:
        assert [t["role"] for t in row["prompt"]][-1] == "user"
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
        assert row["ranks"][0] != row["ranks"][1]
        if row["kind"] == "ranked":
            assert row["ranks"][0] < row["ranks"][1] and row["word_limit"] is None  # the people's better reply


def test_concise_pairs_obey_their_rule(tmp_path):
    """A concise pair: two replies ranked at most --concise_rank_gap apart, the shorter one
    chosen; the prompt is the ranked pair's prompt with a word limit appended to the last
    user turn, which the chosen reply obeys and the rejected one breaks, read as the rewards
    read it."""
    summary, out = prepared(tmp_path, SAMPLE, "--pairs", "concise", "--eval_fraction", "0.25")
    train, held_out = pairs(out)
    concise = [r for r in train + held_out if r["kind"] == "concise"]
    ranked = {(r["tree"], r["prompt"][-1]["content"]): r for r in train + held_out if r["kind"] == "ranked"}
    assert len(concise) == summary["pairs_train"]["concise"] + summary["pairs_eval"]["concise"] >= 20
    for row in concise:
        chosen, rejected = (count_words(row[k][0]["content"]) for k in ("chosen", "rejected"))
        assert abs(row["ranks"][0] - row["ranks"][1]) <= 1
        kind, bound = parse_word_limit(user_message(row["prompt"]))
        assert kind == "max" and bound == row["word_limit"]
        assert chosen <= bound < rejected
        # Only the limit was added: the chat before it is the same group's ranked pair's.
        same_group = [r for (tree, last), r in ranked.items()
                      if tree == row["tree"] and row["prompt"][-1]["content"].startswith(last)]
        assert same_group and same_group[0]["prompt"][:-1] == row["prompt"][:-1]
    # Not "shorter is better": without a stated limit the people's choice stands, and on the
    # sample it is the longer reply in all but 2 of the 43 ranked pairs.
    assert summary["ranked_chosen_shorter"] == 2 and summary["ranked_pairs"] == 43
    assert all(r["word_limit"] is None for r in ranked.values())

    wider, out = prepared(tmp_path / "gap2", SAMPLE, "--pairs", "concise", "--concise_rank_gap", "2")
    assert sum(r["kind"] == "concise" for r in sum(pairs(out), [])) > len(concise)  # ranks 0 and 2 as well


def test_data_without_ranked_replies_gives_no_pairs_and_says_so(tmp_path, capsys):
    unranked = tmp_path / "unranked.jsonl"
    unranked.write_text("".join(json.dumps({**row, "rank": None}) + "\n"
                                for row in map(json.loads, PAIRS_SAMPLE.read_text().splitlines())))
    summary, out = prepared(tmp_path / "out", unranked, "--eval_fraction", "0")
    assert summary["pairs_train"] == {} and (out / "train.jsonl").stat().st_size > 0  # SFT data as before
    assert (out / "pairs_train.jsonl").read_text() == ""
    assert "no DPO pairs: no user turn has two replies ranked against each other" in capsys.readouterr().out
    with pytest.raises(InputError, match=r"pairs_train.jsonl: no pairs in the file\. data_prep.py writes pairs only"):
        read_pair_rows(out / "pairs_train.jsonl")


def test_bad_pairs_flags_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "data_prep.py"), "--dataset_name", str(PAIRS_SAMPLE),
                             "--output_dir", str(tmp_path), "--pairs", "best,concise"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("data_prep: error: --pairs 'best,concise': expected a comma-separated subset "
                                     "of best_worst, all_ranked, concise")
    assert not any(tmp_path.iterdir())


GOOD = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}]}


@pytest.mark.parametrize("row, message", [
    ({**GOOD, "prompt": "Hi?"}, "field 'prompt' must be a non-empty list of turns"),
    ({**GOOD, "prompt": [{"role": "system", "content": "x"}]}, "each prompt turn needs 'role'"),
    ({**GOOD, "prompt": GOOD["prompt"] + GOOD["chosen"]}, "the prompt must end with the user's turn"),
    ({**GOOD, "chosen": "Hello."}, "field 'chosen' must be a list of one assistant turn"),
    ({**GOOD, "rejected": [{"role": "assistant", "content": " "}]}, "field 'rejected' must be a list of one"),
    ({**GOOD, "rejected": GOOD["chosen"]}, "'chosen' and 'rejected' hold the same text"),
    ({**GOOD, "chosen": [{"role": "assistant", "content": "Hi<|end|>"}]}, "holds '<|end|>'"),
    ({key: GOOD[key] for key in ("prompt", "chosen")}, "field 'rejected' must be"),
])
def test_a_bad_pair_names_its_line(tmp_path, row, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=rf"pairs\.jsonl:2: {message}.*; each line must be {{\"prompt\""):
        read_pair_rows(path)


def test_pairs_tokenise_as_trl_does(tiny_model_dir, tmp_path):
    """tokenize_pair gives what DPOTrainer's own preprocessing (trl 1.16) makes of every row,
    so evaluate.py's margins are the ones DPO trains."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from phi2qlora.model import load_chat_tokenizer

    _, out = prepared(tmp_path, SAMPLE, "--pairs", "concise")
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    train = rows(out / "pairs_train.jsonl")
    config = DPOConfig(output_dir=str(tmp_path / "unused"), bf16=False, max_length=None, report_to="none")
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train])
    prepared_by_trl = DPOTrainer._prepare_dataset(None, dataset, tokenizer, config, "train")
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    for i, row in enumerate(train):
        assert tokenize_pair(tokenizer, row) == {k: prepared_by_trl[i][k] for k in keys}
    ids = tokenize_pair(tokenizer, train[0])
    assert tokenizer.decode(ids["prompt_ids"]).endswith("<|assistant|>\n")
    assert tokenizer.decode(ids["chosen_ids"]) == train[0]["chosen"][0]["content"] + "<|end|>\n"
