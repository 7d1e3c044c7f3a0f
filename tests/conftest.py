"""Test-wide setup: HOME and Minari datasets in a private temporary folder (user_files_guard, which
fails the run if a test touches the user's files); real mounts for fault tests."""

import shutil
import subprocess
from pathlib import Path

import pytest

# First, before any test imports minari. Its hooks (the guard) become this conftest's.
from user_files_guard import _user_files_untouched, minari_datasets_at, pytest_sessionfinish  # noqa: F401


class Mounts:
    """Real mounts (tmpfs, bind) for a test; all unmounted, innermost first, at the end."""

    def __init__(self):
        self.points = []

    def _mount(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)

    def tmpfs(self, target, size: str) -> None:
        target.mkdir(parents=True, exist_ok=True)
        done = self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", target)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
        self.points.append(target)

    def bind(self, source, target) -> None:
        target.mkdir(parents=True, exist_ok=True)
        done = self._mount("--bind", source, target)
        assert done.returncode == 0, done.stderr
        self.points.append(target)

    def remount(self, target, mode: str, bind: bool = False) -> None:
        done = self._mount("-o", f"remount,{'bind,' if bind else ''}{mode}", target)
        assert done.returncode == 0, f"remount {mode} of {target} failed: {done.stderr}"

    def unmount_all(self) -> None:
        for target in reversed(self.points):
            if subprocess.run(["umount", str(target)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)  # busy: detach anyway


@pytest.fixture
def mounts():
    m = Mounts()
    try:
        yield m
    finally:
        m.unmount_all()


@pytest.fixture
def tmpfs(mounts, tmp_path):
    """A real 64 MiB file system (tmpfs) at tmp_path/tmpfs; ``mounts.remount(tmpfs, "ro")`` turns it read-only."""
    disk = tmp_path / "tmpfs"
    mounts.tmpfs(disk, "64m")
    return disk


# ---------------------------------------------------------------- a prebuilt offline dataset

POINTMAZE_DATASET = "o2o/pointmaze-umaze/mixed-v0"


@pytest.fixture(scope="session")
def pointmaze_minari(tmp_path_factory) -> Path:
    """A Minari datasets folder holding ``POINTMAZE_DATASET`` (6 episodes of o2o's builder), built
    once per session. Read only: give a test's processes ``private_minari`` (a copy) instead."""
    from o2o.datasets.builders import build_dataset, parse_dataset_id

    root = tmp_path_factory.mktemp("pointmaze-minari")
    with minari_datasets_at(root):
        build_dataset(*parse_dataset_id(POINTMAZE_DATASET), n_episodes=6, progress=False)
    return root


@pytest.fixture
def private_minari(pointmaze_minari, tmp_path) -> Path:
    """tmp_path/minari: this test's own copy of ``pointmaze_minari``, for its processes'
    MINARI_DATASETS_PATH (a learner finds its offline dataset there instead of building it)."""
    return Path(shutil.copytree(pointmaze_minari, tmp_path / "minari"))


@pytest.fixture(scope="module")
def gl():
    """The offscreen OpenGL backend MuJoCo cameras render with; the test skips, saying what to install, without one."""
    from o2o.envs.mujoco_camera import GLUnavailable, gl_backend

    try:
        return gl_backend()
    except GLUnavailable as err:
        pytest.skip(f"needs offscreen OpenGL for MuJoCo: {err}")
