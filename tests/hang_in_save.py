"""Run a script whose Trainer writes only half of `trainer_state.json` at its first
checkpoint and then hangs, so a test can kill -9 it in the middle of writing a checkpoint.
trainer_state.json is the last file the Trainer writes: at that moment every file a
resume needs exists, and only the completion mark tells the checkpoint is not whole.

    python tests/hang_in_save.py sft_qlora.py --config ...
"""

import dataclasses
import json
import os
import runpy
import sys
import time

from transformers.trainer_callback import TrainerState


def save_half_and_hang(self, json_path):
    text = json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
    with open(json_path, "w", encoding="utf-8") as f:
        f.write(text[: len(text) // 2])
    print(f"HALF-WRITTEN {json_path}", flush=True)
    time.sleep(600)


TrainerState.save_to_json = save_half_and_hang
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
