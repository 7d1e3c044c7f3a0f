"""The replay store's fsync: what a commit syncs, in which order, and a failing fsync.

No file system here fails an fsync on demand, so the failure test wraps ``os.fsync`` (the
files, zarr and the store stay real) to raise EIO at one call after another."""

import errno
import itertools
import os
from pathlib import Path

import pytest

from o2o.datasets.replay_store import COMMIT_FILE, ReplayStore
from replay_peers import ACT_DIM, OBS_DIM, make_chunk
from test_replay_store import new_store
from test_store_faults import check_rows, state, stray_files


def snapshot(path: Path) -> dict[Path, tuple[int, int, int]]:
    return {p: (s.st_ino, s.st_mtime_ns, s.st_size) for p in path.rglob("*") if p.is_file() for s in [p.stat()]}


def folders(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_dir()}


class Syscalls:
    """Records the paths given to fsync and os.replace, in order, and calls the real ones."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, Path]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd):
            self.events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
            return real_fsync(fd)

        def replace(src, dst, **kwargs):
            self.events.append(("replace", Path(dst)))
            return real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


def test_a_commit_fsyncs_every_file_it_changed_and_their_folders_before_its_record(tmp_path, monkeypatch):
    store = new_store(tmp_path)  # 64-row chunks: commits cross chunks, patch older ones, resize
    path = store.path
    calls = Syscalls(monkeypatch)
    for seq in range(12):
        store.append(make_chunk("a", seq))  # 25-step episodes close in every chunk: MC patches
        if seq % 3 == 2:
            store.append(make_chunk("b", seq // 3))
        before, folders_before = snapshot(path), folders(path)
        calls.events.clear()
        store.commit()
        after = snapshot(path)
        changed = {p for p, s in after.items() if before.get(p) != s}
        deleted = set(before) - set(after)
        new_folders = folders(path) - folders_before
        record = calls.events.index(("replace", path / COMMIT_FILE))
        synced_first = {p for kind, p in calls.events[:record] if kind == "fsync"}
        data = changed - {path / COMMIT_FILE}
        assert any(p.parent.name == "c" or p.parent.parent.name == "c" for p in data)
        missing = {p for p in data if p not in synced_first}
        missing |= {p.parent for p in data | deleted | new_folders if p.parent not in synced_first}
        assert not missing, f"commit {seq}: written but not fsynced before the record: {sorted(missing)}"
        if seq > 0:  # past a writer's first commit, no folder is synced that gained or lost no entry
            needed = {p.parent for p in data | deleted | new_folders}
            extra = {p for p in synced_first if p.is_dir()} - needed
            assert not extra, f"commit {seq}: folders synced that did not change: {sorted(extra)}"
        # The record itself (its temp file, before the rename) and the store folder after it.
        assert calls.events[record - 1][0] == "fsync" and calls.events[record - 1][1].name.endswith(".tmp")
        assert calls.events[record + 1:] == [("fsync", path)]
    store.close()
    check_rows(path, {"a": 12, "b": 4})


def test_without_fsync_a_commit_syncs_nothing(tmp_path, monkeypatch):
    store = ReplayStore.create(tmp_path / "replay", OBS_DIM, ACT_DIM, chunk_rows=64, fsync=False)
    calls = Syscalls(monkeypatch)
    for seq in range(4):
        store.append(make_chunk("a", seq))
        store.commit()
    store.close()
    assert [kind for kind, _ in calls.events if kind == "fsync"] == []
    reopened = ReplayStore.open(tmp_path / "replay", "a", fsync=False)
    assert reopened.fsync is False and len(reopened) == 160
    reopened.close()
    assert ReplayStore.open(tmp_path / "replay", "a").fsync is True  # a writer's setting, not the store's


def stage_two_commits(store: ReplayStore) -> None:
    """A first commit, then staged rows across a chunk boundary whose episodes close (MC
    patches of committed rows), two actors and a skipped seq: every kind of file a commit writes."""
    for seq in range(3):
        store.append(make_chunk("a", seq))
    store.commit()
    for seq in range(3, 7):
        store.append(make_chunk("a", seq))
        store.append(make_chunk("b", seq - 3))
    store.skip("c", 2)


def test_a_failing_fsync_fails_the_commit_changes_nothing_and_the_retry_commits(tmp_path, monkeypatch):
    real_fsync = os.fsync
    # How many fsyncs that commit makes: the same staging in a twin store.
    twin = ReplayStore.create(tmp_path / "twin", OBS_DIM, ACT_DIM, chunk_rows=64)
    stage_two_commits(twin)
    calls = itertools.count()
    monkeypatch.setattr(os, "fsync", lambda fd: (next(calls), real_fsync(fd))[1])
    twin.commit()
    monkeypatch.setattr(os, "fsync", real_fsync)
    n = next(calls)
    assert n > 20  # chunk files, folders, the record
    twin.close()

    store = new_store(tmp_path)
    path = store.path
    stage_two_commits(store)
    before = state(store)
    # Fail one fsync at a time: among the data (synced in threads, in any order), then the record's
    # temp file before its rename, then the folder after the rename (the fsync after the temp
    # file's). Once the data's fsyncs succeeded, later tries sync fewer folders (see fsync_files).
    for fail_at in [*sorted({0, 1, n // 4, n // 2, 3 * n // 4, n - 3}), "record", "folder"]:
        calls, after_record = itertools.count(), []

        def fsync(fd):
            i, name = next(calls), Path(os.readlink(f"/proc/self/fd/{fd}")).name
            if fail_at == i or (fail_at == "record" and name.endswith(".tmp")) or (fail_at == "folder" and after_record):
                raise OSError(errno.EIO, "Input/output error (injected)")
            if name.endswith(".tmp"):
                after_record.append(i)
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(OSError) as err:
            store.commit()
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert err.value.errno == errno.EIO
        assert state(store) == before, f"fsync {fail_at} of {n} failed"
        assert stray_files(path) == []
        if fail_at != "folder":  # only the folder's fsync comes after the record's rename
            assert len(ReplayStore.open(path, "r")) == 120
    assert store.commit() == 440 and not store.uncommitted and store.committed_seq("c") == 2
    store.close()
    check_rows(path, {"a": 7, "b": 4})


def test_a_failing_fsync_of_the_data_leaves_the_previous_record(tmp_path, monkeypatch):
    store = new_store(tmp_path)
    store.append(make_chunk("a", 0))
    store.commit()
    store.append(make_chunk("a", 1))

    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        store.commit()
    monkeypatch.undo()
    assert len(ReplayStore.open(store.path, "r")) == 40  # readers still trust the previous commit
    assert store.commit() == 80
    store.close()
