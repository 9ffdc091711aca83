#!/usr/bin/env bash
# The CPU test suite, offline, about 10 minutes on 2 cores. The first run sets up .venv/
# (the demo's packages, then llama.cpp's build, its converter, the Space's wheels, and
# Chromium where apt can add it); later runs skip that in seconds. Arguments go to pytest
# (default: tests), e.g. ./run_tests.sh tests/test_sft.py -k resume
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_env.sh tests
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ $# -gt 0 ] || set -- tests
exec python -m pytest -q "$@"
