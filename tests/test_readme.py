"""The README's promises: its Python example runs as written, and CI runs its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    exec(compile(block, "README.md", "exec"), {})
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["audio_0.wav", "video_0.mp4"]


def test_ci_runs_the_readme_test_command():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    test_command = [c for c in commands if c.strip() and not c.startswith("#")][1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()
