"""The Zarr replay store: exactly-once appends, MC returns, reopen, crash safety, concurrent readers, export."""

import multiprocessing as mp
import os
import signal

import numpy as np
import pytest

from o2o.datasets.data_settings import DataSettings
from o2o.transport import wire
from o2o.datasets.mc_return import trajectory_return_to_go
from o2o.datasets.replay_export import export_minari
from o2o.datasets.replay_store import LEARNER_COLUMNS, ReplayStore, SeqGapError, StoreError
from replay_peers import ACT_DIM, OBS_DIM, expected_rows, make_chunk, read_while_written, write_forever

SPAWN = mp.get_context("spawn")  # children start clean: no inherited zarr loop or ZeroMQ context


@pytest.fixture(autouse=True)
def reap_children():
    """A failed test must not leave writer processes behind."""
    yield
    for child in mp.active_children():
        child.kill()
        child.join()


def new_store(tmp_path, **kwargs) -> ReplayStore:
    return ReplayStore.create(tmp_path / "replay", OBS_DIM, ACT_DIM, chunk_rows=64, **kwargs)


def rows_of(store: ReplayStore, actor_id: str) -> dict[str, np.ndarray]:
    rows = store.read()
    mine = rows["actor"] == store.actor_ids.index(actor_id)
    return {name: values[mine] for name, values in rows.items()}


def check_mc_returns(store: ReplayStore) -> int:
    """Every complete episode's rows hold the official MC return; every other row NaN."""
    cfg = store.config
    rows, episodes = store.read(), store.episodes()
    filled = np.zeros(len(store), bool)
    for i in np.flatnonzero(episodes["ended"] & episodes["contiguous"]):
        lo, hi = episodes["start_row"][i], episodes["end_row"][i] + 1
        idx = lo + np.flatnonzero(
            (rows["actor"][lo:hi] == episodes["actor"][i]) & (rows["episode_id"][lo:hi] == episodes["episode_id"][i])
        )
        assert len(idx) == episodes["length"][i] and rows["step"][idx].tolist() == list(range(len(idx)))
        want = trajectory_return_to_go(
            cfg.data.scale(rows["reward"][idx]), rows["terminated"][idx], cfg.data.discount, cfg.scaled_failure_reward
        )
        np.testing.assert_array_equal(rows["mc_return"][idx], want)
        filled[idx] = True
    assert np.isnan(rows["mc_return"][~filled]).all()
    return int(filled.sum())


def check_closed(event, store: ReplayStore, finite_before: np.ndarray) -> int:
    """``event.closed`` holds exactly the rows whose MC return the commit filled (committed
    earlier or now), each once, with the store's values; returns their count."""
    rows = store.read()
    finite = np.isfinite(rows["mc_return"])
    filled = np.flatnonzero(finite & ~np.pad(finite_before, (0, len(finite) - len(finite_before))))
    assert set(event.closed) == {*LEARNER_COLUMNS, "mc_return"}
    assert len(event.closed["mc_return"]) == len(filled)
    # The same rows: matched by their (unique) obs, then every column compared.
    order_event = np.lexsort(event.closed["obs"].T)
    order_store = np.lexsort(rows["obs"][filled].T)
    for name, values in event.closed.items():
        np.testing.assert_array_equal(values[order_event], rows[name][filled][order_store], err_msg=name)
        assert values.dtype == rows[name].dtype, name
    return len(filled)


def test_append_commit_read(tmp_path):
    store = new_store(tmp_path)
    for seq in range(5):
        for actor in ("a", "b"):
            assert store.append(make_chunk(actor, seq))
    assert len(store) == 0 and store.staged_rows == 400  # staged rows are not committed yet
    assert store.commit() == 400
    assert store.committed_seq("a") == 4 and store.committed_seq("nobody") == -1
    for actor in ("a", "b"):
        got, want = rows_of(store, actor), expected_rows(actor, 5)
        for name in wire.ARRAY_NAMES:
            np.testing.assert_array_equal(got[name], want[name].astype(got[name].dtype))
    assert store.read(390, 1000)["obs"].shape == (10, OBS_DIM)


def test_duplicates_are_skipped_and_gaps_refused(tmp_path):
    store = new_store(tmp_path)
    for seq in range(3):
        store.append(make_chunk("a", seq))
    store.commit()
    assert not store.append(make_chunk("a", 1))  # committed duplicate
    store.append(make_chunk("a", 3))
    assert not store.append(make_chunk("a", 3))  # staged duplicate
    with pytest.raises(SeqGapError) as gap:
        store.append(make_chunk("a", 5))
    assert gap.value.expected == 4
    assert store.commit() == 160 and store.duplicates == 2
    np.testing.assert_array_equal(rows_of(store, "a")["obs"], expected_rows("a", 4)["obs"])


