"""Human interventions (HIL-SERL): the ``intervention`` flags on the wire (optional: chunks without one keep
their bytes), in a real store on disk (a column, also in stores made before it), in ``o2o-store check`` and
the Minari export, and in training: the learner draws the operator's rows on the offline side of its
batches too, as HIL-SERL and LeRobot do; the intervention rate of committed rows."""

from __future__ import annotations

import dataclasses
import shutil

import msgpack
import numpy as np
import pytest
import torch
import zarr

from o2o.datasets.data_settings import DataSettings
from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.store_check import check_store
from o2o.learner.buffer import TransitionBuffer
from o2o.learner.online_data import OnlineData, mixed_batch
from o2o.transport import wire
from replay_peers import ACT_DIM, OBS_DIM, make_chunk

SPEC = wire.ChunkSpec(OBS_DIM, ACT_DIM, max_rows=100)


def flags_at(n: int, *rows: int) -> np.ndarray:
    flags = np.zeros(n, np.uint8)
    flags[list(rows)] = 1
    return flags


def with_flags(chunk: wire.TransitionChunk, *rows: int) -> wire.TransitionChunk:
    return dataclasses.replace(chunk, intervention=flags_at(chunk.n, *rows))


def frames_of(chunk: wire.TransitionChunk) -> list[bytes]:
    return [bytes(f) for f in wire.encode_chunk(chunk)]


# ---------------------------------------------------------------- wire


def test_a_chunk_without_interventions_keeps_todays_bytes():
    chunk = make_chunk("arm", seq=2, rows=6)
    # Today's chunk, by hand: the msgpack header listing the 7 row arrays, then their raw bytes.
    names = ["obs", "action", "reward", "next_obs", "terminated", "truncated", "success"]
    dtypes = ["<f4"] * 4 + ["|u1"] * 3
    arrays = [np.ascontiguousarray(getattr(chunk, name), dtype) for name, dtype in zip(names, dtypes)]
    header = {"v": 1, "type": "chunk", "actor_id": "arm", "seq": 2, "policy_version": 0, "episode_id": 0, "step": 12,
              "n": 6, "eval": False, "arrays": [[n, d, list(a.shape)] for n, d, a in zip(names, dtypes, arrays)]}
    today = [msgpack.packb(header, use_bin_type=True), *(a.tobytes() for a in arrays)]
    assert frames_of(chunk) == today
    assert frames_of(dataclasses.replace(chunk, intervention=np.zeros(6, np.uint8))) == today  # all 0: not sent
    assert wire.decode_chunk(today, SPEC).intervention is None  # an older actor's (or spooled) chunk


def test_interventions_round_trip_as_an_eighth_array():
    chunk = dataclasses.replace(make_chunk("arm", seq=0, rows=6), intervention=np.array([0, 1, 1, 0, 0, 1], bool))
    frames = frames_of(chunk)
    assert len(frames) == 9
    assert msgpack.unpackb(frames[0])["arrays"][7] == ["intervention", "|u1", [6]]
    assert frames[8] == bytes([0, 1, 1, 0, 0, 1])
    got = wire.decode(frames, SPEC)
    assert got.intervention.dtype == np.uint8 and got.intervention.tolist() == [0, 1, 1, 0, 0, 1]
    np.testing.assert_array_equal(got.obs, chunk.obs)


def test_interventions_travel_before_camera_frames():
    from test_wire_images import SPEC as CAMERA_SPEC, camera_chunk

    chunk = with_flags(camera_chunk(), 1, 4)
    got = wire.decode([bytes(f) for f in wire.encode_chunk(chunk)], CAMERA_SPEC)
    assert got.intervention.tolist() == [0, 1, 0, 0, 1]
    for camera, frames in chunk.frames.items():
        np.testing.assert_array_equal(got.frames[camera], frames)


