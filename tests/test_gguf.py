"""The CPU serving path with the real engine: the tiny SFT adapter exported to GGUF by
llama.cpp's converter and quantizer, loaded by llama-cpp-python, and the Space folder
started as a Space starts it (from its own folder, in a fresh venv where only its
requirements.txt was installed, offline from wheels fetched beforehand), queried through
gradio_client and headless Chromium on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from gradio_client import Client
from tiny_adapters import sft_adapter

from tools.setup_env import llama_cpp_missing

if missing := llama_cpp_missing():
    pytest.skip(missing, allow_module_level=True)

import export_model  # noqa: E402
from phi2qlora.chat import CHAT_TOKENS, DEFAULT_PROMPTS, END, format_prompt  # noqa: E402
from phi2qlora.gguf import CONVERTER_HOME, greedy_answers, llama_cpp_version, load  # noqa: E402
from phi2qlora.space import start_space  # noqa: E402
from tests.test_app import CHROMIUM, CHROMIUM_FLAGS, listening_addresses, needs_chromium  # noqa: E402

if not (CONVERTER_HOME / f"llama-cpp-python-{llama_cpp_version()}" / "convert_hf_to_gguf.py").is_file():
    pytest.skip("llama.cpp's converter is not unpacked: ./run_tests.sh unpacks it (tools/fetch_gguf_converter.py)",
                allow_module_level=True)

TOKENS = 48
TRAINING_STACK = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets")


@pytest.fixture(scope="module")
def exported(tiny_model_dir, sample_data_dir, tmp_path_factory):
    """export_model.py --gguf q8_0,q4_k_m,f16 --space on the session's tiny SFT adapter."""
    adapter = sft_adapter(tmp_path_factory, tiny_model_dir, sample_data_dir)
    root = tmp_path_factory.mktemp("gguf")
    args = export_model.parse_args(["--model_name_or_path", str(tiny_model_dir), "--adapter", str(adapter),
                                    "--output_dir", str(root / "merged"), "--dtype", "float32",
                                    "--gguf", "q8_0,q4_k_m,f16", "--space", str(root / "space"),
                                    "--space_label", "sft", "--check_max_new_tokens", str(TOKENS)])
    export_model.main(args)
    return root


def test_the_export_is_checked_and_its_agreement_stated(exported):
    info = json.loads((exported / "merged-gguf" / "export.json").read_text())
    checks = info["check"]
    assert set(checks) == {"q8_0", "q4_k_m", "f16"}
    for kind, c in checks.items():
        assert c["prompts"] == len(DEFAULT_PROMPTS) and len(c["answers"]) == len(DEFAULT_PROMPTS)
        assert 0 <= c["same_answers"] <= c["same_first_token"] <= c["prompts"], kind
    # f16 of an fp32 merge is the trained model up to 16-bit rounding: the same greedy answers
    # (seen: 4/4); Q8_0 starts the same (seen: every first token); Q4_K_M is stated, not bounded.
    assert checks["f16"]["same_answers"] >= 3
    modelfile = (exported / "merged-gguf" / "Modelfile").read_text()  # for Ollama users
    assert modelfile.startswith("FROM ./sft-q8_0.gguf\n") and 'PARAMETER stop "<|end|>"' in modelfile
    assert "TEMPLATE \"\"\"<|user|>\n{{ .Prompt }}<|end|>\n<|assistant|>\n\"\"\"" in modelfile
    assert checks["q8_0"]["same_first_token"] >= 3
    print({k: (c["same_answers"], c["same_first_token"], c["mean_tokens_before_a_difference"])
           for k, c in checks.items()})


def test_gguf_keeps_the_chat_format_and_answers_as_the_merged_model(exported):
    """The f16 GGUF of an fp32 merge: the chat tokens are single tokens, END is llama.cpp's
    end of generation, and its greedy answers (text and whether they ended) are the merged
    model's own, run by plain transformers in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phi2qlora.answers import generate_answers

    llm = load(exported / "merged-gguf" / "sft-f16.gguf")
    for token in CHAT_TOKENS:
        assert len(llm.tokenize(token.encode(), add_bos=False, special=True)) == 1, token
    end_id = llm.tokenize(END.encode(), add_bos=False, special=True)[0]
    assert llm.token_eos() == end_id  # llama.cpp's own generation loops stop there too
    merged = AutoModelForCausalLM.from_pretrained(exported / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported / "merged")
    expected = generate_answers(merged, tokenizer, DEFAULT_PROMPTS, 96)
    got = greedy_answers(llm, DEFAULT_PROMPTS, 96)
    assert [(g["answer"], g["ended"]) for g in got] == [(e["answer"], e["ended"]) for e in expected]
    for g in got:  # the prompt as llama.cpp reads it is the prompt as the tokenizer reads it
        assert llm.tokenize(format_prompt(g["prompt"]).encode(), add_bos=False, special=True) == \
            tokenizer(format_prompt(g["prompt"]), add_special_tokens=False)["input_ids"]


def test_llama_cpp_amx_kernels_are_left_out_where_built_in(exported, monkeypatch):
    """llama.cpp's AMX kernels crash on some CPUs that list AMX (this suite segfaulted on one,
    2026-12-05): where a build has them, `load` turns llama.cpp's extra buffer types off;
    elsewhere they stay on (its AVX2/AVX512 repacked kernels)."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info
    for built_in in (True, False):
        monkeypatch.setattr(llama_cpp, "llama_print_system_info",
                            lambda b=built_in: info().replace(b"AMX_INT8 = 1", b"") + (b"AMX_INT8 = 1 |" if b else b""))
        llm = load(exported / "merged-gguf" / "sft-f16.gguf")  # f16: no AMX kernel, safe to load either way
        assert llm.model_params.use_extra_bufts is (not built_in)
    assert llama_cpp.llama_model_default_params().use_extra_bufts  # the library's own default is back


