#!/usr/bin/env bash
# The offline demo: the whole pipeline on the CPU in a few minutes, with no network.
# Builds the tiny Phi model, prepares the bundled oasst1-format sample, and fine-tunes
# with the same QLoRA code path as the T4 run; previews show in the log. The first run
# sets up .venv/ (torch and the pinned packages, about 2 minutes); later runs skip that.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh demo
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python make_tiny_model.py --output_dir outputs/tiny-phi
python data_prep.py --dataset_name data/sample/oasst1_sample.jsonl --output_dir data/tiny --eval_fraction 0.1
rm -rf outputs/tiny-sft  # the demo starts fresh each time; real runs resume instead
python sft_qlora.py --config recipes/sft_tiny.yaml "$@"