def _header(frames, change):
    header = msgpack.unpackb(frames[0])
    change(header["arrays"][7])
    return [msgpack.packb(header), *frames[1:]]


def _set_dtype(entry):
    entry[1] = "<f4"


def _set_shape(entry):
    entry[2] = [5]


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda f: [*f[:8], bytes([0, 2, 0, 0, 0, 1])], wire.BAD_VALUE),
        (lambda f: [*f[:8], bytes([0, 1, 0, 0, 0])], wire.BAD_LENGTH),
        (lambda f: [*_header(f, _set_dtype)[:8], np.zeros(6, "<f4").tobytes()], wire.BAD_DTYPE),
        (lambda f: [*_header(f, _set_shape)[:8], bytes(5)], wire.BAD_SHAPE),
        (lambda f: f[:8], wire.BAD_FRAMES),  # listed, not sent
        (lambda f: [*f, bytes(6)], wire.BAD_FRAMES),  # a frame the header does not list
    ],
    ids=["flag-2", "short", "float", "wrong-shape", "missing", "extra"],
)
def test_bad_intervention_arrays_are_rejected_with_their_reason(corrupt, reason):
    frames = corrupt(frames_of(with_flags(make_chunk("arm", 0, rows=6), 1, 5)))
    with pytest.raises(wire.WireError) as err:
        wire.decode(frames, SPEC)
    assert err.value.reason == reason, err.value


# ---------------------------------------------------------------- store, check, export


def new_store(path) -> ReplayStore:
    return ReplayStore.create(path, OBS_DIM, ACT_DIM, chunk_rows=64, fsync=False)


def test_the_store_keeps_the_column_through_commit_and_reopen(tmp_path):
    store = new_store(tmp_path / "replay")
    store.append(with_flags(make_chunk("a", 0), 3, 4, 39))  # 40 rows: episode 0 ends at row 24
    store.append(make_chunk("b", 0))  # an older actor's chunk: no array
    # As decoded from the wire; its row 36 is a's row 76, in a's episode 3 (a's rows 75..99), still open.
    store.append(wire.decode(frames_of(with_flags(make_chunk("a", 1), 36)), SPEC))
    store.commit(collect=True)
    assert store.last_commit.interventions == 4
    closed = store.last_commit.closed  # the rows the learner trains on carry their flags
    assert closed["intervention"].dtype == np.uint8 and closed["intervention"].sum() == 3  # a's rows 3, 4, 39
    store.close()
    reopened = ReplayStore.open(tmp_path / "replay", "a")
    want = np.zeros(120, np.uint8)
    want[[3, 4, 39, 116]] = 1  # a's rows 0..39, b's 40..79, a's second chunk 80..119
    np.testing.assert_array_equal(reopened.read()["intervention"], want)
    # The open episode is rebuilt from the store with its flags: the commit that closes it hands them over.
    reopened.append(make_chunk("a", 2))
    reopened.commit(collect=True)
    assert reopened.last_commit.interventions == 0 and reopened.last_commit.closed["intervention"].sum() == 1
    reopened.close()


def test_a_chunk_with_bad_flags_is_refused_by_the_store(tmp_path):
    store = new_store(tmp_path / "replay")
    for flags in (np.array([2] * 40, np.uint8), np.zeros(39, np.uint8)):
        with pytest.raises(ValueError, match="intervention"):
            store.append(dataclasses.replace(make_chunk("a", 0), intervention=flags))
    assert store.append(make_chunk("a", 0)) and store.staged_rows == 40  # nothing of the refused ones staged
    store.close()


def older_store(path) -> None:
    """A store as the code before interventions wrote it: this code's layout minus the column."""
    store = new_store(path)
    for seq in range(3):
        store.append(make_chunk("a", seq))
    store.close()
    shutil.rmtree(path / "data" / "intervention")


