"""Set up `.venv/` inside the project for README's two commands, once, and say what is missing.

    python3 tools/setup_env.py demo    # what ./demo_offline.sh needs: torch and the pinned packages
    python3 tools/setup_env.py tests   # what ./run_tests.sh needs: those, llama.cpp's build, its
                                       # converter, the Space's wheels, Chromium where apt can add it

Each step is recorded in `.venv/.setup/` only after it succeeded, with a fingerprint of the
files it installs from. A second run finds every record and skips in well under a second;
a step that was interrupted (Ctrl-C, kill, the network gone) left no record and runs again
on the next run; a changed requirements.txt or constraints.txt re-runs the steps it feeds.

Torch: where the Python that builds `.venv` already has torch (Colab, a CUDA machine), that
torch is kept: `.venv` sees the packages of that Python (a .pth file, after its own) and
takes constraints.txt's other pins beside them. Elsewhere `.venv` gets torch's CPU wheel at
constraints.txt's version. `PYTHON=python3.12 ./run_tests.sh` picks the Python.

Only the standard library and the project's stdlib-only path helpers: it runs before
anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from phi2qlora.gguf import CONVERTER_HOME  # noqa: E402  (stdlib only at import)
from phi2qlora.space import SPACE_WHEELS  # noqa: E402

VENV = ROOT / ".venv"
RECORDS = VENV / ".setup"
PYTHON_IN_VENV = VENV / "bin" / "python"
CONSTRAINTS = ROOT / "constraints.txt"
REQUIREMENTS = ROOT / "requirements.txt"
SERVE_REQUIREMENTS = ROOT / "requirements-serve.txt"
MIN_TORCH = (2, 11)  # requirements.txt's torch>=2.11
# PyPI's Linux torch wheels are CUDA builds (several GB); the CPU wheel lives on PyTorch's index.
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CHROMIUM = Path("/usr/bin/chromium")
HEARTBEAT_S = 30  # off a terminal (CI's log), how often a long step says how far it is
# The lines of pip and of llama.cpp's ninja build that tell how far they are (not warnings).
PROGRESS = re.compile(r"\s*(\[\d+/\d+\]|Collecting|Downloading|Processing|Building|Installing|Successfully|Get:|"
                      r"Unpacking|Setting up|llama\.cpp's converter|the Space's wheels|pip wheel)")

# What the commands cannot install themselves: one line each, printed by the set-up and given
# by the tests that skip without it.
NO_COMPILER = ("no C/C++ compiler (cc, c++): llama.cpp is not built and its tests skip; install one "
               "(Debian/Ubuntu: apt-get install build-essential) and run ./run_tests.sh again")
NO_CHROMIUM = (f"no Chromium at {CHROMIUM}: the browser tests skip; install it (Debian: apt-get install "
               "chromium) to run them")


class SetupStopped(Exception):
    """A step failed or the set-up cannot go on: the message says which and why; nothing is recorded."""


def has_compiler() -> bool:
    return bool(shutil.which(os.environ.get("CC") or "cc") and shutil.which(os.environ.get("CXX") or "c++"))


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp tests can't run here, in one line, or None when llama-cpp-python imports."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        return None
    if not has_compiler():
        return NO_COMPILER
    return "llama-cpp-python is not installed: ./run_tests.sh builds it (or pip install -r requirements-serve.txt)"


def chromium_missing() -> str | None:
    return None if CHROMIUM.exists() else NO_CHROMIUM


def pin(name: str) -> str:
    """constraints.txt's line for `name` (e.g. 'torch==2.13.0+cpu')."""
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if re.match(rf"{re.escape(name)}==", line, re.IGNORECASE):
            return line.strip()
    raise SetupStopped(f"constraints.txt pins no {name}")


