"""``o2o-store check PATH [--repair]``: verify a replay store; remove what a killed commit left.

``check`` reads what the commit record trusts (see replay_store.py) and verifies:

* columns: every column of ``data/`` and ``episodes/`` is there with the store's dtype,
  row shape and chunking, at least as long as the committed counts, each committed chunk
  readable; observations, actions and rewards finite;
* actors: unique ids and valid seqs in the record, every row's actor code in the table,
  a seq for every actor with rows;
* episodes: start/end rows inside the committed rows, valid actor codes; the rows of each
  episode (closed, or open in the record) are those of its actor and episode id from its
  start row to its end row, as many as its length, and every row is in exactly one;
  steps 0..length-1 where contiguous; end flags and returns as its rows say;
* MC returns: finite exactly on the rows of ended contiguous episodes, and equal to the
  ones recomputed from the raw rewards with the store's settings (``mc_return.py``);
* interventions (HIL-SERL): every ``intervention`` flag 0 or 1, and how many rows the operator
  acted; a store made before the column existed has none (its rows read as 0);
* frames (camera stores): each camera's ``frames/<camera>`` uint8 with the recorded (H, W, C),
  as long as the record's frame count, every committed chunk decoding; every row's observation
  and next frame present (inside the committed frames), every committed frame used by a row;
* leftovers of a commit killed before its record: values past the committed counts (in
  the last chunk, or chunk files past it), MC returns on rows of episodes still open,
  temporary files. They are harmless (nobody trusts them) and reported so that
  ``--repair`` can remove them; it never changes a committed value, holds the writer
  lock meanwhile (refusing while a writer has the store open), then checks again.

Exit status: 0 fine, 1 problems or leftovers found, 2 not a store, or a writer holds it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import zarr

from .file_lock import is_locked, try_lock
from .mc_return import trajectory_return_to_go
from .replay_store import (
    COMMIT_FILE,
    EPISODE_CHUNK_ROWS,
    EPISODE_COLUMNS,
    LATER_COLUMNS,
    LOCK_FILE,
    ReplayStore,
    StoreError,
    row_columns,
    temp_files,
)
from .store_frames import FRAMES_GROUP, frame_columns
from .zarr_table import ColumnSpec, fsync_files

MAX_LISTED = 20  # problems listed per kind; the rest are counted
MC_RTOL = 1e-5  # the store computes them with the same code: this only absorbs float noise
READ_CHUNKS = 16  # committed rows are read this many Zarr chunks at a time
FINITE_COLUMNS = ("obs", "action", "next_obs", "reward")  # the wire refuses NaN and inf in these


class Findings:
    """What was checked, problems in committed data, and repairable leftovers (by kind)."""

    def __init__(self):
        self.checked: list[str] = []
        self.problems: dict[str, list[str]] = {}
        self.leftovers: dict[str, list[str]] = {}

    def problem(self, kind: str, message: str) -> None:
        self.problems.setdefault(kind, []).append(message)

    def leftover(self, kind: str, message: str) -> None:
        self.leftovers.setdefault(kind, []).append(message)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.leftovers


def writer_holds(path: Path) -> bool:
    """Whether a writer has the store open (holds the flock on writer.lock)."""
    return is_locked(path / LOCK_FILE)


def _tables(store: ReplayStore, record: dict) -> list[tuple[str, dict[str, ColumnSpec], int, int]]:
    cfg = store.config
    tables = [
        ("data", row_columns(cfg.obs_dim, cfg.action_dim, cfg.obs_spec), cfg.chunk_rows, record["rows"]),
        ("episodes", EPISODE_COLUMNS, EPISODE_CHUNK_ROWS, record["episodes"]),
    ]
    if cfg.cameras:  # the frame count is checked like the rows' (a record without one fails to open)
        tables.append((FRAMES_GROUP, frame_columns(cfg.obs_spec), cfg.frame_chunk, record["frames"]))
    return tables


def _is_fill(values: np.ndarray, spec: ColumnSpec) -> np.ndarray:
    """Per row: every value equals the column's fill value (NaN for MC returns)."""
    same = np.isnan(values) if isinstance(spec.fill, float) and math.isnan(spec.fill) else values == spec.fill
    return same.reshape(len(values), -1).all(axis=1)


