"""A Hugging Face Space folder for the CPU demo: what a user uploads, nothing else.

    SPACE/README.md         the Space's card: sdk gradio, app_file, the hardware it is sized for
    SPACE/app.py            starts the project's page on the models in SPACE/models/
    SPACE/requirements.txt  gradio and llama-cpp-python, pinned: no torch, no transformers
    SPACE/project/          the project's app.py and phi2qlora/, as they are here
    SPACE/models/*.gguf     one column each (export_model.py --space SPACE adds one)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from importlib.metadata import version
from pathlib import Path

from phi2qlora.files import atomic_path, write_atomic
from phi2qlora.gguf import CONVERTER_HOME

ROOT = Path(__file__).resolve().parent.parent
# The Space's wheels, fetched once by tools/fetch_space_wheels.py for tests/test_gguf.py,
# which installs the Space from them in a fresh venv without the network.
SPACE_WHEELS = CONVERTER_HOME / "space-wheels"
# A free CPU Space: 2 vCPUs and 16 GB. The page's models, in Q4_K_M, need about 2 GB each.
HARDWARE = "cpu-basic"

LAUNCHER = '''"""The CPU Space: the fine-tuned Phi-2 models in models/*.gguf answer side by side,
served by llama.cpp. Written by export_model.py --space; the page is project/app.py."""

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "project"))
spec = importlib.util.spec_from_file_location("phi2_demo", HERE / "project" / "app.py")
demo = sys.modules["phi2_demo"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(demo)
from phi2qlora.errors import exit_on_input_error  # noqa: E402


def main():
    # A Space serves what listens on 0.0.0.0:7860; run elsewhere, GRADIO_SERVER_NAME=127.0.0.1
    # keeps it to this machine.
    args = demo.AppArguments(gguf=[str(HERE / "models")], max_new_tokens=160,
                             host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
                             port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    demo.launch(demo.build_demo(demo.load_columns(args), args), args)


if __name__ == "__main__":
    exit_on_input_error(main)
'''

CARD = """---
title: Phi-2 fine-tuned with phi2-qlora
emoji: 🔬
colorFrom: indigo
colorTo: gray
sdk: gradio
sdk_version: {gradio}
app_file: app.py
suggested_hardware: {hardware}
pinned: false
---

# Phi-2, fine-tuned on a T4

{models} answer the same prompt side by side, greedily, each with its word count and
whether it obeys the word limit you set. The models are GGUF files ({files}) served by
llama.cpp (llama-cpp-python {llama}) on the Space's CPU; sized for `{hardware}` (2 vCPUs,
16 GB).

Made with [phi2-qlora](https://github.com/OWNER/phi2-qlora): QLoRA SFT on oasst1, then GRPO
for concise answers that obey word limits, exported with
`python export_model.py --adapter ADAPTER --space SPACE`.

Run it elsewhere: `pip install -r requirements.txt && GRADIO_SERVER_NAME=127.0.0.1 python app.py`,
or any GGUF alone with llama.cpp: `llama-cli -m models/NAME.gguf -p "<|user|>\\nHello<|end|>\\n<|assistant|>\\n"`.
"""

REQUIREMENTS = """# What the Space needs, pinned to what the project tested: no torch, no transformers.
# llama-cpp-python builds llama.cpp from source on the Space (several minutes on 2 cores).
# On x86-64 without its AMX kernels: they crash on some CPUs that list AMX (llama.cpp issue
# #20824; SIGILL on a 2-core Xeon VM, 2026-12-05), and the AVX512/AVX2 kernels run instead.
gradio=={gradio}
{llama}
"""


def llama_cpp_requirements() -> str:
    """requirements-serve.txt's llama-cpp-python lines, build options included."""
    lines = (ROOT / "requirements-serve.txt").read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if line.startswith("llama-cpp-python"))


def space_requirements() -> str:
    """The Space's requirements.txt."""
    return REQUIREMENTS.format(gradio=version("gradio"), llama=llama_cpp_requirements())


PROJECT_FILES = ("app.py", "phi2qlora/__init__.py", "phi2qlora/answers.py", "phi2qlora/args.py",
                 "phi2qlora/chat.py", "phi2qlora/errors.py", "phi2qlora/files.py", "phi2qlora/gguf.py",
                 "phi2qlora/model.py", "phi2qlora/recipes.py", "phi2qlora/word_limits.py")


def add_to_space(space: Path, gguf: Path) -> Path:
    """Create or update the Space folder at `space` and add `gguf` to its models."""
    models = space / "models"
    models.mkdir(parents=True, exist_ok=True)
    with atomic_path(models / gguf.name, suffix=".gguf") as tmp:
        shutil.copyfile(gguf, tmp)
    for name in PROJECT_FILES:
        write_atomic(space / "project" / name, (ROOT / name).read_text(encoding="utf-8"))
    write_atomic(space / "app.py", LAUNCHER)
    write_atomic(space / "requirements.txt", space_requirements())
    pins = {"gradio": version("gradio"), "llama": version("llama-cpp-python")}
    files = sorted(p.name for p in models.glob("*.gguf"))
    write_atomic(space / "README.md", CARD.format(
        models=", ".join(f"`{Path(f).stem}`" for f in files), files=", ".join(files), hardware=HARDWARE, **pins))
    print(f"[export] Space folder {space}: {len(files)} model(s); upload it as a Gradio Space "
          f"(huggingface-cli upload USER/SPACE {space} --repo-type space)")
    return space


def start_space(folder: Path, python, capture: bool = False) -> tuple[subprocess.Popen, int]:
    """`python app.py` in a Space folder as a Space runs it: from the folder, with `python`
    from a venv holding its requirements.txt and none of this project's paths, on a free
    port of 127.0.0.1 (returned). `capture`: its output as text on `stdout`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([str(python), "-s", "app.py"], cwd=folder, env=env, text=capture,
                            stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return proc, port
