"""phi2qlora/files.py: writes that are whole or nothing, prompt files read with their line numbers."""

from __future__ import annotations

import pytest

from phi2qlora.errors import InputError
from phi2qlora.files import _umask, read_jsonl_rows, read_prompt_rows, write_jsonl_atomic


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    """A disk that fills up while the new text is written (the failure is in the write
    itself, after the old file was there): the old file stays whole, no temporary file is
    left, and the error is one line. A writer that wrote to the path itself would leave it
    cut short here."""
    import os

    path = tmp_path / "out.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(InputError, match=r"out\.jsonl: cannot write it \(No space left on device\)"):
        write_jsonl_atomic(path, [{"a": 2}] * 1000)
    monkeypatch.undo()
    assert path.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_rows_that_cannot_be_encoded_write_nothing(tmp_path):
    path = tmp_path / "out.jsonl"
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [{"a": 2}, {"b": object()}])
    assert not path.exists() and not list(tmp_path.iterdir())


def test_prompt_rows_from_jsonl_and_text(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "One"}\n\n{"prompt": "Two", "word_limit": 5}\n')
    (tmp_path / "p.txt").write_text("One\n\nTwo\n")
    assert read_prompt_rows(tmp_path / "p.jsonl") == [
        {"prompt": "One", "word_limit": None}, {"prompt": "Two", "word_limit": 5}]
    assert [r["prompt"] for r in read_prompt_rows(tmp_path / "p.txt")] == ["One", "Two"]


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "One"}\n{"prompt": 3}\n', r"bad\.jsonl:2: field 'prompt' must be a non-empty string"),
    ('{"prompt": "One"\n', r"bad\.jsonl:1: malformed JSON \(Expecting ',' delimiter at column 17\)"),
    ('["One"]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
    ('{"prompt": "One", "word_limit": 0}\n', r"bad\.jsonl:1: field 'word_limit' must be a positive integer"),
    ('{"prompt": "One", "word_limit": true}\n', r"bad\.jsonl:1: field 'word_limit'"),
    ('\n\n', r"bad\.jsonl: no prompts"),
])
def test_prompt_rows_name_the_bad_line(tmp_path, text, message):
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(InputError, match=message):
        read_prompt_rows(tmp_path / "bad.jsonl")


def test_prompt_rows_missing_or_not_utf8(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_prompt_rows(tmp_path / "missing.jsonl")
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        read_prompt_rows(tmp_path / "latin.jsonl")


DEEP, HUGE_INT = "[" * 5000 + "]" * 5000, "1" + "0" * 5000


@pytest.mark.parametrize("raw, message", [
    (b'{"message_id": "a", "text": "unterminated}\n', r"malformed JSON \(Unterminated string starting at column 29\)"),
    (DEEP.encode() + b"\n", "JSON nested too deeply to read"),
    (b'{"n": ' + HUGE_INT.encode() + b"}\n", "a number too long to read"),
    (b'{"prompt": "half a character \\ud800"}\n', "field 'prompt' holds an unpaired surrogate escape"),
    (b'{"ok": "caf\xe9"}\n', r"not UTF-8 text \(byte 12 of the line\)"),
    (b"[1, 2]\n", "expected a JSON object, got list"),
], ids=["malformed", "deep", "huge-int", "surrogate", "bad-byte", "not-an-object"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_the_jsonl_reader_names_the_bad_line(tmp_path, raw, message, gz):
    """The one reader of data_prep, the SFT and GRPO files, prompt files and the rewards CLI:
    every way a line can be unreadable is named with its file and line (here line 3, after a
    byte-order mark and a blank line), .gz or not."""
    import gzip

    content = b"\xef\xbb\xbf" + b'{"fine": 1}\n\n' + raw
    path = tmp_path / ("in.jsonl.gz" if gz else "in.jsonl")
    path.write_bytes(gzip.compress(content) if gz else content)
    rows = read_jsonl_rows(path, "data file")
    assert next(rows) == (1, {"fine": 1})
    with pytest.raises(InputError, match=rf"in\.jsonl(\.gz)?:3: {message}"):
        next(rows)


def test_a_damaged_gzip_is_one_line(tmp_path):
    import gzip

    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n' * 1000)[:-40])
    with pytest.raises(InputError, match=r"in\.jsonl\.gz: cannot read it"):
        list(read_jsonl_rows(path, "data file"))