def test_a_store_made_before_the_column_opens_reads_zeros_and_gets_it_from_a_writer(tmp_path):
    path = tmp_path / "replay"
    older_store(path)
    reader = ReplayStore.open(path, "r")
    assert reader.read()["intervention"].tolist() == [0] * 120
    found = check_store(path)
    assert found.ok, found.problems
    assert any("no intervention column" in line for line in found.checked)

    writer = ReplayStore.open(path, "a")  # adds the column: older rows read 0
    writer.append(with_flags(make_chunk("a", 3), 1, 2, 3))
    writer.commit()
    assert reader.refresh() == 160  # a reader opened before the column existed sees it once it does
    assert reader.read(100)["intervention"].tolist() == [0] * 21 + [1, 1, 1] + [0] * 36
    writer.close()
    assert ReplayStore.open(path).read()["intervention"].sum() == 3
    found = check_store(path)
    assert found.ok, found.problems
    assert any("interventions: 3 of 160 rows acted by the operator (1.9%)" in line for line in found.checked)


def test_rows_an_older_writer_appended_past_the_column_read_zero(tmp_path):
    """Older code appending to a newer store grows its own columns only: the column ends before the rows."""
    path = tmp_path / "replay"
    store = new_store(path)
    store.append(with_flags(make_chunk("a", 0), 0, 39))
    store.append(with_flags(make_chunk("a", 1), 0, 30))  # rows 40 and 70: row 70 lies past the column's end below
    store.close()
    zarr.open_array(str(path / "data" / "intervention"), mode="r+").resize((64,))
    assert ReplayStore.open(path).read()["intervention"].nonzero()[0].tolist() == [0, 39, 40]
    found = check_store(path)
    assert found.ok, found.problems
    writer = ReplayStore.open(path, "a")  # grows it again; the rows past its old end stay 0
    writer.append(with_flags(make_chunk("a", 2), 1))
    writer.close()
    assert ReplayStore.open(path).read()["intervention"].nonzero()[0].tolist() == [0, 39, 40, 81]


def test_store_check_counts_interventions_and_finds_bad_flags(tmp_path):
    path = tmp_path / "replay"
    store = new_store(path)
    store.append(with_flags(make_chunk("a", 0), 5, 6, 7, 8))
    store.append(make_chunk("b", 0))
    store.close()
    found = check_store(path)
    assert found.ok, found.problems
    assert any("interventions: 4 of 80 rows acted by the operator (5.0%)" in line for line in found.checked)
    column = zarr.open_array(str(path / "data" / "intervention"), mode="r+")
    column[10] = 7  # a committed flag that is neither 0 nor 1
    found = check_store(path)
    assert not found.ok and "1 rows hold a flag other than 0 or 1 (first rows: [10], values [7])" in " ".join(
        found.problems["values"])  # fmt: skip


def test_the_minari_export_carries_interventions_per_step(tmp_path):
    import minari

    from o2o.datasets.minari_io import load_transitions
    from o2o.datasets.replay_export import export_minari
    from o2o.envs import get_task

    task = get_task("pointmaze-umaze")
    store = ReplayStore.create_for_task(tmp_path / "replay", task.name, fsync=False)
    dims = {"obs_dim": store.config.obs_dim, "act_dim": store.config.action_dim}
    store.append(with_flags(make_chunk("a", 0, rows=50, **dims), 0, 10, 26))  # two 25-step episodes
    store.commit()
    export_minari(store, "o2o/test/interventions-v0")
    episodes = list(minari.load_dataset("o2o/test/interventions-v0").iterate_episodes())
    assert [np.flatnonzero(e.infos["intervention"]).tolist() for e in episodes] == [[1, 11], [2]]  # reset entry first
    assert load_transitions("o2o/test/interventions-v0", task, DataSettings()).obs.shape == (50, dims["obs_dim"])
    store.close()


# ---------------------------------------------------------------- training


OFFLINE, ONLINE, FLAGGED = 0.0, 1.0, 2.0  # rewards that say where a sampled row came from


