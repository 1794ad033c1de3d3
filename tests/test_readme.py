"""The README's runnable Python example runs as written and prints what the README says it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def runnable_example() -> tuple[str, str]:
    """The code block after "A runnable version", and the output its last comment promises."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    after = readme.split("A runnable version", 1)[1]
    code = re.search(r"```python\n(.*?)```", after, re.S).group(1)
    promised = re.search(r"^# (depth .*?)\s{2,}\(", code, re.M).group(1)
    return code, promised


def test_readme_runnable_example_prints_what_it_promises(tmp_path):
    code, promised = runnable_example()
    # The example writes to /tmp; keep this run's files in its own folder.
    code = code.replace('"/tmp/', f'"{tmp_path.as_posix()}/')
    assert "/tmp/" not in code.replace(tmp_path.as_posix(), "")
    script = tmp_path / "readme_example.py"
    script.write_text(code, encoding="utf-8")
    # Run as a user runs it: a fresh interpreter with the repository importable, offline.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == promised
