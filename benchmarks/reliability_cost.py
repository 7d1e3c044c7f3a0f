"""What CURVE encryption and store fsync cost the ingest path, side by side in one run.

    python -m benchmarks.reliability_cost              # writes the reliability_cost section of BENCHMARKS.md
    python -m benchmarks.reliability_cost --no-write

One actor's real ``Link`` (its spool on disk) sends ``--chunks`` chunks of 256 rows to a real
``IngestServer`` over loopback TCP into a real ``ReplayStore``; timed until every chunk is acked
(committed). Configurations interleaved over ``--repeats`` rounds: CURVE off/on x fsync off/on at
the default 50 ms group commit, and fsync at longer commit intervals (``o2o-learner
ingest.commit_interval_s=``). The goal (issues 10, 19): each costs under 20% of throughput.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from o2o.actor.seams import PolicyBuilder
from o2o.datasets.replay_store import ReplayStore
from o2o.transport.config import LinkConfig
from o2o.transport.ingest import IngestServer
from o2o.transport.link import Link
from o2o.transport.security import ActorKeys, LearnerKeys, add_actor, init_keys
from o2o.transport.spool import Spool

from .report import machine_line, write_section

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from replay_peers import ACT_DIM, OBS_DIM, make_chunk  # noqa: E402

ROWS = 256


def one_run(root: Path, keys: Path | None, fsync: bool, interval: float, chunks: int) -> float:
    store = ReplayStore.create(root / "replay", OBS_DIM, ACT_DIM, chunk_rows=4096, task="bench", fsync=fsync)
    server = IngestServer(store, "tcp://127.0.0.1:*", commit_interval_s=interval, max_rows_per_s=None,
                          keys=LearnerKeys(keys) if keys else None).start()
    spool = Spool(256, str(root / "spool"), 2**30, 2**24)
    link = Link(server.endpoint, "robot-1", "bench", OBS_DIM, ACT_DIM, spool, PolicyBuilder(None),
                cfg=LinkConfig(max_in_flight=64), keys=ActorKeys(keys / "actors" / "robot-1", "robot-1") if keys else None)
    link.start()
    try:
        assert link.wait_welcome(60), "no welcome"
        frames = [make_chunk("robot-1", seq, rows=ROWS, episode_len=1000) for seq in range(chunks)]
        start = time.perf_counter()
        for chunk in frames:
            while not link.status().room:
                time.sleep(0.001)
            link.add(chunk)
        while link.stats.acked_seq < chunks - 1:
            time.sleep(0.001)
        return chunks * ROWS / (time.perf_counter() - start)
    finally:
        link.close(0)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--versus", metavar="REV", help="also run this script of another commit, one round "
                        "each, interleaved with ours (its tree in a worktree, as benchmarks.versus_commit)")
    args = parser.parse_args()
    if args.versus:
        versus(args)
        return
    load_before = os.getloadavg()[0]
    # (name, CURVE, fsync, commit_interval_s); 0.05 s is the learner's default
    configs = [("open, no fsync", False, False, 0.05), ("CURVE, no fsync", True, False, 0.05),
               ("open, fsync", False, True, 0.05), ("CURVE, fsync", True, True, 0.05),
               ("open, fsync, 200 ms commits", False, True, 0.2), ("CURVE, fsync, 200 ms commits", True, True, 0.2),
               ("open, fsync, 500 ms commits", False, True, 0.5)]  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name, *_ in configs}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        keys = init_keys(Path(tmp) / "keys")
        add_actor(keys, "robot-1")
        for r in range(args.repeats):
            for name, curve, fsync, interval in configs:
                folder = Path(tmp) / f"{r}-{name.replace(' ', '').replace(',', '-')}"
                rates[name].append(one_run(folder, keys if curve else None, fsync, interval, args.chunks))
                print(f"round {r}: {name}: {rates[name][-1]:,.0f} rows/s", flush=True)
    base = statistics.median(rates["open, no fsync"])
    lines = ["| configuration | rows/s (median of rounds) | vs open, no fsync |", "|---|---|---|"]
    for name, *_ in configs:
        median = statistics.median(rates[name])
        lines.append(f"| {name} | {median:,.0f} | {median / base:.2f} |")
    curve = statistics.median(rates["CURVE, no fsync"]) / base
    fsync = statistics.median(rates["open, fsync"]) / base
    slow = statistics.median(rates["open, fsync, 200 ms commits"]) / base

    def met(ratio: float) -> str:
        return f"{1 - ratio:+.0%} cost, {'met' if ratio >= 0.8 else 'NOT met'}"

    verdict = (f"Goal: each costs under 20% of throughput. CURVE: {met(curve)}; fsync at the default 50 ms "
               f"group commit: {met(fsync)}; fsync with `commit_interval_s=0.2`: {met(slow)}. Commits (and their "
               "fsyncs, see store_fsync) run in a commit thread while the server goes on "
               "receiving and staging the next chunks; acks still wait for the commit to be durable. "
               "Load from other jobs on this 2-core box makes single rounds noisy.")  # fmt: skip
    table = "\n".join(lines) + "\n\n" + verdict
    print(table)
    if not args.no_write:
        write_section("reliability_cost", f"""## Reliability cost: CURVE and fsync on the ingest path (issue 10)

