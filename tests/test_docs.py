"""Every command and snippet in README.md and docs/*.md runs, as a reader would run it.

The convention, for whoever writes a page:

- Every ```python block of a page runs, in document order, in ONE fresh Python process per page, so a
  block sees the names of the blocks above it. The working folder is a new temporary folder,
  ``EMA_KIT_SMOKE=1`` is set (a snippet that reads it may shrink its sizes, nothing else). In the
  README, warnings are errors too: a newcomer who copies a snippet should see none.
- Every ```bash block runs in that folder too, in its place in the order, with ``bash -euo pipefail``.
- A block right after ``<!-- file: NAME -->`` is written to NAME in that folder instead of being run
  (a script that a later bash block runs, a config file).
- ```text blocks are shown, never run: use them for output and for signatures.
- Two markers keep a block out, each saying why on the page itself:
  ``<!-- run by .ci/run -->`` marks the README's test commands (``.ci/run`` runs the `pip install` lines
  of the README's ``## Test`` section, each tier in a fresh virtual environment), and
  ``<!-- not run: REASON -->`` a command that cannot run here (installing into your environment,
  uploading to Kaggle, a GPU). Use them sparingly: the test lists what they keep out.
- A block in any other language, or without one, fails the test: say which it is.

Keep each page's snippets quick (well under a minute on 2 CPU cores): the digits demo
(``ema_kit.examples``) is the data and model to use.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash", "text")
MARKER = re.compile(
    r"<!--\s*(file:\s*(?P<file>\S+)|(?P<ci>run by \.ci/run)|not run:\s*(?P<reason>.*?))\s*-->"
)

# Runs a page's steps in one process: python blocks in one namespace, bash blocks and files in the cwd.
DRIVER = """
import json, subprocess, sys, time
namespace = {"__name__": "__main__"}
with open(sys.argv[1]) as plan:
    steps = json.load(plan)
for step in steps:
    where = f"{step['page']}:{step['line']}"
    print(f"--- {where} ({step['kind']}) at {time.process_time():.1f} s CPU", flush=True)
    if step["kind"] == "file":
        with open(step["name"], "w") as file:
            file.write(step["code"])
    elif step["kind"] == "bash":
        if subprocess.run(["bash", "-euo", "pipefail", "-c", step["code"]]).returncode:
            sys.exit(f"the bash block at {where} failed")
    else:
        exec(compile(step["code"], where, "exec"), namespace)
