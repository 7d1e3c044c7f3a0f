"""The replay store under faults: old zarr, chunks that do not fit the columns, actors that
vanish mid-episode, and commits that fail on a read-only or full file system (real tmpfs mounts)."""

import dataclasses
import errno
import json
import time

import numpy as np
import pytest
import zarr

from o2o.transport import wire
from o2o.datasets.replay_store import ReplayStore, StoreError
from o2o.datasets.zarr_table import AppendTable, ColumnSpec
from replay_peers import ACT_DIM, OBS_DIM, expected_rows, make_chunk
from test_replay_store import check_closed, check_mc_returns, new_store, rows_of


def state(store: ReplayStore) -> dict:
    """Everything a caller can observe about a writer's progress."""
    return {
        "rows": len(store),
        "staged": store.staged_rows,
        "episodes": store.num_episodes,
        "commits": store.commits,
        "uncommitted": store.uncommitted,
        "actors": store.actor_ids,
        "committed": {a: store.committed_seq(a) for a in store.actor_ids},
        "expected": {a: store.expected_seq(a) for a in store.actor_ids},
    }


def check_rows(path, chunks: dict[str, int]) -> None:
    """The store at ``path`` holds exactly chunks 0..n-1 of each actor, with correct MC returns."""
    store = ReplayStore.open(path, "r")
    for actor_id, n in chunks.items():
        got, want = rows_of(store, actor_id), expected_rows(actor_id, n)
        for name in wire.ARRAY_NAMES:
            np.testing.assert_array_equal(got[name], want[name].astype(got[name].dtype))
    check_mc_returns(store)


def stray_files(path) -> list[str]:
    """Temporary files of zarr (``*.partial``) or of the commit record (``*.tmp``)."""
    return sorted(str(p) for p in path.rglob("*") if p.name.endswith((".partial", ".tmp")))


class Clock:
    """A wall clock the test moves by hand (``ReplayStore.clock``)."""

    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------- zarr version (issue item 5)


def test_writing_needs_a_zarr_whose_local_store_writes_atomically(tmp_path, monkeypatch):
    new_store(tmp_path).close()
    monkeypatch.setattr(zarr, "__version__", "3.1.2")
    with pytest.raises(StoreError, match=r"zarr 3\.1\.2 .*3\.1\.3"):
        ReplayStore.create(tmp_path / "other", OBS_DIM, ACT_DIM)
    assert not (tmp_path / "other").exists()
    with pytest.raises(StoreError, match=r"zarr 3\.1\.2 .*3\.1\.3"):
        ReplayStore.open(tmp_path / "replay", "a")
    assert len(ReplayStore.open(tmp_path / "replay", "r")) == 0  # reading needs no atomic writes
    monkeypatch.setattr(zarr, "__version__", "3.1.3")
    ReplayStore.open(tmp_path / "replay", "a").close()  # the refused open did not keep the lock


# ---------------------------------------------------------------- int32 columns (issue item 8)


def test_chunk_that_does_not_fit_the_columns_is_refused_before_anything_is_staged(tmp_path):
    store = new_store(tmp_path)
    store.append(make_chunk("a", 0))
    store.commit()
    store.append(make_chunk("a", 1))
    before = state(store)
    good = make_chunk("a", 2)
    bad = {
        "policy_version": dataclasses.replace(good, policy_version=2**31),
        "step": dataclasses.replace(make_chunk("a", 2, rows=10), step=2**31 - 5),  # steps up to 2**31 + 4
        "episode_id": dataclasses.replace(good, episode_id=-1),
        "reward": dataclasses.replace(good, reward=good.reward[:-1]),
    }
    for field, chunk in bad.items():
        with pytest.raises(ValueError, match=field):
            store.append(chunk)
        assert state(store) == before, field
    with pytest.raises(ValueError, match="policy_version"):
        store.append(dataclasses.replace(make_chunk("newcomer", 0), policy_version=2**31))
    assert state(store) == before  # not even an actor entry for the newcomer
    assert store.append(good)  # the same seq, corrected
    store.close()
    check_rows(tmp_path / "replay", {"a": 3})