def buffer_of(n: int, reward: float, capacity: int = 0, flags: np.ndarray | None = None,
              online: bool = False) -> TransitionBuffer:  # fmt: skip
    buffer = TransitionBuffer(2, 1, capacity or n, "cpu", online=online)
    add(buffer, n, reward, flags)
    return buffer


def add(buffer: TransitionBuffer, n: int, reward, flags: np.ndarray | None = None) -> None:
    buffer.add(obs=np.zeros((n, 2), np.float32), action=np.zeros((n, 1), np.float32),
               reward=np.array(np.broadcast_to(np.asarray(reward, np.float32), (n,))), next_obs=np.zeros((n, 2), np.float32),
               terminated=np.zeros(n, np.float32), mc_return=np.zeros(n, np.float32), intervention=flags)  # fmt: skip


def online_with_interventions(n: int = 100, flagged: int = 20, capacity: int = 0) -> TransitionBuffer:
    flags = np.zeros(n, np.uint8)
    flags[np.random.default_rng(0).choice(n, flagged, replace=False)] = 1
    return buffer_of(n, np.where(flags == 1, FLAGGED, ONLINE), capacity, flags, online=True)


def test_the_offline_side_draws_intervention_rows_as_often_as_a_uniform_draw_over_both():
    torch.manual_seed(0)
    offline, online = buffer_of(100, OFFLINE), online_with_interventions(100, 50)
    assert online.interventions == 50
    batches, size, ratio = 500, 64, 0.5
    n_offline = 32  # round(64 * 0.5)
    drawn = torch.stack([mixed_batch(offline, online, size, ratio).reward for _ in range(batches)])
    offline_side, online_side = drawn[:, :n_offline], drawn[:, n_offline:]
    # By hand: each offline-side row is an intervention row with p = 50 / (100 + 50) = 1/3, so 500 x 32 draws
    # hold 5333.3 of them, standard deviation sqrt(16000 x 1/3 x 2/3) = 59.6: within 4 of them (a share of
    # K / N = 1/2, or half and half as HIL-SERL's demo/RL split, would give 8000).
    assert abs(int((offline_side == FLAGGED).sum()) - 16000 / 3) < 4 * 59.6
    assert not (offline_side == ONLINE).any()  # online rows the operator did not act: never offline
    # The online side stays a uniform draw over all online rows: half are intervention rows, 8000 +- 4 x 63.2.
    assert abs(int((online_side == FLAGGED).sum()) - 8000) < 4 * 63.2
    assert (online_side != OFFLINE).all()


def test_without_interventions_batches_are_drawn_as_before():
    offline, online = buffer_of(300, OFFLINE), buffer_of(100, ONLINE, online=True)
    torch.manual_seed(3)
    got = mixed_batch(offline, online, 64, 0.25)
    torch.manual_seed(3)  # the split before interventions existed: offline rows first, then online ones
    first, last = offline.sample(16), online.sample(48)
    assert torch.equal(got.obs, torch.cat([first.obs, last.obs])) and torch.equal(got.reward, torch.cat([first.reward,
                                                                                                       last.reward]))
    assert got.online_rows == 48
    assert mixed_batch(None, online, 64, 0.5).online_rows == 64  # from scratch: all online, as before


def test_from_scratch_the_offline_side_is_the_intervention_rows_alone():
    torch.manual_seed(1)
    batch = mixed_batch(None, online_with_interventions(100, 5), 64, 0.25)
    assert (batch.reward[:16] == FLAGGED).all() and batch.online_rows == 48


def test_intervention_rows_leave_the_offline_side_when_the_online_buffer_drops_them():
    online = online_with_interventions(100, 20, capacity=150)
    add(online, 100, ONLINE)  # 50 of the first rows are overwritten
    assert 0 < online.interventions < 20
    add(online, 50, ONLINE)
    assert online.interventions == 0
    torch.manual_seed(0)
    assert not (mixed_batch(buffer_of(300, OFFLINE), online, 64, 0.5).reward == FLAGGED).any()


