"""Committed notebooks carry no outputs: check every notebook under notebooks/, or strip them.

    python tools/check_notebooks.py            # exit 1 and name each cell with outputs
    python tools/check_notebooks.py --strip    # clear outputs and execution counts in place

Outputs in git bloat the history with images, leak local paths and make every run a diff;
the notebook is run fresh in Colab or by tests/test_notebook.py instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def problems(path: Path) -> list[str]:
    """One line per code cell that has outputs or an execution count."""
    nb = nbformat.read(path, as_version=4)
    found = []
    for n, cell in enumerate(nb.cells, 1):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            found.append(f"{path}: cell {n} has {len(cell.outputs)} output(s)")
        if cell.get("execution_count") is not None:
            found.append(f"{path}: cell {n} has execution_count {cell.execution_count}")
    return found


def strip(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)  # nbclient's timings
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strip", action="store_true", help="clear the outputs in place instead of failing")
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.strip:
        for path in paths:
            strip(path)
    found = [line for path in paths for line in problems(path)]
    print("\n".join(found) if found else f"{len(paths)} notebook(s) without outputs")
    if found:
        print("strip them before committing: python tools/check_notebooks.py --strip", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
