"""GGUF: a merged model as llama.cpp (and Ollama, LM Studio) loads it, written by
llama.cpp's own converter and quantizer, read back through llama-cpp-python to check it
and to serve it on a CPU.

llama-cpp-python's wheel has the engine and the quantizer (`llama_model_quantize`), not
the converter; its source on the package index carries llama.cpp's `convert_hf_to_gguf.py`
(with `conversion/` and `gguf-py/`) of the same llama.cpp commit. `tools/fetch_gguf_converter.py`
unpacks those into CONVERTER_HOME once, for the installed llama-cpp-python version.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from phi2qlora.chat import END, format_prompt
from phi2qlora.errors import InputError
from phi2qlora.word_limits import count_words

# llama.cpp's file types (llama_ftype): Q4_K_M is what llama.cpp's and Ollama's users load by
# default for a model of this size (4.9 bits a weight, the quality "sweet spot" of llama.cpp's
# own tables); Q8_0 is near lossless at twice the size.
QUANTS = {"q4_k_m": 15, "q8_0": 7, "f16": 1}
CONVERTER_HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi2qlora"


def llama_cpp_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:
        return None


def converter_dir() -> Path:
    """The unpacked converter for the installed llama-cpp-python, or a one-line error saying
    how to get it."""
    version = llama_cpp_version()
    if version is None:
        raise InputError("GGUF export needs llama-cpp-python: pip install -r requirements-serve.txt (see README, "
                         "\"Export\")")
    folder = CONVERTER_HOME / f"llama-cpp-python-{version}"
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise InputError(f"llama.cpp's converter for llama-cpp-python {version} is not in {folder}: run "
                         "python tools/fetch_gguf_converter.py (it unpacks it from the package's source)")
    return folder


def convert(model_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """`model_dir` (a merged export: safetensors, config, tokenizer) -> an f16 GGUF, through
    llama.cpp's converter in a child process (its memory and logging stay there)."""
    out_path = Path(out_path)
    child = [sys.executable, "-m", "phi2qlora.gguf", str(converter_dir()), str(model_dir), str(out_path)]
    done = subprocess.run(child, capture_output=True, text=True)
    if done.returncode != 0 or not out_path.is_file():
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise InputError(f"llama.cpp's converter failed on {model_dir}: {last[:300]}")
    return out_path


def quantize(f16_path: str | os.PathLike, out_path: str | os.PathLike, kind: str, threads: int = 0) -> Path:
    """llama.cpp's quantizer (the C function llama-quantize calls) from an f16 GGUF."""
    import ctypes

    import llama_cpp

    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[kind]
    params.nthread = threads
    with suppress_stdout_stderr(disable=False):  # a line per tensor from the C library
        status = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(),
                                                ctypes.byref(params))
    if status != 0:
        raise InputError(f"llama.cpp could not quantize {f16_path} to {kind} (status {status})")
    return Path(out_path)


def gguf_files(paths: list[str]) -> list[Path]:
    """GGUF files from files and folders of them (a folder: its *.gguf, by name)."""
    files = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(path.glob("*.gguf"))
            if not found:
                raise InputError(f"--gguf {given}: no .gguf file in that folder; write one with export_model.py --gguf")
            files += found
        elif path.is_file() and path.suffix == ".gguf":
            files.append(path)
        else:
            raise InputError(f"--gguf {given}: no such .gguf file or folder; write one with export_model.py --gguf")
    return files


