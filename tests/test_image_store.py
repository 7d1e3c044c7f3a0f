"""Camera frames in the replay store: each frame once, rows pointing at them, crash safety with a real
kill, bad frames refused untouched, frames handed out with the rows (reads, commit events, trainable
rows, the newest ``limit`` of them), the store checker, and a Minari export that loads back.

Every frame's pixels encode its id: ``frame_id(actor, episode, step) = 100000 * actor + 10 * episode + step``
(step T is an episode's final next observation; unique for 10,000 episodes of each actor), written into the
first three bytes of the image, and the camera's number in the next one. Rows carry the same id in their state vector (``obs[0]`` the id
of their observation, ``next_obs[0]`` of their next one), so every check reads the pixels back and
compares them with what the row says, by hand-countable numbers.
"""

import json
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
import zarr

from o2o.datasets.replay_store import ReplayStore, StoreError
from o2o.datasets.rows import TransitionChunk, frame_layout
from o2o.datasets.store_check import check_store, repair_store
from o2o.datasets.store_frames import concat_rows
from o2o.datasets.trainable_rows import trainable_rows
from o2o.envs.obs_spec import CameraSpec, ObsSpec

SPAWN = mp.get_context("spawn")
SPEC = ObsSpec(2, (CameraSpec("front", 6, 5, 3), CameraSpec("wrist", 4, 4, 1)))
EPISODE_LEN = 7  # even episodes terminate, odd ones are truncated
ROWS = 5  # rows per chunk: episodes end mid-chunk and span chunks


@pytest.fixture(autouse=True)
def reap_children():
    yield
    for child in mp.active_children():
        child.kill()
        child.join()


ACTORS = {"a": 1, "b": 2, "eval": 3}


def frame_id(actor_id: str, episode: np.ndarray, step: np.ndarray) -> np.ndarray:
    return 100000 * ACTORS[actor_id] + 10 * episode + step


def image(ids: np.ndarray, camera: CameraSpec, camera_no: int) -> np.ndarray:
    """Frames whose first three bytes are the id (little endian) and whose fourth is the camera's number."""
    images = np.zeros((len(ids), *camera.shape), np.uint8)
    flat = images.reshape(len(ids), -1)
    flat[:, 0], flat[:, 1], flat[:, 2], flat[:, 3] = ids % 256, ids // 256 % 256, ids // 65536, camera_no
    return images