# ---------------------------------------------------------------- idle actors (issue item 11)


class ReadRecordingStore(ReplayStore):
    """Records the row ranges read (a reopening writer reads its open episodes' rows)."""

    reads: list[tuple[int, int]] = []

    def read(self, start=0, stop=None, columns=None):
        ReadRecordingStore.reads.append((start, len(self) if stop is None else min(stop, len(self))))
        return super().read(start, stop, columns)


def check_abandoned(path, actor_id: str, rows: int) -> None:
    store = ReplayStore.open(path, "r")
    episodes = store.episodes()
    mine = np.flatnonzero(episodes["actor"] == store.actor_ids.index(actor_id))
    assert len(mine) == 1
    episode = {name: values[mine[0]] for name, values in episodes.items()}
    assert not episode["ended"] and episode["length"] == rows
    got = rows_of(store, actor_id)
    assert episode["return"] == pytest.approx(float(got["reward"].astype(np.float64).sum()))
    assert np.isnan(got["mc_return"]).all()
    check_mc_returns(store)


def test_abandon_idle_episodes_closes_the_episodes_of_actors_idle_past_the_limit(tmp_path):
    store = new_store(tmp_path)
    store.clock = clock = Clock(1_000_000.0)
    store.append(make_chunk("gone", 0, rows=10))  # episode 0, steps 0..9, then the actor vanishes
    store.commit()
    for seq in range(8):  # one chunk every 10 minutes from an actor that stays
        clock.t += 600
        store.append(make_chunk("live", seq, rows=10))
        store.commit()
        idle = clock.t - 1_000_000.0
        assert store.abandon_idle_episodes(3600.0, now=clock.t) == (["gone"] if idle == 4200 else [])
        if idle == 4200:
            assert store.uncommitted  # committed with the next commit
            store.commit()
    assert store.abandon_idle_episodes(0.0, now=clock.t + 1) == ["live"]
    store.close()
    check_abandoned(tmp_path / "replay", "gone", rows=10)


def test_reopen_abandons_actors_idle_at_the_last_commit_and_reads_only_live_episodes(tmp_path):
    path = tmp_path / "replay"
    store = new_store(tmp_path)
    store.clock = clock = Clock(1_000_000.0)
    store.append(make_chunk("gone", 0, rows=10))  # rows 0..9, episode still open
    store.commit()
    for seq in range(12):  # 2 hours of an actor that stays: rows 10..129, its episode 4 open
        clock.t += 600
        store.append(make_chunk("live", seq, rows=10))
        store.commit()
    rows = store.read()
    live = (rows["actor"] == store.actor_ids.index("live")) & (rows["episode_id"] == 4)
    live_start = int(np.flatnonzero(live)[0])
    store.close()
    assert live_start == 110

    ReadRecordingStore.reads = []
    store = ReadRecordingStore.open(path, "a")  # abandon_idle_s defaults to 10 minutes
    assert ReadRecordingStore.reads == [(live_start, 130)]  # not from row 0, gone's episode start
    store.close()
    check_abandoned(path, "gone", rows=10)
    ReadRecordingStore.reads = []
    ReadRecordingStore.open(path, "a").close()
    assert ReadRecordingStore.reads == [(live_start, 130)]


def test_an_actor_idle_only_while_the_learner_was_down_keeps_its_episode(tmp_path):
    path = tmp_path / "replay"
    store = new_store(tmp_path)
    store.clock = clock = Clock(time.time() - 2 * 86400)  # the learner stopped two days ago
    store.append(make_chunk("sleepy", 0, rows=10))  # steps 0..9 of episode 0
    clock.t += 60
    store.commit()
    store.close()
    # The actor kept its next chunks in its spool; the learner comes back now.
    store = ReplayStore.open(path, "a")
    assert store.abandon_idle_episodes(3600.0) == []  # downtime is not idleness
    store.append(make_chunk("other", 0))  # a commit before sleepy reconnects ...
    store.commit()
    store.close()
    store = ReplayStore.open(path, "a")  # ... and another restart
    for seq in (1, 2):  # the spooled chunks: steps 10..29, episode 0 ends at step 24
        store.append(make_chunk("sleepy", seq, rows=10))
    store.close()
    reader = ReplayStore.open(path, "r")
    assert np.isfinite(rows_of(reader, "sleepy")["mc_return"][:25]).all()
    assert check_mc_returns(reader) == 25 + 25  # sleepy's episode 0 and other's


