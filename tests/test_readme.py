"""The README's usage example runs as written, and .ci/run calls the README's test command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_ci_runs_the_readme_test_command():
    ci = Path(__file__).resolve().parents[1] / ".ci" / "run"
    text = README.read_text()
    section = text.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    command = re.search(r"```bash\n(.*?)\n```", section, flags=re.S).group(1)
    assert "pytest" in command
    # .ci/run extracts exactly this section; check its extraction gives the same command
    extracted = subprocess.run(
        ["bash", "-c", f"sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' {README} | "
                       "sed -n '/^```bash$/,/^```$/p' | sed '1d;$d'"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == command
    assert "README.md" in ci.read_text()
