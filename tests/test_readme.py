"""README's commands stay true: CI runs README's test command, and the demo command names a real recipe."""

from __future__ import annotations

from conftest import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = text.split("```bash\n")[1:]
    return [line for block in blocks for line in block.split("```")[0].splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    test_command = ci_lines[-1]
    assert "pytest" in test_command
    assert test_command in _readme_commands()


def test_readme_demo_command_uses_the_demo_recipe() -> None:
    demo = next(command for command in _readme_commands() if "lora-causal train" in command)
    recipe = demo.split("lora-causal train", 1)[1].split()[0]
    assert (REPO / recipe).is_file()