def test_store_whose_commit_record_has_no_times_still_opens_and_abandons_nothing(tmp_path):
    path = tmp_path / "replay"
    store = new_store(tmp_path)
    store.append(make_chunk("a", 0, rows=10))
    store.close()
    record = json.loads((path / "commit.json").read_text())  # as an older o2o wrote it
    record.pop("time", None)
    for actor in record["actors"]:
        actor.pop("last_row_time", None)
        for key in ("length", "end_row", "reward_sum"):
            actor["episode"].pop(key, None)
    (path / "commit.json").write_text(json.dumps(record))
    store = ReplayStore.open(path, "a", abandon_idle_s=0.0)
    assert store.num_episodes == 0 and store.expected_seq("a") == 1
    a_minute_after_open = time.time() + 60  # the store's own clock argument, not a measured duration
    assert store.abandon_idle_episodes(3600.0, now=a_minute_after_open) == []  # idle time counts from this open
    for seq in (1, 2):
        store.append(make_chunk("a", seq, rows=10))
    store.close()
    reader = ReplayStore.open(path, "r")
    assert check_mc_returns(reader) == 25 and reader.episodes()["length"].tolist() == [25]


# ---------------------------------------------------------------- failing commits (issue item 2)


def test_commit_on_a_read_only_file_system_changes_nothing_and_can_be_retried(mounts, tmp_path):
    disk = tmp_path / "disk"
    mounts.tmpfs(disk, "64m")
    path = disk / "replay"
    store = ReplayStore.create(path, OBS_DIM, ACT_DIM, chunk_rows=64)
    try:
        for seq in range(3):
            store.append(make_chunk("a", seq))
            store.append(make_chunk("b", seq))
        store.commit()  # 240 rows; the arrays hold 512
        finite = np.isfinite(store.read()["mc_return"])
        for seq in range(3, 6):  # episodes end: MC returns of committed rows change too
            store.append(make_chunk("a", seq))
            store.append(make_chunk("b", seq))
        before = state(store)
        mounts.remount(disk, "ro")  # e.g. the kernel remounted it after an I/O error
        for _ in range(2):
            with pytest.raises(OSError) as err:
                store.commit()
            assert err.value.errno == errno.EROFS
            assert state(store) == before
        assert len(ReplayStore.open(path, "r")) == 240  # readers still see the previous commit
        store.append(make_chunk("a", 6))  # staging goes on meanwhile: 520 rows need larger arrays
        mounts.remount(disk, "rw")
        assert stray_files(path) == []
        assert store.commit(collect=True) == 520 and not store.uncommitted
        # The rows of the episodes closed before the failures reach the learner with the retry.
        assert check_closed(store.last_commit, store, finite) == 175 + 125  # a: rows 100..274, b: 100..224
    finally:
        store.close(commit=False)
    check_rows(path, {"a": 7, "b": 6})


