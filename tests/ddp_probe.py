"""Run sft_qlora.py or grpo_train.py in each process of `accelerate launch`, then have every
process write its trainable weights to `rank<N>.safetensors` in the output directory, so a
test can check that data parallelism kept the processes' adapters identical.

    accelerate launch --cpu --num_processes 2 tests/ddp_probe.py sft --config ... --output_dir D
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo_train  # noqa: E402
import sft_qlora  # noqa: E402

script = {"sft": sft_qlora, "grpo": grpo_train}[sys.argv[1]]
trainer = script.main(*script.parse_args(sys.argv[2:]))
weights = {n: p.detach().float().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
save_file(weights, Path(trainer.args.output_dir) / f"rank{os.environ.get('RANK', '0')}.safetensors")
print(f"[probe] rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: "
      f"{len(weights)} trainable tensors, global step {trainer.state.global_step}", flush=True)