def test_mc_returns_fill_on_episode_end_for_interleaved_actors(tmp_path):
    # Sparse convention: scaled reward = 2 r - 1, failure reward 0 (raw) -> -1 (scaled).
    store = new_store(tmp_path, data=DataSettings(0.9, 2.0, -1.0), failure_reward=0.0)
    all_fail = make_chunk("c", 0, rows=25)
    all_fail = wire.TransitionChunk(**{**all_fail.__dict__, "reward": np.zeros(25, np.float32)})
    store.append(all_fail)
    for seq in range(3):  # 40-row chunks, 25-step episodes: episodes span chunks and commits
        store.append(make_chunk("a", seq))
        store.append(make_chunk("b", seq))
        store.commit()
    # a: episodes 0-3 ended (rows 0..99), episode 4 open (rows 100..119); same for b.
    assert check_mc_returns(store) == 2 * 100 + 25
    np.testing.assert_allclose(rows_of(store, "c")["mc_return"], -1.0 / (1 - 0.9))
    assert np.isnan(rows_of(store, "a")["mc_return"][100:]).all()
    episodes = store.episodes()
    assert len(episodes["actor"]) == 9 and episodes["ended"].all()
    assert episodes["terminated"].sum() == 5  # even episodes terminate (2 + 2 for a, b, plus c's)


def test_episode_with_a_missing_chunk_gets_no_mc_return(tmp_path):
    store = new_store(tmp_path)
    store.append(make_chunk("a", 0, rows=10, episode_len=30))
    store.skip("a", 1)  # chunk 1 was rejected: steps 10..19 are missing
    store.append(make_chunk("a", 2, rows=10, episode_len=30))
    store.commit()
    episodes = store.episodes()
    assert episodes["ended"].tolist() == [True] and episodes["contiguous"].tolist() == [False]
    assert np.isnan(store.read()["mc_return"]).all() and store.committed_seq("a") == 2


def test_reopen_keeps_appending_and_finishes_open_episodes(tmp_path):
    store = new_store(tmp_path)
    store.append(make_chunk("a", 0))
    store.append(make_chunk("b", 0))
    store.close()
    with pytest.raises(StoreError):
        ReplayStore.create(tmp_path / "replay", OBS_DIM, ACT_DIM)
    store = ReplayStore.open(tmp_path / "replay", "a")
    with pytest.raises(StoreError, match="another process"):
        ReplayStore.open(tmp_path / "replay", "a")  # one writer at a time
    assert len(store) == 80 and store.expected_seq("a") == 1
    for seq in range(1, 4):
        store.append(make_chunk("a", seq))
    store.close()
    store = ReplayStore.open(tmp_path / "replay", "r")
    np.testing.assert_array_equal(rows_of(store, "a")["reward"], expected_rows("a", 4)["reward"])
    assert check_mc_returns(store) == 150 + 25  # a: 6 episodes of 25 ended; b: 1


def test_commit_events_hand_over_the_rows_of_the_episodes_they_close(tmp_path):
    """The learner trains on ``event.closed`` alone: every row that gets an MC return comes
    once, with its columns, from the commit that closed its episode, also for rows committed
    before a restart (read back by the reopening writer), eval rows included (flagged), and
    never for abandoned or gappy episodes."""
    store = new_store(tmp_path, data=DataSettings(0.9, 2.0, -1.0), failure_reward=0.0)
    finite = np.zeros(0, bool)
    handed = []

    def commit() -> None:
        nonlocal finite
        store.commit(collect=True)
        handed.append(check_closed(store.last_commit, store, finite))
        finite = np.isfinite(store.read(columns=["mc_return"])["mc_return"])

    store.append(make_chunk("a", 0))  # episodes of 25 rows in 40-row chunks: ends span commits
    store.append(wire.TransitionChunk(**{**make_chunk("evaluator", 0).__dict__, "eval": True}))
    commit()
    store.append(make_chunk("a", 1))
    store.append(make_chunk("gappy", 0, rows=10, episode_len=30))
    store.skip("gappy", 1)  # steps 10..19 missing: no MC return, nothing handed over
    store.append(make_chunk("gappy", 2, rows=10, episode_len=30))
    commit()
    store.append(make_chunk("b", 0))  # b's second episode stays open across the restart
    commit()
    store.close()
    store = ReplayStore.open(tmp_path / "replay", "a")
    store.append(make_chunk("b", 1))  # closes it: rows 15..24 of b were committed before the restart
    store.append(make_chunk("a", 2))
    commit()
    assert store.abandon_idle_episodes(0.0, now=store.clock() + 1) == ["a", "evaluator", "b"]  # no MC return
    commit()
    assert handed == [25 + 25, 25 + 25, 25, 25 + 25 + 25, 0]
    assert sum(handed) == np.isfinite(store.read()["mc_return"]).sum()


