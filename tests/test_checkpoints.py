"""Checkpoints without pickles, and --resume_from_checkpoint: honoured with the checks of
the automatic resume, or refused in one line before a model loads. (The resumed runs that
must equal uninterrupted ones, from a copy of a checkpoint too, are in test_sft.py and
test_grpo.py; they also check that no file of a run is a pickle.)"""

from __future__ import annotations

import json
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, pickles_under, sft_args
from safetensors.torch import save_file

import sft_qlora
from phi2qlora.checkpoints import load_state, save_state
from phi2qlora.errors import InputError
from phi2qlora.training import COMPLETE_MARK, RUN_FILE, train_guarded

FAST = ["--preview_steps", "0", "--eval_strategy", "no", "--report_to", "none", "--eval_file", ""]


def test_the_pickle_check_finds_every_kind_of_pickle(tmp_path):
    """The check the runs are held to must be able to fail: torch.save's zip and its legacy
    format, and plain pickles of every protocol, are found whatever their names."""
    state = {"step": torch.tensor(3.0), "betas": (0.9, 0.999)}
    torch.save(state, tmp_path / "optimizer.pt")
    torch.save(state, tmp_path / "looks-like.json", _use_new_zipfile_serialization=False)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / f"p{protocol}.txt").write_bytes(pickle.dumps({"lr": [1e-3]}, protocol=protocol))
    save_file({"a": torch.zeros(2)}, tmp_path / "ok.safetensors")
    (tmp_path / "ok.json").write_text(json.dumps(state["betas"]))
    (tmp_path / COMPLETE_MARK).write_text("step 2\n")
    expected = ["looks-like.json", "optimizer.pt", *(f"p{p}.txt" for p in range(pickle.HIGHEST_PROTOCOL + 1))]
    assert pickles_under(tmp_path) == sorted(expected)


def test_a_state_round_trips_without_pickle(tmp_path):
    """Optimizer, scheduler and RNG states: tensors, tuples, int keys, numpy arrays."""
    import random

    import numpy as np

    params = [torch.nn.Parameter(torch.randn(3, 2))]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    params[0].sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
             "cpu": torch.random.get_rng_state()}
    save_state(state, tmp_path / "state.safetensors")
    back = load_state(tmp_path / "state.safetensors", "redo")
    assert pickles_under(tmp_path) == []
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # betas a tuple again
    torch.testing.assert_close(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    torch.random.set_rng_state(back["cpu"])
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item())


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, sample_data_dir, tmp_path_factory):
    """Two steps of tiny SFT, a checkpoint after each."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, out, "--max_steps", "2", "--save_steps", "1", *FAST))
    return out


def refused(tiny_model_dir, sample_data_dir, out, pattern, *extra, monkeypatch):
    """sft_qlora.main refuses with `pattern`, before a model loads, writing nothing in `out`."""
    monkeypatch.setattr(sft_qlora, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    existed = out.exists()
    with pytest.raises(InputError, match=pattern):
        sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, out, "--max_steps", "4", *FAST, *extra))
    assert existed or not out.exists()


def test_resume_from_checkpoint_is_refused_where_a_resume_would_go_wrong(tiny_model_dir, sample_data_dir, run_dir,
                                                                       tmp_path, monkeypatch):
    first = run_dir / "checkpoint-1"
    cases = [
        (tmp_path / "a", r"written by another run \(lora_r: 16 there, 8 now\); give the same model",
         ["--lora_r", "8"], first),
        (tmp_path / "b", r"and --resume false ask for opposite things", ["--resume", "false"], first),
        (tmp_path / "c", r"run: not a checkpoint folder; give a checkpoint-N folder", [], run_dir),
        (tmp_path / "d", r"checkpoint-3: no such folder; give a checkpoint-N folder", [], tmp_path / "nowhere" / "checkpoint-3"),
        # Resuming step 1 into the run's own folder would write over its checkpoint-2.
        (run_dir, r"holds checkpoints after step 1 \(checkpoint-2\), which this run would write over", [], first),
    ]
    for out, pattern, extra, checkpoint in cases:
        refused(tiny_model_dir, sample_data_dir, out, pattern, *extra, "--resume_from_checkpoint", str(checkpoint),
                monkeypatch=monkeypatch)

    # A copy cut short, or one whose run is unknown.
    partial = tmp_path / "partial" / "checkpoint-1"
    shutil.copytree(first, partial)
    (partial / COMPLETE_MARK).unlink()
    refused(tiny_model_dir, sample_data_dir, tmp_path / "e", r"saved in part only \(no checkpoint_complete",
            "--resume_from_checkpoint", str(partial), monkeypatch=monkeypatch)
    orphan = tmp_path / "orphan" / "checkpoint-1"
    shutil.copytree(first, orphan)
    (orphan / RUN_FILE).unlink()
    refused(tiny_model_dir, sample_data_dir, tmp_path / "f", r"no run\.json in it or beside it",
            "--resume_from_checkpoint", str(orphan), monkeypatch=monkeypatch)


def test_a_damaged_checkpoint_is_named_before_a_resume(tiny_model_dir, sample_data_dir, run_dir, tmp_path,
                                                      monkeypatch):
    """Marked complete, then cut short (a copy, a disk): the file, what is wrong, what to do,
    whether the resume is automatic or asked for."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    optimizer = copy / "checkpoint-2" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    pattern = (rf"{optimizer}: cut short \([\d,]+ bytes where its header says [\d,]+\); remove {copy / 'checkpoint-2'} "
               "to resume from the checkpoint before it")
    refused(tiny_model_dir, sample_data_dir, copy, pattern, monkeypatch=monkeypatch)
    refused(tiny_model_dir, sample_data_dir, tmp_path / "new", pattern, "--resume_from_checkpoint",
            str(copy / "checkpoint-2"), monkeypatch=monkeypatch)
    (copy / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2,')
    with pytest.raises(InputError, match=r"checkpoint-2/trainer_state\.json:1: not valid JSON"):
        sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, copy, "--max_steps", "4", *FAST))


