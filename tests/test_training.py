"""phi2qlora/training.py: which checkpoints count as complete."""

from __future__ import annotations

from phi2qlora.training import CHECKPOINT_FILES, COMPLETE_MARK, latest_complete_checkpoint


def test_latest_complete_checkpoint_skips_half_written_ones(tmp_path, capsys):
    assert latest_complete_checkpoint(tmp_path / "none") is None
    everything = (*CHECKPOINT_FILES, COMPLETE_MARK)
    for step, files in [(10, everything), (20, everything), (30, CHECKPOINT_FILES[:2]),
                        (40, CHECKPOINT_FILES)]:  # 40: every file, but killed before the mark
        (tmp_path / f"checkpoint-{step}").mkdir()
        for f in files:
            (tmp_path / f"checkpoint-{step}" / f).write_text("x")
    (tmp_path / "checkpoint-tmp").mkdir()
    assert latest_complete_checkpoint(tmp_path, verbose=True).endswith("checkpoint-20")
    printed = capsys.readouterr().out
    assert "skipping" in printed and "checkpoint-30" in printed and "checkpoint-40" in printed
    assert "checkpoint-10" not in printed
