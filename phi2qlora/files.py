"""The user's files: read with errors that name the file and the line, written whole or
not at all, and checked before any work (an output path the OS refuses or that overlaps an
input, a folder that should hold a model or an adapter, a safetensors or JSON file cut
short or garbled)."""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import os
import tempfile
import zlib
from pathlib import Path

from phi2qlora.chat import reserved_text_in
from phi2qlora.errors import InputError


# ---------------------------------------------------------------------------------------
# Writing: whole or not at all.
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """A temporary path beside `path` to write to, renamed onto `path` when the block ends
    without an error (removed otherwise): a crash leaves the old file or none, never half a
    file. `suffix` keeps the extension for writers that read it (matplotlib)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
    except OSError as e:
        raise InputError(cannot_write(path, e)) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a directory where the file goes
            raise InputError(cannot_write(path, e)) from None
        raise


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all, synced to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_jsonl_atomic(path: str | os.PathLike, rows) -> int:
    """Rows as JSON Lines, whole or not at all (every row is encoded before anything is
    written). Returns how many."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    write_atomic(path, "".join(lines))
    return len(lines)


def check_output_apart(output: str | os.PathLike, flag: str, inputs: dict) -> None:
    """An output folder must be apart from what the run reads (`inputs`: {flag: path}; a
    Hub id or a path that is not there is skipped): not one of them, not holding one (a
    script writes README.md, tokenizer files and checkpoints into its folder, over what is
    there), not inside one (an adapter folder, a model folder)."""
    for input_flag, given in inputs.items():
        if given and Path(given).expanduser().exists() and (relation := path_relation(output, given)):
            raise InputError(f"{flag} {output}: {relation} the {input_flag} {given}; choose a folder of its own for "
                             f"{flag} (a new one beside it)")


def path_relation(folder: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How `folder` stands to `other`: "is", "holds", "is inside", or None (apart)."""
    a, b = Path(folder).expanduser().resolve(), Path(other).expanduser().resolve()
    if a == b:
        return "is"
    if b.is_relative_to(a):
        return "holds"
    return "is inside" if a.is_relative_to(b) else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cannot_write(path: Path, error: OSError) -> str:
    """The OS's refusal to write `path`, as one line with what to do."""
    blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"{path}: cannot write it: {blocker} is a file, not a folder; choose another output path"
    return (f"{path}: cannot write it ({error.strerror or error}); choose another output path, or check that "
            "you may write there and that the disk has room")


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Fail now, before any work, if the OS will refuse to create or write `path` (a file
    or a folder): its nearest existing ancestor must be a folder this user may write to."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if existing != path and not existing.is_dir():
        raise InputError(f"{flag} {path}: cannot be created, {existing} is a file; choose another {flag}")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write in {folder} (permission denied or a read-only disk); "
                         f"choose another {flag}")


# ---------------------------------------------------------------------------------------
# Reading JSON Lines: one reader for data, prompts and pairs, gzip-aware.
# ---------------------------------------------------------------------------------------
class BadLine(Exception):
    """One line is unusable; `str(e)` says why (the reader adds the file and the line)."""


