"""tools/setup_env.py, what README's two commands run first: a step counts as done only
once it finished, an interrupted one runs again next time, a second run does nothing, a
kept torch shows through .venv, and what it cannot install is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from tools import setup_env


@pytest.fixture
def venv(tmp_path, monkeypatch) -> Path:
    """setup_env's .venv moved into a temp dir (never the project's own)."""
    folder = tmp_path / ".venv"
    monkeypatch.setattr(setup_env, "VENV", folder)
    monkeypatch.setattr(setup_env, "RECORDS", folder / ".setup")
    monkeypatch.setattr(setup_env, "PYTHON_IN_VENV", folder / "bin" / "python")
    monkeypatch.setattr(setup_env.signal, "signal", lambda *args: None)  # pytest keeps its own SIGTERM
    return folder


def test_a_step_is_done_only_with_its_record_its_key_and_its_product(venv, tmp_path):
    product = tmp_path / "converter.py"
    step = setup_env.Step("converter", "says", "key-1", lambda: None, product=product)
    assert not step.done()
    setup_env.write_record("converter", "key-1")
    assert not step.done()  # the record alone: its product outside .venv is gone
    product.write_text("")
    assert step.done()
    step.key = "key-2"  # constraints.txt changed what it installs from
    assert not step.done()


def test_an_interrupted_step_runs_again_and_a_second_run_does_nothing(venv, monkeypatch, capsys):
    ran = []

    def step(name, interrupt=False):
        def run():
            ran.append(name)
            if interrupt and ran.count(name) == 1:
                raise KeyboardInterrupt  # Ctrl-C in the middle of it, the first time
        return setup_env.Step(name, f"installing {name}", "key", run)

    monkeypatch.setattr(setup_env, "venv_ready", lambda wanted: True)
    monkeypatch.setattr(setup_env, "plan", lambda target, kept: [step("torch"), step("packages", interrupt=True)])
    monkeypatch.setattr(setup_env, "torch_already_there", lambda: None)

    assert setup_env.main(["demo"]) == 1
    assert ran == ["torch", "packages"] and setup_env.read_record("packages") is None
    assert setup_env.main(["demo"]) == 0
    assert ran == ["torch", "packages", "packages"]  # only the unfinished one
    assert setup_env.main(["demo"]) == 0
    assert ran == ["torch", "packages", "packages"]  # everything recorded: nothing runs
    assert "ready for the demo" in capsys.readouterr().out


def test_the_interruption_is_told_in_one_line(venv, monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(setup_env, "venv_ready", lambda wanted: True)
    monkeypatch.setattr(setup_env, "plan", lambda target, kept: [setup_env.Step("packages", "x", "k", interrupted)])
    assert setup_env.main(["tests"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "stopped: interrupted" in line and "run the same command again" in line


def test_a_failed_command_names_its_log_and_records_nothing(venv):
    log = venv / ".setup" / "logs" / "fails.log"
    with pytest.raises(setup_env.SetupStopped, match="fails.log"):
        setup_env.run_shown([sys.executable, "-c", "print('half'); raise SystemExit(3)"], "a step", log)
    assert "half" in log.read_text()
    setup_env.run_shown([sys.executable, "-c", "print('whole')"], "a step", log)
    assert "whole" in log.read_text()


def test_a_long_step_says_how_far_it_is(venv, monkeypatch, capsys):
    monkeypatch.setattr(setup_env, "HEARTBEAT_S", 0.3)
    build = "import time; print('[7/193] /usr/bin/g++ -O3 -o x.o -c src/llama-model.cpp', flush=True); " \
            "print('  1210 | a compiler warning', flush=True); time.sleep(1.5)"
    setup_env.run_shown([sys.executable, "-c", build], "llama.cpp's build", venv / "build.log")
    shown = capsys.readouterr().out.splitlines()
    heartbeats = [line for line in shown if line.startswith("  llama.cpp's build: 0:0")]
    assert heartbeats and all(line.endswith(" so far; [7/193] compiling llama-model.cpp") for line in heartbeats)
    assert shown[-1].startswith("  done in 0:0")  # the warning after it never took the status line


def test_a_package_cut_short_is_removed_for_pip_to_put_back(venv):
    site = venv / "lib" / "python3.11" / "site-packages"
    whole, cut = site / "whole-1.0.dist-info", site / "cut-1.0.dist-info"
    for info in (whole, cut):
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Name: x\n")
    (whole / "INSTALLER").write_text("pip\n")  # pip writes it after every other file
    setup_env.repair_half_installed()
    assert whole.exists() and not cut.exists()


def test_a_kept_torch_shows_through_the_venv_after_its_own_packages(venv):
    setup_env.make_venv(sys.executable, kept_torch="2.13.0")
    shown = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.util, sys; print(importlib.util.find_spec('torch').origin); "
                            "print([p for p in sys.path if p.endswith('-packages')])"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    import torch

    assert shown[0] == torch.__file__  # this Python's torch, not a second one
    own = eval(shown[1])[0]
    assert own.startswith(str(venv))  # .venv's pins come first
    assert setup_env.venv_ready(setup_env.venv_wanted("2.13.0"))
    assert not setup_env.venv_ready(setup_env.venv_wanted(None))  # this Python lost its torch: rebuilt


def test_someone_elses_venv_is_left_alone(venv):
    venv.mkdir()
    (venv / "mine.txt").write_text("keep")
    with pytest.raises(setup_env.SetupStopped, match="not made by this set-up"):
        setup_env.make_venv(sys.executable, kept_torch=None)
    assert (venv / "mine.txt").read_text() == "keep"


def test_without_a_compiler_llama_cpp_is_not_built_and_that_is_one_line(venv, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert [s.name for s in setup_env.plan("tests", kept_torch="2.13.0") if s.name != "chromium"] == ["packages"]
    assert setup_env.NO_COMPILER in setup_env.missing_pieces("tests")
    assert setup_env.missing_pieces("demo") == []  # the demo builds nothing
    for line in (setup_env.NO_COMPILER, setup_env.NO_CHROMIUM):
        assert "\n" not in line and "install" in line


def test_the_demo_takes_no_llama_cpp_and_the_tests_do(venv):
    demo = [s.name for s in setup_env.plan("demo", kept_torch=None)]
    tests = [s.name for s in setup_env.plan("tests", kept_torch=None)]
    assert demo == ["torch", "packages"]
    assert tests[:2] == demo and ("llama.cpp" in tests) == setup_env.has_compiler()


@pytest.mark.parametrize("python, says", [
    ("/nonexistent/python3", "no /nonexistent/python3 found: install Python 3.11 or newer"),
    ("OLD", "is Python 3.9.7; Python 3.11 or newer is needed"),
])
def test_a_missing_or_old_python_is_one_line(tmp_path, python, says):
    if python == "OLD":  # stands in for a Python 3.9: fails the version check, names itself
        python = tmp_path / "python3.9"
        python.write_text("#!/bin/sh\n[ \"$1\" = -V ] && echo 'Python 3.9.7'\nexit 1\n")
        python.chmod(0o755)
    done = subprocess.run(["bash", "-c", "source tools/setup_env.sh demo"], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(python)})
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert says in line
