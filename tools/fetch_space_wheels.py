"""The wheels a Space installs from its requirements.txt, kept for the tests, once.

tests/test_gguf.py installs the Space folder as a Space's builder does: a fresh venv and
`pip install -r requirements.txt`, nothing else. Tests don't use the network, so this
fetches those wheels beforehand (gradio and what it needs; llama-cpp-python built as the
Space builds it, from pip's cache when `pip install -r requirements-serve.txt` built it):

    python tools/fetch_space_wheels.py      # -> ~/.cache/phi2qlora/space-wheels/
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from phi2qlora.errors import InputError, exit_on_input_error  # noqa: E402
from phi2qlora.space import SPACE_WHEELS, space_requirements  # noqa: E402


def main() -> Path:
    wanted = space_requirements()
    if (SPACE_WHEELS / "requirements.txt").is_file() and \
            (SPACE_WHEELS / "requirements.txt").read_text(encoding="utf-8") == wanted:
        print(f"already there: {SPACE_WHEELS}")
        return SPACE_WHEELS
    SPACE_WHEELS.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=SPACE_WHEELS.parent) as tmp:
        staging = Path(tmp) / "wheels"
        staging.mkdir()
        (staging / "requirements.txt").write_text(wanted, encoding="utf-8")
        print("pip wheel over the Space's requirements.txt (llama-cpp-python: pip's cached build, or minutes)",
              flush=True)
        got = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-r", str(staging / "requirements.txt"),
                              "-w", str(staging)], stderr=subprocess.PIPE, text=True)
        if got.returncode:
            raise InputError("could not fetch the Space's wheels: "
                             f"{(got.stderr.strip().splitlines() or ['pip failed'])[-1][:200]}")
        shutil.rmtree(SPACE_WHEELS, ignore_errors=True)
        staging.rename(SPACE_WHEELS)  # whole or not at all
    print(f"the Space's wheels ({len(list(SPACE_WHEELS.glob('*.whl')))}): {SPACE_WHEELS}")
    return SPACE_WHEELS


if __name__ == "__main__":
    exit_on_input_error(main)
