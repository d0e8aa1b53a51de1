"""./quickstart.sh on a copy of the tree: it comes up, and every client command it prints works as printed."""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import ROOT, free_port

pytestmark = pytest.mark.slow
SKIP = shutil.ignore_patterns(".git", ".venv", ".tox", "__pycache__", "*.egg-info", ".mypy_cache", ".ruff_cache")


def test_quickstart_prints_commands_that_work(tmp_path: Path) -> None:
    tree = tmp_path / "remotellm"
    shutil.copytree(ROOT, tree, ignore=SKIP)
    env = {**os.environ, "PORT": str(free_port()), "DEMO_PORT": str(free_port())}
    log = (tmp_path / "quickstart.log").open("w+")
    proc = subprocess.Popen(
        ["./quickstart.sh"], cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300  # a fresh venv and its installs
        text = ""
        while "Ctrl-C stops everything." not in text:
            assert proc.poll() is None, f"quickstart exited:\n{text[-3000:]}"
            assert time.monotonic() < deadline, f"quickstart did not come up:\n{text[-3000:]}"
            time.sleep(0.5)
            log.seek(0)
            text = log.read()
        block = text.split("Try (each works as printed):", 1)[1].split("Ctrl-C stops everything.", 1)[0]
        commands = [c.strip() for c in re.split(r"^\s*#.*$", block, flags=re.M) if c.strip()]
        assert len(commands) == 5, commands
        for command in commands:
            done = subprocess.run(["bash", "-c", command], cwd=tree, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (command, done.stderr)
            assert "Hello" in done.stdout, (command, done.stdout[:500])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
