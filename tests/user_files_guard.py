"""Keeps the test suite off the user's files (a pytest plugin; conftest.py loads it).

On import, before any test imports minari: HOME and MINARI_DATASETS_PATH point into a private
temporary folder for the whole session, and the test processes' subprocesses inherit both. Then:
- a test that leaves either variable changed fails, and the variable is put back (the leak that
  left a 6-episode dataset in ~/.minari: a fixture deleted MINARI_DATASETS_PATH in its `finally`,
  so every later test fell back to the real home);
- opening a file under the real ~/.minari from the test process fails the test that did it;
- at the end, a change under the real ~/.minari (by any process) or a ~/.minari made in the
  private home (something fell back to Minari's default folder) fails the run.

Tests that need datasets in another folder use ``minari_datasets_at``, which puts the variable back.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

USER_HOME = Path.home()
USER_MINARI = USER_HOME / ".minari"
SANDBOX = Path(tempfile.mkdtemp(prefix="o2o-test-"))
SESSION_ENV = {"HOME": str(SANDBOX / "home"), "MINARI_DATASETS_PATH": str(SANDBOX / "minari")}
(SANDBOX / "home").mkdir()
os.environ.update(SESSION_ENV)


def _tree(folder: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of everything under ``folder``: what a write would change."""
    if not folder.exists():
        return []
    return sorted((str(p), p.lstat().st_size, p.lstat().st_mtime_ns) for p in [folder, *folder.rglob("*")])


_USER_MINARI_BEFORE = _tree(USER_MINARI)
_opened: list[str] = []


def _watch_opens(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.startswith(str(USER_MINARI)):
            _opened.append(path)


sys.addaudithook(_watch_opens)


@contextlib.contextmanager
def minari_datasets_at(root: Path):
    """MINARI_DATASETS_PATH=root inside the block, the session's folder again after it."""
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield root
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


@pytest.fixture(autouse=True)
def _user_files_untouched():
    yield
    changed = {name: os.environ.get(name) for name, value in SESSION_ENV.items() if os.environ.get(name) != value}
    os.environ.update(SESSION_ENV)  # the next tests run in the sandbox again
    opened, _opened[:] = list(_opened), []
    if changed:
        pytest.fail(f"this test left {changed} instead of the session's {SESSION_ENV}: later tests would read and "
                    f"write the user's real home (~/.minari). Use minari_datasets_at() or monkeypatch.setenv")
    if opened:
        pytest.fail(f"this test opened the user's own Minari files: {opened[:3]}")


def pytest_sessionfinish(session, exitstatus) -> None:
    problems = []
    if _tree(USER_MINARI) != _USER_MINARI_BEFORE:
        problems.append(f"the user's {USER_MINARI} changed during the run")
    if (SANDBOX / "home" / ".minari").exists():
        problems.append("something wrote to Minari's default folder (~/.minari) instead of MINARI_DATASETS_PATH")
    if problems:
        sys.stderr.write("\nuser_files_guard: " + "; ".join(problems) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