def _open(path: Path) -> tuple[ReplayStore, dict]:
    """The store (its format, version and config checked) and the one record every check uses."""
    if not path.is_dir():
        raise StoreError(f"{path} does not exist or is not a folder")
    try:
        store = ReplayStore.open(path, "r")
        record = json.loads((path / COMMIT_FILE).read_text())
        return store, record
    except (OSError, ValueError, KeyError, TypeError) as err:  # a torn or hand-edited record, metadata
        raise StoreError(f"{path} cannot be opened as a replay store ({type(err).__name__}: {err})") from None


def check_store(path: str | os.PathLike) -> Findings:
    """Check a store; raises StoreError if ``path`` is not one (or cannot be opened)."""
    path = Path(path)
    store, record = _open(path)
    found = Findings()
    live = writer_holds(path)
    rows, n_episodes, actors = record["rows"], record["episodes"], record["actors"]
    cfg = store.config
    cameras = f", cameras {cfg.obs_spec.to_dict()['cameras']}: {record['frames']:,} frames" if cfg.cameras else ""
    found.checked.append(
        f"commit {record['commit']}: {rows:,} rows, {n_episodes:,} closed episodes, {len(actors)} actors "
        f"(obs_dim {cfg.obs_dim}, action_dim {cfg.action_dim}, chunk_rows {cfg.chunk_rows}, {cfg.data}, "
        f"failure_reward {cfg.failure_reward}{cameras}){'; a writer has it open' if live else ''}"
    )
    group = zarr.open_group(str(path), mode="r")
    cols = _check_columns(group, store, record, found)
    if cols is None:
        return found  # columns missing or unreadable: the rest would only repeat that
    data, episodes = cols
    if cfg.cameras:
        _check_frame_indices(data, record["frames"], found)
    _check_interventions(data, rows, found)
    open_episodes = _check_actors(data, actors, rows, found)
    _check_episodes(store, data, episodes, open_episodes, len(actors), found, live)
    if live:
        found.checked.append("leftovers past the commit: not checked, a writer has the store open (a commit "
                             "may be in progress)")  # fmt: skip
    else:
        _find_leftovers(path, group, store, record, found)
    return found


def _check_columns(group, store: ReplayStore, record: dict, found: Findings):
    """Shapes, dtypes, lengths of every column; reads the committed rows (big ones in blocks)."""
    out = {}
    for table, specs, chunk_rows, count in _tables(store, record):
        values = out[table] = {}
        if table not in group:
            found.problem("columns", f"the group {table}/ is missing")
            continue
        for name, spec in specs.items():
            where = f"{table}/{name}"
            if name not in group[table]:
                if name not in LATER_COLUMNS:  # a store made before a later column: its rows read the fill
                    found.problem("columns", f"{where} is missing")
                continue
            arr = group[table][name]
            if arr.dtype != np.dtype(spec.dtype) or arr.shape[1:] != spec.shape or arr.chunks[0] != chunk_rows:
                found.problem("columns", f"{where} is {arr.dtype} rows {arr.shape[1:]} in chunks of {arr.chunks[0]}; "
                              f"expected {spec.dtype} rows {spec.shape} in chunks of {chunk_rows}")  # fmt: skip
                continue
            if arr.shape[0] < count and name not in LATER_COLUMNS:  # later ones: rows of older writers
                found.problem("columns", f"{where} holds {arr.shape[0]:,} rows on disk, the commit record says {count:,}")
                continue
            blocks = []
            for start in range(0, count, READ_CHUNKS * chunk_rows):
                stop = min(count, start + READ_CHUNKS * chunk_rows)
                try:
                    block = arr[start:stop]
                except Exception as err:  # a torn or corrupt chunk: the codec's own error type
                    found.problem("columns", f"{where}: rows {start:,}..{stop - 1:,} cannot be read "
                                  f"({type(err).__name__}: {err})")  # fmt: skip
                    break
                if len(block) < stop - start:  # a later column shorter than the rows: the rest reads the fill
                    block = np.concatenate([block, np.full((stop - start - len(block), *spec.shape), spec.fill,
                                                           spec.dtype)])  # fmt: skip
                if name in FINITE_COLUMNS and not np.isfinite(block).all():
                    bad = start + int(np.flatnonzero(~np.isfinite(block.reshape(len(block), -1)).all(axis=1))[0])
                    found.problem("values", f"{where}: row {bad:,} holds NaN or inf")
                if spec.shape == ():  # the episode checks need the one-value columns whole
                    blocks.append(block)
            if spec.shape == ():
                values[name] = np.concatenate(blocks) if blocks else np.zeros(0, spec.dtype)
    n_columns = sum(len(specs) for _, specs, _, _ in _tables(store, record))
    found.checked.append(f"columns: {n_columns} columns read up to the committed counts (dtype, row shape, chunks, "
                         "length on disk, every committed chunk decodes; obs, action, next_obs, reward finite)")  # fmt: skip
    if "columns" in found.problems:
        return None
    return out["data"], out["episodes"]