def amx_kernels_built_in() -> bool:
    """Whether this llama.cpp was built with its AMX kernels: a build from source with its
    defaults (-march=native) on a CPU that lists AMX, as Intel's Sapphire Rapids and newer do."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextmanager
def _extra_buffer_types(enabled: bool):
    """llama-cpp-python 0.3.36's `Llama` has no parameter for llama.cpp's `use_extra_bufts`;
    it reads the model's defaults from `llama_model_default_params`, so that is where the
    flag is set, for the one `Llama(...)` inside this block."""
    import llama_cpp.llama as engine

    defaults = engine.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = enabled
        return p

    engine.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        engine.llama_cpp.llama_model_default_params = defaults


# ---------------------------------------------------------------------------------------
# Is a GGUF whole? Its header read as the format lays it out, its size against the tensors.
# ---------------------------------------------------------------------------------------
# ggml types: (values a block, bytes a block), for those a GGUF of this project holds (f32,
# f16, q4_0..q8_0, the k-quants, bf16); another type leaves the size unchecked.
GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
               10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 30: (1, 2)}
# GGUF metadata value types with a fixed size (8 string and 9 array are read apart).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Reader:
    """Little-endian reads that raise EOFError past the end, before allocating for a length
    a damaged header makes up."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size

    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise EOFError
        return self.f.read(n)

    def int(self, size: int) -> int:
        return int.from_bytes(self.take(size), "little")

    def string(self) -> bytes:
        return self.take(self.int(8))

    def value(self, kind: int):
        if kind in _FIXED:
            raw = self.take(_FIXED[kind])
            return int.from_bytes(raw, "little") if kind in (4, 10) else raw
        if kind == 8:
            return self.string()
        if kind == 9:
            inner, count = self.int(4), self.int(8)
            if count * _FIXED.get(inner, 8) > self.left():  # every item takes at least this much
                raise EOFError
            for _ in range(count):
                self.value(inner)
            return None
        raise ValueError(f"unknown metadata type {kind}")


