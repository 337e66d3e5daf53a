"""Every Python snippet in the README and docs/ runs as written.

The snippets of one document run in order in one namespace, as a reader would type them. A
snippet whose first line is ``# not run: <reason>`` is skipped (e.g. one that needs
``paddle.distributed.launch``); the reason must be given.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_snippets_run(document: pathlib.Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # snippets write under out/
    text = document.read_text()
    namespace = {"__name__": "__snippet__"}
    for match in SNIPPET.finditer(text):
        line = text[: match.start()].count("\n") + 2
        if match.group(1).startswith("# not run:"):
            assert match.group(1).split("\n")[0].strip() != "# not run:", "give a reason"
            continue
        code = compile(match.group(1), f"{document.name}:{line}", "exec")
        exec(code, namespace)