def test_the_learner_gets_the_flags_from_commits_and_restarts_and_logs_the_rate(tmp_path):
    path = tmp_path / "replay"
    store = ReplayStore.create(path, OBS_DIM, ACT_DIM, chunk_rows=64, fsync=False)
    low, high = -np.ones(ACT_DIM, np.float32), np.ones(ACT_DIM, np.float32)
    data = OnlineData(TransitionBuffer(OBS_DIM, ACT_DIM, 1000, "cpu", online=True), low, high, DataSettings())
    store.append(with_flags(make_chunk("a", 0), 2, 30))  # 40 rows: episode 0 (rows 0..24) closes
    store.commit(collect=True)
    data.on_commit(store.last_commit)
    data.drain()
    assert data.buffer.interventions == 1  # row 30's episode is still open: not trainable yet
    assert data.pop_intervention_rate() == pytest.approx(2 / 40)
    store.append(make_chunk("a", 1))  # rows 40..79: episode 1 closes at row 49
    store.commit(collect=True)
    data.on_commit(store.last_commit)
    data.drain()
    assert data.buffer.interventions == 2 and data.intervention_rows == 2
    assert data.pop_intervention_rate() == 0.0  # none among the 40 rows committed since
    assert data.pop_intervention_rate() == 0.0  # nothing committed since
    store.close()

    restarted = OnlineData(TransitionBuffer(OBS_DIM, ACT_DIM, 1000, "cpu", online=True), low, high, DataSettings())
    store = ReplayStore.open(path, "a")
    assert restarted.load_store(store) == 75 and restarted.buffer.interventions == 2  # a's episodes 0, 1, 2
    assert restarted.intervention_rows == 2 and restarted.pop_intervention_rate() == 0.0  # counted from here
    store.append(with_flags(make_chunk("a", 2), 0, 1, 2, 3))
    store.commit(collect=True)
    restarted.on_commit(store.last_commit)
    restarted.drain()
    assert restarted.pop_intervention_rate() == pytest.approx(4 / 40)
    store.close()


def test_a_camera_buffer_samples_intervention_rows_with_their_own_images():
    from test_image_buffer import ACT as CAM_ACT, SPEC as CAM_SPEC, assert_own_images, segment_rows

    buffer = TransitionBuffer(CAM_SPEC, CAM_ACT, capacity=40, device="cpu", online=True, frame_capacity=24)
    rows = segment_rows([(1, 0, 5), (2, 0, 5)])  # episodes 1 and 2, five steps each
    frames = {k[len("frames/"):]: v for k, v in rows.items() if k.startswith("frames/")}
    keys = ("obs", "action", "reward", "next_obs", "terminated", "mc_return", "obs_frame", "next_frame")
    buffer.add(**{k: rows[k] for k in keys}, frames=frames, intervention=flags_at(10, 1, 2, 7))
    torch.manual_seed(0)
    batch = buffer.sample_interventions(200)
    assert batch.online_rows == 0
    assert sorted(set(map(tuple, batch.obs.numpy().astype(int).tolist()))) == [(1, 1), (1, 2), (2, 2)]
    assert_own_images(batch)
    # Two more 8-step episodes: 18 more frames wrap the 24-frame ring, so episode 1's frames are gone (its rows
    # are still in the 40-row ring, but no longer sampleable).
    more = segment_rows([(3, 0, 8), (4, 0, 8)])
    buffer.add(**{k: more[k] for k in keys}, frames={k[len("frames/"):]: v for k, v in more.items()
                                                     if k.startswith("frames/")})  # fmt: skip
    assert buffer.interventions == 1
    assert set(map(tuple, buffer.sample_interventions(50).obs.numpy().astype(int).tolist())) == {(2, 2)}
