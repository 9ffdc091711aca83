"""Run a script as a T4 would: at most 15 GiB of GPU memory (pass `--dtype float16` to
the script for the T4's precision). Prints the peak memory and the wall time at the end.

    python benchmarks/t4_mode.py sft_qlora.py --dtype float16 --max_steps 30 ...
"""

import os
import runpy
import sys
import time

import torch

T4_GIB = float(os.environ.get("T4_GIB", "15"))

if __name__ == "__main__":
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, T4_GIB * 2**30 / total))
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    start = time.perf_counter()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        peak = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
        print(f"[t4_mode] cap {T4_GIB:.0f} GiB on {torch.cuda.get_device_name()}: peak allocated {peak:.2f} GiB, "
              f"peak reserved {reserved:.2f} GiB, wall {time.perf_counter() - start:.0f} s", flush=True)