"""


def blocks(text: str, page: str = "page") -> list[dict]:
    """The fenced blocks of a page: language, code, its first line, and the marker right above it.

    Example:
        >>> found = blocks("<!-- file: a.py -->\\n```python\\nprint(1)\\n```\\n\\n```text\\nout\\n```\\n")
        >>> [(b["language"], b["file"], b["code"]) for b in found]
        [('python', 'a.py', 'print(1)\\n'), ('text', None, 'out\\n')]
    """
    found, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        above = next((line for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER.fullmatch(above.strip())
        end = next((i for i in range(index + 1, len(lines)) if lines[i].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{page}:{index + 1}: a ``` block that never closes")
        indent = len(fence.group(1))
        found.append(
            {
                "language": fence.group(2),
                "code": "".join(line[indent:] + "\n" for line in lines[index + 1 : end]),
                "line": index + 2,
                "file": marker and marker.group("file"),
                "ci": bool(marker and marker.group("ci")),
                "not_run": marker and marker.group("reason"),
            }
        )
        index = end + 1
    return found


def steps(text: str, name: str) -> list[dict]:
    """What runs for the page ``text`` (called ``name``), in order; refuses a block of another language."""
    run = []
    for block in blocks(text, name):
        where = f"{name}:{block['line']}"
        if block["language"] not in LANGUAGES:
            raise AssertionError(
                f"{where}: a ```{block['language']} block; write ```python, ```bash or ```text (see the "
                f"convention in tests/test_docs.py)"
            )
        if block["ci"] or block["not_run"] is not None or block["language"] == "text":
            continue
        if block["file"]:
            run.append({"kind": "file", "name": block["file"], **_where(name, block)})
        else:
            run.append({"kind": block["language"], **_where(name, block)})
    return run


def _where(name: str, block: dict) -> dict:
    return {"page": name, "line": block["line"], "code": block["code"]}


def run_page(text: str, name: str, folder: Path, *, warnings_are_errors: bool = False):
    """Run the page ``text`` in the new folder ``folder`` as the convention says; the finished process."""
    plan = folder.parent / f"{folder.name}-steps.json"
    plan.write_text(json.dumps(steps(text, name)))
    folder.mkdir()
    return subprocess.run(
        [sys.executable, *(["-W", "error"] if warnings_are_errors else []), "-c", DRIVER, str(plan)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "EMA_KIT_SMOKE": "1", "MPLBACKEND": "Agg"},
    )


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(REPO).as_posix() for p in PAGES])
def test_every_snippet_and_command_of_the_page_runs_in_order(page, tmp_path):
    name = page.relative_to(REPO).as_posix()
    result = run_page(
        page.read_text(encoding="utf-8"), name, tmp_path / "cwd", warnings_are_errors=name == "README.md"
    )
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


def test_every_page_says_the_language_of_each_block_and_why_one_is_not_run():
    kept_out = []
    for page in PAGES:
        steps(page.read_text(encoding="utf-8"), page.name)  # raises on a block of another language
        for block in blocks(page.read_text(encoding="utf-8")):
            if block["not_run"] is not None:
                assert block["not_run"].strip(), f"{page.name}:{block['line']}: `not run:` needs a reason"
                kept_out.append(f"{page.name}:{block['line']}")
    assert len(kept_out) <= 6, f"more commands kept out of the docs test than before: {kept_out}"


def test_the_readme_test_section_holds_the_two_tier_commands_that_ci_runs():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Test\n", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in section.splitlines() if line.startswith("pip install")]
    assert len(commands) == 2, commands  # .ci/run's contract: one per tier
    marked = [block for block in blocks(section) if block["ci"]]
    assert [line for b in marked for line in b["code"].splitlines()] == commands


def test_a_page_runs_its_blocks_in_order_in_one_process_in_a_fresh_folder(tmp_path):
    text = (
        "```python\nimport os\nx = 41\nprint(os.environ['EMA_KIT_SMOKE'])\n```\n\n"
        "<!-- file: script.py -->\n```python\nprint('script', 1 + 1)\n```\n\n"
        "```bash\npython script.py > out.txt\n```\n\n"
        "<!-- not run: it would fail -->\n```bash\nexit 1\n```\n\n"
        "```text\nnot code\n```\n\n"
        "```python\nassert x == 41 and open('out.txt').read() == 'script 2\\n'\n"
        "print(sorted(os.listdir()))\n```\n"
    )
    result = run_page(text, "check.md", tmp_path / "cwd")
    assert result.returncode == 0, result.stderr
    printed = [line for line in result.stdout.splitlines() if not line.startswith("---")]
    assert printed == ["1", "['out.txt', 'script.py']"]


def test_in_the_readme_a_snippet_that_warns_fails(tmp_path):
    text = "```python\nimport warnings\nwarnings.warn('the half-life is over half the run')\n```\n"
    assert run_page(text, "check.md", tmp_path / "a").returncode == 0
    result = run_page(text, "README.md", tmp_path / "b", warnings_are_errors=True)
    assert result.returncode != 0 and "UserWarning: the half-life is over half the run" in result.stderr


def test_a_failing_block_fails_the_page_naming_its_line(tmp_path):
    text = "```python\nx = 1\n```\n\n```python\nraise ValueError('broken')\n```\n"
    result = run_page(text, "check.md", tmp_path / "cwd")
    assert result.returncode != 0
    assert 'File "check.md:6"' in result.stderr and "ValueError: broken" in result.stderr