def _check_frame_indices(data: dict, n_frames: int, found: Findings) -> None:
    """Every row's observation and next frame inside the committed frames; every frame used."""
    used = np.zeros(n_frames, bool)
    for name in ("obs_frame", "next_frame"):
        index = data[name]
        outside = np.flatnonzero((index < 0) | (index >= n_frames))
        if len(outside):
            found.problem("frames", f"{len(outside):,} rows have a {name} outside the {n_frames:,} committed frames "
                          f"(first rows: {outside[:5].tolist()}, values {index[outside[:5]].tolist()})")  # fmt: skip
        used[index[(index >= 0) & (index < n_frames)]] = True
    unused = np.flatnonzero(~used)
    if len(unused):
        found.problem("frames", f"{len(unused):,} committed frames are no row's observation or next observation "
                      f"(first: {unused[:5].tolist()})")  # fmt: skip
    found.checked.append(f"frames: {n_frames:,} per camera; every row's obs_frame and next_frame inside them, "
                         "every frame used by a row")  # fmt: skip


def _check_interventions(data: dict, rows: int, found: Findings) -> None:
    """The operator's rows (HIL-SERL): flags 0 or 1, counted."""
    flags = data.get("intervention")
    if flags is None:
        found.checked.append("interventions: no intervention column (a store made before they were recorded): "
                             "every row reads 0")  # fmt: skip
        return
    bad = np.flatnonzero(flags > 1)
    if len(bad):
        found.problem("values", f"data/intervention: {len(bad):,} rows hold a flag other than 0 or 1 (first rows: "
                      f"{bad[:5].tolist()}, values {flags[bad[:5]].tolist()})")  # fmt: skip
    n = int((flags == 1).sum())
    found.checked.append(f"interventions: {n:,} of {rows:,} rows acted by the operator ({n / max(rows, 1):.1%}); "
                         "every flag 0 or 1")  # fmt: skip


def _check_actors(data: dict, actors: list, rows: int, found: Findings) -> list[dict]:
    """The record's actor table; returns its open episodes as episode-table-like dicts."""
    ids = [a.get("id") for a in actors]
    if len(set(ids)) != len(ids) or not all(isinstance(i, str) and i for i in ids):
        found.problem("actors", f"actor ids must be unique non-empty strings: {ids[:MAX_LISTED]}")
    codes, counts = np.unique(data["actor"], return_counts=True)
    for code in codes[(codes < 0) | (codes >= len(actors))]:
        found.problem("actors", f"rows name actor code {code}, the record knows codes 0..{len(actors) - 1}")
    with_rows = dict(zip(codes.tolist(), counts.tolist()))
    open_episodes = []
    for code, actor in enumerate(actors):
        seq = actor.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < -1:
            found.problem("actors", f"actor {actor.get('id')!r}: seq {seq!r} is not an int >= -1")
        elif seq < 0 and with_rows.get(code):
            found.problem("actors", f"actor {actor.get('id')!r} has {with_rows[code]:,} rows but no committed seq")
        episode = actor.get("episode")
        if episode:
            end = episode.get("end_row", rows - 1)
            length = episode.get("length")
            open_episodes.append({"actor": code, "episode_id": episode["episode_id"], "start_row": episode["start_row"],
                                  "end_row": end, "length": length})  # fmt: skip
    found.checked.append(f"actors: {len(actors)} in the record ({len(with_rows)} with rows, "
                         f"{len(open_episodes)} with an open episode); every row's actor code known")  # fmt: skip
    return open_episodes


