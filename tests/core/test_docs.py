"""The README a newcomer reads: short, its links resolve, its package list matches the check."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _between(text: str, marker: str) -> str:
    return text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]


def test_readme_is_short():
    # issue 19: what it is, a picture, packages, the two commands, the panels, the CLI at a
    # glance and the config format; the research notes live in docs/
    assert README.count("\n") < 200


def test_every_local_link_and_picture_exists():
    for folder, text in [(ROOT, README)] + [(p.parent, p.read_text(encoding="utf-8"))
                                            for p in sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (folder / target).exists(), f"{folder}: broken link {target}"


def test_the_two_commands_ci_reads_are_there():
    test_block = _between(README, "test-command")
    lines = [ln for ln in test_block.splitlines() if ln.strip() and not ln.startswith("```")]
    assert len(lines) == 1 and "pytest" in lines[0]
    assert ".venv/bin/unitscale-explorer" in README


def test_readme_packages_are_those_the_platform_check_names():
    from app.platform_check import DEBIAN_PACKAGES

    line = _between(README, "system-packages")
    packages = line.split("apt-get install", 1)[1].split("```", 1)[0].split()
    assert packages and len(packages) == len(set(packages))
    assert set(packages) <= set(DEBIAN_PACKAGES.values())
    # the two whose absence this list was written for
    assert {"libxcb-icccm4", "libxcb-keysyms1", "libxcb-cursor0"} <= set(packages)
