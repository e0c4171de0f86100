"""The README's examples run, and its set-up commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_examples_run():
    blocks = python_blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:  # later blocks build on earlier ones, as a reader runs them
        exec(compile(block, "README.md", "exec"), namespace)
    assert float(namespace["metrics"]["loss"]) < 1.0
    assert namespace["out"].shape == (32, 8)


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_second():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert first_block[0].endswith("lowrank-jax finetune")
    assert first_block[1].endswith("python -m pytest -p no:benchmark -n 2 --dist loadfile")
    assert "pytest-xdist" in (ROOT / "pyproject.toml").read_text()  # the test extra installs what -n needs
    ci = (ROOT / ".ci" / "run").read_text()
    assert "awk '/^```bash/{inside=1; next} inside && /^```/{exit} inside' README.md | sed -n 2p" in ci
