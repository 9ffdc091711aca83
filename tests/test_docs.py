"""README and docs/: every relative link and #anchor leads somewhere, README stays a first
screen (under 12 KB), and its first block is the two commands, the second being what CI runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import ROOT

DOCUMENTS = [ROOT / "README.md", ROOT / "PERFORMANCE.md", ROOT / "outputs" / "README.md",
             *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def outside_code(text: str) -> list[str]:
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's ids for a Markdown file's headings: lower case, punctuation dropped, spaces to
    hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for line in outside_code(path.read_text(encoding="utf-8")):
        if heading := re.match(r"#+\s+(.*)", line):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(document):
    broken = []
    for line in outside_code(document.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:: not ours to check offline
            file, _, anchor = target.partition("#")
            path = (document.parent / file).resolve() if file else document
            if not path.exists():
                broken.append(f"{target}: no {file}")
            elif anchor and path.suffix == ".md" and anchor not in set(anchors(path)):
                broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert broken == []


def test_the_anchor_rule_is_githubs():
    assert list(anchors(ROOT / "README.md"))[:3] == ["phi2-qlora-fine-tune-phi-2-on-a-t4-and-watch-it-learn",
                                                     "colab-notebook", "the-offline-demo"]


def test_readme_is_a_first_screen_with_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12_288, "README.md over 12 KB: move depth into docs/"
    first_block = readme.split("```")[1].splitlines()[1:]
    commands = [line.split("#")[0].strip() for line in first_block if line.split("#")[0].strip()]
    assert commands == ["./demo_offline.sh", "./run_tests.sh"]
    for command in commands:
        assert os.access(ROOT / command, os.X_OK), command
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "./run_tests.sh"]  # and nothing else
