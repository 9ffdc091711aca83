"""Unpack llama.cpp's GGUF converter for the installed llama-cpp-python, once.

llama-cpp-python's wheel holds the engine and the quantizer, not `convert_hf_to_gguf.py`;
its source distribution on the package index holds both, from the same llama.cpp commit.
This downloads that source (pip, no build) and keeps the converter's files:

    python tools/fetch_gguf_converter.py      # -> ~/.cache/phi2qlora/llama-cpp-python-<version>/
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from phi2qlora.errors import InputError, exit_on_input_error  # noqa: E402
from phi2qlora.gguf import CONVERTER_HOME, llama_cpp_version  # noqa: E402

KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def main() -> Path:
    version = llama_cpp_version()
    if version is None:
        raise InputError("llama-cpp-python is not installed: pip install -r requirements-serve.txt first")
    target = CONVERTER_HOME / f"llama-cpp-python-{version}"
    if (target / "convert_hf_to_gguf.py").is_file():
        print(f"already there: {target}")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={version}", "-d", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not archives:
            raise InputError(f"could not download llama-cpp-python {version}'s source: "
                             f"{(got.stderr.strip().splitlines() or ['no archive'])[-1][:200]}")
        staging = Path(tmp) / "converter"
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                inner = member.name.split("/vendor/llama.cpp/", 1)
                if len(inner) == 2 and inner[1].startswith(KEEP) and (member.isfile() or member.isdir()):
                    member.name = inner[1]
                    tar.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise InputError(f"llama-cpp-python {version}'s source holds no convert_hf_to_gguf.py")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), target)  # whole or not at all: the folder appears complete
    print(f"llama.cpp's converter for llama-cpp-python {version}: {target}")
    return target


if __name__ == "__main__":
    exit_on_input_error(main)
