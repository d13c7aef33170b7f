"""The README's set-up commands are the ones CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    train_cmd, test_cmd = readme_commands()[:2]
    assert "moelab train" in train_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