def _check_store_matches_sent(path) -> int:
    store = ReplayStore.open(path, "r")
    rows = store.read()
    for code, actor_id in enumerate(store.actor_ids):
        n_chunks = store.committed_seq(actor_id) + 1
        mine = rows["actor"] == code
        want = expected_rows(actor_id, n_chunks)
        for name in wire.ARRAY_NAMES:  # every committed chunk exactly once, in order, nothing else
            np.testing.assert_array_equal(rows[name][mine], want[name].astype(rows[name].dtype))
    assert (rows["actor"] >= 0).all()
    return len(store)


def test_sigkill_at_random_moments_never_loses_committed_rows(tmp_path):
    path = tmp_path / "replay"
    new_store(tmp_path, failure_reward=0.0).close()
    rng = np.random.default_rng(0)
    lengths = []
    for round_ in range(6):
        writer = SPAWN.Process(target=write_forever, args=(str(path), ["a", "b", "c"], round_), daemon=True)
        writer.start()
        # Wait for the writer's first commits, then kill it at a random instant.
        while len(ReplayStore.open(path, "r")) <= (lengths[-1] if lengths else 0):
            writer.join(0.02)
            assert writer.exitcode is None, "the writer died on its own"
        writer.join(rng.uniform(0.0, 0.3))
        assert writer.exitcode is None, "the writer died on its own (its traceback is above)"
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        lengths.append(_check_store_matches_sent(path))
    assert lengths == sorted(lengths)
    # A writer reopening after the crashes clears MC returns of episodes whose end was never committed.
    ReplayStore.open(path, "a").close()
    assert check_mc_returns(ReplayStore.open(path, "r")) > 0


def test_concurrent_reader_sees_a_growing_intact_prefix(tmp_path):
    path = tmp_path / "replay"
    new_store(tmp_path).close()
    writer = SPAWN.Process(target=write_forever, args=(str(path), ["a", "b"], 0), daemon=True)
    out = SPAWN.Queue()
    reader = SPAWN.Process(target=read_while_written, args=(str(path), 40, out), daemon=True)
    writer.start()
    while len(ReplayStore.open(path, "r")) == 0:  # the writer is up (a spawned process takes seconds)
        writer.join(0.05)
        assert writer.exitcode is None, "the writer died on its own"
    reader.start()
    report = out.get(timeout=60)
    reader.join()
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    sizes = [n for n, _ in report]
    assert all(ok for _, ok in report)
    assert sizes == sorted(sizes) and len(set(sizes)) > 1


def test_export_minari_round_trips_through_load_transitions(tmp_path):
    import minari

    from o2o.datasets.minari_io import load_transitions
    from o2o.envs import get_task

    task = get_task("pointmaze-umaze")
    store = ReplayStore.create_for_task(tmp_path / "replay", task.name, data=DataSettings(0.95, 3.0, -1.0))
    dims = {"obs_dim": store.config.obs_dim, "act_dim": store.config.action_dim}
    for seq in range(4):
        store.append(make_chunk("a", seq, **dims))
        store.append(make_chunk("b", seq, **dims))
    chunk = make_chunk("evaluator", 0, rows=25, **dims)
    store.append(wire.TransitionChunk(**{**chunk.__dict__, "eval": True}))
    store.commit()

    dataset = export_minari(store, "o2o/test/replay-v0")
    loaded = minari.load_dataset("o2o/test/replay-v0")
    assert loaded.total_episodes == dataset.total_episodes == 12  # 6 complete episodes each; eval excluded
    data = load_transitions("o2o/test/replay-v0", task, DataSettings(0.95, 3.0, -1.0))
    rows = store.read()
    exported = np.isfinite(rows["mc_return"]) & ~rows["eval"]
    # Episodes are exported in the order they ended; compare as sets of rows keyed by obs.
    order_store = np.lexsort(rows["obs"][exported].T)
    order_loaded = np.lexsort(data.obs.T)
    np.testing.assert_array_equal(data.obs[order_loaded], rows["obs"][exported][order_store])
    np.testing.assert_array_equal(data.mc_return[order_loaded], rows["mc_return"][exported][order_store])
    assert len(export_minari(store, "o2o/test/replay-eval-v0", include_eval=True).episode_indices) == 13