def fingerprint(*parts: Path | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.read_bytes() if isinstance(part, Path) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def write_record(name: str, text: str) -> None:
    """Whole or not at all: a record is the proof that its step finished."""
    RECORDS.mkdir(parents=True, exist_ok=True)
    partial = RECORDS / f".{name}.partial"
    partial.write_text(text, encoding="utf-8")
    partial.replace(RECORDS / name)


def read_record(name: str) -> str | None:
    try:
        return (RECORDS / name).read_text(encoding="utf-8")
    except OSError:
        return None


def elapsed(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def progress_text(line: str) -> str:
    """A progress line as the status shows it: a compile step by its source file, not its flags."""
    step = re.match(r"\s*(\[\d+/\d+\]).* -c (\S+)", line)
    return f"{step.group(1)} compiling {Path(step.group(2)).name}" if step else line.strip()


def run_shown(cmd: list[str], label: str, log: Path, env: dict | None = None, show_failure: bool = True) -> None:
    """Run `cmd` with its whole output in `log`. On a terminal one status line follows its
    latest progress line; elsewhere (CI) a line every 30 s. A failure shows the last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    on_terminal = sys.stdout.isatty()
    tail: deque[str] = deque(maxlen=15)
    latest = [""]
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env, cwd=ROOT)

        def pump():
            for line in proc.stdout:
                out.write(line)
                if line.strip():
                    tail.append(line.rstrip())
                    if PROGRESS.match(line):
                        latest[0] = progress_text(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            while True:
                try:
                    proc.wait(timeout=1 if on_terminal else HEARTBEAT_S)
                    break
                except subprocess.TimeoutExpired:
                    so_far = elapsed(time.monotonic() - start)
                    if on_terminal:
                        width = shutil.get_terminal_size().columns
                        print(f"\r\033[K  {so_far} {latest[0]}"[:width], end="", flush=True)
                    else:
                        print(f"  {label}: {so_far} so far; {latest[0][:110]}", flush=True)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
        finally:
            reader.join(timeout=5)
            if on_terminal:
                print("\r\033[K", end="", flush=True)
    if proc.returncode:
        if show_failure:
            print("\n".join("  | " + line for line in tail), file=sys.stderr)
        raise SetupStopped(f"{label} failed (the lines above; all of it in "
                           f"{log.relative_to(ROOT) if log.is_relative_to(ROOT) else log})")
    print(f"  done in {elapsed(time.monotonic() - start)}", flush=True)


def pip(*args: str, label: str, log: str, show_failure: bool = True) -> None:
    run_shown([str(PYTHON_IN_VENV), "-m", "pip", "install", "--disable-pip-version-check", *args], label,
              RECORDS / "logs" / f"{log}.log", show_failure=show_failure)


# ---- the Python that builds .venv, and whether its torch is kept ------------------------------------

def base_python() -> str:
    """The interpreter running this, unless it is .venv's own (an activated .venv): then the
    one .venv was built from, run again."""
    if Path(sys.prefix).resolve() != VENV.resolve():
        return sys.executable
    built_from = json.loads(read_record("venv") or "{}").get("python")
    if built_from and Path(built_from).exists():
        os.execv(built_from, [built_from, *sys.argv])
    raise SetupStopped("this is .venv's own Python: run with another (PYTHON=python3 ./run_tests.sh)")


def torch_already_there() -> str | None:
    """The version of the torch this Python has, if any (Colab, a CUDA machine)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:2])