def test_an_answer_stops_at_the_end_of_turn_and_leaves_it_out():
    """stream_answer on a stand-in engine that emits two tokens, END, then more."""
    from phi2qlora.gguf import stream_answer

    class Engine:
        def tokenize(self, text, add_bos=False, special=True):
            return [99] if text == END.encode() else [1, 2, 3]

        def token_eos(self):
            return 99

        def generate(self, tokens, **kwargs):
            yield from (10, 11, 99, 12)

        def detokenize(self, ids, special=False):
            return {10: b"Hello", 11: b" there"}[ids[0]]

    *_, last = stream_answer(Engine(), "Hi", 16)
    assert last == {"prompt": "Hi", "answer": "Hello there", "words": 2, "ended": True, "ids": [10, 11]}
    *_, cut = stream_answer(Engine(), "Hi", 1)
    assert cut == {"prompt": "Hi", "answer": "Hello", "words": 1, "ended": False, "ids": [10]}


@pytest.fixture(scope="module")
def space_python(tmp_path_factory, exported):
    """A fresh venv with the Space's requirements.txt installed as a Space's builder installs
    it (`pip install -r requirements.txt`), offline from the wheels that
    tools/fetch_space_wheels.py fetched: nothing else in it."""
    from phi2qlora.space import SPACE_WHEELS

    wanted = (exported / "space" / "requirements.txt").read_text()
    fetched = SPACE_WHEELS / "requirements.txt"
    if not fetched.is_file() or fetched.read_text() != wanted:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "the Space's wheels are not fetched: ./run_tests.sh fetches them (tools/fetch_space_wheels.py)")
    venv = tmp_path_factory.mktemp("space-env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(SPACE_WHEELS),
                    "--disable-pip-version-check", "-r", str(exported / "space" / "requirements.txt")],
                   check=True, env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")})
    return python


def installed(python) -> set[str]:
    from packaging.utils import canonicalize_name

    listing = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                             check=True, capture_output=True, text=True).stdout
    return {canonicalize_name(d["name"]) for d in json.loads(listing)}