def test_commit_whose_record_cannot_be_written_changes_nothing_and_can_be_retried(mounts, tmp_path):
    disk, view = tmp_path / "disk", tmp_path / "view"
    mounts.tmpfs(disk, "64m")
    ReplayStore.create(disk / "replay", OBS_DIM, ACT_DIM, chunk_rows=64).close()
    # The store seen through bind mounts: the data folders writable, the folder of commit.json not.
    mounts.bind(disk / "replay", view)
    for folder in ("data", "episodes"):
        mounts.bind(disk / "replay" / folder, view / folder)
    store = ReplayStore.open(view, "a")
    try:
        store.append(make_chunk("a", 0))
        store.append(make_chunk("b", 0))
        store.commit()
        for seq in (1, 2):
            store.append(make_chunk("a", seq))
            store.append(make_chunk("b", seq))
        store.skip("c", 4)
        before = state(store)
        mounts.remount(view, "ro", bind=True)
        with pytest.raises(OSError) as err:
            store.commit()  # the data writes succeed, the record does not
        assert err.value.errno == errno.EROFS
        assert state(store) == before
        assert len(ReplayStore.open(view, "r")) == 80
        mounts.remount(view, "rw", bind=True)
        assert stray_files(view) == []
        assert store.commit() == 240 and store.committed_seq("c") == 4
    finally:
        store.close(commit=False)
    check_rows(view, {"a": 3, "b": 3})


def fill(folder) -> None:
    """Write a file until the file system is full."""
    with open(folder / "filler", "wb", buffering=0) as f:
        with pytest.raises(OSError) as err:
            while True:
                f.write(b"\xff" * 65536)
    assert err.value.errno == errno.ENOSPC


def test_commit_on_a_full_disk_changes_nothing_and_can_be_retried(mounts, tmp_path):
    disk = tmp_path / "disk"
    mounts.tmpfs(disk, "2m")
    path = disk / "replay"
    store = ReplayStore.create(path, OBS_DIM, ACT_DIM, chunk_rows=64)
    try:
        store.append(make_chunk("a", 0))
        store.commit()
        store.append(make_chunk("a", 1))
        before = state(store)
        fill(disk)
        with pytest.raises(OSError) as err:
            store.commit()  # fails in the data writes
        assert err.value.errno == errno.ENOSPC
        assert state(store) == before and stray_files(path) == []
        (disk / "filler").unlink()
        assert store.commit() == 80
        store.skip("a", 3)  # a commit that writes nothing but commit.json
        before = state(store)
        fill(disk)
        with pytest.raises(OSError) as err:
            store.commit()
        assert err.value.errno == errno.ENOSPC
        assert state(store) == before and stray_files(path) == []
        assert ReplayStore.open(path, "r").committed_seq("a") == 1
        (disk / "filler").unlink()
        store.commit()
    finally:
        store.close(commit=False)
    check_rows(path, {"a": 2})
    assert ReplayStore.open(path, "r").committed_seq("a") == 3


def test_a_failed_flush_returns_only_after_every_write_finished(tmp_path):
    """A write still running after the failure was reported could overwrite what a retry writes."""
    group = zarr.open_group(str(tmp_path / "table"), mode="w")
    specs = {"small": ColumnSpec("int32"), "big": ColumnSpec("float32", (65536,))}
    table = AppendTable.create(group, specs, chunk_rows=64, compressor=None)
    rng = np.random.default_rng(0)
    table.stage({"small": np.arange(64), "big": rng.random((64, 65536), np.float32)}, 64)
    (tmp_path / "table" / "small" / "c" / "0").mkdir(parents=True)  # the chunk's file cannot be renamed there
    with pytest.raises(OSError):
        table.flush()
    assert (tmp_path / "table" / "big" / "c" / "0" / "0").is_file()
    assert table.length == 0 and table.staged == 64


# ---------------------------------------------------------------- repairs at reopen


def test_reopen_clears_stale_mc_returns_in_the_last_partly_filled_chunk(tmp_path):
    """A commit killed after its data writes leaves MC returns on committed rows of an episode
    whose end was never committed; the reopening writer must clear them on disk, also when
    they lie in the last chunk, which it holds in memory."""
    path = tmp_path / "replay"
    store = new_store(tmp_path)
    store.append(make_chunk("a", 0, rows=10))  # rows 0..9: steps 0..9 of an open episode
    store.close()
    # What the killed commit left: the episode ended, its MC returns written, commit.json not.
    zarr.open_array(str(path / "data" / "mc_return"), mode="r+")[0:10] = np.arange(10, 0, -1, dtype=np.float32)
    ReplayStore.open(path, "a").close()
    assert np.isnan(ReplayStore.open(path, "r").read()["mc_return"]).all()
