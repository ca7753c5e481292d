"""docs/api.md's examples run: every ```python block is a complete program.

Each block is compiled with its line numbers in docs/api.md (a traceback
points at the page) and executed in a namespace of its own, from the
repository's directory (the block that drives a device over its socket
imports the project's test client from tests/).  The blocks assert what
they show, so a change of the API that breaks one fails here.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
API_MD = REPO / "docs" / "api.md"

_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line of the block's first code line, code) for each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = python_blocks(API_MD.read_text())


def test_the_page_has_its_examples() -> None:
    assert len(BLOCKS) >= 8, [line for line, _ in BLOCKS]
    # Every async example is a whole program: it runs itself.
    for line, code in BLOCKS:
        if "async def" in code:
            assert "trio.run(main)" in code, f"docs/api.md:{line}: an async example without trio.run(main)"
        assert "assert " in code, f"docs/api.md:{line}: an example that asserts nothing"


def test_the_cost_per_request_placeholder_is_marked() -> None:
    # The lead fills it with measured numbers; until then it says so.
    text = API_MD.read_text()
    assert "### Cost per request" in text


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"api.md:{line}" for line, _ in BLOCKS])
def test_example_runs(line: int, code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))  # what a block adds goes with it
    tree = ast.parse(code)
    ast.increment_lineno(tree, line - 1)
    exec(compile(tree, str(API_MD), "exec"), {"__name__": "__main__"})