def _check_episodes(store, data: dict, episodes: dict, open_episodes: list[dict], n_actors: int, found: Findings,
                    live: bool) -> None:  # fmt: skip
    cfg = store.config
    rows = len(data["actor"])
    n_closed = len(episodes["actor"])
    # Closed episodes, then the record's open ones, as columns.
    ep = {k: np.concatenate([np.asarray(episodes[k], np.int64), np.array([e[k] for e in open_episodes], np.int64)])
          for k in ("actor", "episode_id", "start_row", "end_row")}  # fmt: skip
    open_length = [-1 if e["length"] is None else e["length"] for e in open_episodes]  # -1: an older record
    length = np.concatenate([episodes["length"].astype(np.int64), np.array(open_length, np.int64)])
    is_open = np.arange(len(length)) >= n_closed

    def name(i: int) -> str:
        what = "open episode" if is_open[i] else f"episode {i}"
        rows_of = f"rows {ep['start_row'][i]}..{ep['end_row'][i]}"
        return f"{what} (actor {ep['actor'][i]}, episode_id {ep['episode_id'][i]}, {rows_of})"

    inside = (ep["start_row"] >= 0) & (ep["start_row"] <= ep["end_row"]) & (ep["end_row"] < rows)
    for i in np.flatnonzero(~inside):
        found.problem("episodes", f"{name(i)}: start/end rows outside the {rows:,} committed rows")
    valid_actor = (ep["actor"] >= 0) & (ep["actor"] < n_actors)
    for i in np.flatnonzero(~valid_actor):
        found.problem("episodes", f"{name(i)}: invalid actor code")
    # Each row belongs to the episode of its (actor, episode_id) that starts last at or before it.
    keys = np.rec.fromarrays([np.concatenate([data["actor"], ep["actor"]]).astype(np.int64),
                              np.concatenate([data["episode_id"], ep["episode_id"]])])  # fmt: skip
    _, group = np.unique(keys, return_inverse=True)
    group = group.ravel().astype(np.int64)
    row_group, ep_group = group[:rows], group[rows:]
    span = rows + 1
    ep_key = ep_group * span + np.clip(ep["start_row"], 0, rows)
    order = np.argsort(ep_key, kind="stable")
    at = np.searchsorted(ep_key[order], row_group * span + np.arange(rows), side="right") - 1
    owner = np.full(rows, -1)
    if len(order):
        candidate = order[np.maximum(at, 0)]
        owned = (at >= 0) & (ep_group[candidate] == row_group) & (np.arange(rows) <= ep["end_row"][candidate])
        owner[owned] = candidate[owned]
    stray = np.flatnonzero(owner < 0)
    if len(stray):
        found.problem("episodes", f"{len(stray):,} rows belong to no episode of their actor and episode id "
                      f"(first rows: {stray[:5].tolist()})")  # fmt: skip
    counts = np.bincount(owner[owner >= 0], minlength=len(length))
    for i in np.flatnonzero(inside & valid_actor):
        if length[i] >= 0 and counts[i] != length[i]:
            found.problem("episodes", f"{name(i)}: {counts[i]:,} rows of its actor and episode id, "
                          f"its length says {length[i]:,}")  # fmt: skip
        elif owner[ep["start_row"][i]] != i or owner[ep["end_row"][i]] != i:
            found.problem("episodes", f"{name(i)}: its start or end row belongs to another actor or episode")
    # Per episode, its rows in order: steps, end flags, return, MC returns.
    by_owner = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[by_owner], np.arange(len(length) + 1))
    mc = data["mc_return"]
    finite = np.isfinite(mc)
    expect_mc = np.zeros(rows, bool)
    n_mc = n_ended = 0
    for i in range(n_closed):
        idx = by_owner[bounds[i] : bounds[i + 1]]
        if not len(idx) or counts[i] != length[i]:
            continue
        last = idx[-1]
        contiguous, ended = bool(episodes["contiguous"][i]), bool(episodes["ended"][i])
        if contiguous and not np.array_equal(data["step"][idx], np.arange(len(idx))):
            found.problem("episodes", f"{name(i)}: marked contiguous, but its steps are not 0..{len(idx) - 1}")
        done = bool(data["terminated"][last] or data["truncated"][last])
        if ended != done or (ended and bool(episodes["terminated"][i]) != bool(data["terminated"][last])):
            row_flags = f"terminated={bool(data['terminated'][last])}, truncated={bool(data['truncated'][last])}"
            found.problem("episodes", f"{name(i)}: ended={ended}, terminated={bool(episodes['terminated'][i])}, "
                          f"but its last row has {row_flags}")  # fmt: skip
        total = float(data["reward"][idx].astype(np.float64).sum())
        if not math.isclose(total, float(episodes["return"][i]), rel_tol=1e-9, abs_tol=1e-6):
            found.problem("episodes", f"{name(i)}: return {episodes['return'][i]!r}, its rows' rewards sum to {total!r}")
        if not (ended and contiguous):
            continue
        n_ended += 1
        expect_mc[idx] = True
        terminals = np.zeros(len(idx), np.float32)
        terminals[-1] = float(episodes["terminated"][i])
        want = trajectory_return_to_go(cfg.data.scale(data["reward"][idx]), terminals, cfg.data.discount,
                                       cfg.scaled_failure_reward, cfg.data.mc_infinite_horizon)  # fmt: skip
        got = mc[idx]
        bad = ~np.isclose(got, want, rtol=MC_RTOL, atol=MC_RTOL)
        n_mc += len(idx)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            found.problem("mc_return", f"{name(i)}: {int(bad.sum())} of {len(idx)} MC returns differ from the ones "
                          f"recomputed from its rewards (first: row {idx[k]:,} holds {got[k]!r}, "
                          f"expected {want[k]!r})")  # fmt: skip
    # Every other row NaN. MC returns on rows of an episode the record holds open are what a
    # commit killed after its data writes leaves (or, with a writer live, one in progress).
    open_rows = np.isin(owner, np.flatnonzero(is_open))
    unexpected = finite & ~expect_mc
    wrong = np.flatnonzero(unexpected & ~open_rows)
    if len(wrong):
        found.problem("mc_return", f"{len(wrong):,} rows hold an MC return, but their episode is not an ended "
                      f"contiguous one (first rows: {wrong[:5].tolist()})")  # fmt: skip
    stale = np.flatnonzero(unexpected & open_rows)
    if len(stale) and not live:
        found.leftover("mc_return", f"{len(stale):,} rows of episodes still open hold MC returns (first rows: "
                       f"{stale[:5].tolist()}): a commit killed after its data writes wrote them")  # fmt: skip
    found.checked.append(
        f"episodes: {n_closed:,} closed + {len(open_episodes)} open; rows inside the commit, actor codes, every row in "
        f"exactly one episode of its actor and episode id, lengths, steps, end flags, returns"
    )
    found.checked.append(
        f"mc_return: {n_mc:,} rows of {n_ended:,} ended contiguous episodes recomputed from the raw rewards "
        f"(rtol {MC_RTOL:g}); the other {rows - n_mc:,} rows NaN"
    )


