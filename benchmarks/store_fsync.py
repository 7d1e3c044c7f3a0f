"""What durability costs: replay store commits with fsync on (the default) vs off.

Run from the repository root:

    python -m benchmarks.store_fsync              # writes the 'store_fsync' section of BENCHMARKS.md
    python -m benchmarks.store_fsync --no-write   # print only

One process appends 1000-row chunks (obs 17, action 6: the ingest benchmark's rows;
200-step episodes, random-walk observations) to a real ``ReplayStore`` in a folder under
the repository (``.bench/``, the repository's disk, not a tmpfs) and commits every
``commit_rows`` rows: 1000 (a commit per chunk, what a lightly loaded learner does every
50 ms) and 32768 (one full Zarr chunk, group commit under load). The two settings run
interleaved (off, on, on, off, ...) in the same run; each figure is the median of the
repeats. rows/s counts append + commit time; ms per commit is the median commit() call.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from o2o.datasets.replay_store import ReplayStore
from o2o.datasets.rows import TransitionChunk

ROOT = Path(__file__).resolve().parent.parent
OBS_DIM, ACT_DIM, CHUNK, EPISODE_LEN = 17, 6, 1000, 200


def make_chunks(total_rows: int, seed: int = 0) -> list[TransitionChunk]:
    rng = np.random.default_rng(seed)
    obs = np.cumsum(rng.normal(0, 0.05, (total_rows + 1, OBS_DIM)), axis=0).astype(np.float32)
    chunks = []
    for seq, start in enumerate(range(0, total_rows, CHUNK)):
        step = np.arange(start, start + CHUNK) % EPISODE_LEN
        last = step == EPISODE_LEN - 1
        chunks.append(TransitionChunk(
            actor_id="bench", seq=seq, policy_version=0, episode_id=start // EPISODE_LEN, step=int(step[0]),
            obs=obs[start:start + CHUNK], action=rng.uniform(-1, 1, (CHUNK, ACT_DIM)).astype(np.float32),
            reward=rng.normal(size=CHUNK).astype(np.float32), next_obs=obs[start + 1:start + CHUNK + 1],
            terminated=np.zeros(CHUNK, np.uint8), truncated=last.astype(np.uint8), success=np.zeros(CHUNK, np.uint8),
        ))  # fmt: skip
    return chunks


def run_once(folder: Path, chunks: list[TransitionChunk], commit_rows: int, fsync: bool) -> dict:
    path = folder / f"replay-{'on' if fsync else 'off'}"
    store = ReplayStore.create(path, OBS_DIM, ACT_DIM, fsync=fsync)
    commit_s = []
    t0 = time.perf_counter()
    for chunk in chunks:
        store.append(chunk)
        if store.staged_rows >= commit_rows:
            t = time.perf_counter()
            store.commit()
            commit_s.append(time.perf_counter() - t)
    store.commit()
    elapsed = time.perf_counter() - t0
    rows = len(store)
    store.close()
    shutil.rmtree(path)
    return {"rows_per_s": rows / elapsed, "ms_per_commit": 1e3 * statistics.median(commit_s), "commits": len(commit_s)}


def file_system(folder: Path) -> str:
    """Device and type of the mount holding ``folder`` (from /proc/mounts)."""
    best = ("?", "?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, point, kind = line.split()[:3]
        if str(folder.resolve()).startswith(point) and len(point) >= len(best[2]):
            best = (device, kind, point)
    return f"{best[1]} on {best[0]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit-rows", default="1000,32768", help="comma-separated rows per commit")
    parser.add_argument("--rows", type=int, default=200_000, help="rows per run (at least 20 commits)")
    parser.add_argument("--repeat", type=int, default=4, help="runs per setting, interleaved")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    (ROOT / ".bench").mkdir(exist_ok=True)
    load_before = os.getloadavg()[0]
    results = []
    for commit_rows in [int(x) for x in args.commit_rows.split(",")]:
        total = max(args.rows, 20 * commit_rows) // CHUNK * CHUNK
        chunks = make_chunks(total)
        runs = {False: [], True: []}
        with tempfile.TemporaryDirectory(prefix="store-fsync-", dir=ROOT / ".bench") as tmp:
            for i in range(args.repeat):
                for fsync in (False, True) if i % 2 == 0 else (True, False):
                    runs[fsync].append(run_once(Path(tmp), chunks, commit_rows, fsync))
            where = file_system(Path(tmp))
        med = {f: {k: statistics.median(r[k] for r in runs[f]) for k in ("rows_per_s", "ms_per_commit")} for f in runs}
        results.append((commit_rows, total, runs[True][0]["commits"], med))
        off, on = med[False], med[True]
        print(f"commit every {commit_rows} rows ({total:,} rows): fsync off {off['rows_per_s']:,.0f} rows/s, "
              f"{off['ms_per_commit']:.2f} ms/commit; on {on['rows_per_s']:,.0f} rows/s, "
              f"{on['ms_per_commit']:.2f} ms/commit; on/off {on['rows_per_s'] / off['rows_per_s']:.2f}")  # fmt: skip
    load_after = os.getloadavg()[0]
    if args.no_write:
        return
    from benchmarks.report import machine_line, write_section

    lines = []
    for rows, total, commits, m in results:
        off, on = m[False], m[True]
        lines.append(
            f"| {rows:,} | {total:,} ({commits} commits) | {off['rows_per_s'] / 1e3:,.0f}k | {on['rows_per_s'] / 1e3:,.0f}k "
            f"| {on['rows_per_s'] / off['rows_per_s']:.2f} | {off['ms_per_commit']:.1f} | {on['ms_per_commit']:.1f} "
            f"| {on['ms_per_commit'] - off['ms_per_commit']:+.1f} |"
        )
    table = "\n".join(lines)
    write_section(
        "store_fsync",
        f"""
## Replay store durability: commits with fsync on (default) vs off

`python -m benchmarks.store_fsync`: one process appends 1000-row chunks (obs 17, action 6) to a
`ReplayStore` under the repository's `.bench/` ({where}, not a tmpfs) and commits every
N rows; fsync off and on interleaved in one run, medians of {args.repeat} runs each.
Machine: {machine_line()}; load average {load_before:.1f} before, {load_after:.1f} after.

| rows per commit | rows per run | fsync off (rows/s) | **fsync on (rows/s)** | on / off | ms per commit, off | on | added by fsync |
|---|---|---|---|---|---|---|---|
{table}

With fsync on, a commit fsyncs the chunk files it rewrote (each column's last chunk, patched older
chunks), resized arrays' `zarr.json` and their folders, concurrently in threads, then the new
`commit.json` before its rename and the store folder after it. A commit per full Zarr chunk (how
`IngestServer` groups commits under load) pays that once per 32768 rows.
""",
    )
    print("wrote the 'store_fsync' section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
