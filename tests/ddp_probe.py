"""Run sft_qlora.py or grpo_train.py in each process of `accelerate launch`, then have every
process write its trainable weights to `rank<N>.safetensors` and its logged losses to
`rank<N>_losses.json` in the output directory, so a test can check that data parallelism
kept the processes' adapters identical and trained as one process would.

    accelerate launch --cpu --num_processes 2 tests/ddp_probe.py sft --config ... --output_dir D
"""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_train  # noqa: E402
import sft_qlora  # noqa: E402

script = {"sft": sft_qlora, "grpo": grpo_train}[sys.argv[1]]
callbacks = []
if os.environ.get("PROBE_STOP_AT"):  # an interruption at a step boundary, as conftest.stop_at makes one
    from conftest import stop_at

    callbacks.append(stop_at(int(os.environ["PROBE_STOP_AT"])))
trainer = script.main(*script.parse_args(sys.argv[2:]), callbacks=callbacks)
weights = {n: p.detach().float().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
rank = os.environ.get("RANK", "0")
save_file(weights, Path(trainer.args.output_dir) / f"rank{rank}.safetensors")
losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
(Path(trainer.args.output_dir) / f"rank{rank}_losses.json").write_text(json.dumps(losses))
print(f"[probe] rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: "
      f"{len(weights)} trainable tensors, global step {trainer.state.global_step}", flush=True)
# Tear the process group down before the interpreter does: once in ~3 runs on 2 CPU cores
# (torch 2.13, gloo) the rank that finished first aborted at exit ("terminate called without
# an active exception") while the other still saved.
import torch.distributed as dist  # noqa: E402

if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
