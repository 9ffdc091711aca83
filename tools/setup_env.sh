# Sourced by demo_offline.sh and run_tests.sh from the project's root: sets up .venv/ for
# "$1" (demo or tests) on the first run (tools/setup_env.py; seconds after that), then puts
# it first on PATH. PYTHON picks the Python to build it from (default: python3).
phi2_python=${PYTHON:-python3}
if ! command -v "$phi2_python" >/dev/null 2>&1; then
  echo "set-up: no $phi2_python found: install Python 3.11 or newer (Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
  exit 1
fi
# trl 1.16 (requirements.txt) needs Python 3.11; the check itself runs on any Python.
if ! "$phi2_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "set-up: $phi2_python is $("$phi2_python" -V 2>&1 | head -n 1); Python 3.11 or newer is needed (trl 1.16 requires it): install one and run PYTHON=python3.11 $0" >&2
  exit 1
fi
"$phi2_python" tools/setup_env.py "$1" || exit $?
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
unset PYTHONHOME phi2_python