def _chunk_entries(array_dir: Path) -> list[tuple[int, Path]]:
    """(first-axis chunk index, file or folder) of every chunk zarr wrote for an array."""
    root = array_dir / "c"
    if not root.is_dir():
        return []
    return [(int(p.name), p) for p in root.iterdir() if p.name.isdigit()]


def _find_leftovers(path: Path, group, store, record, found: Findings) -> None:
    for table, specs, chunk_rows, count in _tables(store, record):
        first_free = -(-count // chunk_rows)
        files, columns, last = 0, 0, count
        for name, spec in specs.items():
            if name not in group[table]:  # a later column of an older store
                continue
            arr = group[table][name]
            files += sum(1 for i, _ in _chunk_entries(path / table / name) if i >= first_free)
            stop = min(first_free * chunk_rows, arr.shape[0])
            written = np.flatnonzero(~_is_fill(arr[count:stop], spec)) if stop > count else []
            if len(written):
                columns += 1
                last = max(last, count + int(written[-1]))
        if columns:
            found.leftover("past the commit", f"{table}/: {columns} columns hold values in rows {count:,}..{last:,} of "
                           f"their last chunk, past the committed {count:,}")  # fmt: skip
        if files:
            found.leftover("past the commit", f"{table}/: {files} chunk files past the committed {count:,} rows")
    temps = temp_files(path)
    if temps:
        names = ", ".join(str(p.relative_to(path)) for p in temps[:5]) + (" ..." if len(temps) > 5 else "")
        found.leftover("temp files", f"{len(temps)} temporary files of interrupted writes: {names}")
    found.checked.append("leftovers: values and chunk files past the committed counts, MC returns on open "
                         "episodes' rows, temporary files")  # fmt: skip


def repair_store(path: str | os.PathLike) -> list[str]:
    """Remove the leftovers ``check_store`` reports (never a committed value); returns what
    was done. Raises StoreError while a writer has the store open."""
    path = Path(path)
    store, _ = _open(path)
    fd = try_lock(path / LOCK_FILE, write=False)
    if fd is None:
        raise StoreError(f"{path} is open for writing by another process: stop it (the learner) before --repair; "
                         "a writer keeps the store consistent itself")  # fmt: skip
    try:
        record = json.loads((path / COMMIT_FILE).read_text())  # under the lock: no commit can follow
        group = zarr.open_group(str(path), mode="r+")
        done, written = [], []
        for temp in temp_files(path):
            temp.unlink()
            written.append(temp)
            done.append(f"removed {temp.relative_to(path)}")
        for table, specs, chunk_rows, count in _tables(store, record):
            first_free = -(-count // chunk_rows)
            for name, spec in specs.items():
                if name not in group[table]:  # a later column of an older store
                    continue
                arr = group[table][name]
                for i, entry in _chunk_entries(path / table / name):
                    if i >= first_free:  # wholly past the commit
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                        written.append(entry)
                        done.append(f"removed chunk {i} of {table}/{name} (past the committed {count:,} rows)")
                stop = min(first_free * chunk_rows, arr.shape[0])
                if stop > count and not _is_fill(arr[count:stop], spec).all():
                    # Rewrite the last chunk: committed rows as they are, the rest the fill value.
                    base = (count // chunk_rows) * chunk_rows
                    block = arr[base:stop]
                    block[count - base :] = spec.fill
                    arr[base:stop] = block
                    key = arr.metadata.encode_chunk_key((count // chunk_rows,) + (0,) * len(spec.shape))
                    written.append(path / table / name / key)
                    done.append(f"reset rows {count:,}..{stop - 1:,} of {table}/{name} (past the commit)")
        done += _clear_open_mc_returns(path, group, record, written)
        fsync_files(written, path)
        return done
    finally:
        os.close(fd)


def _clear_open_mc_returns(path: Path, group, record: dict, written: list[Path]) -> list[str]:
    """NaN for the MC returns an interrupted commit wrote on rows of episodes the record holds
    open (what a reopening writer does, see ``EpisodeTracker.rebuild``)."""
    rows = record["rows"]
    arr = group["data"]["mc_return"]
    actor, episode_id = group["data"]["actor"][:rows], group["data"]["episode_id"][:rows]
    done = []
    for code, state in enumerate(record["actors"]):
        episode = state.get("episode")
        if not episode:
            continue
        start = episode["start_row"]
        mine = start + np.flatnonzero((actor[start:] == code) & (episode_id[start:] == episode["episode_id"]))
        stale = mine[np.isfinite(arr.get_coordinate_selection(mine))] if len(mine) else mine
        if len(stale):
            arr.set_coordinate_selection(stale, np.full(len(stale), np.nan, np.float32))
            chunks = np.unique(stale // arr.chunks[0])
            written += [path / "data" / "mc_return" / arr.metadata.encode_chunk_key((int(c),)) for c in chunks]
            done.append(f"cleared {len(stale):,} MC returns on rows of actor {state['id']!r}'s open episode")
    return done


def _print_findings(path: Path, found: Findings) -> None:
    print(f"o2o replay store {path}")
    for line in found.checked:
        print(f"  checked {line}")
    for title, groups in (("PROBLEM", found.problems), ("LEFTOVER", found.leftovers)):
        for kind, messages in groups.items():
            for message in messages[:MAX_LISTED]:
                print(f"  {title} [{kind}] {message}")
            if len(messages) > MAX_LISTED:
                print(f"  {title} [{kind}] ... and {len(messages) - MAX_LISTED} more")
    n_problems = sum(map(len, found.problems.values()))
    n_leftovers = sum(map(len, found.leftovers.values()))
    if found.ok:
        print("OK: every check passed")
    else:
        print(f"NOT OK: {n_problems} problems in committed data, {n_leftovers} leftovers past the commit")
        if n_leftovers:
            print("  leftovers are harmless (no reader trusts them); `o2o-store check --repair PATH` removes them")
        if n_problems:
            print("  problems are in committed data: --repair does not change it; restore the store from a backup "
                  "or export the rows you trust")  # fmt: skip


def cmd_check(args) -> int:
    path = Path(args.path)
    try:
        if args.repair:
            done = repair_store(path)
            for line in done:
                print(f"repair: {line}")
            print(f"repair: {'done' if done else 'nothing to remove'}; checking")
        found = check_store(path)
    except StoreError as err:
        print(f"o2o-store: {err}", file=sys.stderr)
        return 2
    _print_findings(path, found)
    return 0 if found.ok else 1


def cmd_export(args) -> int:
    from .replay_export import export_minari  # minari's writer, only for this command

    try:
        store = ReplayStore.open(args.path, "r")
    except (StoreError, FileNotFoundError) as err:
        print(f"o2o-store: {args.path}: {err}", file=sys.stderr)
        return 2
    try:
        dataset = export_minari(store, args.dataset_id, args.task, include_eval=args.include_eval)
    except ValueError as err:  # no complete episode, an id that exists, ...
        print(f"o2o-store: {err}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"wrote {args.dataset_id}: {dataset.total_episodes} episodes, {dataset.total_steps} steps")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="o2o-store", description="Inspect o2o replay stores.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="verify a replay store (exit 0 fine, 1 problems or leftovers, 2 not a store)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    check.add_argument("path", help="the store folder")
    check.add_argument("--repair", action="store_true",
                       help="first remove leftovers past the last commit and temp files (never committed data)")  # fmt: skip
    check.set_defaults(func=cmd_check)
    export = sub.add_parser("export", help="write a store's complete episodes as a Minari dataset (e.g. a robot's "
                            "demonstrations, to pretrain on)")  # fmt: skip
    export.add_argument("path", help="the store folder")
    export.add_argument("dataset_id", help="the Minari id to write, e.g. o2o/my-task/demos-v0 (under MINARI_DATASETS_PATH)")
    export.add_argument("--task", help="the o2o task (default: the store's)")
    export.add_argument("--include-eval", action="store_true", help="also the actors' deterministic eval episodes")
    export.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
