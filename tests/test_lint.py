"""Static checks every module must pass: ruff's pyflakes rules (``F``: undefined names, unused
imports and variables, redefinitions). An undefined name is otherwise found only when its line
runs, which for an error path (a missing optional extra, say) is a user's traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["engine", "labeling", "student", "export", "bench", "tests"]


def test_pyflakes_rules_pass_everywhere():
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.skip("ruff is not installed (it is in the dev extra: pip install -e '.[dev]')")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select", "F",
                        "--output-format", "concise", *PACKAGES], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