def site_dirs() -> list[str]:
    """This Python's package folders, in its own order (user, venv, system)."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]


# ---- .venv ----------------------------------------------------------------------------------------

def venv_wanted(kept_torch: str | None) -> dict:
    """What .venv must have been built for; another path to the same Python version is fine."""
    return {"version": ".".join(platform.python_version_tuple()[:2]), "keeps_torch": kept_torch is not None}


def venv_ready(wanted: dict) -> bool:
    recorded = json.loads(read_record("venv") or "{}")
    if {k: recorded.get(k) for k in wanted} != wanted or not PYTHON_IN_VENV.exists():
        return False
    return subprocess.run([str(PYTHON_IN_VENV), "-c", "import pip"], capture_output=True).returncode == 0


def make_venv(python: str, kept_torch: str | None) -> None:
    if VENV.exists():
        if not RECORDS.is_dir():
            raise SetupStopped(f"{VENV.name}/ is in the way and was not made by this set-up: move or remove it")
        print(f"set-up: rebuilding {VENV.name}/ (half made, or made for another Python version or torch)", flush=True)
        shutil.rmtree(VENV)
    RECORDS.mkdir(parents=True)  # first: marks the folder as this set-up's, even half made
    print(f"set-up: creating {VENV.name}/ with {python} (Python {platform.python_version()})", flush=True)
    import importlib.util

    if importlib.util.find_spec("ensurepip") is not None:
        made = subprocess.run([python, "-m", "venv", str(VENV)], capture_output=True, text=True)
    else:  # Debian's python3 without python3-venv (Colab too): pip from this Python installs pip there
        made = subprocess.run([python, "-m", "venv", "--without-pip", str(VENV)], capture_output=True, text=True)
        if not made.returncode:
            made = subprocess.run([python, "-m", "pip", "--python", str(PYTHON_IN_VENV), "install", "-q", "pip"],
                                  capture_output=True, text=True)
    if made.returncode:
        raise SetupStopped("could not create .venv: " + (made.stderr.strip().splitlines() or ["?"])[-1][:200] +
                           " (Debian/Ubuntu: apt-get install python3-venv)")
    if kept_torch:
        purelib = subprocess.run([str(PYTHON_IN_VENV), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        # After .venv's own folder on sys.path: .venv's pins win, this Python's torch (and the rest) shows through.
        (Path(purelib) / "_phi2qlora_base_packages.pth").write_text("\n".join(site_dirs()) + "\n", encoding="utf-8")
    write_record("venv", json.dumps({**venv_wanted(kept_torch), "python": python}))


def repair_half_installed() -> None:
    """A package whose install was cut short: pip writes INSTALLER into its .dist-info after
    every file, so one without it is removed, and the next pip install puts it back whole."""
    for info in VENV.glob("lib/python*/site-packages/*.dist-info"):
        if not (info / "INSTALLER").exists():
            print(f"set-up: {info.name} was cut short: installing it again", flush=True)
            shutil.rmtree(info)


# ---- the steps -------------------------------------------------------------------------------------

@dataclass
class Step:
    name: str
    says: str                       # what it does and how long it takes, announced before it runs
    key: str                        # fingerprint of what it installs from: recorded when done
    run: Callable[[], None]
    product: Path | None = None     # its result outside .venv: when gone, the step runs again
    optional: bool = False          # a failure is said and the rest goes on (tried again next run)

    def done(self) -> bool:
        return read_record(self.name) == self.key and (self.product is None or self.product.exists())


def constraints_without_torch() -> Path:
    """constraints.txt less its torch line: torch is installed first or kept, never replaced."""
    path = RECORDS / "constraints-without-torch.txt"
    lines = [l for l in CONSTRAINTS.read_text(encoding="utf-8").splitlines() if not l.startswith("torch==")]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def install_cpu_torch() -> None:
    wanted = pin("torch")  # torch==2.13.0+cpu
    if platform.system() != "Linux":
        wanted = wanted.split("+")[0]  # PyPI's macOS/Windows wheels are the CPU ones
    common = [wanted, "-c", str(constraints_without_torch())]
    try:  # a local or configured index may hold the CPU wheel already; else PyTorch's own index
        pip(*common, label=f"{wanted} (CPU)", log="torch", show_failure=platform.system() != "Linux")
    except SetupStopped:
        if platform.system() != "Linux":
            raise
        print(f"  not in pip's own indexes: from {PYTORCH_CPU_INDEX}", flush=True)
        pip(*common, "--extra-index-url", PYTORCH_CPU_INDEX, label=f"{wanted} (CPU)", log="torch")


def install_chromium() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = RECORDS / "logs" / "chromium.log"
    run_shown(["sh", "-c", "dpkg --configure -a && apt-get update -qq && apt-get install -y -qq chromium"],
              "apt-get install chromium", log, env=env)


def can_apt_install_chromium() -> bool:
    """Root on Debian with apt: CI's machine. Elsewhere the set-up only says what to install."""
    try:
        debian = "ID=debian" in Path("/etc/os-release").read_text().splitlines()
    except OSError:
        debian = False
    return debian and os.geteuid() == 0 and shutil.which("apt-get") is not None