`python -m benchmarks.reliability_cost --chunks {args.chunks} --repeats {args.repeats}` on {machine_line()}:
one actor's real `Link` (disk spool) -> loopback TCP -> `IngestServer` -> `ReplayStore` (chunks of
{ROWS} rows, timed until all are acked, i.e. committed), the configurations interleaved; the load
average was {load_before:.1f} before and {os.getloadavg()[0]:.1f} after.

{table}
""")


def versus(args) -> None:
    """This tree's and ``args.versus``'s own reliability_cost, one round each, alternating; prints
    the fsync off/on medians of both (open link) and writes them after the usual section."""
    import re
    import subprocess

    from .versus_commit import ROOT, checkout, run

    def rates(out: str) -> dict[str, float]:
        rows = re.findall(r"^\| (open, (?:no )?fsync) \| ([\d,]+) \|", out, re.M)
        return {name: float(value.replace(",", "")) for name, value in rows}

    args.versus = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.versus], capture_output=True,
                                 text=True, check=True).stdout.strip()  # a name that stays true in BENCHMARKS.md
    cmd = ["-m", "benchmarks.reliability_cost", "--chunks", str(args.chunks), "--repeats", "1", "--no-write"]
    found: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    with tempfile.TemporaryDirectory(prefix="o2o-versus-") as tmp:
        shim = checkout(args.versus, Path(tmp))
        for package in ("experiments", "launch"):  # packages versus_commit's shim does not map (yet)
            if (Path(tmp) / "tree" / package).is_dir() and not (shim / "o2o" / package).exists():
                (shim / "o2o" / package).symlink_to(Path(tmp) / "tree" / package)
        sides = {"old": (Path(tmp) / "tree", shim), "new": (ROOT, None)}
        try:
            for r in range(args.repeats):
                for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    for name, rate in rates(run(*sides[side], cmd)).items():
                        found[side].setdefault(name, []).append(rate)
                    print(f"round {r} {side}: {[(k, v[-1]) for k, v in found[side].items()]}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "tree")])
    med = {side: {k: statistics.median(v) for k, v in d.items()} for side, d in found.items()}
    lines = [f"| open link, one actor | {args.versus} (rows/s) | this tree (rows/s) | new / old |", "|---|---|---|---|"]
    for name in ("open, no fsync", "open, fsync"):
        lines.append(f"| {name} | {med['old'][name]:,.0f} | {med['new'][name]:,.0f} | "
                     f"{med['new'][name] / med['old'][name]:.2f} |")  # fmt: skip
    for side, label in (("old", args.versus), ("new", "this tree")):
        cost = 1 - med[side]["open, fsync"] / med[side]["open, no fsync"]
        lines.append(f"fsync cost, {label}: {cost:.0%} ({'under' if cost < 0.2 else 'NOT under'} the 20% goal)")
    table = "\n".join(lines[:4]) + "\n\n" + "; ".join(lines[4:]) + "."
    print(table)
    if not args.no_write:
        write_section("reliability_versus", f"""## fsync cost before and after the commit thread (issue 19), side by side

`python -m benchmarks.reliability_cost --versus {args.versus} --chunks {args.chunks} --repeats {args.repeats}` on
{machine_line()}: each tree's own `benchmarks.reliability_cost --repeats 1` (one actor's `Link` -> `IngestServer`
-> `ReplayStore`, 256-row chunks, timed until all are acked), alternating old / new, medians of the rounds.

{table}
""")


if __name__ == "__main__":
    main()