def test_commits_written_while_appends_go_on_leave_the_same_store_as_commits_in_a_row(tmp_path):
    """The ingest server writes each commit in a thread while it stages more chunks: appends,
    episodes that close (MC returns patched onto rows the pending commit is writing, or has
    written) and skips between ``begin_commit`` and ``finish_commit`` go into the next commit,
    and the result (rows, MC returns, episodes, seqs, commit events' closed rows) equals a store
    written with plain commits; a failed pending commit leaves it all staged for the next one."""
    chunks = [make_chunk(actor, seq, rows=40, episode_len=60) for seq in range(12) for actor in ("a", "b")]
    plain = ReplayStore.create(tmp_path / "plain", OBS_DIM, ACT_DIM, chunk_rows=64, fsync=False)
    overlapped = ReplayStore.create(tmp_path / "overlapped", OBS_DIM, ACT_DIM, chunk_rows=64, fsync=False)
    closed_plain, closed_overlapped = [], []
    pending = None
    for i, chunk in enumerate(chunks):
        plain.append(chunk)
        overlapped.append(chunk)
        if i % 3 == 2:
            plain.commit(collect=True)
            closed_plain.append(plain.last_commit.closed["obs"])
            if pending is not None:
                if i % 9 == 8:  # this one fails: everything it held is written by the next
                    overlapped.abort_commit(pending)
                else:
                    pending.run()
                    overlapped.finish_commit(pending)
                    closed_overlapped.append(overlapped.last_commit.closed["obs"])
            pending = overlapped.begin_commit(collect=True)  # written while the next chunks are staged
    plain.skip("a", 12)
    overlapped.skip("a", 12)
    pending.run()
    overlapped.finish_commit(pending)
    closed_overlapped.append(overlapped.last_commit.closed["obs"])
    plain.commit(collect=True)
    closed_plain.append(plain.last_commit.closed["obs"])
    overlapped.commit(collect=True)
    closed_overlapped.append(overlapped.last_commit.closed["obs"])
    plain.close()
    overlapped.close()
    a, b = ReplayStore.open(tmp_path / "plain", "r"), ReplayStore.open(tmp_path / "overlapped", "r")
    assert len(a) == len(b) == 12 * 2 * 40
    rows_a, rows_b = a.read(), b.read()
    for name in rows_a:
        np.testing.assert_array_equal(rows_a[name], rows_b[name], err_msg=name)
    assert np.isfinite(rows_b["mc_return"]).sum() > 0
    for name, values in a.episodes().items():
        np.testing.assert_array_equal(values, b.episodes()[name], err_msg=name)
    assert (a.committed_seq("a"), a.committed_seq("b")) == (b.committed_seq("a"), b.committed_seq("b")) == (12, 11)
    # Every row with an MC return was handed over once, whichever commit closed its episode.
    np.testing.assert_array_equal(np.sort(np.concatenate(closed_plain), axis=0),
                                  np.sort(np.concatenate(closed_overlapped), axis=0))  # fmt: skip
    check_mc_returns(b)


def test_chunk_files_are_byte_for_byte_what_zarr_itself_writes(tmp_path):
    """The store encodes and writes whole chunks itself (zarr_table.chunk_encoder, without zarr's
    per-write indexing): the files must be the ones zarr's own ``setitem`` makes from the same
    rows, chunks of only fill values included (zarr stores those as no file)."""
    store = ReplayStore.create(tmp_path / "replay", OBS_DIM, ACT_DIM, chunk_rows=64)
    for seq in range(9):  # 360 rows: 5 full chunks and a partial one; "eval" and "intervention" stay fill
        store.append(make_chunk("a", seq))
        if seq % 4 == 3:
            store.commit()
    store.close()
    assert_chunks_as_zarr_writes(tmp_path / "replay", ("data", "episodes"))


def assert_chunks_as_zarr_writes(path, tables) -> None:
    """Each array's chunk files under ``path/<table>`` are the files zarr writes for its values."""
    import zarr

    twin = zarr.open_group(str(path.parent / "twin"), mode="w")
    for table in tables:
        written = 0
        for name, arr in zarr.open_group(str(path / table), mode="r").arrays():
            copy = twin.create_array(f"{table}/{name}", shape=arr.shape, chunks=arr.chunks, dtype=arr.dtype,
                                     fill_value=arr.fill_value, compressors=arr.compressors)  # fmt: skip
            copy[:] = arr[:]
            ours, theirs = path / table / name / "c", path.parent / "twin" / table / name / "c"
            files = sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file()) if ours.exists() else []
            twins = sorted(p.relative_to(theirs) for p in theirs.rglob("*") if p.is_file()) if theirs.exists() else []
            assert files == twins, f"{table}/{name}"
            for file in files:
                assert (ours / file).read_bytes() == (theirs / file).read_bytes(), f"{table}/{name}/{file}"
            written += len(files)
        assert written > 0, table
