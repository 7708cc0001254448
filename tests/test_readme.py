"""The README's commands are true: every ``distillery`` command it shows exists with the
options it shows, its set-up lines are the two a fresh machine needs, and its quick tour
runs as written on coco128."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from distillery.engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TOUR_MARK = "<!-- quick tour: run as written by tests/test_readme.py -->"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def command_lines(block: str) -> list[str]:
    """Logical lines of a bash block (backslash continuations joined, comments dropped)."""
    lines, cur = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    return lines


def distillery_calls(line: str) -> list[list[str]]:
    """The ``distillery ...`` invocations in one shell line, as argument lists (without the program)."""
    line = re.sub(r"\s#\s.*$", "", line)  # trailing comment
    calls = []
    for part in re.split(r"&&|\|\||;|\|", line):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        for i, w in enumerate(words):
            if w == "distillery" or w.endswith("/distillery"):
                calls.append(words[i + 1:])
                break
    return calls


def resolve(args: list[str]) -> tuple[click.Command, list[str]]:
    """Walk the command tree; returns the leaf command and the rest of the arguments."""
    cmd: click.Command = main
    ctx = click.Context(main)
    rest = list(args)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"README shows `distillery {' '.join(args)}`: no command {rest[0]!r} under {cmd.name}"
        cmd, rest = sub, rest[1:]
    return cmd, rest


def option_names(cmd: click.Command) -> set[str]:
    names = set()
    for p in cmd.params:
        names.update(getattr(p, "opts", []))
        names.update(getattr(p, "secondary_opts", []))
    return names | {"--help", "-h"}


def test_every_readme_command_and_option_exists():
    text = README.read_text(encoding="utf-8")
    seen = 0
    for block in bash_blocks(text):
        for line in command_lines(block):
            for args in distillery_calls(line):
                if not args:
                    continue
                cmd, rest = resolve(args)
                known = option_names(cmd)
                for w in rest:
                    if w.startswith("--"):
                        opt = w.split("=", 1)[0]
                        assert opt in known, f"README: `distillery {' '.join(args)}`: {cmd.name} has no option {opt}"
                seen += 1
    assert seen >= 20, f"only {seen} distillery commands found in the README; did the block format change?"


def test_readme_starts_with_install_test_and_main_job():
    first = command_lines(bash_blocks(README.read_text(encoding="utf-8"))[0])
    assert len(first) == 3, first
    install, test, job = first
    assert "pip install" in install and "-e '.[dev]'" in install
    assert "-m pytest" in test
    assert "distillery label" in job and "../shared/data/coco128" in job
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert install.split("#")[0].strip().replace("pip install", "pip install -q") in ci
    assert test.split("#")[0].strip() in ci


@pytest.mark.slow
def test_readme_quick_tour_runs_as_written(coco128, tmp_path):
    """The tour block runs line by line in a scratch folder laid out like a checkout
    (``../shared/data/coco128`` beside it), with this environment's ``distillery``."""
    text = README.read_text(encoding="utf-8")
    assert TOUR_MARK in text, "the README lost its quick tour marker"
    block = bash_blocks(text[text.index(TOUR_MARK):])[0]
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    os.symlink(coco128, tmp_path / "shared" / "data" / "coco128")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for line in command_lines(block):
        r = subprocess.run(["bash", "-c", "set -eo pipefail; " + line], cwd=work, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, f"README tour line failed: {line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, f"{line}\n{r.stderr[-3000:]}"