def json_error(e: json.JSONDecodeError) -> str:
    """json's message with its column: "Unterminated string starting at column 9", not "... at at"."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def parse_json_line(raw: bytes):
    """One line's JSON value, or BadLine saying what is wrong with it."""
    try:
        value = json.loads(raw.decode("utf-8").rstrip("\r\n"))
    except UnicodeDecodeError as e:
        raise BadLine(f"not UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadLine(f"malformed JSON ({json_error(e)}); each line must be one JSON object") from None
    except RecursionError:
        raise BadLine("JSON nested too deeply to read; each line must be one flat JSON object") from None
    except ValueError:  # Python reads no integer of more than 4,300 digits
        raise BadLine("a number too long to read (over 4,300 digits)") from None
    return value


def jsonl_lines(path: str | os.PathLike, what: str = "file", progress: bool = False, if_missing: str = ""):
    """`(line number, raw bytes)` for each non-blank line of a JSONL file, `.gz` or not.
    Bytes, not a text-mode file, because that decodes 8 KB ahead and blames an earlier line
    for a bad byte; a UTF-8 byte-order mark is skipped. `if_missing`: what to do, said when
    the file is not there."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise InputError(f"{path}: {what} not found" + (f"; {if_missing}" if if_missing else ""))
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            if progress:
                from tqdm import tqdm

                f = tqdm(f, desc="reading", unit=" lines", disable=None)
            for n, raw in enumerate(f, 1):
                if n == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                if raw.strip():
                    yield n, raw
    except (OSError, EOFError, zlib.error) as e:  # a damaged .gz raises any of these
        raise InputError(f"{path}: cannot read it: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def unencodable(value) -> str | None:
    """Where a JSON value holds a lone surrogate ("\\ud800" is valid JSON, not valid UTF-8):
    "field 'x'" for a top-level field of an object, "" elsewhere, None if nowhere."""
    def fails(v) -> bool:
        try:
            json.dumps(v, ensure_ascii=False).encode("utf-8")
            return False
        except UnicodeEncodeError:
            return True

    if not fails(value):
        return None
    if isinstance(value, dict):
        return next((f"field '{k}'" for k, v in value.items() if fails(k) or fails(v)), "")
    return ""


def read_jsonl_rows(path: str | os.PathLike, what: str = "file", *, objects: bool = True,
                    if_missing: str = "run data_prep.py first (see README)"):
    """Yield `(line number, row)` for each non-blank line, stopping at the first bad line
    with its file and line (`datasets`' JSON loader names neither). `objects`: every row
    must be a JSON object."""
    for n, raw in jsonl_lines(path, what, if_missing=if_missing):
        try:
            row = parse_json_line(raw)
            if objects and not isinstance(row, dict):
                raise BadLine(f"expected a JSON object, got {type(row).__name__}")
            if (where := unencodable(row)) is not None:
                raise BadLine(f"{where or 'the line'} holds an unpaired surrogate escape (such as \\ud800), which "
                              "no UTF-8 text can hold; fix the escape")
        except BadLine as e:
            raise InputError(f"{path}:{n}: {e}") from None
        yield n, row


def check_limit(limit: int | None, flag: str) -> None:
    """`limit` caps how many rows to use: None for all, else at least 1."""
    if limit is not None and limit < 1:
        raise InputError(f"{flag} must be at least 1 (or left out to use every row), got {limit}")


def read_prompt_rows(path: str | os.PathLike) -> list[dict]:
    """Prompts as `{"prompt", "word_limit"}` rows: a `.jsonl` file as data_prep.py writes
    them (`word_limit` a positive integer or null, optional), or any other text file with
    one prompt per line (no stated limit)."""
    path = Path(path)
    rows = []
    if path.suffix != ".jsonl":
        if not path.is_file():
            raise InputError(f"{path}: prompt file not found")
        try:
            lines = path.read_text(encoding="utf-8-sig").split("\n")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text; save it as UTF-8") from None
        rows = [{"prompt": line.strip(), "word_limit": None} for line in lines if line.strip()]
    else:
        for n, row in read_jsonl_rows(path, "prompt file"):
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise InputError(f"{path}:{n}: field 'prompt' must be a non-empty string")
            if token := reserved_text_in(row["prompt"]):
                raise InputError(f"{path}:{n}: the prompt holds {token!r}, which the tokenizer reads as a special "
                                 "token (a turn boundary); remove it")
            limit = row.get("word_limit")
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit < 10**9):
                raise InputError(f"{path}:{n}: field 'word_limit' must be a positive integer below 10**9 or null, "
                                 f"got {str(limit)[:20]}")
            rows.append({"prompt": row["prompt"], "word_limit": limit})
    if not rows:
        raise InputError(f"{path}: no prompts in the file")
    return rows


# ---------------------------------------------------------------------------------------
# Folders that must hold a model or an adapter.
# ---------------------------------------------------------------------------------------
def check_model_source(name: str, flag: str = "--model_name_or_path", marks=("config.json",)) -> None:
    """A model given as a local folder must be one (holding one of `marks`); a name that can
    only be a path and is not there is said so now, not as a 70-line traceback about repo ids
    after the data loaded."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / m).is_file() for m in marks):
            raise InputError(f"{flag} {name}: no model in that folder ({marks[0]} missing); give a folder "
                             "a model was saved in (make_tiny_model.py, export_model.py) or a Hub id such as "
                             "microsoft/phi-2")
        # Whole files, before a library reads them with a traceback (a copy cut short, a full disk).
        redo = "the model folder is damaged: copy or download it again, or write it again with the script that made it"
        for file in sorted(path.glob("*.json")):
            read_json_file(file, redo)
        for file in sorted(path.glob("*.safetensors")):
            check_safetensors(file, redo)
        return
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or not name.strip():
        raise InputError(f"{flag} {name}: no such model folder; give a local folder with config.json or a Hub "
                         "id such as microsoft/phi-2")


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds an adapter: adapter_config.json, which sft_qlora.py and
    grpo_train.py leave in their output directory and PEFT reads first."""
    return (Path(folder) / "adapter_config.json").is_file()


def check_adapter_folder(folder: str | os.PathLike, flag: str = "--adapter",
                         what_to_do: str = "give the output directory of sft_qlora.py or grpo_train.py") -> dict:
    """`folder` holds a whole adapter: adapter_config.json that reads as JSON and an
    adapter_model.safetensors that is not cut short. Returns the adapter's config."""
    where = f"{flag} {folder}" if flag else str(folder)
    if not is_adapter_folder(folder):
        raise InputError(f"{where}: no adapter there (adapter_config.json missing); {what_to_do}")
    redo = "copy the adapter folder again, or train it again"
    config = read_json_file(Path(folder) / "adapter_config.json", redo)
    if not isinstance(config, dict):
        raise InputError(f"{Path(folder) / 'adapter_config.json'}: damaged (a JSON {type(config).__name__}, not an "
                         f"adapter's settings); {redo}")
    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputError(f"{where}: no adapter_model.safetensors (adapters load from safetensors only, never from "
                         f"a pickle such as adapter_model.bin); {redo}")
    check_safetensors(weights, redo)
    return config


# ---------------------------------------------------------------------------------------
# Files a library would read with a traceback: checked first, one line each.
# ---------------------------------------------------------------------------------------
def check_safetensors(path: str | os.PathLike, what_to_do: str) -> dict:
    """A safetensors file's header (`{name: {"dtype", "shape", "data_offsets"}}`), read
    without loading a tensor, after checking that the file is whole: its 8-byte header
    length, the JSON header, and a size equal to the header's end of data. A truncated
    copy (an upload cut short, a full disk) fails here as one line naming the file, not
    as a safetensors traceback at load."""
    import struct

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found; {what_to_do}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise InputError(f"{path}: cut short ({size} bytes: not even a safetensors header); {what_to_do}")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise InputError(f"{path}: cut short ({size:,} bytes, its header alone should take {header_len:,}); "
                             f"{what_to_do}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise InputError(f"{path}: damaged (its header is not a safetensors header); {what_to_do}") from None
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        state = "cut short" if size < expected else "damaged"
        raise InputError(f"{path}: {state} ({size:,} bytes where its header says {expected:,}); {what_to_do}")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def read_json_file(path: str | os.PathLike, what_to_do: str):
    """A JSON file's value; a missing, empty, cut-short or garbled file is one line with
    the line and column of the fault."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: not found; {what_to_do}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start + 1}): damaged; {what_to_do}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = "empty" if not text.strip() else f"not valid JSON ({json_error(e)})"
        raise InputError(f"{path}:{e.lineno}: {what}; {what_to_do}") from None
    except RecursionError:
        raise InputError(f"{path}: nested too deeply to read: damaged; {what_to_do}") from None


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