def gguf_damage(path: Path) -> str | None:
    """What is wrong with a GGUF file (not one, cut short), or None: the header walked as
    the format lays it out, then the file's size against its last tensor's end. llama.cpp
    itself says only "Failed to load model from file"."""
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    with open(path, "rb") as f:
        reader = _Reader(f, size)
        try:
            if reader.take(4) != b"GGUF":
                return "not a GGUF file (it does not start with GGUF)"
            reader.int(4)  # the format's version
            tensors, entries = reader.int(8), reader.int(8)
            alignment = 32
            for _ in range(entries):
                key, kind = reader.string(), reader.int(4)
                value = reader.value(kind)
                if key == b"general.alignment" and isinstance(value, int):
                    alignment = value
            end = 0
            for _ in range(tensors):
                reader.string()
                rank = reader.int(4)
                if rank > 8:  # GGML_MAX_DIMS is 4
                    raise ValueError(f"a tensor of {rank} dimensions")
                dims = [reader.int(8) for _ in range(rank)]
                kind, offset = reader.int(4), reader.int(8)
                count = math.prod(dims)
                if kind in GGML_BLOCKS:
                    per_block, block_bytes = GGML_BLOCKS[kind]
                    end = max(end, offset + count // per_block * block_bytes)
        except EOFError:
            return f"cut short inside its header ({size:,} bytes)"
        except ValueError as e:
            return f"damaged header ({e})"
        data_start = -(-f.tell() // alignment) * alignment
    if size < data_start + end:
        return f"cut short ({size:,} of {data_start + end:,} bytes)"
    return None


def load(path: str | os.PathLike, n_ctx: int = 0, threads: int | None = None, seed: int = 0,
         repacked: bool | None = None):
    """A GGUF on llama.cpp's CPU backend. `n_ctx` 0: the model's own context (2,048 for
    Phi-2); `threads` defaults to the cores this process may use; `repacked`: llama.cpp's
    extra buffer types (None: on unless the build has AMX kernels, below)."""
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no GGUF model there; write one with export_model.py --gguf")
    if problem := gguf_damage(path):
        raise InputError(f"{path}: {problem}; copy it again, or write it again with export_model.py --gguf")
    threads = threads or len(os.sched_getaffinity(0))
    # llama.cpp puts Q4_K / Q8_0 weights in an "extra buffer type" repacked for its fastest
    # kernels: AMX where the build has them, else its AVX2/AVX512 repack. Its AMX kernels
    # killed the process on a 2-core Xeon VM that lists AMX (2026-12-05, llama-cpp-python
    # 0.3.36: SIGILL at the first `ldtilecfg` with 1 thread, a segfault with 2), as reported
    # for other Sapphire Rapids machines (llama.cpp issue #20824). There the plain kernels
    # run instead (Phi-2 Q4_K_M: 6.5 against 8.9 new tok/s on those 2 cores, PERFORMANCE.md).
    extra = not amx_kernels_built_in() if repacked is None else repacked
    try:
        # use_mmap=False: llama.cpp repacks Q4_K / Q8_0 weights for its CPU kernels; read from a
        # memory map the file's pages stay resident beside the repacked copy (Phi-2 Q4_K_M, 2
        # cores: peak RSS 3.0 GiB mapped, 2.0 GiB read, the same speed).
        with _extra_buffer_types(extra):
            return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=seed,
                         n_gpu_layers=0, use_mmap=False, verbose=False)
    except (ValueError, RuntimeError) as e:  # llama.cpp refuses a damaged or foreign file this way
        raise InputError(f"{path}: llama.cpp cannot load it ({str(e)[:200]}); export it again") from None


def prompt_tokens(llm, prompt: str) -> list[int]:
    """The chat-formatted prompt as llama.cpp tokenizes it, the chat tokens as one token each."""
    return llm.tokenize(format_prompt(prompt).encode("utf-8"), add_bos=False, special=True)


def stream_answer(llm, prompt: str, max_new_tokens: int):
    """One prompt's greedy answer as it grows: answers.generate_answers' row (`prompt`,
    `answer`, `words`, `ended`, plus the new token `ids`) after each new token; the last is
    the answer."""
    end_id = llm.tokenize(END.encode(), add_bos=False, special=True)[0]
    ids, text = [], b""

    def row(ended: bool) -> dict:
        answer = text.decode("utf-8", "replace").strip()
        return {"prompt": prompt, "answer": answer, "words": count_words(answer), "ended": ended, "ids": list(ids)}

    tokens = prompt_tokens(llm, prompt)
    for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if token == end_id or token == llm.token_eos():
            yield row(True)
            return
        ids.append(token)
        text += llm.detokenize([token], special=False)
        yield row(False)
        if len(ids) >= max_new_tokens:
            return


def greedy_answers(llm, prompts: list[str], max_new_tokens: int = 128) -> list[dict]:
    """stream_answer's last row for each prompt."""
    rows = []
    for prompt in prompts:
        last = {"prompt": prompt, "answer": "", "words": 0, "ended": False, "ids": []}  # no token at all
        for last in stream_answer(llm, prompt, max_new_tokens):
            pass
        rows.append(last)
    return rows


# ---------------------------------------------------------------------------------------
# The converter's child process.
# ---------------------------------------------------------------------------------------
def _is_gpt2_byte_level(model_dir: Path) -> bool:
    """Whether the tokenizer pre-tokenizes as GPT-2 (and Phi-2) do: byte-level with GPT-2's
    regex, no prefix space. make_tiny_model.py's tokenizer is built that way."""
    try:
        pre = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    except (OSError, KeyError, ValueError):
        return False
    return (pre or {}).get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")


def _convert_in_child(converter: str, model_dir: str, out_path: str) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py on `model_dir`. Its pre-tokenizer check knows
    tokenizers by a hash of one text's tokens: Phi-2's is known ("phi-2", GPT-2's rules), a
    locally trained BPE with the same rules is not. For that one case the rules are read
    from tokenizer.json and written as "gpt-2", which is what they are."""
    sys.path[:0] = [converter, str(Path(converter) / "gguf-py")]
    import convert_hf_to_gguf
    from conversion import base

    known = base.TextModel.get_vocab_base_pre

    def pre_tokenizer(self, tokenizer):
        quiet = logging.getLogger("hf-to-gguf")
        level, quiet.level = quiet.level, logging.CRITICAL  # its banner is for a model it should know
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if _is_gpt2_byte_level(Path(self.dir_model)):
                return "gpt-2"
            raise
        finally:
            quiet.level = level

    base.TextModel.get_vocab_base_pre = pre_tokenizer
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out_path, "--outtype", "f16"]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    _convert_in_child(*sys.argv[1:4])
