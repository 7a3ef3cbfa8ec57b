"""The README's examples are true: the Python example runs, the YAML example is a valid run configuration,
every allegro-fast command line parses, and .ci/run calls the README's test command."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

from allegro_fast.cli import build_parser
from allegro_fast.run_config import RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs():
    """Every ```python block is a complete program and runs (```py blocks are fragments needing user files)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})  # noqa: S102  (running the README's example is the test)


def test_yaml_example_is_a_valid_run_configuration():
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has no YAML run configuration"
    for block in blocks:
        config = RunConfig.from_dict(yaml.safe_load(block))
        assert config.model_config(["C", "H", "O"]).num_layers >= 1


def test_command_lines_parse():
    """Every `allegro-fast ...` line (and torchrun's `-m allegro_fast.cli ...`) is accepted by the parser."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL):
        for line in block.splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                if words and words[0] == "allegro-fast":
                    commands.append(words[1:])
                elif words and words[0] == "torchrun" and "allegro_fast.cli" in words:
                    commands.append(words[words.index("allegro_fast.cli") + 1:])
    assert any(c[:1] == ["demo"] for c in commands), "the main job runs the demo"
    assert {c[0] for c in commands} >= {"demo", "train", "evaluate", "md"}
    parser = build_parser()
    for arguments in commands:
        parser.parse_args(arguments)


def test_ci_runs_the_readme_test_command():
    ci = Path(__file__).resolve().parents[1] / ".ci" / "run"
    text = README.read_text()
    section = text.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    command = re.search(r"```bash\n(.*?)\n```", section, flags=re.DOTALL).group(1)
    assert "pytest" in command
    # .ci/run extracts exactly this section; check its extraction gives the same command
    extracted = subprocess.run(
        ["bash", "-c", (f"sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' {README} | "
                        "sed -n '/^```bash$/,/^```$/p' | sed '1d;$d'")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert extracted == command
    assert "README.md" in ci.read_text()