def test_grpo_refuses_an_sft_checkpoint(tiny_model_dir, sample_data_dir, run_dir, tmp_path, monkeypatch):
    import grpo_train

    monkeypatch.setattr(grpo_train, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(InputError, match=r"checkpoint-2: written by another run \(.*script: 'sft_qlora\.py' there, "
                                         r"'grpo_train\.py' now"):
        grpo_train.main(*grpo_train.parse_args([
            "--config", str(ROOT / "recipes" / "grpo_tiny.yaml"), "--model_name_or_path", str(tiny_model_dir),
            "--sft_adapter", str(run_dir), "--prompts_file", str(sample_data_dir / "grpo_prompts.jsonl"),
            "--output_dir", str(tmp_path / "grpo"), "--report_to", "none",
            "--resume_from_checkpoint", str(run_dir / "checkpoint-2")]))
    assert not (tmp_path / "grpo").exists()


def test_a_script_that_does_not_resume_from_a_given_checkpoint_refuses_it():
    """The Trainer itself ignores --resume_from_checkpoint; train_guarded will not start a
    run whose script did not pass it to claim_output_dir, rather than start from step 0."""
    trainer = SimpleNamespace(args=SimpleNamespace(resume_from_checkpoint="out/checkpoint-4", world_size=1))
    with pytest.raises(InputError, match=r"--resume_from_checkpoint out/checkpoint-4: this script does not resume"):
        train_guarded(trainer, None, {})


@pytest.mark.gpu
def test_fp16_resume_keeps_the_loss_scaler(tiny_model_dir, sample_data_dir, tmp_path):
    """fp16 mixed precision (a T4's only choice) saves the loss scaler's state too, without
    pickle, and a run stopped at step 2 and resumed ends with the uninterrupted adapter."""
    from conftest import stop_at
    from safetensors.torch import load_file

    from phi2qlora.checkpoints import SCALER_FILE

    run = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--dtype", "float16", *FAST]
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path / "a", *run))
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path / "b", *run), callbacks=[stop_at(2)])
    scaler = load_state(tmp_path / "b" / "checkpoint-2" / SCALER_FILE, "redo")
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    sft_qlora.main(*sft_args(tiny_model_dir, sample_data_dir, tmp_path / "b", *run))
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=0)  # CUDA kernels: not bit-exact
    assert pickles_under(tmp_path) == []
