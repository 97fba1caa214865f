"""The README's code snippets, read from the README itself, so the tests run exactly what users copy."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def snippet(name: str) -> str:
    """The ```python block right after ``<!-- snippet: NAME -->`` in README.md."""
    match = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```python\n(.*?)```", README.read_text(), re.S)
    if match is None:
        raise KeyError(f"README.md has no snippet {name!r}")
    return match.group(1)


def run_snippet(name: str, **names: object) -> dict:
    """Execute snippet ``name`` with ``names`` predefined (the data it expects); return its namespace."""
    namespace: dict = {"__name__": f"readme_{name}", **names}
    exec(compile(snippet(name), f"README.md:{name}", "exec"), namespace)
    return namespace
