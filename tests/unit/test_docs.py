"""The docs keep up with the code: every module has its line in docs/architecture.md, and the
README's links lead to files that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_architecture_names_every_module() -> None:
    text = (REPO / "docs/architecture.md").read_text()
    missing = []
    for root in (REPO / "harness", REPO / "fixtures"):
        for path in sorted(root.rglob("*.py")):
            if path.stem in ("__init__", "__main__") and path.parent.name not in ("cli", "bench"):
                continue
            name = path.stem if path.stem not in ("__init__", "__main__") else (
                f"{path.parent.name}/{path.stem}")
            if f"`{name}`" not in text and f"{name}`" not in text and f"`{name}" not in text:
                missing.append(str(path.relative_to(REPO)))
    assert not missing, f"docs/architecture.md has no line for: {missing}"


def test_readme_and_docs_links_exist() -> None:
    broken = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", doc.read_text()):
            if "://" in target:
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_readme_starts_with_the_two_minute_try() -> None:
    text = (REPO / "README.md").read_text()
    first_screen = "\n".join(text.splitlines()[:45])
    for command in ("make lab-up", "hvlab backup vm01", "hvlab explain", "make lab-down"):
        assert command in first_screen, command
    assert "make test" in text and len(text.splitlines()) < 300