@pytest.fixture(scope="module")
def space(exported, space_python):
    folder = exported / "space"
    proc, port = start_space(folder, space_python, capture=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline and not listening_addresses(port):
        if proc.poll() is not None:
            pytest.fail(f"the Space exited: {proc.stdout.read()[-2000:]}")
        time.sleep(0.5)
    try:
        yield folder, port, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_space_folder_holds_what_a_space_needs(exported, space_python):
    folder = exported / "space"
    card = (folder / "README.md").read_text()
    front = card.split("---")[1]
    assert re.search(r"^sdk: gradio$", front, re.M) and re.search(r"^app_file: app\.py$", front, re.M)
    assert re.search(r"^suggested_hardware: cpu-basic$", front, re.M)
    requirements = [line for line in (folder / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert sorted({r.split("==")[0] for r in requirements}) == ["gradio", "llama-cpp-python"]
    serve = [line for line in (ROOT / "requirements-serve.txt").read_text().splitlines() if line.startswith("llama")]
    assert [r for r in requirements if r.startswith("llama")] == serve  # built as the project builds it
    have = installed(space_python)
    assert {"gradio", "llama-cpp-python"} <= have and not have & set(TRAINING_STACK)  # no torch, no transformers
    assert [p.name for p in (folder / "models").glob("*.gguf")] == ["sft-q8_0.gguf"]


def test_space_answers_as_the_exported_model_and_checks_requests(exported, space):
    folder, port, url = space
    assert listening_addresses(port) == {"127.0.0.1"}
    client = Client(url, verbose=False)
    prompt, limit = "Explain why the sky is blue.", 20
    sent, answer, stats = client.predict(prompt, limit, TOKENS, api_name="/generate")
    expected = greedy_answers(load(folder / "models" / "sft-q8_0.gguf"), [f"{prompt} Use at most {limit} words."],
                              TOKENS)[0]
    assert sent == f"**Sent:** {prompt} Use at most {limit} words."
    assert answer == expected["answer"]
    assert f"{expected['words']} word" in stats and "the limit (at most 20 words)" in stats
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="this server takes at most 2,000"):
        client.predict("x" * 2001, None, TOKENS, api_name="/generate")


@needs_chromium
def test_space_in_a_browser_answers_in_its_column(space):
    playwright = pytest.importorskip("playwright.sync_api")
    folder, port, url = space
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.locator("#prompt textarea").fill("Give me three tips for a job interview.")
            page.locator("#generate").click()
            page.wait_for_function("document.querySelector('#stats-gguf0')?.innerText.includes('word')",
                                   timeout=60_000)
            shown = page.locator("#answer-gguf0 textarea").input_value()
        finally:
            browser.close()
    expected = greedy_answers(load(folder / "models" / "sft-q8_0.gguf"), ["Give me three tips for a job interview."],
                              160)[0]
    assert shown == expected["answer"]


def test_a_bad_model_file_in_the_space_is_one_line(exported, space_python, tmp_path):
    import shutil

    folder = tmp_path / "space"
    shutil.copytree(exported / "space", folder)
    (folder / "models" / "sft-q8_0.gguf").write_bytes(b"not a model")
    proc, _ = start_space(folder, space_python, capture=True)
    out, _ = proc.communicate(timeout=120)
    lines = [line for line in out.strip().splitlines() if line]
    assert proc.returncode == 2, out
    assert re.fullmatch(r"app: error: .*sft-q8_0\.gguf: not a GGUF file \(it does not start with GGUF\); copy it "
                        r"again, or write it again with export_model\.py --gguf", lines[-1])
    assert "Traceback" not in out


def test_app_on_a_cpu_takes_the_gguf_exports_unless_told(tmp_path, monkeypatch, capsys):
    import app

    monkeypatch.setattr(app, "DEFAULT_GGUF", str(tmp_path))
    args = app.parse_args([])
    app.use_cpu_fast_path(args)
    assert args.gguf == []  # no GGUF there yet: the adapters, as before, and how to get the fast path
    said = capsys.readouterr().out
    assert "fp32 path" in said and "export_model.py --gguf q4_k_m" in said
    (tmp_path / "m-q4_k_m.gguf").write_bytes(b"")
    app.use_cpu_fast_path(args)
    assert args.gguf == [str(tmp_path)]
    exact = app.parse_args(["--weights", "dequantized"])
    app.use_cpu_fast_path(exact)
    assert exact.gguf == []  # --weights: the exact fp32 path, for checks


def test_answers_stream_into_their_columns(exported):
    """app.answer_all yields each column's text as it grows (a prefix of the final answer,
    longer each time), then its stats line."""
    import app

    args = app.parse_args(["--gguf", str(exported / "merged-gguf" / "sft-q8_0.gguf")])
    columns = app.load_columns(args)
    updates = [out[1] for out in app.answer_all(columns, args, "Give me three tips for a job interview.", None, 32)]
    final = updates[-1]
    growing = [u for u in updates if u]
    assert len(set(growing)) >= 5 and all(final.startswith(u) for u in growing)
    assert final == greedy_answers(columns[0].model, ["Give me three tips for a job interview."], 32)[0]["answer"]


def test_the_cpu_serving_benchmark_times_every_path(exported, tmp_path):
    """benchmarks/bench_cpu_serving.py at tiny scale: the fp32 baseline, llama.cpp at batch 1
    and 2 (one decode a step over both rows), and the page of two GGUFs in one process."""
    gguf = exported / "merged-gguf"
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cpu_serving.py"),
                          "--model_dir", str(exported / "merged"), "--runs", "2", "--new_tokens", "6",
                          "--batch", "2", "--paths", "dequantized",
                          "--gguf", str(gguf / "sft-f16.gguf"), str(gguf / "sft-q8_0.gguf"), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    paths = results["paths"]
    assert set(paths) == {"dequantized", f"gguf {gguf / 'sft-f16.gguf'}", f"gguf {gguf / 'sft-q8_0.gguf'}", "page"}
    for name in ("dequantized", f"gguf {gguf / 'sft-f16.gguf'}", f"gguf {gguf / 'sft-q8_0.gguf'}"):
        r = paths[name]
        assert len(r["tok_s"]) == 2 and min(r["tok_s"]) > 0 and len(r["tok_s_batch"]) == 2, name
        assert len(r["tokens"]) == 6 and r["same_prompt"] and r["peak_rss_gib"] > 0, name
    f16 = paths[f"gguf {gguf / 'sft-f16.gguf'}"]
    assert f16["batch_row0_same"] >= 1  # the batched decode answers row 0's prompt, not another row's
    assert len(paths["page"]["tok_s_each"]) == 2
    assert set(results["product_ms"]) == {"fp32", "nf4", "nf4 packed"}
    assert "| dequantized |" in run.stdout
