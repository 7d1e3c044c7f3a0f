"""The suite keeps off the user's files: the leak that left a 6-episode dataset in ~/.minari is
reproduced with the old fixture, caught by the guard, and gone with the new helper.

Each case runs a small pytest session in a subprocess whose HOME is a folder of this test
(pytester sets it): that folder plays the user's home."""

from pathlib import Path

pytest_plugins = ["pytester"]

GUARD = Path(__file__).with_name("user_files_guard.py")

# The old `poisoned_dataset` of test_online_faults.py: sets the variable, deletes it in `finally`.
OLD_FIXTURE = '''
import os
from o2o.datasets.minari_io import datasets_root

def poisoned_dataset(root):
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        (root / "test").mkdir(parents=True)
    finally:
        del os.environ["MINARI_DATASETS_PATH"]

def test_makes_a_dataset(tmp_path):
    poisoned_dataset(tmp_path / "minari")

def test_builds_the_default_dataset_after_it():
    (datasets_root() / "o2o" / "pointmaze-umaze" / "mixed-v0").mkdir(parents=True)
'''

NEW_FIXTURE = '''
from o2o.datasets.minari_io import datasets_root
from user_files_guard import minari_datasets_at

def poisoned_dataset(root):
    with minari_datasets_at(root):
        (root / "test").mkdir(parents=True)

def test_makes_a_dataset(tmp_path):
    poisoned_dataset(tmp_path / "minari")

def test_builds_the_default_dataset_after_it():
    (datasets_root() / "o2o" / "pointmaze-umaze" / "mixed-v0").mkdir(parents=True)
'''


def run(pytester, monkeypatch, tests: str, guarded: bool):
    pytester.makepyfile(user_files_guard=GUARD.read_text(), test_fixture=tests)
    if guarded:
        pytester.makeconftest("from user_files_guard import _user_files_untouched, pytest_sessionfinish")
    monkeypatch.delenv("MINARI_DATASETS_PATH")  # as on a user's machine
    return pytester.runpytest_subprocess("-p", "no:cacheprovider")


def user_minari(pytester) -> Path:
    return pytester.path / ".minari"


def test_the_old_fixture_leaks_into_the_users_minari_folder_without_the_guard(pytester, monkeypatch):
    result = run(pytester, monkeypatch, OLD_FIXTURE, guarded=False)
    result.assert_outcomes(passed=2)  # nothing tells
    assert (user_minari(pytester) / "datasets" / "o2o" / "pointmaze-umaze" / "mixed-v0").is_dir()


def test_the_guard_fails_the_run_of_the_old_fixture_and_keeps_the_user_folder_clean(pytester, monkeypatch):
    result = run(pytester, monkeypatch, OLD_FIXTURE, guarded=True)
    assert result.ret != 0
    result.assert_outcomes(passed=2, errors=1)  # the fixture's test fails at teardown
    result.stdout.fnmatch_lines(["ERROR*test_makes_a_dataset*"])
    assert "this test left {'MINARI_DATASETS_PATH': None}" in result.stdout.str()
    assert not user_minari(pytester).exists()  # the later test ran in the sandbox


def test_the_new_helper_passes_the_guard(pytester, monkeypatch):
    result = run(pytester, monkeypatch, NEW_FIXTURE, guarded=True)
    result.assert_outcomes(passed=2)
    assert result.ret == 0 and not user_minari(pytester).exists()


def test_the_guard_fails_the_run_when_a_process_writes_the_users_minari_folder(pytester, monkeypatch):
    writes_home = '''
import subprocess, sys
from user_files_guard import USER_MINARI

def test_a_child_that_writes_the_real_home():
    subprocess.run([sys.executable, "-c", f"import os; os.makedirs({str(USER_MINARI)!r})"], check=True)
'''
    result = run(pytester, monkeypatch, writes_home, guarded=True)
    result.assert_outcomes(passed=1)
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*user_files_guard*changed during the run*"])
