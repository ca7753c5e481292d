"""Rules about the repository itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_project_stands_on_its_own() -> None:
    # Its docs say what it does and why (docs/design.md); no file points at
    # a page outside the repository for it.
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    outside = ("DESIGN" + ".md", "../" + "shared")  # split, so that this file does not match itself
    offenders = []
    for name in files.decode().split("\0"):
        path = REPO / name
        if not name or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(word in line for word in outside):
                offenders.append(f"{name}:{lineno}: {line.strip()[:100]}")
    assert offenders == []


def test_no_two_test_modules_share_a_name() -> None:
    # pytest imports tests/ and integration/ modules by their basename
    # (rootdir-relative, no __init__.py): two test_x.py make the second one
    # fail to collect, which stops the whole run.  conftest.py is the
    # exception: pytest drops the previous "conftest" module before it
    # imports the next folder's (_pytest/config _importconftest).
    seen: dict[str, Path] = {}
    clashes = []
    for folder in ("tests", "integration"):
        for path in sorted((REPO / folder).glob("*.py")):
            if path.name in seen and path.name != "conftest.py":
                clashes.append(f"{seen[path.name].relative_to(REPO)} and {path.relative_to(REPO)}")
            seen[path.name] = path
    assert clashes == []


def test_the_tests_docs_name_exist() -> None:
    # docs/backends.md's table says which test shows each option: a renamed
    # or removed test would leave the table pointing at nothing.
    import re

    defined = set()
    for folder in ("tests", "integration"):
        for path in (REPO / folder).glob("*.py"):
            defined |= set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
    modules = {path.stem for folder in ("tests", "integration") for path in (REPO / folder).glob("test_*.py")}
    for page in ("backends.md", "scrub.md", "conformance.md"):
        text = (REPO / "docs" / page).read_text()
        named = set(re.findall(r"`(test_\w+)", text)) | set(re.findall(r"\| (test_\w+)", text))
        named |= {n for cell in re.findall(r"\| ([^|]*test_[^|]*) \|", text)
                  for n in re.findall(r"\b(test_\w+)", cell)}
        assert named - defined - modules == set(), page
