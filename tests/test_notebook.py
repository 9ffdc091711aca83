"""The walkthrough notebook: committed without outputs, and run top to bottom in tiny mode
by a real Jupyter kernel (nbclient + ipykernel), as a user would run it, failing on any
cell error. Its tiny run writes only into a temp dir, never into outputs/ or data/."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import check_notebooks  # noqa: E402

WALKTHROUGH = ROOT / "notebooks" / "phi2_qlora_walkthrough.ipynb"
BUDGET_S = 300  # CI: the whole tiny run within 5 minutes (it uses about 2 CPU-minutes on 2 cores)
# CI's tiny mode: fewer steps and shorter answers than recipes/*_tiny.yaml. It checks that
# every cell runs and shows what it should, not that the model learns (test_sft/test_grpo do).
TINY_PARAMETERS = {
    "TINY_MODEL_FLAGS": "--pretrain_steps 0",
    "SFT_FLAGS": "--max_steps 4 --per_device_train_batch_size 4 --logging_steps 1 --eval_steps 2 --save_steps 4 "
                 "--preview_steps 2 --preview_max_new_tokens 8",
    "GRPO_FLAGS": "--max_steps 2 --num_generations 2 --per_device_train_batch_size 4 --max_completion_length 16 "
                  "--save_steps 2 --preview_steps 2 --preview_max_new_tokens 8",
    "DPO_FLAGS": "--max_steps 2 --per_device_train_batch_size 2 --max_length 128 --max_prompt_tokens 64 "
                 "--save_steps 2 --eval_steps 2 --preview_steps 2 --preview_max_new_tokens 8",
    "EVAL_FLAGS": "--max_new_tokens 16",
}


def test_committed_notebooks_have_no_outputs():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert WALKTHROUGH in notebooks
    for path in notebooks:
        nbformat.validate(nbformat.read(path, as_version=4))
        assert check_notebooks.problems(path) == [], "run: python tools/check_notebooks.py --strip"


def test_checker_catches_and_strips_outputs(tmp_path):
    nb = nbformat.read(WALKTHROUGH, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    path = tmp_path / "executed.ipynb"
    nbformat.write(nb, path)
    assert len(check_notebooks.problems(path)) == 2
    assert check_notebooks.main([str(path)]) == 1
    assert check_notebooks.main(["--strip", str(path)]) == 0
    assert check_notebooks.problems(path) == []


def parameters_cell_index(nb) -> int:
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    return index


def test_one_parameters_cell_switches_the_mode():
    nb = nbformat.read(WALKTHROUGH, as_version=4)
    source = nb.cells[parameters_cell_index(nb)].source
    assert 'MODE = "real"' in source  # a user who opens it in Colab gets the real run
    for name in ("TINY_DIR", *TINY_PARAMETERS):
        assert f"\n{name} = " in source, name


def inject_parameters(nb, values: dict) -> None:
    """papermill's convention: a cell tagged `injected-parameters` right after `parameters`."""
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(parameters_cell_index(nb) + 1, cell)


def snapshot(*dirs: Path) -> dict:
    return {p: p.stat().st_mtime_ns for d in dirs if d.exists() for p in d.rglob("*")}


def outputs_of(nb, output_type: str, mime: str) -> list:
    return [o["data"][mime] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == output_type and mime in o.get("data", {})]


def executed(nb, cwd: Path = ROOT / "notebooks", timeout: int = BUDGET_S) -> float:
    """Run every cell in a fresh python3 kernel started in `cwd`; seconds taken."""
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, startup_timeout=120,
                            resources={"metadata": {"path": str(cwd)}})
    start = time.monotonic()
    client.execute()
    return time.monotonic() - start


def test_real_mode_without_a_gpu_stops_at_once_with_a_clear_error():
    """'Run all' in real mode on a CPU runtime must stop before any download or training."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: real mode would start the real run")
    nb = nbformat.read(WALKTHROUGH, as_version=4)
    with pytest.raises(CellExecutionError, match="MODE='real' needs a GPU"):
        executed(nb, timeout=120)
    ran = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
    assert "needs a GPU" in ran[-1].source  # the last cell run: nothing after it started


def test_walkthrough_runs_top_to_bottom_in_tiny_mode(tmp_path, monkeypatch):
    work = tmp_path / "work"
    nb = nbformat.read(WALKTHROUGH, as_version=4)
    inject_parameters(nb, {"MODE": "tiny", "TINY_DIR": str(work), **TINY_PARAMETERS})
    # `!python` in the notebook must find this interpreter, whatever PATH says.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    # What the scripts write by default: the notebook's tiny mode must leave all of it alone.
    defaults = [ROOT / "data", ROOT / "outputs" / "notebook-tiny", ROOT / "outputs" / "eval",
                *(ROOT / "outputs").glob("tiny-*")]
    before = snapshot(*defaults)

    try:
        elapsed = executed(nb)
    except CellExecutionError:
        nbformat.write(nb, tmp_path / "failed.ipynb")  # for a look at every cell's output
        raise
    print(f"notebook ran in tiny mode in {elapsed:.0f} s")

    if os.environ.get("CI"):  # CI has the machine to itself; a shared dev box's load says nothing of the notebook
        assert elapsed < BUDGET_S
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    markdown = "\n".join(outputs_of(nb, "display_data", "text/markdown"))
    assert "## Preview at step 0 (before training)" in markdown  # SFT's, GRPO's and DPO's previews, inline
    assert markdown.count("## Preview at step 2") == 3
    assert "# Evaluation" in markdown and "| grpo |" in markdown and "| dpo |" in markdown  # evaluate.py's report.md
    assert "Preference accuracy: on " in markdown  # on the held-out pairs
    assert len(outputs_of(nb, "display_data", "image/png")) >= 4  # loss.png twice, rewards.png, report.png
    streamed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                       if o.output_type == "stream")
    assert "[sft] adapter, previews and loss.png" in streamed and "[grpo] adapter" in streamed
    assert "[dpo] adapter" in streamed
    (sft_cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("!python sft_qlora.py")]
    assert sum(o.output_type == "stream" for o in sft_cell.outputs) > 5  # the log arrived in pieces, as it came
    # The demo page, served from the kernel, answered one request with all four models.
    assert "**Sent:** Explain why the sky is blue. Use at most 20 words." in streamed
    assert all(f"\n{key}: " in streamed for key in ("base", "sft", "dpo", "grpo")), streamed[-2000:]
    for path in ("tiny-phi/model.safetensors", "data/train.jsonl", "sft/adapter_model.safetensors",
                 "grpo/adapter_model.safetensors", "dpo/adapter_model.safetensors", "data/pairs_eval.jsonl",
                 "eval/report.json"):
        assert (work / path).is_file(), path
    assert snapshot(*defaults) == before  # nobody's demo outputs touched
