"""The type checker runs with the tests (configuration in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.unit
def test_mypy_is_clean():
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:]
