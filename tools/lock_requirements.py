"""Write constraints.txt: the exact version of every package a fresh CPU machine installs
for requirements.txt and requirements-serve.txt, as pip resolves it today (their
dependencies included).

    python tools/lock_requirements.py            # resolve again, rewrite constraints.txt
    python tools/lock_requirements.py --keep     # only pin what a requirements change adds
    ./run_tests.sh                               # installs with it into .venv/, then runs the suite

requirements.txt keeps the ranges the code runs on (down to the GPU image's torch 2.11 and
transformers 5.17, and whatever Colab has); constraints.txt pins the versions the test
suite passed with, so a fresh machine gets what was tested. pip resolves without
installing (`pip install --dry-run --ignore-installed --report`), for this Python and
platform. After refreshing it, install with it and run the suite before committing.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the CPU wheel (2.13.0+cpu) where pip's indexes hold it; a bare `torch` pulls CUDA


def resolve(keep: bool = False) -> dict[str, str]:
    """`keep`: within the current constraints.txt, so only what a requirements change adds
    gets a new pin and every tested version stays."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                        "--report", str(report), TORCH, "-r", str(ROOT / "requirements.txt"),
                        "-r", str(ROOT / "requirements-serve.txt"),
                        *(["-c", str(ROOT / "constraints.txt")] if keep else [])], check=True)
        installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"]: i["metadata"]["version"] for i in installs}


def main() -> None:
    pins = resolve(keep="--keep" in sys.argv[1:])
    header = [
        "# Exact versions for requirements.txt and requirements-serve.txt, made by `python tools/lock_requirements.py`",
        f"# on {datetime.date.today().isoformat()} for Python {platform.python_version()} on "
        f"{platform.system()} {platform.machine()}: not edited by hand.",
        "# ./demo_offline.sh and ./run_tests.sh install with it (tools/setup_env.py); by hand: docs/setup.md.",
    ]
    lines = [f"{name}=={version}" for name, version in sorted(pins.items(), key=lambda kv: kv[0].lower())]
    (ROOT / "constraints.txt").write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    print(f"constraints.txt: {len(lines)} packages")


if __name__ == "__main__":
    main()
