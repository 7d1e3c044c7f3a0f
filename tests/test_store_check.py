"""``o2o-store check [--repair]`` on real stores: a good one, one a killed commit left data past
its record in, a corrupted MC return, a missing path, and a writer holding the store."""

import re
import subprocess
import sys

import numpy as np
import pytest
import zarr

from o2o.datasets.data_settings import DataSettings
from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.store_check import check_store, main
from replay_peers import ACT_DIM, OBS_DIM, make_chunk


def o2o_store(*args) -> subprocess.CompletedProcess:
    """The CLI in its own process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "o2o.datasets.store_check", *map(str, args)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def good_store(tmp_path) -> ReplayStore:
    """Two actors, episodes closed and open across commits, a skipped seq; MC returns with
    settings other than the defaults, so a checker that ignored them would fail."""
    store = ReplayStore.create(tmp_path / "replay", OBS_DIM, ACT_DIM, chunk_rows=64, data=DataSettings(0.9, 2.0, -0.5, True),
                               fsync=False)  # fmt: skip
    for seq in range(5):
        store.append(make_chunk("a", seq))
        if seq < 4:
            store.append(make_chunk("b", seq))
        store.commit()
    store.skip("c", 1)
    store.commit()
    return store  # a: 200 rows (8 episodes), b: 160 rows (6 closed, 1 open): 360 rows, 5 chunks + 40 rows


def test_a_good_store_passes(tmp_path):
    good_store(tmp_path).close()
    done = o2o_store("check", tmp_path / "replay")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: every check passed" in done.stdout
    assert "360 rows, 14 closed episodes, 3 actors" in done.stdout
    assert "mc_return: 350 rows of 14 ended contiguous episodes recomputed" in done.stdout
    assert "1 open" in done.stdout


def test_rows_written_past_the_commit_are_reported_and_removed_by_repair(tmp_path, capsys):
    store = good_store(tmp_path)
    path = store.path
    committed = store.read()
    # A commit killed between its data writes and its record: the chunks are on disk, the
    # record is not. b's open episode closes here, so MC returns of committed rows change too.
    for seq in range(4, 8):
        store.append(make_chunk("b", seq))
    store._rows.flush()
    store._episodes.flush()
    store.close(commit=False)
    (path / ".commit.json.4242.tmp").write_text("{")  # a record the kill left half written
    assert len(ReplayStore.open(path, "r")) == 360  # readers trust the record only

    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"LEFTOVER \[past the commit\] data/: \d+ columns hold values in rows 360\.\.383 of their last chunk", out)
    assert re.search(r"LEFTOVER \[past the commit\] data/: \d+ chunk files past the committed 360 rows", out)
    assert re.search(r"LEFTOVER \[past the commit\] episodes/: \d+ columns hold values in rows 14\.\.19 ", out)
    assert "LEFTOVER [mc_return] 10 rows of episodes still open hold MC returns" in out
    assert "LEFTOVER [temp files] 1 temporary files" in out and "PROBLEM" not in out

    done = o2o_store("check", "--repair", path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "repair: removed .commit.json.4242.tmp" in done.stdout
    assert "repair: cleared 10 MC returns on rows of actor 'b'" in done.stdout
    assert "OK: every check passed" in done.stdout
    reopened = ReplayStore.open(path, "r")
    assert len(reopened) == 360
    for name, values in reopened.read().items():
        np.testing.assert_array_equal(values, committed[name], err_msg=name)
    assert (zarr.open_array(str(path / "data" / "obs"), mode="r")[360:] == 0).all()  # the fill value again
    # The writer goes on from the repaired store as from any other.
    writer = ReplayStore.open(path, "a")
    assert writer.expected_seq("b") == 4
    writer.append(make_chunk("b", 4))
    writer.close()
    assert check_store(path).ok


def test_a_corrupted_mc_return_is_reported_and_not_repaired(tmp_path):
    good_store(tmp_path).close()
    path = tmp_path / "replay"
    mc = zarr.open_array(str(path / "data" / "mc_return"), mode="r+")
    value = float(mc[77])
    mc[77] = value + 0.5
    done = o2o_store("check", path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "PROBLEM [mc_return]" in done.stdout and "row 77 holds" in done.stdout
    assert "1 problems in committed data" in done.stdout
    assert o2o_store("check", "--repair", path).returncode == 1  # committed data is never changed
    assert float(zarr.open_array(str(path / "data" / "mc_return"), mode="r")[77]) == pytest.approx(value + 0.5)


def test_an_episode_whose_rows_belong_to_another_actor_is_reported(tmp_path):
    good_store(tmp_path).close()
    path = tmp_path / "replay"
    zarr.open_array(str(path / "data" / "actor"), mode="r+")[100] = 1 - zarr.open_array(str(path / "data" / "actor"))[100]
    found = check_store(path)
    assert not found.ok and "episodes" in found.problems
    assert any("rows of its actor and episode id, its length says" in p for p in found.problems["episodes"])


def test_a_missing_path_or_a_folder_that_is_no_store_is_a_clear_error(tmp_path):
    done = o2o_store("check", tmp_path / "nowhere")
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr + done.stdout
    (tmp_path / "empty").mkdir()
    done = o2o_store("check", "--repair", tmp_path / "empty")
    assert done.returncode == 2
    assert "is not an o2o replay store" in done.stderr and "Traceback" not in done.stderr + done.stdout


def test_repair_is_refused_while_a_writer_holds_the_store(tmp_path):
    store = good_store(tmp_path)  # open for appending: holds writer.lock
    try:
        done = o2o_store("check", "--repair", store.path)
        assert done.returncode == 2
        assert "open for writing by another process" in done.stderr and "Traceback" not in done.stderr
        done = o2o_store("check", store.path)  # checking a live store is fine
        assert done.returncode == 0, done.stdout + done.stderr
        assert "a writer has it open" in done.stdout and "leftovers past the commit: not checked" in done.stdout
    finally:
        store.close()