def decode(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = images.reshape(len(images), int(np.prod(images.shape[1:]))).astype(np.int64)
    return flat[:, 0] + 256 * flat[:, 1] + 65536 * flat[:, 2], flat[:, 3]


def make_chunk(actor_id: str, seq: int, rows: int = ROWS, spec: ObsSpec = SPEC) -> TransitionChunk:
    """Chunk ``seq`` of an actor, frames in the wire's segment layout (``frame_layout``)."""
    g = seq * rows + np.arange(rows)
    episode, step = g // EPISODE_LEN, g % EPISODE_LEN
    last = step == EPISODE_LEN - 1
    terminated, truncated = last & (episode % 2 == 0), last & (episode % 2 == 1)
    local, n_frames = frame_layout(terminated, truncated)
    ids = np.empty(n_frames, np.int64)
    ids[local], ids[local + 1] = frame_id(actor_id, episode, step), frame_id(actor_id, episode, step + 1)
    state = np.zeros((rows, spec.state_dim), np.float32)
    state[:, 0] = frame_id(actor_id, episode, step)
    next_state = state.copy()
    next_state[:, 0] += 1
    return TransitionChunk(
        actor_id=actor_id, seq=seq, policy_version=0, episode_id=int(episode[0]), step=int(step[0]),
        obs=state, action=np.full((rows, 1), seq, np.float32), reward=np.ones(rows, np.float32), next_obs=next_state,
        terminated=terminated.astype(np.uint8), truncated=truncated.astype(np.uint8), success=np.zeros(rows, np.uint8),
        frames={c.name: image(ids, c, i + 1) for i, c in enumerate(spec.cameras)},
    )  # fmt: skip


def new_store(tmp_path, **kwargs) -> ReplayStore:
    return ReplayStore.create(tmp_path / "replay", SPEC, 1, chunk_rows=8, frame_chunk=4, fsync=False, **kwargs)


def committed_frames(path) -> int:
    return json.loads((path / "commit.json").read_text())["frames"]


def check_rows_see_their_frames(rows: dict, once: bool = True) -> None:
    """Each row's obs_frame / next_frame (relative) show the ids its state names, in every camera;
    the dict holds each frame once (unless not ``once``), and only frames its rows use."""
    for number, camera in enumerate(SPEC.cameras, 1):
        ids, cameras = decode(rows[f"frames/{camera.name}"])
        assert (cameras == number).all(), camera.name
        np.testing.assert_array_equal(ids[rows["obs_frame"]], rows["obs"][:, 0], err_msg=camera.name)
        np.testing.assert_array_equal(ids[rows["next_frame"]], rows["next_obs"][:, 0], err_msg=camera.name)
        assert not once or len(np.unique(ids)) == len(ids), "a frame held twice"
    used = np.union1d(rows["obs_frame"], rows["next_frame"])
    assert used.tolist() == list(range(len(rows["frames/front"]))), "frames no row uses"


def test_each_frame_is_stored_once_and_rows_point_at_theirs(tmp_path):
    store = new_store(tmp_path)
    for seq in range(4):  # a and b interleave: a row's next frame is not the next row's frame
        store.append(make_chunk("a", seq))
        store.append(make_chunk("b", seq))
        store.commit()
    # Per actor 20 rows: episode 0 (rows 0-6, 8 frames), 1 (rows 7-13, 8 frames), 2 open (rows 14-19, 7 frames).
    # The wire sent 6 + 7 + 7 + 6 = 26 frames; chunks 1-3 begin with the previous chunk's last frame.
    assert committed_frames(store.path) == 2 * 23
    rows = store.read()
    assert {"obs_frame", "next_frame", "frames/front", "frames/wrist"} <= set(rows) and len(rows["obs"]) == 40
    assert rows["frames/front"].shape == (46, 6, 5, 3) and rows["frames/wrist"].shape == (46, 4, 4, 1)
    assert rows["frames/front"].dtype == np.uint8
    check_rows_see_their_frames(rows)
    for code in range(2):  # within an episode, the next row's observation is the SAME stored frame
        mine = np.flatnonzero(rows["actor"] == code)
        same_episode = rows["episode_id"][mine][1:] == rows["episode_id"][mine][:-1]
        np.testing.assert_array_equal(rows["obs_frame"][mine][1:][same_episode], rows["next_frame"][mine][:-1][same_episode])
    # Columns: none of the camera keys unless asked for; any one of them brings them all.
    assert set(store.read(columns=["reward"])) == {"reward"}
    camera_keys = {"obs_frame", "next_frame", "frames/front", "frames/wrist"}
    assert set(store.read(columns=["obs", "frames/wrist"])) == {"obs", *camera_keys}
    part = store.read(10, 20)  # a part holds only the frames its rows use
    check_rows_see_their_frames(part)
    # a's rows 10..14 are its steps 5, 6 of episode 0 and 0..2 of episode 1: frames of steps 5..7 and 0..3.
    assert len(part["frames/front"]) == 2 * 7


def test_a_state_store_is_unchanged(tmp_path):
    store = ReplayStore.create(tmp_path / "state", 5, 3, chunk_rows=64)
    assert "frames" not in zarr.open_group(str(store.path), mode="r")
    attrs = zarr.open_group(str(store.path), mode="r").attrs["o2o_replay"]
    assert attrs["version"] == 1 and "obs_spec" not in attrs
    assert "frames" not in json.loads((store.path / "commit.json").read_text())
    assert "obs_frame" not in store.read() and store.obs_spec == ObsSpec(5)


def test_a_first_frame_unlike_the_stored_one_is_stored_again(tmp_path):
    store = new_store(tmp_path)
    store.append(make_chunk("a", 0))
    chunk = make_chunk("a", 1)
    changed = {name: images.copy() for name, images in chunk.frames.items()}
    changed["front"][0].reshape(-1)[:3] = [7, 0, 0]  # id 7: not the frame the store holds for step 5
    store.append(TransitionChunk(**{**chunk.__dict__, "frames": changed}))
    store.commit()
    assert committed_frames(store.path) == 6 + 7  # nothing deduplicated: the bytes differ
    rows = store.read()
    front = decode(rows["frames/front"])[0]
    assert front[rows["obs_frame"][5]] == 7 and front[rows["next_frame"][4]] == frame_id("a", 0, 5)


def test_commit_events_hand_over_closed_episodes_with_their_frames_also_across_a_restart(tmp_path):
    store = new_store(tmp_path)
    closed = []
    for seq in range(4):  # episodes end at a's steps 6, 13, 20, 27; chunks hold steps 5 seq .. 5 seq + 4
        store.append(make_chunk("a", seq))
        store.commit(collect=True)
        closed.append(store.last_commit.closed)
    store.close()
    store = ReplayStore.open(tmp_path / "replay", "a")  # a's episode 2 (its steps 14..19 so far) is open
    store.append(make_chunk("a", 4))  # closes it: its frames from before the restart come from the store
    store.commit(collect=True)
    closed.append(store.last_commit.closed)
    assert [len(c["obs"]) for c in closed] == [0, 7, 7, 0, 7]
    assert [len(c["frames/front"]) for c in closed] == [0, 8, 8, 0, 8]  # T + 1 frames per closed episode
    for event in closed:
        check_rows_see_their_frames(event)
        assert event["frames/wrist"].dtype == np.uint8 and event["obs_frame"].dtype == np.int64
    np.testing.assert_array_equal(closed[4]["obs"][:, 0], frame_id("a", 2, np.arange(7)))
    # The chunk after the restart began with the last frame stored before it: kept once.
    assert committed_frames(store.path) == 3 * 8 + 5  # episodes 0, 1, 2 and open episode 3 (steps 21..24)


@pytest.mark.parametrize("what", ["camera", "shape", "count", "dtype", "missing"])
def test_frames_that_do_not_fit_the_store_are_refused_and_nothing_is_touched(tmp_path, what):
    store = new_store(tmp_path)
    store.append(make_chunk("a", 0))
    store.commit()
    before = store.read()
    chunk = make_chunk("a", 1)
    frames = dict(chunk.frames)
    if what == "camera":
        frames["rear"] = frames.pop("wrist")
    elif what == "shape":
        frames["front"] = np.zeros((len(frames["front"]), 5, 6, 3), np.uint8)
    elif what == "count":
        frames["front"] = frames["front"][:-1]
    elif what == "dtype":
        frames["wrist"] = frames["wrist"].astype(np.float32)
    else:
        frames = {}
    expected = {"camera": "cameras ['front', 'rear']", "shape": "(7, 5, 6, 3), expected uint8 (7, 6, 5, 3)",
                "count": "(6, 6, 5, 3), expected uint8 (7, 6, 5, 3)", "dtype": "float32",
                "missing": "cameras []"}[what]  # fmt: skip
    with pytest.raises(ValueError, match="refused, nothing was staged") as refused:
        store.append(TransitionChunk(**{**chunk.__dict__, "frames": frames}))
    assert expected in str(refused.value)
    assert store.staged_rows == 0 and store.expected_seq("a") == 1 and not store.uncommitted
    store.append(chunk)  # the same seq, corrected: still continues the stored episode
    store.commit()
    rows = store.read()
    for name, values in before.items():
        if not name.startswith("frames/") and name != "mc_return":  # chunk 1 ends episode 0: its MC returns
            np.testing.assert_array_equal(rows[name][:5], values, err_msg=name)
    check_rows_see_their_frames(rows)
    assert committed_frames(store.path) == 6 + 6
    with pytest.raises(ValueError, match="this store has no cameras"):
        ReplayStore.create(tmp_path / "state", 2, 1).append(make_chunk("a", 0))


def test_the_store_records_its_spec_and_checks_it_on_open(tmp_path):
    new_store(tmp_path).close()
    attrs = zarr.open_group(str(tmp_path / "replay"), mode="r").attrs["o2o_replay"]
    assert attrs["version"] == 2 and ObsSpec.from_dict(attrs["obs_spec"]) == SPEC
    assert ReplayStore.open(tmp_path / "replay", obs_spec=SPEC).obs_spec == SPEC
    with pytest.raises(StoreError, match="holds observations"):
        ReplayStore.open(tmp_path / "replay", obs_spec=ObsSpec(2, (CameraSpec("front", 6, 5, 3),)))
    group = zarr.open_group(str(tmp_path / "replay"), mode="r+")
    group.attrs["o2o_replay"] = {**attrs, "obs_spec": {"state_dim": 2, "cameras": {"front": [6, 5, 3], "wrist": [8, 8, 1]}}}
    with pytest.raises(StoreError, match="frames columns are"):
        ReplayStore.open(tmp_path / "replay")


def test_trainable_rows_bring_their_frames_and_can_be_only_the_newest(tmp_path):
    store = new_store(tmp_path)
    for seq in range(6):  # a: 30 rows, episodes 0-3 ended (28 rows), episode 4 open
        store.append(make_chunk("a", seq))
        store.append(TransitionChunk(**{**make_chunk("eval", seq).__dict__, "eval": True}))
    store.commit()
    rows = trainable_rows(store)
    everything = concat_rows(list(rows.chunks(chunk=8)))
    assert len(everything["obs"]) == 28 and not everything["eval"].any()
    check_rows_see_their_frames(rows.read(0, 60))
    # Parts concatenated: the indices still point at each row's frames (a frame both parts use, twice).
    check_rows_see_their_frames(concat_rows([rows.read(0, 30), rows.read(30, 60)]), once=False)
    np.testing.assert_array_equal(everything["obs"][:, 0], frame_id("a", np.arange(28) // 7, np.arange(28) % 7))
    for limit in (1, 9, 28, 100):
        parts = list(rows.chunks(["obs", "next_obs", "frames/front"], chunk=8, limit=limit))
        newest = concat_rows(parts)
        assert sorted(newest) == ["frames/front", "frames/wrist", "next_frame", "next_obs", "obs", "obs_frame"]
        np.testing.assert_array_equal(newest["obs"], everything["obs"][-limit:])
        ids = decode(newest["frames/front"])[0]
        np.testing.assert_array_equal(ids[newest["obs_frame"]], newest["obs"][:, 0])
        np.testing.assert_array_equal(ids[newest["next_frame"]], newest["next_obs"][:, 0])
        # Reading starts at the chunk where the newest rows begin (the chunks before are only counted).
        assert len(parts[0]["obs"]) > 0


# ---------------------------------------------------------------- crash safety: a real kill


def write_until_killed(path: str, die_in_commit: int) -> None:
    """A writer process: reopen, then append a's and b's next chunks and commit, forever. With
    ``die_in_commit`` > 0 it SIGKILLs itself inside that commit, after its rows and frames are
    written and before its record is (the moment a kill hurts most)."""
    from o2o.datasets import store_format

    store = ReplayStore.open(path, "a")
    real_write = store_format.write_atomic

    def write_record(target, text, fsync=True):
        if store.commits + 1 == die_in_commit:
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(target, text, fsync=fsync)

    store_format.write_atomic = write_record
    while True:
        for actor in ("a", "b"):
            store.append(make_chunk(actor, store.expected_seq(actor)))
        store.commit()


def check_after_kill(path) -> int:
    """What a store left by a killed writer shows: the committed rows, each actor's chunks in order,
    and the committed frames only, every row seeing its own."""
    store = ReplayStore.open(path, "r")
    rows = store.read()
    assert len(rows["frames/front"]) <= committed_frames(path)
    for code, actor in enumerate(store.actor_ids):
        n = store.committed_seq(actor) + 1
        mine = rows["obs"][rows["actor"] == code, 0]
        np.testing.assert_array_equal(mine, np.concatenate([make_chunk(actor, s).obs[:, 0] for s in range(n)]))
    check_rows_see_their_frames(rows)
    return len(store)


def test_a_writer_killed_mid_commit_leaves_the_last_commit_and_the_next_continues(tmp_path):
    path = tmp_path / "replay"
    new_store(tmp_path).close()
    writer = SPAWN.Process(target=write_until_killed, args=(str(path), 3), daemon=True)
    writer.start()
    writer.join(120)
    assert writer.exitcode == -signal.SIGKILL, "the writer did not die in its third commit"
    # Commits 1 and 2 made 2 chunks of each actor: 20 rows; a and b 12 frames each (6 + 7, one shared).
    assert check_after_kill(path) == 20 and committed_frames(path) == 24
    found = check_store(path)
    assert not found.problems and "past the commit" in found.leftovers  # commit 3's frames and rows
    assert any(line.startswith("frames: 24 per camera") for line in found.checked)
    # The next writer continues cleanly: chunk 2 of each actor begins with a committed frame.
    store = ReplayStore.open(path, "a")
    for actor in ("a", "b"):
        store.append(make_chunk(actor, 2))
    store.close()
    assert check_after_kill(path) == 30 and committed_frames(path) == 24 + 2 * 6
    assert check_store(path).ok


def test_writers_killed_at_random_moments_never_lose_committed_rows_or_frames(tmp_path):
    path = tmp_path / "replay"
    new_store(tmp_path).close()
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(3):
        writer = SPAWN.Process(target=write_until_killed, args=(str(path), 0), daemon=True)
        writer.start()
        while len(ReplayStore.open(path, "r")) <= (lengths[-1] if lengths else 0):
            writer.join(0.02)
            assert writer.exitcode is None, "the writer died on its own"
        writer.join(rng.uniform(0.0, 0.2))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        lengths.append(check_after_kill(path))
        assert not check_store(path).problems
    assert lengths == sorted(lengths)
    repair_store(path)
    assert check_store(path).ok


# ---------------------------------------------------------------- store check and export


def test_the_store_check_finds_a_row_pointing_past_the_frames(tmp_path):
    store = new_store(tmp_path)
    for seq in range(3):
        store.append(make_chunk("a", seq))
    store.close()
    found = check_store(tmp_path / "replay")
    assert found.ok, (found.problems, found.leftovers)
    nexts = zarr.open_array(str(tmp_path / "replay" / "data" / "next_frame"), mode="r+")
    nexts[6] = 18  # 18 frames are committed (6 + 6 + 6): 18 is none of them
    found = check_store(tmp_path / "replay")
    assert any("a next_frame outside the 18 committed frames (first rows: [6], values [18])" in p
               for p in found.problems["frames"])  # fmt: skip
    # Row 6 ended episode 0: its next frame (the episode's final one) was no other row's.
    assert any("1 committed frames are no row's" in p for p in found.problems["frames"])


def test_an_image_store_exports_to_minari_and_loads_back(tmp_path):
    """A camera task's store (spec read from the task's env) -> Minari (Dict observations written by
    Minari's writer, JPEG) -> ``load_transitions``: the same rows, frames within JPEG error."""
    from o2o.datasets.data_settings import DataSettings
    from o2o.datasets.minari_io import load_transitions
    from o2o.datasets.replay_export import export_minari
    from o2o.envs import get_task

    task = get_task("pointmaze-umaze-pixels")
    store = ReplayStore.create_for_task(tmp_path / "replay", task.name, fsync=False)
    spec = store.obs_spec
    assert spec == ObsSpec(2, (CameraSpec("top", 48, 48, 3),))

    def grey(chunk):  # JPEG keeps a flat grey frame: its level encodes the id (ids differ by 1: x 5)
        ids = decode(chunk.frames["front"])[0]
        frames = np.broadcast_to(((ids * 5) % 250)[:, None, None, None], (len(ids), 48, 48, 3)).astype(np.uint8)
        return TransitionChunk(**{**chunk.__dict__, "action": np.zeros((chunk.n, 2), np.float32), "frames": {"top": frames}})

    for seq in range(4):
        store.append(grey(make_chunk("a", seq)))
    store.commit()
    export_minari(store, "o2o/test/image-replay-v0")
    data = load_transitions("o2o/test/image-replay-v0", task, DataSettings())
    assert len(data) == 14 and set(data.frames) == {"top"}  # a's two ended episodes; the open one is not exported
    np.testing.assert_array_equal(data.obs[:, 0], frame_id("a", np.arange(14) // 7, np.arange(14) % 7))
    assert data.frames["top"].shape == (16, 48, 48, 3) and data.frames["top"].dtype == np.uint8
    for index, state in ((data.obs_frame, data.obs), (data.next_frame, data.next_obs)):
        want = (state[:, 0].astype(np.int64) * 5) % 250
        got = data.frames["top"][index].astype(np.int64)
        assert np.abs(got - want[:, None, None, None]).max() <= 2  # JPEG's error on flat frames


def test_frame_chunk_files_are_byte_for_byte_what_zarr_itself_writes(tmp_path):
    from test_replay_store import assert_chunks_as_zarr_writes

    store = new_store(tmp_path)  # frames in zstd chunks of 4, rows in chunks of 8
    for seq in range(5):
        for actor in ("a", "b"):
            store.append(make_chunk(actor, seq))
        store.commit()
    store.close()
    assert_chunks_as_zarr_writes(tmp_path / "replay", ("data", "episodes", "frames"))
