"""app.py served for real on 127.0.0.1 with the tiny model and two adapters on one base:
through gradio_client, and typed into by headless Chromium. Each column must show what
generate_answers gives on that model run directly."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from tiny_adapters import scaled_adapter, sft_adapter

import app
from phi2qlora.answers import generate_answers
from phi2qlora.errors import InputError, exit_on_input_error
from phi2qlora.model import load_adapter, load_base_model, load_chat_tokenizer
from phi2qlora.word_limits import count_words, row_limit
from tools.setup_env import CHROMIUM, chromium_missing  # the browser ./run_tests.sh adds where apt can

PROMPT = "Explain why the sky is blue."
LIMIT, TOKENS = 20, 24
SENT = f"{PROMPT} Use at most {LIMIT} words."  # a phrasing GRPO was rewarded for, LIMIT words allowed
# Without the background-networking flags, Chromium's calls home hang on an offline machine.
# Playwright gives each launch a fresh temporary profile (--user-data-dir) by itself.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, sample_data_dir, tmp_path_factory):
    """The session's tiny SFT adapter (shared with the evaluate/export tests), and a copy
    with its lora_B doubled to stand in for GRPO: two adapters on one base."""
    sft = sft_adapter(tmp_path_factory, tiny_model_dir, sample_data_dir)
    return {"sft": sft, "grpo": scaled_adapter(sft, tmp_path_factory.mktemp("app") / "grpo", 2.0)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapters):
    args = app.parse_args(["--base", str(tiny_model_dir), "--sft", str(adapters["sft"]), "--grpo",
                           str(adapters["grpo"]), "--port", str(free_port()), "--max_new_tokens", str(TOKENS),
                           "--max_new_tokens_cap", "64", "--max_prompt_chars", "300"])
    demo = app.build_demo(app.load_columns(args), args)
    app.launch(demo, args, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, args, f"http://127.0.0.1:{args.port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def direct(tiny_model_dir, adapters):
    """generate_answers on each model loaded on its own, as app.py loads it on a CPU: the
    NF4 base unpacked to fp32 (dequantize), adapter on top. {'base' | 'sft' | 'grpo': answer}."""
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))

    def unpacked(adapter=None):
        model = load_base_model(str(tiny_model_dir), tokenizer, torch.float32).dequantize(dtype=torch.float32)
        return load_adapter(model, str(adapter)) if adapter else model

    models = {"base": unpacked(), **{k: unpacked(d) for k, d in adapters.items()}}
    return {k: generate_answers(m, tokenizer, [SENT], TOKENS)[0] for k, m in models.items()}


def test_cpu_weights_give_the_trained_models_answers(tiny_model_dir, adapters, direct):
    """The adapters were trained on the NF4 base; unpacked to fp32 (the app's CPU default)
    that base computes the same: the same greedy answer as the 4-bit model itself."""
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    nf4 = load_adapter(load_base_model(str(tiny_model_dir), tokenizer, torch.float32),
                              str(adapters["sft"]))  # as training loads it
    assert generate_answers(nf4, tokenizer, [SENT], TOKENS)[0] == direct["sft"]


def check_columns(shown: dict, direct: dict):
    """shown: {key: (answer text, stats line)} as the page shows them."""
    assert shown.keys() == direct.keys() == {"base", "sft", "grpo"}
    for key, (answer, stats) in shown.items():
        expected = direct[key]
        assert answer == expected["answer"], key
        words = re.search(r"(\d+) words?\b", stats)
        assert words and int(words[1]) == expected["words"] == count_words(answer), stats
        assert ("ended" in stats) == expected["ended"]
        obeys = 0 < expected["words"] <= LIMIT
        assert f"{'obeys' if obeys else 'breaks'} the limit (at most {LIMIT} words)" in stats, stats
    # The switch is real: the adapters change what the one base in memory says.
    assert direct["sft"]["answer"] != direct["base"]["answer"]


def test_client_gets_each_models_greedy_answer_and_word_count(served, direct):
    demo, args, url = served
    client = Client(url, verbose=False)
    sent, *rest = client.predict(PROMPT, LIMIT, TOKENS, api_name="/generate")
    assert sent == f"**Sent:** {SENT}"
    keys = ["base", "sft", "grpo"]
    check_columns({k: (rest[2 * i], rest[2 * i + 1]) for i, k in enumerate(keys)}, direct)
    # No limit set: nothing appended, no verdict.
    sent, answer, stats, *_ = client.predict(PROMPT, None, 8, api_name="/generate")
    assert sent == f"**Sent:** {PROMPT}" and "limit" not in stats
    assert ("ended" in stats) != ("cut off at 8 tokens" in stats)


@pytest.mark.parametrize("prompt, word_limit, tokens, message", [
    ("x" * 301, None, TOKENS, "The prompt is 301 characters long; this server takes at most 300"),
    ("   ", None, TOKENS, "Type a prompt first"),
    (PROMPT, -3, TOKENS, "Value -3 is less than minimum value 0"),  # Gradio's own bound checks
    (PROMPT, 1001, TOKENS, "Value 1001 is greater than maximum value 1000"),
    (PROMPT, None, 65, "Value 65 is greater than maximum value 64"),
], ids=["prompt-over-cap", "empty-prompt", "negative-limit", "limit-too-big", "tokens-over-cap"])
def test_server_refuses_bad_input_with_a_message(served, prompt, word_limit, tokens, message):
    """The page's prompt cap (Textbox max_length) is checked only in the browser; a client
    that skips the browser must meet the same limits on the server."""
    client = Client(served[2], verbose=False)
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(prompt, word_limit, tokens, api_name="/generate")


def test_prompt_at_the_cap_is_answered(served):
    sent, answer, stats, *_ = Client(served[2], verbose=False).predict("y" * 300, None, 8, api_name="/generate")
    assert sent == "**Sent:** " + "y" * 300 and "word" in stats


@pytest.mark.parametrize("word_limit, tokens, message", [
    (2.5, TOKENS, "word limit must be a whole number"), (0.5, TOKENS, "word limit must be a whole number"),
    (5, 0, "Max new tokens must be a whole number from 1 to 64"), (5, "many", "Max new tokens"),
])
def test_request_check_without_gradio(word_limit, tokens, message):
    """app.full_prompt checks on its own too (a notebook may call answer_all directly)."""
    args = app.parse_args(["--max_new_tokens_cap", "64"])
    with pytest.raises(InputError, match=message):
        app.full_prompt(PROMPT, word_limit, tokens, args)
    assert app.full_prompt(f"{PROMPT}\ncode", 7.0, 8.0, args) == (f"{PROMPT}\ncode\n\nUse at most 7 words.", 8)
    sent, _ = app.full_prompt("Is it safe or not", 20, 8, args)  # no full stop: the limit on its own line
    assert sent == "Is it safe or not\n\nUse at most 20 words." and row_limit(sent) == ("max", 20)


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port`, from the kernel's tables."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def test_listens_on_loopback_only_and_shares_nothing(served):
    demo, args, _ = served
    assert listening_addresses(args.port) == {"127.0.0.1"}
    assert demo.share is False and demo.share_url is None
    defaults = app.parse_args([])
    assert (defaults.host, defaults.share) == ("127.0.0.1", False)
    assert app.parse_args(["--share"]).share is True  # only when asked


@needs_chromium
def test_browser_types_a_prompt_and_reads_every_answer(served, direct, tmp_path):
    """Headless Chromium: type, click, read the answers and word counts from the page; then
    an over-long prompt (the browser's maxlength removed, as any other client could) shows
    the server's message in the page. Screenshot: $APP_SCREENSHOT (docs/app.png) or tmp."""
    playwright = pytest.importorskip("playwright.sync_api")
    demo, args, url = served
    outside = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.on("request", lambda r: None if r.url.startswith(url) else outside.append(r.url))
            page.goto(url)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#word-limit input").fill(str(LIMIT))
            page.locator("#generate").click()
            page.wait_for_function("document.querySelector('#stats-grpo')?.innerText.includes('word')",
                                   timeout=60_000)
            shown = {k: (page.locator(f"#answer-{k} textarea").input_value(), page.locator(f"#stats-{k}").inner_text())
                     for k in ("base", "sft", "grpo")}
            assert page.locator("#sent").inner_text() == f"Sent: {SENT}"
            check_columns(shown, direct)
            page.screenshot(path=os.environ.get("APP_SCREENSHOT") or tmp_path / "app.png", full_page=True)

            prompt = page.locator("#prompt textarea")
            assert prompt.get_attribute("maxlength") == str(args.max_prompt_chars)
            prompt.evaluate("e => e.removeAttribute('maxlength')")
            prompt.fill("z" * 400)
            page.locator("#generate").click()
            toast = page.get_by_text("this server takes at most 300")
            toast.wait_for(timeout=30_000)
            assert "The prompt is 400 characters long" in toast.inner_text()
        finally:
            browser.close()
    assert outside == []  # the page needs nothing from outside this server (fonts included)


def test_cli_checks_paths_before_loading(tmp_path, monkeypatch, capsys, adapters):
    monkeypatch.chdir(tmp_path)  # no default adapter folders here
    with pytest.raises(InputError, match="--sft missing: no adapter there"):
        app.adapter_folders(app.parse_args(["--sft", "missing"]))
    with pytest.raises(InputError, match="nothing fine-tuned to show"):
        app.adapter_folders(app.parse_args([]))
    with pytest.raises(InputError, match="not both"):
        app.adapter_folders(app.parse_args(["--merged", "m", "--sft", str(adapters["sft"])]))
    # A default folder that is absent is skipped with a note; one that is there is used.
    shutil.copytree(adapters["sft"], tmp_path / app.DEFAULT_SFT)
    assert app.adapter_folders(app.parse_args([])) == {"sft": app.DEFAULT_SFT}
    assert f"no GRPO adapter in {app.DEFAULT_GRPO}" in capsys.readouterr().out
    assert (app.weights_for(app.parse_args([]), merged=False), app.weights_for(app.parse_args([]), merged=True)) \
        == (("nf4", "nf4") if torch.cuda.is_available() else ("dequantized", "full"))
    with pytest.raises(InputError, match=r"--max_new_tokens 100: must be from 8 to --max_new_tokens_cap \(64\)"):
        app.load_columns(app.parse_args(["--max_new_tokens", "100", "--max_new_tokens_cap", "64"]))
    with pytest.raises(InputError, match="--weights 'int8': expected one of auto, nf4, dequantized, full"):
        app.weights_for(app.AppArguments(weights="int8"), merged=False)  # from Python: no argparse
    # From the command line: one line on stderr, exit status 2, no traceback.
    with pytest.raises(SystemExit) as stopped:
        exit_on_input_error(lambda: app.main(["--grpo", "nowhere"]))
    assert stopped.value.code == 2 and "--grpo nowhere: no adapter there" in capsys.readouterr().err


def test_merged_export_answers_as_its_adapter_does(tiny_model_dir, adapters, direct, tmp_path):
    """A merged folder (what export_model.py writes: plain transformers model, safetensors,
    tokenizer with the chat tokens) gives the SFT adapter's answer; one without the chat
    tokens is refused."""
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    base = load_base_model(str(tiny_model_dir), tokenizer, torch.float32).dequantize(dtype=torch.float32)
    merged = load_adapter(base, str(adapters["sft"])).merge_and_unload()  # as export_model.py merges
    merged.save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")

    args = app.parse_args(["--merged", str(tmp_path / "merged"), "--show_base", "false"])
    columns = app.load_columns(args)
    assert [c.key for c in columns] == ["merged0"]
    *_, (sent, answer, stats) = app.answer_all(columns, args, PROMPT, LIMIT, TOKENS)
    assert answer == direct["sft"]["answer"] and f"{direct['sft']['words']} word" in stats

    with pytest.raises(InputError, match="lacks the chat tokens"):
        app.load_merged(str(tiny_model_dir), torch.float32, "full")
    with pytest.raises(InputError, match="no model there"):
        app.load_merged(str(tmp_path / "nothing"), torch.float32, "full")


def test_verdict_reads_strict_limits_as_ifeval_does():
    """"under 50 words" allows 49: the page says so, whatever phrasing the user typed."""
    def stats(prompt, n):
        answer = " ".join(["word"] * n) + "."
        return app.stats_line({"answer": answer, "words": n, "ended": True}, prompt, 64)

    assert stats("Explain it in under 50 words.", 49).endswith("obeys the limit (at most 49 words)")
    assert stats("Explain it in under 50 words.", 50).endswith("breaks the limit (at most 49 words)")
    assert stats("Explain it. Use at most 50 words.", 50).endswith("obeys the limit (at most 50 words)")
    assert stats("Write more than 10 words.", 10).endswith("breaks the limit (at least 11 words)")
    assert "limit" not in stats("Explain it.", 10)


def test_transformers_answers_stream_as_they_grow(tiny_model_dir, adapters, direct):
    """A transformers column streams too (TextIteratorStreamer): growing text, then the
    same final answer generate_answers gives."""
    tokenizer = load_chat_tokenizer(str(tiny_model_dir))
    model = load_adapter(load_base_model(str(tiny_model_dir), tokenizer, torch.float32).dequantize(dtype=torch.float32),
                         str(adapters["sft"])).eval()
    steps = list(app.stream_answers(model, tokenizer, SENT, TOKENS))
    assert steps[-1] == direct["sft"]
    texts = [s["answer"] for s in steps[:-1] if s["answer"]]
    assert len(texts) >= 3 and all(direct["sft"]["answer"].startswith(x) for x in texts)


def test_the_queue_does_not_poll_every_millisecond():
    """Gradio's queue looks for a free slot every 1 ms while a generation runs, CPU that a
    2-core Space's llama.cpp threads need (app.build_demo says how much): the page sets 50 ms."""
    demo = app.build_demo([app.Column("x", "X", None, None)], app.AppArguments())
    assert demo._queue.sleep_when_free == 0.05