def plan(target: str, kept_torch: str | None) -> list[Step]:
    llama = pin("llama_cpp_python").split("==")[1]
    steps = []
    if not kept_torch:
        steps.append(Step("torch", f"torch's CPU wheel ({pin('torch')}, about 200 MB; not the CUDA build)",
                          fingerprint(pin("torch"), platform.python_version()), install_cpu_torch))
    steps.append(Step("packages", "the pinned packages: requirements.txt at constraints.txt's versions "
                                  "(about 2 minutes from nothing)",
                      fingerprint(REQUIREMENTS, CONSTRAINTS),
                      lambda: pip("-r", str(REQUIREMENTS), "-c", str(constraints_without_torch()),
                                  label="requirements.txt", log="packages")))
    if target == "demo":
        return steps
    if has_compiler():
        steps += [
            Step("llama.cpp", f"llama.cpp, built from source by llama-cpp-python {llama} (requirements-serve.txt): "
                              "takes about 5 minutes on 2 free cores (longer on busy ones), once",
                 fingerprint(SERVE_REQUIREMENTS, CONSTRAINTS),
                 lambda: pip("-v", "-r", str(SERVE_REQUIREMENTS), "-c", str(constraints_without_torch()),
                             label="llama.cpp's build", log="llama.cpp")),
            Step("converter", "llama.cpp's GGUF converter, from llama-cpp-python's source (tools/fetch_gguf_converter.py)",
                 fingerprint(llama), lambda: run_shown(
                     [str(PYTHON_IN_VENV), "tools/fetch_gguf_converter.py"], "the converter",
                     RECORDS / "logs" / "converter.log"),
                 product=CONVERTER_HOME / f"llama-cpp-python-{llama}" / "convert_hf_to_gguf.py"),
            Step("space-wheels", "the CPU Space's wheels, for its offline install in the tests "
                                 "(tools/fetch_space_wheels.py; llama.cpp from pip's cache)",
                 fingerprint(SERVE_REQUIREMENTS, CONSTRAINTS), lambda: run_shown(
                     [str(PYTHON_IN_VENV), "tools/fetch_space_wheels.py"], "the Space's wheels",
                     RECORDS / "logs" / "space-wheels.log"),
                 product=SPACE_WHEELS / "requirements.txt"),
        ]
    if not CHROMIUM.exists() and can_apt_install_chromium():
        steps.append(Step("chromium", "Chromium for the browser tests (apt-get install chromium, about a minute)",
                          "debian", install_chromium, product=CHROMIUM, optional=True))
    return steps


def missing_pieces(target: str) -> list[str]:
    if target == "demo":
        return []
    return [line for line in (None if has_compiler() else NO_COMPILER, chromium_missing()) if line]


def set_up(target: str) -> None:
    start = time.monotonic()
    python = base_python()
    kept_torch = torch_already_there()
    if kept_torch and version_tuple(kept_torch) < MIN_TORCH:
        raise SetupStopped(f"{python} has torch {kept_torch}, older than requirements.txt's torch>=2.11: upgrade "
                           "it there, or build .venv from a Python without torch (PYTHON=...) to get the CPU wheel")
    wanted = venv_wanted(kept_torch)
    fresh_venv = not venv_ready(wanted)
    if fresh_venv:
        make_venv(python, kept_torch)
    if kept_torch and fresh_venv:
        print(f"set-up: torch {kept_torch} is already installed for {python}: kept (.venv sees that Python's "
              "packages and takes constraints.txt's other pins beside them)", flush=True)
    steps = [s for s in plan(target, kept_torch) if not s.done()]
    if steps:
        repair_half_installed()
    for number, step in enumerate(steps, 1):
        print(f"set-up [{number}/{len(steps)}]: {step.says}", flush=True)
        try:
            step.run()
        except SetupStopped as failed:
            if not step.optional:
                raise
            print(f"set-up: {failed}; going on without it", flush=True)
            continue
        write_record(step.name, step.key)
    for line in missing_pieces(target):
        print(f"set-up: {line}", flush=True)
    torch_note = f"torch {kept_torch} kept from {python}" if kept_torch else f"{pin('torch')}"
    print(f"set-up: .venv ready for the {target} in {time.monotonic() - start:.1f} s ({torch_note})", flush=True)


def stop_as_ctrl_c(*_) -> None:
    """A kill (CI's timeout, a closed terminal) stops a step as Ctrl-C does: nothing is recorded."""
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    target = argv[0] if argv else "tests"
    if target not in ("demo", "tests"):
        print(f"setup_env.py: error: say what to set up for, demo or tests (not {target!r})", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, stop_as_ctrl_c)
    with open(__file__, "rb") as lock:  # one set-up at a time in this checkout: pip runs in parallel would mix
        import fcntl

        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("set-up: waiting for another set-up of .venv to finish", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            set_up(target)
        except (SetupStopped, KeyboardInterrupt) as stopped:
            reason = str(stopped) if isinstance(stopped, SetupStopped) else "interrupted"
            print(f"set-up: stopped: {reason}. Nothing half-done is kept as done: run the same command again "
                  "to finish it.", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
