"""Shared fixtures: the tiny Phi model and the prepared sample data, built once a session.
Everything is local: no test reaches the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "oasst1_sample.jsonl"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def needs_compiler():
    """torch.compile on the CPU builds its kernels with a C/C++ compiler: skip without one."""
    from tools.setup_env import has_compiler

    return pytest.mark.skipif(not has_compiler(), reason="torch.compile on the CPU needs a C/C++ compiler")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on the CPU)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Phi model and tokenizer, as `make_tiny_model.py` builds them (shorter
    pretraining, to keep the suite quick)."""
    import make_tiny_model

    return make_tiny_model.build(tmp_path_factory.mktemp("tiny-phi"), SAMPLE, pretrain_steps=150)


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory) -> Path:
    """data_prep.py run on the bundled sample, as the README's offline demo runs it."""
    out = tmp_path_factory.mktemp("data")
    subprocess.run(
        [sys.executable, str(ROOT / "data_prep.py"), "--dataset_name", str(SAMPLE), "--output_dir", str(out)],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )
    return out


def sft_args(model_dir, data_dir, output_dir, *extra: str):
    """The tiny recipe's arguments, pointed at the fixtures."""
    import sft_qlora

    return sft_qlora.parse_args([
        "--config", str(ROOT / "recipes" / "sft_tiny.yaml"),
        "--model_name_or_path", str(model_dir),
        "--train_file", str(Path(data_dir) / "train.jsonl"),
        "--eval_file", str(Path(data_dir) / "eval.jsonl"),
        "--output_dir", str(output_dir),
        "--report_to", "none",
        *extra,
    ])


def stop_at(step: int):
    """A callback that stops training (without a checkpoint of its own) after `step`: the
    resume tests' interruption at a step boundary."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return StopAt()


def pickles_under(folder) -> list[str]:
    """Every file under `folder` that is a pickle, judged by its bytes, not its name:
    torch.save's zip (a `data.pkl` inside), a pickle of protocol 2 or later (its PROTO
    opcode first: torch.save's legacy format too), or any stream pickletools reads whole to
    its STOP (protocols 0 and 1). Nothing is unpickled."""
    import pickletools
    import zipfile

    found = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            if head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path):
                pickled = any(n.endswith(".pkl") for n in zipfile.ZipFile(path).namelist())
            elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                pickled = True
            else:
                try:
                    pickled = [op.name for op, _, _ in pickletools.genops(f)][-1] == "STOP"
                except Exception:  # not a pickle stream: the usual answer
                    pickled = False
        if pickled:
            found.append(str(path.relative_to(folder)))
    return found
